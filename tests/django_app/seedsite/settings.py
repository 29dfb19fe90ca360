"""Settings as the Neon Django guide writes them: the DATABASES values come from the Connection
Details (here passed in ARGON_DJANGO_DATABASE as JSON by the test that runs this project). With
DATABASE_URL set instead, the entry comes from `argon.django.database()`, and DJANGO_TEST_RUNNER
picks the test runner (the branch runner's tests)."""

import json
import os

SECRET_KEY = "test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "notes"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "seedsite.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
TEST_RUNNER = os.environ.get("DJANGO_TEST_RUNNER", "django.test.runner.DiscoverRunner")

if os.environ.get("DATABASE_URL"):
    import argon.django

    DATABASES = {"default": argon.django.database(os.environ["DATABASE_URL"])}
else:
    _db = json.loads(os.environ["ARGON_DJANGO_DATABASE"])
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": _db["NAME"],
            "USER": _db["USER"],
            "PASSWORD": _db["PASSWORD"],
            "HOST": _db["HOST"],
            "PORT": _db["PORT"],
            "OPTIONS": _db.get("OPTIONS", {}),
            "CONN_MAX_AGE": (None if os.environ.get("ARGON_CONN_MAX_AGE") == "None"
                             else int(os.environ.get("ARGON_CONN_MAX_AGE", "0"))),
            "CONN_HEALTH_CHECKS": os.environ.get("ARGON_CONN_HEALTH_CHECKS") == "1",
        }
    }

if os.environ.get("ARGON_TEST_SPAWN"):  # --parallel workers started as on macOS (spawn, not fork)
    import multiprocessing

    multiprocessing.set_start_method("spawn", force=True)

if os.environ.get("ARGON_TEST_BAD_CACHE"):  # createcachetable fails: a set-up that breaks half-way
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": 'bad"name'}}
