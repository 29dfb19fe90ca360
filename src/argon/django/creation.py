"""The test database as a branch: Django's DatabaseCreation with create, clone and destroy done
through the API (docs/adr/0014-django-test-databases-as-branches.md).

`install()` gives each PostgreSQL connection a subclass of its backend's own creation class. For
an Argon or Neon endpoint, creating the test database means: find the template branch for this
migration state (or build it once: a branch of the connection's branch, Django's own
`create_test_db` run on it, its compute removed, then published by renaming), branch it, rename
the database inside to the test database's name, and point the connection at the new branch's
endpoint. Clones for `--parallel` are more branches of the template; destroying deletes the
branch. Everything else (plain PostgreSQL, no API key, an API that does not answer) keeps
Django's behaviour after a one-line notice.

The run's branches live in the connection's settings dict under STATE_KEY, so they travel to
`--parallel` workers with the settings (forked or spawned) and back to teardown.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

from argon.django.api import Api, ApiError, expiry, find_credentials
from argon.django.connstr import find_endpoint, retarget
from argon.django.keys import TEMPLATE_DB, BranchNames, migration_state, names_for

STATE_KEY = "ARGON_TEST_BRANCHES"
RUN_HOURS = 24  # a run's branches expire after this, should the run be killed before its teardown
TEMPLATES_KEPT = 3  # per base branch and alias: the current template and the two newest before it
_CONNECTION_KEYS = ("NAME", "HOST", "PORT", "PASSWORD", "OPTIONS")


@dataclass
class Target:
    """Where one alias's test branches come from, resolved once at install."""

    api: Api
    project_id: str
    base: dict[str, Any]  # the branch the configured endpoint belongs to
    original: dict[str, Any]  # the alias's connection settings before any test database
    workers: int = 0  # --parallel N, when the runner says: clones 2..N are then made at once
    listed: list[dict[str, Any]] | None = None  # the project's branches as install() read them: the first look-up's


def _snapshot(settings_dict: dict[str, Any]) -> dict[str, Any]:
    out = {k: settings_dict.get(k) for k in _CONNECTION_KEYS}
    out["OPTIONS"] = dict(settings_dict.get("OPTIONS") or {})
    out["TEST"] = dict(settings_dict.get("TEST") or {})
    out["USER"] = settings_dict.get("USER")
    return out


def clone_settings(settings_dict: dict[str, Any], suffix: object) -> dict[str, Any] | None:
    """The settings of --parallel clone `suffix`, if this run made it as a branch."""
    clone = ((settings_dict.get(STATE_KEY) or {}).get("clones") or {}).get(str(suffix))
    return None if clone is None else {**settings_dict, **clone["settings"]}


class BranchCreation:
    """Mixed in before the backend's DatabaseCreation (see `wrap`); `argon` None = Django's way."""

    argon: Target | None = None
    connection: Any
    _argon_building = False
    _argon_deletes: ThreadPoolExecutor | None = None  # teardown's deletes, side by side

    # Django's entry points -------------------------------------------------------------------------

    def create_test_db(self, verbosity: int = 1, autoclobber: bool = False, serialize: bool = True,
                       keepdb: bool = False) -> str:
        if self.argon is None:
            return super().create_test_db(verbosity, autoclobber, serialize, keepdb)  # type: ignore[misc]
        from django.conf import settings
        from django.core.management import call_command

        started = time.monotonic()
        test_name = self._get_test_db_name()  # type: ignore[attr-defined]
        try:
            names = names_for(project_id=self.argon.project_id, base_branch_id=self.argon.base["id"],
                              user=str(self.argon.original["USER"]),
                              alias=self.connection.alias, state=migration_state(self.connection))
            workers = self.argon.workers
            made = self._acquire_all(names, test_name, keepdb=keepdb, verbosity=verbosity, run_name=names.run(),
                                     suffixes=[None, *(str(n) for n in range(2, workers + 1))])
        except ApiError as exc:
            self._fail(exc, keepdb)
        record = made.pop(None)
        self.connection.settings_dict[STATE_KEY] = {"ident": names.ident, "state": names.state, "main": record,
                                                    "clones": made}
        try:
            self._point(record["settings"])
            settings.DATABASES[self.connection.alias]["NAME"] = test_name
            if verbosity >= 1:
                action = "Using existing" if record["reused"] else "Creating"
                self.log(f"{action} test database for alias {self._get_database_display_str(verbosity, test_name)} "  # type: ignore[attr-defined]
                         f"on branch {record['name']!r}...")
            if serialize:
                self.connection._test_serialized_contents = self.serialize_db_to_string()  # type: ignore[attr-defined]
            call_command("createcachetable", database=self.connection.alias)
            self.connection.ensure_connection()
        except BaseException:
            self._abandon(keepdb)
            raise
        if verbosity >= 2:
            self.log(f"argon: test database ready in {time.monotonic() - started:.2f} s")
        return test_name

    def clone_test_db(self, suffix: object, verbosity: int = 1, autoclobber: bool = False,
                      keepdb: bool = False) -> None:
        state = self.connection.settings_dict.get(STATE_KEY)
        if self.argon is None or state is None:
            return super().clone_test_db(suffix, verbosity, autoclobber, keepdb)  # type: ignore[misc]
        test_name = self.connection.settings_dict["NAME"]
        if str(suffix) == "1":
            # Worker 1 takes the run's own branch: once the clones exist nothing else uses it (the
            # parent only serializes it, before the workers start), so N workers cost N branches.
            state["clones"]["1"] = {**state["main"], "shared": True}
            if verbosity >= 1:
                self.log(f"Using the test database for alias {self._get_database_display_str(verbosity, test_name)} "  # type: ignore[attr-defined]
                         f"as clone 1 (branch {state['main']['name']!r})...")
            return None
        record = state["clones"].get(str(suffix))  # made with the run's branch when the runner said N
        if record is None:
            names = BranchNames(state["ident"], state["state"])
            try:
                record = self._acquire(names, test_name, keepdb=keepdb, suffix=str(suffix),
                                       run_name=f"{state['main']['name']}-{suffix}", verbosity=verbosity,
                                       template_id=state["main"]["template_id"])
            except ApiError as exc:
                self._fail(exc, keepdb)
            except BaseException:
                self._abandon(keepdb)
                raise
        state["clones"][str(suffix)] = record
        if verbosity >= 1:
            action = "Using existing clone" if record["reused"] else "Cloning test database"
            self.log(f"{action} for alias {self._get_database_display_str(verbosity, test_name)} "  # type: ignore[attr-defined]
                     f"as branch {record['name']!r}...")
        return None

    def get_test_db_clone_settings(self, suffix: object) -> dict[str, Any]:
        found = clone_settings(self.connection.settings_dict, suffix)
        return found if found is not None else super().get_test_db_clone_settings(suffix)  # type: ignore[misc]

    def destroy_test_db(self, old_database_name: str | None = None, verbosity: int = 1, keepdb: bool = False,
                        suffix: object = None) -> None:

        state = self.connection.settings_dict.get(STATE_KEY)
        if self.argon is None or state is None:
            return super().destroy_test_db(old_database_name, verbosity, keepdb, suffix)  # type: ignore[misc]
        self._close()
        record = state["main"] if suffix is None else state["clones"].get(str(suffix))
        if record is not None and not record.get("shared"):
            if verbosity >= 1:
                self.log(f"{'Preserving' if keepdb else 'Destroying'} test database for alias "
                         f"{self._get_database_display_str(verbosity, record['settings']['NAME'])} "  # type: ignore[attr-defined]
                         f"(branch {record['name']!r})...")
            if not keepdb:
                self._delete_soon(record)  # Django destroys the clones one by one: their deletes overlap
        if suffix is None:
            if not keepdb:  # clones Django did not ask to destroy (it asks for those it cloned)
                for clone in state["clones"].values():
                    if not clone.get("shared"):
                        self._delete_soon(clone)
            self._deletes_done()
            self._restore(old_database_name)
        return None

    def set_as_test_mirror(self, primary_settings_dict: dict[str, Any]) -> None:
        """A mirror reads the primary's test database: on its branch, so the same endpoint too."""
        super().set_as_test_mirror(primary_settings_dict)  # type: ignore[misc]
        if STATE_KEY in primary_settings_dict:
            for key in ("HOST", "PORT", "USER", "PASSWORD"):
                self.connection.settings_dict[key] = primary_settings_dict[key]
            self.connection.settings_dict["OPTIONS"] = dict(primary_settings_dict["OPTIONS"])

    def test_db_signature(self) -> tuple[Any, ...]:
        """Django tells test databases apart by host, port and name; Argon's local connection
        strings differ only by the endpoint in `options`, so it is part of the signature too."""
        ref = find_endpoint(self.argon.original if self.argon else self.connection.settings_dict)
        return (*super().test_db_signature(), ref.endpoint_id if ref else None)  # type: ignore[misc]

    def log(self, msg: str) -> None:
        if self._argon_building and msg.startswith("Creating test database"):
            return  # the template's own creation: the runner says "Building ..." instead
        super().log(msg)  # type: ignore[misc]

    # Branches --------------------------------------------------------------------------------------

    def _acquire(self, names: BranchNames, test_name: str, *, keepdb: bool, suffix: str | None, run_name: str,
                 verbosity: int, template_id: str | None = None, rebuild: bool = True) -> dict[str, Any]:
        """A branch with a running compute whose database `test_name` is freshly migrated (or, with
        keepdb, the kept one). Returns its record: name, ids, the connection settings, reused, and
        the template it came from (`template_id`, known to save clones a look-up)."""
        assert self.argon is not None
        api, project = self.argon.api, self.argon.project_id
        if keepdb:
            name = names.keep(test_name, suffix)
            existing = self._find(name)
            if existing is not None:
                endpoints = [e for e in api.branch_endpoints(project, existing["id"]) if e["type"] == "read_write"]
                endpoint = endpoints[0] if endpoints else api.add_compute(project, existing["id"])
                return self._record(existing, endpoint["id"], test_name, reused=True)
            if suffix is None:
                self._collect(names.keep_prefix, keep=lambda n: n.startswith(names.keep_prefix + names.state))
        else:
            name = run_name
        template = {"id": template_id} if template_id else self._template(names, verbosity, test_name)
        started = time.monotonic()
        try:
            # The compute's start is not waited for: the first connection waits for it at the proxy,
            # and the API polls it would take are set-up time (ADR 0033).
            created = api.create_branch(project, name=name, parent_id=template["id"],
                                        expires_at=None if keepdb else expiry(RUN_HOURS), wait_start=False)
        except ApiError as exc:
            if exc.status != 404 or not rebuild:
                raise
            template = self._build(names, verbosity, test_name)  # the template was deleted meanwhile: build it again
            created = api.create_branch(project, name=name, parent_id=template["id"],
                                        expires_at=None if keepdb else expiry(RUN_HOURS), wait_start=False)
        created_at = time.monotonic()
        record = self._record(created["branch"], created["endpoints"][0]["id"], test_name, reused=False)
        record["template_id"] = template["id"]
        try:
            renamed = self._rename_database(record["settings"], [d["name"] for d in created.get("databases", [])],
                                            test_name)
        except BaseException:
            self._delete_quietly(record)
            raise
        if verbosity >= 3:
            self.log(f"argon: branch {name!r}: created with its compute starting in {created_at - started:.2f} s"
                     + (f", database renamed in {time.monotonic() - created_at:.2f} s" if renamed else ""))
        return record

    def _acquire_all(self, names: BranchNames, test_name: str, *, keepdb: bool, verbosity: int, run_name: str,
                     suffixes: list[str | None]) -> dict[str | None, dict[str, Any]]:
        """The run's branch (suffix None) and, with --parallel N, the clones 2..N, all at once: Argon
        copies one branch at a time, but the compute starts and the renames overlap. The template is
        found (or built) first, here, since only this thread may point the connection elsewhere."""
        if len(suffixes) == 1:
            return {None: self._acquire(names, test_name, keepdb=keepdb, suffix=None, run_name=run_name,
                                        verbosity=verbosity)}
        template_id = self._template(names, verbosity, test_name)["id"]
        with ThreadPoolExecutor(max_workers=len(suffixes), thread_name_prefix="argon-branch") as pool:
            futures = {sfx: pool.submit(self._acquire, names, test_name, keepdb=keepdb, suffix=sfx,
                                        run_name=run_name if sfx is None else f"{run_name}-{sfx}",
                                        verbosity=verbosity, template_id=template_id, rebuild=False)
                       for sfx in suffixes}
        made, failed = {}, None
        for sfx, future in futures.items():
            try:
                made[sfx] = future.result()
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            if not keepdb:
                for record in made.values():
                    self._delete_quietly(record)
            raise failed
        return made

    def _record(self, branch: dict[str, Any], endpoint_id: str, test_name: str, *, reused: bool) -> dict[str, Any]:
        assert self.argon is not None
        password = None
        if self.argon.base.get("protected"):  # Neon gives children of protected branches new passwords
            password = self.argon.api.reveal_password(self.argon.project_id, branch["id"],
                                                      str(self.argon.original["USER"]))
        target = retarget(self.argon.original, endpoint_id, pooled=False, password=password)
        conn = {k: target[k] for k in _CONNECTION_KEYS}
        conn["NAME"] = test_name
        return {"branch_id": branch["id"], "name": branch["name"], "endpoint_id": endpoint_id, "settings": conn,
                "reused": reused, "template_id": None}

    def _find(self, name: str, *, fresh: bool = True) -> dict[str, Any] | None:
        """The oldest branch called `name`; `fresh=False` may answer from the list install() read
        (once: a template found there is branched at once, and a 404 then builds it again)."""
        assert self.argon is not None
        listed, self.argon.listed = self.argon.listed, None
        if fresh or listed is None:
            listed = self.argon.api.branches(self.argon.project_id)
        found = [b for b in listed if b["name"] == name]
        return min(found, key=lambda b: (b.get("created_at") or "", b["id"])) if found else None

    def _template(self, names: BranchNames, verbosity: int, test_name: str) -> dict[str, Any]:
        found = self._find(names.template, fresh=False)
        if found is not None:
            if verbosity >= 2:
                self.log(f"argon: template {names.template!r} is up to date")
            return found
        return self._build(names, verbosity, test_name)

    def _build(self, names: BranchNames, verbosity: int, test_name: str) -> dict[str, Any]:
        """Migrate a new template on a builder branch and publish it by renaming; if another run
        published first (409), drop ours and use theirs. Its database has this run's test database
        name, so that runs with that name (the usual case) need not rename it."""
        from django.conf import settings

        assert self.argon is not None
        api, project = self.argon.api, self.argon.project_id
        started = time.monotonic()
        if verbosity >= 1:
            self.log(f"Building the test database template for alias {self.connection.alias!r} "
                     f"(branch {names.template!r}; first run for these migrations)...")
        created = api.create_branch(project, name=names.builder(), parent_id=self.argon.base["id"],
                                    expires_at=expiry(RUN_HOURS))
        builder = self._record(created["branch"], created["endpoints"][0]["id"], test_name, reused=False)
        saved = _snapshot(self.connection.settings_dict)
        try:
            for db in created.get("databases", []):  # the base's data is not the tests': keep templates small
                api.delete_database(project, builder["branch_id"], db["name"])
            self._point(builder["settings"])
            self.connection.settings_dict["TEST"] = {**saved["TEST"], "NAME": test_name}
            self._argon_building = True
            try:
                super().create_test_db(verbosity, autoclobber=True, serialize=False, keepdb=False)  # type: ignore[misc]
            finally:
                self._argon_building = False
            self._close()
            # Listing the databases while the compute runs records the one Django made with SQL in
            # the branch's metadata (a deleted endpoint's stop does not), which each run's branch
            # then lists: runs with the same test database name skip the rename.
            api.databases(project, builder["branch_id"])
            api.delete_endpoint(project, builder["endpoint_id"])  # a clean stop; branches then copy a stopped cluster
            try:
                template = api.update_branch(project, builder["branch_id"], name=names.template, expires_at=None)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                self._delete_quietly(builder)
                found = self._find(names.template)
                if found is None:
                    raise
                return found
        except BaseException as exc:
            self._close()
            self._delete_quietly(builder)
            self.log(f"argon: building the test database template failed ({type(exc).__name__}: {exc}); "
                     f"nothing was kept (branch {builder['name']!r} deleted)")
            raise
        finally:
            self.connection.settings_dict.update({k: saved[k] for k in _CONNECTION_KEYS})
            self.connection.settings_dict["TEST"] = saved["TEST"]
            settings.DATABASES[self.connection.alias]["NAME"] = saved["NAME"]
        if verbosity >= 1:
            self.log(f"argon: template {names.template!r} built in {time.monotonic() - started:.1f} s")
        self._collect(names.template_prefix, keep=lambda n: n == names.template or "-build-" in n,
                      spare=TEMPLATES_KEPT - 1)
        return template

    def _collect(self, prefix: str, *, keep: Any, spare: int = 0) -> None:
        """Delete branches named `prefix…` that `keep` rejects, but the `spare` newest of them.
        Best effort: a template that still has children (another run) stays."""
        assert self.argon is not None
        api, project = self.argon.api, self.argon.project_id
        try:
            stale = [b for b in api.branches(project) if b["name"].startswith(prefix) and not keep(b["name"])]
        except ApiError:
            return
        stale.sort(key=lambda b: b.get("created_at") or "", reverse=True)
        for branch in stale[spare:]:
            with contextlib.suppress(ApiError):
                api.delete_branch(project, branch["id"])

    def _delete_quietly(self, record: dict[str, Any]) -> None:
        if record.get("deleted"):
            return
        record["deleted"] = True
        self._delete_branch(record)

    def _delete_branch(self, record: dict[str, Any]) -> None:
        assert self.argon is not None
        try:
            self.argon.api.delete_branch(self.argon.project_id, record["branch_id"])
        except ApiError as exc:
            self.log(f"argon: could not delete branch {record['name']!r} ({exc}); it expires by itself")

    def _delete_soon(self, record: dict[str, Any]) -> None:
        """`_delete_quietly` in the background: `_deletes_done` waits for it."""
        if record.get("deleted"):
            return
        record["deleted"] = True
        if self._argon_deletes is None:
            self._argon_deletes = ThreadPoolExecutor(max_workers=8, thread_name_prefix="argon-delete")
        self._argon_deletes.submit(self._delete_branch, record)

    def _deletes_done(self) -> None:
        pool, self._argon_deletes = self._argon_deletes, None
        if pool is not None:
            pool.shutdown(wait=True)

    # Connections -----------------------------------------------------------------------------------

    def _close(self) -> None:
        self.connection.close()
        close_pool = getattr(self.connection, "close_pool", None)
        if close_pool is not None:
            close_pool()

    def _point(self, conn: dict[str, Any]) -> None:
        """Point this alias at another branch's endpoint (in place: other threads share the dict)."""
        self._close()
        self.connection.settings_dict.update({k: conn[k] for k in _CONNECTION_KEYS})
        self.connection.settings_dict["OPTIONS"] = dict(conn["OPTIONS"])

    def _rename_database(self, conn: dict[str, Any], listed: list[str], new: str) -> bool:
        """Give the template's one database the name this run's test database has, unless it has
        it already (`listed`: the branch's databases as the API lists them). Returns whether it
        renamed. Templates built before their database took the run's name hold TEMPLATE_DB."""
        if new in listed:
            return False
        old = listed[0] if len(listed) == 1 else TEMPLATE_DB if TEMPLATE_DB in listed else None
        settings_dict = {**self.connection.settings_dict, **conn, "OPTIONS": dict(conn["OPTIONS"])}
        settings_dict.pop(STATE_KEY, None)
        wrapper = type(self.connection)(settings_dict, alias=f"{self.connection.alias}-argon")
        quote = wrapper.ops.quote_name
        try:
            with wrapper._nodb_cursor() as cursor:
                if old is None:  # an API that does not list them: the one database besides postgres
                    cursor.execute("SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn "
                                   "AND datname <> 'postgres' ORDER BY datname = %s DESC", [TEMPLATE_DB])
                    row = cursor.fetchone()
                    old = row[0] if row else TEMPLATE_DB
                    if old == new:
                        return False
                cursor.execute(f"ALTER DATABASE {quote(old)} RENAME TO {quote(new)}")
        finally:
            wrapper.close()
        return True

    def _restore(self, name: str | None = None) -> None:
        """The alias's own connection settings again (Django's NAME, or `name`)."""
        from django.conf import settings

        assert self.argon is not None
        original = self.argon.original
        self.connection.settings_dict.update({k: original[k] for k in _CONNECTION_KEYS})
        self.connection.settings_dict["OPTIONS"] = dict(original["OPTIONS"])
        name = name if name is not None else original["NAME"]
        self.connection.settings_dict["NAME"] = name
        settings.DATABASES[self.connection.alias]["NAME"] = name
        self.connection.settings_dict.pop(STATE_KEY, None)

    def _abandon(self, keepdb: bool) -> None:
        """Set-up failed half-way: delete the run's branches made so far (not kept ones), as
        teardown would have, since Django never tears down a set-up that raised."""
        state = self.connection.settings_dict.get(STATE_KEY)
        if state is None:
            return
        self._close()
        if not keepdb:
            for record in [*state["clones"].values(), state["main"]]:
                if not record.get("shared") and not record.get("deleted"):
                    self._delete_quietly(record)
        self._restore()

    def _fail(self, exc: ApiError, keepdb: bool) -> NoReturn:
        """As Django does when it cannot create a test database: one line, exit status 2."""
        self._abandon(keepdb)
        self.log(f"argon: cannot set up the test database for alias {self.connection.alias!r}: {exc}")
        sys.exit(2)


_CLASSES: dict[type, type] = {}


def wrap(creation: Any, target: Target | None) -> Any:
    """A BranchCreation standing in for `creation` (same backend class underneath)."""
    base = type(creation)
    if isinstance(creation, BranchCreation):
        creation.argon = target
        return creation
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"Branch{base.__name__}", (BranchCreation, base), {"__module__": __name__})
    new = cls(creation.connection)
    new.argon = target
    return new


def install(aliases: Iterable[str] | None = None, *, verbosity: int = 1, workers: int = 0,
            environ: dict[str, str] | None = None) -> list[str]:
    """Let the test databases of `aliases` (default: all) be branches where that is possible.
    Returns the notices (one line each, also written to stderr at verbosity >= 1) for the
    PostgreSQL aliases that keep Django's behaviour."""
    from django.db import connections

    env = os.environ if environ is None else environ
    wanted = None if aliases is None else set(aliases)
    credentials = find_credentials(env)
    api = Api(credentials) if credentials else None
    resolved: dict[str, tuple[str, dict[str, Any]]] = {}
    notices = []
    for alias in connections:
        connection = connections[alias]
        if connection.vendor != "postgresql":
            continue
        target = None
        settings_dict = connection.settings_dict
        if (wanted is None or alias in wanted) and not (settings_dict.get("TEST") or {}).get("MIRROR"):
            ref = find_endpoint(settings_dict)
            reason = None
            if ref is None:
                reason = "it is plain PostgreSQL (no Argon or Neon endpoint in its host, options or password)"
            elif api is None:
                reason = "no API key (set ARGON_API_KEY or NEON_API_KEY, or run `argon login`)"
            else:
                try:
                    if ref.endpoint_id not in resolved:
                        project, endpoint = api.find_endpoint(ref.endpoint_id, env.get("ARGON_PROJECT_ID")
                                                              or env.get("NEON_PROJECT_ID"))
                        listed = api.branches(project)  # the base, and the template's first look-up
                        base = next((b for b in listed if b["id"] == endpoint["branch_id"]), None)
                        if base is None:
                            base = api.branch(project, endpoint["branch_id"])
                        resolved[ref.endpoint_id] = (project, base, listed)
                    project, base, listed = resolved[ref.endpoint_id]
                    target = Target(api, project, base, _snapshot(settings_dict), workers, list(listed))
                except ApiError as exc:
                    reason = str(exc)
            if reason is not None:
                notices.append(f"argon: {reason}; Django creates the test database for alias {alias!r} as usual.")
        connection.creation = wrap(connection.creation, target)
    if verbosity >= 1:
        for line in notices:
            sys.stderr.write(line + "\n")
    return notices
