"""Pure parts of schemas: conninfo quoting of hostile database names, neonctl-shaped diffs."""

from __future__ import annotations

from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from argon.cli.schema_diff import unified
from argon.control.schema import _dsn


def test_a_database_name_is_never_read_as_connection_parameters() -> None:
    for name in ("host=/tmp dbname=postgres", "a'b\\c", "x' host='/elsewhere", 'we"ird'):
        parsed = conninfo_to_dict(_dsn(Path("/run/argon/ep-1"), name))
        assert parsed["dbname"] == name and parsed["host"] == "/run/argon/ep-1"


def test_unified_diff_is_headed_like_neonctl() -> None:
    lines = unified("neondb", "CREATE TABLE t (\n    a int\n);\n", "CREATE TABLE t (\n    a int,\n    b int\n);\n",
                    "(Branch: main)", "(Branch: dev at 0/1A2B3C)")
    assert lines[:2] == ["--- Database: neondb\t(Branch: main)", "+++ Database: neondb\t(Branch: dev at 0/1A2B3C)"]
    assert "+    b int" in lines and "-    a int" in lines and lines[2].startswith("@@")
    same = unified("neondb", "x\n", "x\n", "(Branch: main)", "(Branch: main)")
    assert same == ["--- Database: neondb\t(Branch: main)", "+++ Database: neondb\t(Branch: main)"]
