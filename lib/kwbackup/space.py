"""Free space at the places: a warning before a place is full, not a failed night after.

After a run, backup-db (prod) and the orchestrator (pi5, nas) compare each place's free space
with MIN_FREE_DUMPS times its newest dump: less is a warning and an alert (the exit status stays),
and every figure goes out as the metric `backup.free_bytes` tagged with the place. list-backups
shows each place's free space too.
"""

from __future__ import annotations

import os
from pathlib import Path

from .log import size
from .places import Place
from .run import run


def free_local(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def parse_df(text: str) -> int | None:
    """Available bytes from `df -Pk`'s last line (POSIX output, 1024-byte blocks)."""
    lines = text.strip().splitlines()
    fields = lines[-1].split() if len(lines) > 1 else []
    return int(fields[3]) * 1024 if len(fields) >= 4 and fields[3].isdigit() else None


def free_at(place: Place) -> int | None:
    """The free space of a place's DIR filesystem; None when it cannot be told."""
    if place.is_local:
        return free_local(place.local_dir())
    code, out, _ = run(
        place.command(["df", "-Pk", place.remote_path()], name=f"df on {place.name}"), check=False, timeout=60
    )
    return parse_df(out.decode(errors="replace")) if code == 0 else None


def low(settings, place: str, free: int, newest: int | None) -> str | None:
    """The warning when `free` is under MIN_FREE_DUMPS times the newest dump, else None."""
    wanted = float(settings["MIN_FREE_DUMPS"])
    if newest and free < wanted * newest:
        return (
            f"low disk space on {place}: {size(free)} free, less than MIN_FREE_DUMPS={wanted:g} times its "
            f"newest dump ({size(newest)}); make room before the next nights fail"
        )
    return None
