"""`python -m tests.fuzz.run <target> [libFuzzer options] <dirs>`: one target under atheris, with
coverage from Argon's own modules only (instrumenting every library would take most of a minute)."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["argon"]):
    from tests.fuzz.targets import TARGETS


def main(argv: list[str]) -> None:
    atheris.Setup([argv[0], *argv[2:]], TARGETS[argv[1]])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
