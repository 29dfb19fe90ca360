import json
import os
import time

from django.db import IntegrityError, connection, transaction
from django.test import TestCase, TransactionTestCase

from notes.models import Note


class Recorded:
    """With $ARGON_TEST_RECORD set, each test appends where it ran: process, the endpoint in the
    connection's settings, the database, and the compute's start time (one per Postgres server).
    With $ARGON_TEST_RENDEZVOUS=N too, tests wait (up to 60 s) until N processes have recorded, so
    with --parallel N every worker runs tests (none can take all the work while another starts)."""

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        path = os.environ.get("ARGON_TEST_RECORD")
        if path:
            with connection.cursor() as cursor:
                cursor.execute("SELECT current_database(), pg_postmaster_start_time()::text")
                database, started = cursor.fetchone()
            settings = connection.settings_dict
            with open(path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "database": database, "postmaster": started,
                                    "options": settings["OPTIONS"].get("options"), "host": settings["HOST"]}) + "\n")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with open(path) as f:
                    pids = {json.loads(line)["pid"] for line in f}
                if len(pids) >= int(os.environ.get("ARGON_TEST_RENDEZVOUS", "1")):
                    break
                time.sleep(0.05)


class NoteTests(Recorded, TestCase):
    def test_create_and_query(self) -> None:
        Note.objects.create(title="hello", body="world")
        self.assertEqual(Note.objects.get(title="hello").body, "world")

    def test_unique_title(self) -> None:
        Note.objects.create(title="dup")
        with self.assertRaises(IntegrityError), transaction.atomic():
            Note.objects.create(title="dup")

    def test_view(self) -> None:
        Note.objects.create(title="a")
        self.assertEqual(self.client.get("/count/").json(), {"notes": 1})


class FlushTests(Recorded, TransactionTestCase):
    def test_truncate_between_tests(self) -> None:
        Note.objects.create(title="t")
        self.assertEqual(Note.objects.count(), 1)
