"""`argon storage`: see which clone backend the data directory gets, and give ext4 machines the fast
path (a loop-mounted XFS image with reflinks)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from argon.cli.client import CliError
from argon.settings import load
from argon.storage import volume


@click.group()
def storage() -> None:
    """The data directory's storage: status, and a copy-on-write volume for instant branches."""


def _data_dir(data_dir: str | None) -> Path:
    return Path(data_dir) if data_dir else load().data_dir


@storage.command("status")
@click.option("--data-dir", help="Data directory (default: ARGON_DATA_DIR / the config)")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts")
def storage_status(data_dir: str | None, as_json: bool) -> None:
    """Filesystem, free space and clone backend of the data directory."""
    info = volume.status(_data_dir(data_dir))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    gb = 1024 ** 3
    click.echo(f"Data directory   {info['path']}")
    click.echo(f"Filesystem       {info['filesystem']}{' (its own mount point)' if info['mount_point'] else ''}")
    click.echo(f"Free             {int(info['free_bytes']) / gb:.1f} GB of {int(info['total_bytes']) / gb:.1f} GB")
    click.echo(f"Clone backend    {info['clone_backend']}")
    if not info["reflink"]:
        click.echo("Branches copy their data here (~2 s per GB). For instant copy-on-write branches run, as root,\n"
                   "  argon storage init --size 50G")


@storage.command("init")
@click.option("--data-dir", help="Where to mount the volume (default: ARGON_DATA_DIR); must be empty or absent")
@click.option("--image", type=click.Path(dir_okay=False), help="The image file (default: <data-dir>.img)")
@click.option("--size", default="20G", show_default=True, help="Maximum size (sparse: uses disk only as it fills)")
@click.option("--fs", type=click.Choice(volume.FILESYSTEMS), default="xfs", show_default=True,
              help="xfs keeps ~90 % of ext4's Postgres throughput; btrfs 40-60 %")
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them")
def storage_init(data_dir: str | None, image: str | None, size: str, fs: str, dry_run: bool) -> None:
    """Create a sparse image file, format it with reflinks and mount it at the data directory, so that
    branches, snapshots and restores are copy-on-write clones (milliseconds, whatever the size).

    \b
    As root:        argon storage init --size 50G
    See first:      argon storage init --dry-run
    Then start:     argon up
    """
    try:
        p = volume.plan(_data_dir(data_dir), image=Path(image) if image else None, size=size, fs=fs)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if dry_run:
        click.echo(p.shell())
        click.echo(f"# to mount it at boot, add to /etc/fstab:\n{volume.fstab_line(p)}")
        return
    problems = volume.problems(p)
    if problems:
        lines = "\n".join(f"  - {x}" for x in problems)
        raise CliError(f"cannot prepare the volume:\n{lines}\nTo do it by hand, run:\n{p.shell()}")
    try:
        volume.apply(p)
    except OSError as exc:
        raise CliError(f"{exc}\nNothing was left behind; fix the cause and run it again.") from None
    click.echo(f"Mounted a {p.size} {p.fs} volume with reflinks at {p.mountpoint} (image {p.image}).")
    click.echo("To mount it at boot, add this line to /etc/fstab:")
    click.echo(f"  {volume.fstab_line(p)}")
    click.echo("Start Argon on it with:  argon up" + (f" --data-dir {p.mountpoint}" if data_dir else ""))
