"""Extensions as Neon's owner role has them: every allow-listed extension the installation has is
created by the project's owner (not a superuser) through the real proxy, and none of them opens a
way to the OS, the files or superuser: the isolation checks run after all of them are installed,
and an owner who sets traps for the superuser-run install scripts catches nothing."""

from __future__ import annotations

import itertools
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
        for name in support.gucs:  # every platform setting is beyond the owner's reach
            with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.CantChangeRuntimeParam)):
                conn.execute("select set_config(%s, 'plpython3u', false)", (name,))
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


def install_scripts(conn: psycopg.Connection[Any], name: str, directories: list[Path]) -> list[Path]:
    """The scripts CREATE EXTENSION runs for `name`'s default version: a base script and its update path."""
    default = conn.execute("select default_version from pg_available_extensions where name = %s",
                           (name,)).fetchone()
    files = {p.name: p for d in directories for p in d.glob(f"{name}--*.sql")}
    assert default is not None and files, name
    if f"{name}--{default[0]}.sql" in files:
        return [files[f"{name}--{default[0]}.sql"]]
    for base in sorted(f.removeprefix(f"{name}--").removesuffix(".sql") for f in files if f.count("--") == 1):
        row = conn.execute("select path from pg_extension_update_paths(%s) where source = %s and target = %s",
                           (name, base, default[0])).fetchone()
        if row and row[0]:
            hops = row[0].split("--")
            return [files[f"{name}--{base}.sql"]] + [files[f"{name}--{a}--{b}.sql"] for a, b in itertools.pairwise(hops)]
    raise AssertionError(f"no install path for {name}")


def trap_names(conn: psycopg.Connection[Any], scripts: list[Path]) -> set[str]:
    """Functions of pg_catalog the scripts call without defining them: where a better-matching function
    in the target schema would be called instead, by the superuser running the script."""
    calls: set[str] = set()
    defined: set[str] = set()
    for script in scripts:
        text = script.read_text(errors="replace")
        calls |= {m.lower() for m in _CALL.findall(text)}
        defined |= {m.lower() for m in _DEFINED.findall(text)}
    catalog = {r[0] for r in conn.execute(
        "select distinct proname from pg_proc where pronamespace = 'pg_catalog'::regnamespace").fetchall()}
    return (calls - defined) & catalog


# A trap must match a script's call better than the pg_catalog function it meant: an exact type where
# pg_catalog's needs an implicit cast. One and two arguments of the types scripts pass.
TRAP_TYPES = ("integer", "bigint", "smallint", "text", "numeric", "double precision", "oid", "boolean")
TRAP_SIGNATURES = ("", *TRAP_TYPES, *(f"{a}, {b}" for a in TRAP_TYPES for b in TRAP_TYPES))


def plant_traps(conn: psycopg.Connection[Any], schema: str, names: set[str]) -> None:
    """Functions recording who calls them and whether as a superuser, into public.caught."""
    for trap in sorted(names):
        for args in TRAP_SIGNATURES:
            conn.execute(sql.SQL(
                "create or replace function {}.{}({}) returns text language sql as "
                "$$ insert into public.caught select current_user, rolsuper::text from pg_roles "
                "where rolname = current_user "
                "returning 'x' $$").format(sql.Identifier(schema), sql.Identifier(trap), sql.SQL(args)))


def test_traps_for_install_scripts_catch_nothing(platform: RunningPlatform, versioned: dict[str, Any]) -> None:
    """CVE-2023-39417's class: the owner plants functions named like the pg_catalog functions the
    superuser-run install scripts call (with exact argument types, which beat pg_catalog's where it
    needs a cast) in the target schema, and tries schemas whose names break out of quoting, then creates every
    platform-trusted extension there. Nothing runs as a superuser on the owner's behalf."""
    version = versioned["project"]["pg_version"]
    support = platform.plane.extensions[version]
    # pg_cron's schema is fixed (pg_catalog, where nobody else can create anything).
    elevated = [o.name for o in support.offered if o.trusted_by == "platform" and o.name != "pg_cron"]
    if not elevated:
        pytest.skip(f"no platform-trusted extension on PostgreSQL {version} here")
    directories = [extensions._install_dirs(platform.plane.installs[version]).extension_dir,
                   platform.plane.layout.runtime_dir / "extensions" / f"pg{version}" / "extension"]
    refused: list[tuple[str, str, str]] = []
    with psycopg.connect(platform.dsn(versioned), autocommit=True) as conn:
        traps = {name: trap_names(conn, install_scripts(conn, name, directories)) for name in elevated}
        assert any(traps.values())
        conn.execute("create table caught (who text, su text)")
        conn.execute("grant insert on caught to public")
        for schema in ("public", "x'; alter role neondb_owner superuser; --", 'y"$z\\'):
            conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
            for name in elevated:
                if schema != "public" and name == "postgis":
                    continue  # its script is long: the plain schema is enough
                plant_traps(conn, schema, traps[name])
                conn.execute(sql.SQL("set search_path = {}, public").format(sql.Identifier(schema)))
                try:
                    conn.execute(sql.SQL("create extension if not exists {} schema {} cascade").format(
                        sql.Identifier(name), sql.Identifier(schema)))
                except psycopg.Error as exc:
                    refused.append((schema, name, str(exc).splitlines()[0]))
                conn.execute(sql.SQL("drop extension if exists {} cascade").format(sql.Identifier(name)))
                conn.execute("reset search_path")
        assert conn.execute("select * from caught where su = 'true'").fetchall() == []
        assert conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone() == (False,)
    # A trap may make a script's call ambiguous, and pgextwlist will not put a hostile schema name into
    # its scripts: refusals are fine, obedience is not. Most extensions install despite the traps.
    in_public = [r for r in refused if r[0] == "public"]
    assert len(in_public) < len(elevated), in_public


def test_traps_catch_a_careless_install_script(platform: RunningPlatform) -> None:
    """The traps above work: a platform-trusted extension whose script calls round(42) unqualified
    (pg_catalog's round wants numeric) runs the owner's round(integer) as superuser."""
    if 18 not in platform.plane.installs:
        pytest.skip("PostgreSQL 18 is not installed here")
    overlay = Path(platform.plane.extensions[18].gucs["extension_control_path"].split(":")[0]) / "extension"
    files = {overlay / "argon_careless.control": "default_version = '1.0'\ntrusted = true\n",
             overlay / "argon_careless--1.0.sql": "SELECT round(42);\n"}
    created = platform.create_project(pg_version=18, name="careless")
    try:
        for path, text in files.items():
            path.write_text(text)
        with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
            conn.execute("create table caught (who text, su text)")
            traps = trap_names(conn, install_scripts(conn, "argon_careless", [overlay]))
            assert traps == {"round"}
            plant_traps(conn, "public", traps)
            conn.execute("create extension argon_careless")
            assert ("cloud_admin", "true") in conn.execute("select who, su from caught").fetchall()
    finally:
        for path in files:
            path.unlink(missing_ok=True)
        platform.delete_project(created["project"]["id"])


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


def test_schema_only_branch_keeps_the_extensions(platform: RunningPlatform, versioned: dict[str, Any]) -> None:
    """A schema-only branch restores the parent's DDL on a platform-internal compute: the extensions,
    those the platform trusts and pg_cron (which only loads preloaded) included, come along."""
    from tests.integration.test_branches import branch, scalar, uri_of

    pid = versioned["project"]["id"]
    offered = {e["name"] for e in available(platform, versioned)["extensions"]}
    wanted = [n for n in ("pgcrypto", "vector", "pg_stat_statements", "bloom", "pg_cron") if n in offered]
    with psycopg.connect(platform.dsn(versioned), autocommit=True) as conn:
        for name in wanted:
            conn.execute(sql.SQL("create extension {}").format(sql.Identifier(name)))
        if "vector" in offered:
            conn.execute("create table docs (id int, embedding vector(3))")
    child = branch(platform, pid, name="schema", init_source="schema-only")
    uri = uri_of(child)
    assert sorted(scalar(uri, "select array_agg(extname::text) from pg_extension where extname <> 'plpgsql'")) \
        == sorted(wanted)
    if "vector" in offered:
        assert scalar(uri, "select count(*) from docs") == 0
    if "pgcrypto" in offered:
        assert scalar(uri, "select length(gen_random_bytes(4))") == 4


def test_api_roles_are_neon_superusers_without_a_superuser_path(platform: RunningPlatform,
                                                                versioned: dict[str, Any]) -> None:
    """A role made through the API is in neon_superuser, as on Neon: it creates schemas and
    allow-listed extensions in the project's databases and reads and writes every table; still no
    program, file or superuser, and row security still holds (pg_cron's jobs as the platform role)."""
    pid, branch = versioned["project"]["id"], versioned["branch"]["id"]
    version = versioned["project"]["pg_version"]
    body = available(platform, versioned)
    offered = {e["name"] for e in body["extensions"]}
    made = platform.api.post(f"/projects/{pid}/branches/{branch}/roles", json={"role": {"name": "app"}})
    assert made.status_code == 201, made.text
    assert platform.api.post(f"/projects/{pid}/branches/{branch}/databases",
                             json={"database": {"name": "appdb", "owner_name": "neondb_owner"}}).status_code == 201
    assert "neon_superuser" not in {r["name"] for r in platform.api.get(
        f"/projects/{pid}/branches/{branch}/roles").json()["roles"]}
    with psycopg.connect(platform.dsn(versioned), autocommit=True) as owner:
        owner.execute("create table owned (x int)")
        owner.execute("insert into owned values (1)")
        if "pg_cron" in offered:
            owner.execute("create extension pg_cron")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # row security: only its own jobs
                owner.execute("insert into cron.job (schedule, command, nodename, nodeport, database, username) "
                              "values ('* * * * *', 'select 1', '', 0, 'neondb', 'cloud_admin')")
    for database in ("neondb", "appdb"):
        uri = platform.api.get(f"/projects/{pid}/connection_uri", params={
            "branch_id": branch, "role_name": "app", "database_name": database}).json()["uri"]
        with psycopg.connect(uri, autocommit=True) as app:
            assert app.execute("select pg_has_role('neon_superuser', 'member'), rolsuper, rolcreatedb "
                               "from pg_roles where rolname = current_user").fetchone() == (True, False, True)
            app.execute("create schema app_schema")
            app.execute("create extension bloom schema app_schema" if "bloom" in offered else "select 1")
            app.execute("create extension if not exists pg_trgm schema app_schema")
            if database == "neondb":
                app.execute("insert into owned values (2)")  # pg_write_all_data, as Neon's roles
                assert app.execute("select count(*) from owned").fetchone() == (2,)
                assert_isolated(app)
    if version >= 18 and "postgis" in body["not_available"]:
        with psycopg.connect(platform.dsn(versioned), autocommit=True) as owner:
            with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
                owner.execute("create extension postgis")
            assert f"not available on PostgreSQL {version}" in str(err.value)
            if "postgis" in body["other_versions"]:
                assert f"PostgreSQL {body['other_versions']['postgis'][0]}" in str(err.value.diag.message_hint)
