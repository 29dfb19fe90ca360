"""The pure parts of a branch's history and its WAL: LSNs, WAL segment names, the manifest, the
archive command, reading commit records from pg_waldump's output."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from argon.storage import history as hs
from argon.storage import wal


def test_lsn_round_trip_and_errors() -> None:
    assert wal.parse_lsn("0/16B3748") == 0x16B3748
    assert wal.parse_lsn("1/0") == 1 << 32
    assert wal.format_lsn(wal.parse_lsn("A/00C169D8")) == "A/C169D8"
    for bad in ("", "16B3748", "0/", "x/1", "0/123456789", "0/1/2"):
        with pytest.raises(ValueError):
            wal.parse_lsn(bad)


@pytest.mark.parametrize("segsize", [1 << 20, 16 << 20])
def test_segment_names(segsize: int) -> None:
    for lsn in (0, segsize * 5 + 17, (3 << 32) + segsize * 2):
        name = wal.segment_name(2, lsn, segsize)
        assert len(name) == 24
        assert wal.segment_start(name, segsize) == (2, lsn - lsn % segsize)
    assert wal.segment_start("00000002.history", segsize) is None
    assert wal.segment_start("000000010000000000000003.part", segsize) is None


def test_manifest_round_trip(tmp_path: Path) -> None:
    now = datetime(2026, 11, 24, 13, 0, tzinfo=UTC)
    snap = hs.Snapshot(name="base", taken_at=now, redo_lsn="0/1000028", consistent_lsn="0/1000100", template="t-1")
    epoch = hs.Epoch(id="e1", started_at=now, start_lsn="0/1000100", timeline=1, segsize=1 << 20, snapshots=(snap,))
    history = hs.BranchHistory(tmp_path / "history")
    assert history.load().current is None
    history.save(hs.Manifest((epoch,)))
    later = epoch.replace(ended_at=now + timedelta(hours=1), end_lsn="0/2000000")
    history.save(history.load().with_epoch(later).with_epoch(epoch.replace(id="e2")))
    loaded = history.load()
    assert [e.id for e in loaded.epochs] == ["e1", "e2"] and loaded.current and loaded.current.id == "e2"
    assert loaded.epochs[0] == later and loaded.epochs[0].snapshots[0] == snap
    assert [e.id for e in loaded.without("e1").epochs] == ["e2"]
    assert [p.name for p in history.root.iterdir()] == ["manifest.json"]  # no temp file left


def test_archive_command_quotes_odd_paths(tmp_path: Path) -> None:
    archive = tmp_path / "it's 100%" / "wal"
    archive.mkdir(parents=True)
    segment = tmp_path / "000000010000000000000001"
    segment.write_bytes(b"wal")
    cmd = wal.archive_command(archive)
    # Postgres replaces %p and %f and turns %% into %; then a shell runs it.
    shell = cmd.replace("%p", str(segment)).replace("%f", segment.name).replace("%%", "%")
    subprocess.run(["sh", "-c", shell], check=True)
    subprocess.run(["sh", "-c", shell], check=True)  # archiving the same segment again is fine
    assert (archive / segment.name).read_bytes() == b"wal"
    assert sorted(p.name for p in archive.iterdir()) == [segment.name]


def test_commit_lines_of_pg_waldump() -> None:
    line = ("rmgr: Transaction len (rec/tot):     34/    34, tx:        725, lsn: 0/00616840, prev 0/00616800, "
            "desc: COMMIT 2026-11-24 13:00:38.442266 UTC")
    match = wal._COMMIT.search(line)
    assert match and match.group(1) == "0/00616840" and match.group(2) == "2026-11-24 13:00:38.442266"
    with_invals = line + "; inval msgs: catcache 80 catcache 79"
    assert wal._COMMIT.search(with_invals)
    assert not wal._COMMIT.search(line.replace("COMMIT", "ABORT"))


def test_recovery_settings() -> None:
    to_end = wal.recovery_settings(None)
    assert "recovery_target_lsn" not in to_end and to_end["recovery_target_action"] == "promote"
    to_lsn = wal.recovery_settings("0/1000")
    assert to_lsn["recovery_target_lsn"] == "0/1000" and to_lsn["recovery_target_inclusive"] == "off"
    assert to_lsn["archive_mode"] == "off"  # a rebuild never archives into anybody's history
    assert to_end["hot_standby"] == "off"  # a hot standby refuses WAL of a larger compute than its own


@pytest.mark.parametrize("change", [{"id": "/etc"}, {"id": "../../other-project"}, {"id": ""}, {"segsize": 1},
                                    {"segsize": 3 << 20}, {"timeline": "1; rm"}, {"start_lsn": "x"},
                                    {"snapshots": [{"name": "../../x", "taken_at": "2026-01-01T00:00:00+00:00",
                                                    "redo_lsn": "0/1", "consistent_lsn": "0/1"}]}])
def test_a_tampered_manifest_is_refused(tmp_path: Path, change: dict[str, object]) -> None:
    """The compute's uid can write the manifest: no name in it may lead root out of the history
    directory, no number may make a loop run for ever."""
    epoch = {"id": "e1", "started_at": "2026-01-01T00:00:00+00:00", "start_lsn": "0/1", "timeline": 1,
             "segsize": 1 << 20, "snapshots": []}
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "epochs": [{**epoch, **change}]}))
    with pytest.raises(hs.ManifestError):
        hs.BranchHistory(tmp_path).load()
    with pytest.raises(ValueError):
        hs.BranchHistory(tmp_path).epoch_dir("/etc")
