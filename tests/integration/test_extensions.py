"""Extensions as Neon's owner role has them: every allow-listed extension the installation has is
created by the project's owner (not a superuser) through the real proxy, and none of them opens a
way to the OS, the files or superuser: the isolation checks run after all of them are installed,
and an owner who sets traps for the superuser-run install scripts catches nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from argon.compute import extensions
from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.pg, pytest.mark.slow]

# What the issue names: the owner creates each of these wherever the installation has it.
REQUIRED = ("pgcrypto", "uuid-ossp", "vector", "pg_stat_statements", "hstore", "citext", "pg_trgm", "btree_gin",
            "btree_gist", "unaccent", "bloom", "postgis", "pg_cron")

# A first use of some of them, as apps do it.
SMOKE = {
    "pgcrypto": "select encode(digest('abc', 'sha256'), 'hex') = "
                "'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad' "
                "and crypt('pw', gen_salt('bf')) like '$2a$%' and pgp_sym_decrypt(pgp_sym_encrypt('s', 'k'), 'k') = 's'",
    "uuid-ossp": "select uuid_generate_v4()::text ~ '^[0-9a-f-]{36}$' and uuid_generate_v5(uuid_ns_url(), 'x') = "
                 "'4cd605e7-afa2-5360-b5b9-c5e9fb5c76f4'",
    "vector": "select '[1,2,3]'::vector <-> '[1,2,4]'::vector = 1",
    "pg_stat_statements": "select count(*) >= 0 from pg_stat_statements",
    "hstore": "select ('a=>1'::hstore) -> 'a' = '1'",
    "citext": "select 'A'::citext = 'a'::citext",
    "pg_trgm": "select similarity('word', 'words') > 0.5",
    "bloom": "create table bloom_t (a int, b int); create index on bloom_t using bloom (a, b); "
             "select count(*) = 1 from pg_indexes where tablename = 'bloom_t'",
    "postgis": "select ST_Distance('POINT(0 0)'::geometry, 'POINT(3 4)'::geometry) = 5",
    "pg_cron": "select cron.schedule('argon-test', '0 3 * * *', 'select 1') > 0",
}


def available(platform: RunningPlatform, created: dict[str, Any]) -> dict[str, Any]:
    resp = platform.api.get(f"/projects/{created['project']['id']}/available_extensions")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def installed_here(platform: RunningPlatform, version: int) -> set[str]:
    """The allow-listed extensions this machine's installation (or its donor build) has files for."""
    install = platform.plane.installs[version]
    dirs = extensions._install_dirs(install)
    names = {p.name.removesuffix(".control") for p in dirs.extension_dir.glob("*.control")}
    if version >= extensions.OVERLAY_FIRST_VERSION and extensions.donor_archive(version) is not None:
        names |= set(extensions.DONATED)
    return names & set(extensions.ALLOW_LIST)


@pytest.fixture(params=[15, 18])
def versioned(platform: RunningPlatform, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    if request.param not in platform.plane.installs:
        pytest.skip(f"PostgreSQL {request.param} is not installed here")
    created = platform.create_project(pg_version=request.param, name=f"ext{request.param}")
    yield created
    platform.delete_project(created["project"]["id"])


def test_allow_list_never_names_a_dangerous_extension() -> None:
    assert not set(extensions.ALLOW_LIST) & extensions.NEVER
    assert set(REQUIRED) <= set(extensions.ALLOW_LIST)


def test_default_version_has_what_first_migrations_create(platform: RunningPlatform) -> None:
    """The version a project gets by default offers pgcrypto, uuid-ossp and vector."""
    created = platform.create_project(name="default-ext")
    try:
        names = {e["name"] for e in available(platform, created)["extensions"]}
        assert {"pgcrypto", "uuid-ossp", "vector"} <= names, names
    finally:
        platform.delete_project(created["project"]["id"])


def test_owner_creates_every_offered_extension(platform: RunningPlatform, versioned: dict[str, Any]) -> None:
    version = versioned["project"]["pg_version"]
    body = available(platform, versioned)
    offered = {e["name"]: e for e in body["extensions"]}
    support = platform.plane.extensions[version]
    if support.mechanism != "none":
        # Everything on the list the installation has is offered (pgextwlist is installed where CI runs 15).
        assert installed_here(platform, version) <= set(offered), installed_here(platform, version) - set(offered)
    assert set(body["not_available"]) == set(extensions.ALLOW_LIST) - set(offered)
    assert offered["pg_stat_statements"]["preloaded"] is True

    with psycopg.connect(platform.dsn(versioned), autocommit=True) as conn:
        assert conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone() == (False,)
        for name in sorted(offered):
            conn.execute(sql.SQL("create extension if not exists {} cascade").format(sql.Identifier(name)))
        created = {r[0] for r in conn.execute("select extname from pg_extension").fetchall()}
        assert set(offered) <= created
        for name, query in SMOKE.items():
            if name in offered:
                *setup, check = query.split("; ")
                for statement in setup:
                    conn.execute(statement)
                assert conn.execute(check).fetchone() == (True,), name
        assert conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone() == (False,)
        assert_isolated(conn)
        conn.execute("select pg_stat_statements_reset()")  # granted to the database's owner, as Neon does
        if "pg_cron" in offered:
            # Jobs run as the role that scheduled them; scheduling as the platform's role is refused.
            with pytest.raises(psycopg.Error):
                conn.execute("select cron.schedule_in_database('x', '* * * * *', 'select 1', 'neondb', 'cloud_admin')")
        # The owner can drop what it created, one by one, dependents first.
        for name in sorted(offered, key=lambda n: n in ("cube", "postgis")):
            conn.execute(sql.SQL("drop extension if exists {} cascade").format(sql.Identifier(name)))


def assert_isolated(conn: psycopg.Connection[Any]) -> None:
    """With every offered extension installed, the owner still reaches no program, file or superuser."""
    denied = [
        "copy (select 1) to program 'id'",
        "select pg_read_file('PG_VERSION')",
        "select pg_ls_dir('.')",
        "create function argon_c() returns int language c as 'libc.so.6', 'getpid'",
        "grant pg_execute_server_program to current_user",
        "grant pg_read_server_files to current_user",
        "alter system set shared_preload_libraries = ''",
        "set extension_control_path = '/tmp'",
        "set dynamic_library_path = '/tmp'",
        "set session_preload_libraries = 'pgextwlist'",
        "alter role current_user set session_preload_libraries = 'pg_stat_statements'",
    ]
    for statement in denied:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(statement)
        assert isinstance(info.value, (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFunction,
                                       psycopg.errors.UndefinedObject, psycopg.errors.CantChangeRuntimeParam)), \
            (statement, info.value)
    have = {r[0] for r in conn.execute("select name from pg_available_extensions").fetchall()}
    for name in sorted(extensions.NEVER & have):
        with pytest.raises(psycopg.Error):
            conn.execute(sql.SQL("create extension {}").format(sql.Identifier(name)))
    with pytest.raises(psycopg.Error):
        conn.execute("create language plpython3u")


_CALL = re.compile(r"\b([a-z_][a-z0-9_]*)\s*\(", re.IGNORECASE)
_DEFINED = re.compile(r"create\s+(?:or\s+replace\s+)?(?:function|procedure|aggregate)\s+(?:[a-z0-9_@\"]+\.)?"
                      r"\"?([a-z_][a-z0-9_]*)", re.IGNORECASE)


def called_names(version: int, names: list[str], platform: RunningPlatform) -> set[str]:
    """Functions the install scripts of `names` call without defining them (trap candidates)."""
    dirs = [extensions._install_dirs(platform.plane.installs[version]).extension_dir,
            platform.plane.layout.runtime_dir / "extensions" / f"pg{version}" / "extension"]
    calls: set[str] = set()
    defined: set[str] = set()
    for name in names:
        for directory in dirs:
            for script in directory.glob(f"{name}--*.sql"):
                text = script.read_text(errors="replace")
                calls |= {m.lower() for m in _CALL.findall(text)}
                defined |= {m.lower() for m in _DEFINED.findall(text)}
    keywords = {"create", "function", "returns", "table", "values", "in", "as", "and", "or", "not", "exists",
                "cast", "array", "row", "select", "coalesce", "nullif", "greatest", "least", "any", "all", "over",
                "filter", "with", "using", "on", "char", "varchar", "numeric", "decimal", "timestamp", "time",
                "interval", "bit", "float", "double", "precision", "setof", "if", "case", "type", "operator",
                "index", "view", "language", "procedure", "aggregate", "trigger", "default", "check", "primary",
                "key", "references", "unique", "grouping", "extract", "overlay", "position", "substring", "trim",
                "collate", "insert", "into", "update", "delete", "from", "where", "set", "policy"}
    return {c for c in calls - defined - keywords if len(c) > 2}


# Polymorphic arguments match without a cast: a trap wins wherever the script's call needs one.
TRAP_SIGNATURES = ("", "anyelement", "anyelement, anyelement", "anyelement, anyelement, anyelement", "text",
                   "text, text")


def test_traps_for_install_scripts_catch_nothing(platform: RunningPlatform, versioned: dict[str, Any]) -> None:
    """CVE-2023-39417's class: the owner plants functions named like those the superuser-run install
    scripts call (with polymorphic arguments) in the target schema, and a schema whose
    name tries to break out of quoting, then creates every platform-trusted extension there. Nothing
    runs as a superuser on the owner's behalf."""
    version = versioned["project"]["pg_version"]
    support = platform.plane.extensions[version]
    elevated = [o.name for o in support.offered if o.trusted_by == "platform" and o.name != "pg_cron"]
    if not elevated:
        pytest.skip(f"no platform-trusted extension on PostgreSQL {version} here")
    traps = called_names(version, elevated, platform)
    assert traps
    with psycopg.connect(platform.dsn(versioned), autocommit=True) as conn:
        conn.execute("create table caught (who text, su text)")
        conn.execute("grant insert on caught to public")
        refused: list[tuple[str, str, str]] = []
        for schema in ("public", "x'; alter role neondb_owner superuser; --", 'y"$z\\'):
            conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
            for trap in sorted(traps):
                for args in TRAP_SIGNATURES:
                    conn.execute(sql.SQL(
                        "create or replace function {}.{}({}) returns text language sql as "
                        "$$ insert into public.caught values (current_user, current_setting('is_superuser')) "
                        "returning 'x' $$").format(sql.Identifier(schema), sql.Identifier(trap), sql.SQL(args)))
            conn.execute(sql.SQL("set search_path = {}, public").format(sql.Identifier(schema)))
            for name in elevated:
                try:
                    conn.execute(sql.SQL("create extension if not exists {} schema {} cascade").format(
                        sql.Identifier(name), sql.Identifier(schema)))
                except psycopg.Error as exc:
                    refused.append((schema, name, str(exc).splitlines()[0]))
                conn.execute(sql.SQL("drop extension if exists {} cascade").format(sql.Identifier(name)))
            conn.execute("reset search_path")
        assert conn.execute("select * from caught where su = 'on'").fetchall() == []
        assert conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone() == (False,)
    # A trap may make a script's call ambiguous, and pgextwlist will not put a hostile schema name into
    # its scripts: refusals are fine, obedience is not. Most extensions install despite the traps.
    in_public = [r for r in refused if r[0] == "public"]
    assert len(in_public) < len(elevated), in_public


def test_role_the_owner_creates_can_create_extensions(platform: RunningPlatform, versioned: dict[str, Any]) -> None:
    version = versioned["project"]["pg_version"]
    if version < 16:
        pytest.skip("on PostgreSQL 15 the owner cannot create roles (CREATEROLE could grant server programs)")
    offered = {e["name"] for e in available(platform, versioned)["extensions"]}
    with psycopg.connect(platform.dsn(versioned), autocommit=True) as conn:
        conn.execute("create role app_dev login")
        conn.execute("grant create on database neondb to app_dev")
        conn.execute("grant app_dev to current_user")
        conn.execute("set role app_dev")
        for name in ("bloom", "pgcrypto") if "pgcrypto" in offered else ("bloom",):
            conn.execute(sql.SQL("create extension {}").format(sql.Identifier(name)))
        assert conn.execute("select rolsuper from pg_roles where rolname = 'app_dev'").fetchone() == (False,)


def test_platform_directory_is_not_writable_by_computes(platform: RunningPlatform) -> None:
    for version, support in platform.plane.extensions.items():
        path = support.gucs.get("extension_control_path", "").split(":")[0]
        if not path:
            continue
        for entry in [Path(path), *Path(path).rglob("*")]:
            mode = entry.stat().st_mode
            assert not mode & 0o022, (version, entry)
