"""Django test database setup: Django's own runner against argon.django's branch runner, side by side.

Run from the repository root (so `tests.fixtures.platform` is importable):

    .venv/bin/python -m benchmarks.django_tests [--migrations 10,200] [--rounds 3] [--quick]
                                                [--backend copy|reflink|both] [--json PATH]

For each migration count it generates a Django project (one app, N migrations: a model every ten,
fields added in between; eight TestCase classes so four workers have work) on its own Argon project,
then runs `manage.py test --timing` in a subprocess, as a user would, and reads Django's own
"Total database setup took" line:

- `django`: DiscoverRunner (CREATE DATABASE + every migration; `--parallel` clones with CREATE
  DATABASE ... TEMPLATE), sequential and `--parallel 4`;
- `branch, first run`: BranchTestRunner when no template exists (builds it: that run migrates);
- `branch`: BranchTestRunner afterwards, sequential and `--parallel 4` (branches of the template,
  renames of its spare copies when they are ready: ADR 0033; on reflink the pool holds four from the
  first branch on; on copy as many as were branched at once, so there the first `--parallel 4`
  round copies three clones and the later ones take four spares: take the median of three rounds);
- `cp -a of the template`: the template branch's cluster copied by hand in the same rounds, the floor
  under a branch on that backend at that moment (on a loaded machine it moves a lot).

The Django and branch rounds are interleaved, so load from anything else on the machine hits both.
Target: branch setup <= 1 s after the first run, whatever the number of migrations. The platform
runs in this process, on the copy backend (this machine's filesystem) and, as root, also on the
reflink backend (an XFS image, as `argon storage init` makes); everything is stopped and removed in
`finally` blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.core.common import BenchError, short_tmpdir
from benchmarks.core.targets import start_platform

REPO_ROOT = Path(__file__).resolve().parent.parent
SETUP = re.compile(r"Total database setup took ([0-9.]+)s")
TEARDOWN = re.compile(r"Total database teardown took ([0-9.]+)s")
TEST_CLASSES = 8
TARGET_S = 1.0

SETTINGS = '''import os
import argon.django

SECRET_KEY = "bench"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "bench"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {"default": argon.django.database(os.environ["DATABASE_URL"])}
TEST_RUNNER = os.environ["BENCH_TEST_RUNNER"]
'''


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def generate_project(root: Path, migrations: int) -> Path:
    """A Django project whose one app has `migrations` migrations and TEST_CLASSES test classes."""
    app = root / "bench"
    (app / "migrations").mkdir(parents=True)
    (root / "benchsite").mkdir()
    (root / "benchsite" / "__init__.py").write_text("")
    (root / "benchsite" / "settings.py").write_text(SETTINGS)
    (root / "manage.py").write_text("import os, sys\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', "
                                    "'benchsite.settings')\nfrom django.core.management import "
                                    "execute_from_command_line\nexecute_from_command_line(sys.argv)\n")
    (app / "__init__.py").write_text("")
    (app / "migrations" / "__init__.py").write_text("")
    models: dict[str, list[str]] = {}
    previous = None
    for n in range(1, migrations + 1):
        name = f"{n:04d}_step"
        model = f"Model{(n - 1) // 10}"
        if (n - 1) % 10 == 0:
            op = (f"migrations.CreateModel({model!r}, [('id', models.BigAutoField(primary_key=True)), "
                  f"('name', models.CharField(max_length=100, default=''))])")
            models[model] = ["name = models.CharField(max_length=100, default='')"]
        else:
            op = f"migrations.AddField({model.lower()!r}, 'f{n}', models.IntegerField(default={n}))"
            models[model].append(f"f{n} = models.IntegerField(default={n})")
        deps = f"[('bench', {previous!r})]" if previous else "[]"
        (app / "migrations" / f"{name}.py").write_text(
            "from django.db import migrations, models\n\n\nclass Migration(migrations.Migration):\n"
            f"    dependencies = {deps}\n    operations = [{op}]\n")
        previous = name
    (app / "models.py").write_text("from django.db import models\n" + "".join(
        f"\n\nclass {model}(models.Model):\n" + "".join(f"    {line}\n" for line in fields)
        for model, fields in models.items()))
    (app / "tests.py").write_text("from django.test import TestCase\n\nfrom bench.models import Model0\n" + "".join(
        f"\n\nclass Case{i}(TestCase):\n    def test_query(self) -> None:\n"
        f"        Model0.objects.create(name='x')\n        self.assertEqual(Model0.objects.count(), 1)\n"
        for i in range(TEST_CLASSES)))
    return root


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def run_tests(self, project: Path, env: dict[str, str], runner: str, parallel: int) -> dict[str, float]:
        cmd = [sys.executable, "manage.py", "test", "--noinput", "--timing", "--parallel", str(parallel)]
        started = time.monotonic()
        out = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=1800,
                             env={**env, "BENCH_TEST_RUNNER": runner})
        wall = time.monotonic() - started
        if out.returncode != 0 or f"Ran {TEST_CLASSES} tests" not in out.stderr:
            raise BenchError(f"{runner} --parallel {parallel} failed:\n{out.stdout}{out.stderr}"[-3000:])
        setup, teardown = SETUP.search(out.stderr), TEARDOWN.search(out.stderr)
        if setup is None or teardown is None:
            raise BenchError(f"no --timing lines in:\n{out.stderr[-2000:]}")
        return {"setup_s": float(setup.group(1)), "teardown_s": float(teardown.group(1)), "wall_s": round(wall, 3)}

    @staticmethod
    def template_dir(running: Any, root: Path, project_id: str) -> Path:
        branches = running.api.get(f"/projects/{project_id}/branches").json()["branches"]
        (template,) = [b for b in branches if b["name"].startswith("django-template-")]
        return root / "data" / "projects" / project_id / "branches" / template["id"] / "pgdata"

    @staticmethod
    def copy_time(pgdata: Path, backend: str) -> dict[str, float]:
        """The floor under a branch on this backend right now: `cp -a` of the template's cluster."""
        target = pgdata.parent.parent / f".bench-copy-{os.getpid()}"
        reflink = "always" if backend == "reflink" else "never"
        started = time.monotonic()
        subprocess.run(["cp", "-a", f"--reflink={reflink}", str(pgdata), str(target)], check=True)
        elapsed = time.monotonic() - started
        shutil.rmtree(target, ignore_errors=True)
        return {"setup_s": round(elapsed, 3), "teardown_s": 0.0, "wall_s": round(elapsed, 3)}

    def measure(self, backend: str, root: Path) -> None:
        running = start_platform(root)
        work = short_tmpdir("bd")
        try:
            for count in self.args.migrations:
                say(f"{backend}: {count} migrations")
                created = running.create_project(name=f"bench-{count}")
                project = generate_project(work / f"p{count}", count)
                env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGON_", "NEON_", "DJANGO_"))}
                env.update({"DATABASE_URL": running.dsn(created), "PYTHONPATH": str(project),
                            "ARGON_API_URL": running.api_url, "ARGON_API_KEY": running.api.headers["Authorization"][7:],
                            "XDG_CONFIG_HOME": str(work / "config")})
                samples: dict[str, list[dict[str, float]]] = {}

                def one(label: str, runner: str, parallel: int, *, _env: dict[str, str] = env,
                        _project: Path = project, _samples: dict[str, list[dict[str, float]]] = samples) -> None:
                    result = self.run_tests(_project, _env, runner, parallel)
                    _samples.setdefault(label, []).append(result)
                    say(f"  {label}: setup {result['setup_s']:.2f} s")

                one("branch, first run", "argon.django.BranchTestRunner", 1)
                template = self.template_dir(running, root, created["project"]["id"])
                for _ in range(self.args.rounds):
                    one("django", "django.test.runner.DiscoverRunner", 1)
                    one("branch", "argon.django.BranchTestRunner", 1)
                    samples.setdefault("cp -a of the template", []).append(self.copy_time(template, backend))
                    one("django --parallel 4", "django.test.runner.DiscoverRunner", 4)
                    one("branch --parallel 4", "argon.django.BranchTestRunner", 4)
                self.results.setdefault(backend, {})[str(count)] = {
                    label: {"setup_s": statistics.median(s["setup_s"] for s in rows),
                            "teardown_s": statistics.median(s["teardown_s"] for s in rows),
                            "wall_s": statistics.median(s["wall_s"] for s in rows), "samples": rows}
                    for label, rows in samples.items()}
                running.delete_project(created["project"]["id"])
        finally:
            running.stop()
            shutil.rmtree(work, ignore_errors=True)

    def run(self) -> None:
        for backend in self.args.backends:
            try:
                if backend == "reflink":
                    if os.geteuid() != 0:
                        self.errors[backend] = "skipped: the reflink backend needs root (a loop-mounted XFS image)"
                        continue
                    from benchmarks.core.common import backend_root

                    with backend_root("reflink", 5) as root:
                        self.measure(backend, root)
                else:
                    root = short_tmpdir("bj")
                    try:
                        self.measure(backend, root)
                    finally:
                        shutil.rmtree(root, ignore_errors=True)
            except Exception as exc:
                self.errors[backend] = f"{type(exc).__name__}: {exc}"
                say(f"{backend} failed: {exc}")


def verdicts(results: dict[str, Any]) -> list[str]:
    out = []
    for backend, counts in results.items():
        for count, rows in counts.items():
            for label in ("branch", "branch --parallel 4"):
                if label in rows:
                    s = rows[label]["setup_s"]
                    out.append(f"{backend}, {count} migrations, {label}: setup {s:.2f} s -> target <= "
                               f"{TARGET_S:.0f} s {'MET' if s <= TARGET_S else 'NOT MET'}")
    return out


def render(results: dict[str, Any], errors: dict[str, str]) -> str:
    lines = ["Django test database setup (median seconds, Django's --timing)", "=" * 62, ""]
    header = f"{'backend':8} {'migrations':>10}  {'runner':22} {'setup s':>8} {'teardown s':>10} {'run s':>7} {'n':>3}"
    lines += [header, "-" * len(header)]
    for backend, counts in results.items():
        for count, rows in counts.items():
            for label, r in rows.items():
                lines.append(f"{backend:8} {count:>10}  {label:22} {r['setup_s']:>8.2f} {r['teardown_s']:>10.2f} "
                             f"{r['wall_s']:>7.2f} {len(r['samples']):>3}")
            for mode in ("", " --parallel 4"):
                d, b = rows.get("django" + mode), rows.get("branch" + mode)
                if d and b:
                    lines.append(f"{'':8} {'':>10}  setup, django / branch{mode}: {d['setup_s'] / b['setup_s']:.1f}x")
    lines += ["", "Verdicts:"] + [f"  {v}" for v in verdicts(results)]
    lines += [f"  ({k}: {v})" for k, v in errors.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.django_tests", description=__doc__.split("\n")[0])
    parser.add_argument("--migrations", default="10,200", help="migration counts, comma separated (default 10,200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each runner after the first run (default 3)")
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--backend", default="both", choices=["copy", "reflink", "both"])
    parser.add_argument("--json", metavar="PATH", help="also write the JSON results to PATH")
    args = parser.parse_args(argv)
    args.migrations = [int(x) for x in args.migrations.split(",") if x.strip()]
    args.rounds = 1 if args.quick else args.rounds
    args.backends = ["copy", "reflink"] if args.backend == "both" else [args.backend]
    bench = Bench(args)
    started, load_before = time.monotonic(), os.getloadavg()
    bench.run()
    report = {"results": bench.results, "errors": bench.errors, "elapsed_seconds": round(time.monotonic() - started, 1),
              "load_average": {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()},
              "verdicts": verdicts(bench.results)}
    print(render(bench.results, bench.errors))
    print(f"\nload average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(not v.startswith("skipped") for v in bench.errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
