"""Backup to object storage (ADR 0018): the object store seam (`store`), the object format
(`objects`), WAL shipping (`wal`) and base backups (`bases`). Mechanism only; which branches are
shipped when, retention and restore policy are `argon.control.backup`."""
