"""A data migration with a side effect the tests count: each time it runs (that is, each time a
database is migrated) it appends the database's name to $ARGON_TEST_MIGRATION_LOG; with
$ARGON_TEST_FAIL_MIGRATION set it fails."""

import os

from django.db import migrations


def record(apps, schema_editor):  # type: ignore[no-untyped-def]
    log = os.environ.get("ARGON_TEST_MIGRATION_LOG")
    if log:
        with open(log, "a") as f:
            f.write(schema_editor.connection.settings_dict["NAME"] + "\n")
    if os.environ.get("ARGON_TEST_FAIL_MIGRATION"):
        raise RuntimeError("this migration fails on purpose (ARGON_TEST_FAIL_MIGRATION)")


class Migration(migrations.Migration):
    dependencies = [("notes", "0001_initial")]
    operations = [migrations.RunPython(record, migrations.RunPython.noop)]
