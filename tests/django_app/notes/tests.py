from django.db import IntegrityError, transaction
from django.test import TestCase, TransactionTestCase

from notes.models import Note


class NoteTests(TestCase):
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


class FlushTests(TransactionTestCase):
    def test_truncate_between_tests(self) -> None:
        Note.objects.create(title="t")
        self.assertEqual(Note.objects.count(), 1)
