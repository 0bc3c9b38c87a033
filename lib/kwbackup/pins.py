"""Anomalies and pins: a night that looks wrong keeps the last good dump everywhere.

A verified dump is anomalous against the previous verified one when its size differs by more
than SIZE_CHANGE_ALERT_PCT, or a table of the previous dump is missing from it or has lost more
than ROW_DROP_ALERT_PCT of its rows (from the manifests: nothing is read twice). The previous
dump is then pinned: a `<dump>.pin` file (one JSON object: pinned_at, reason) beside it, on the
pi5 and every destination. A pinned dump neither counts toward KEEP nor is removed, until
`backup-orchestrator --release-pins`.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from . import files, names
from .places import Entry
from .settings import Settings


def anomalies(previous: Entry, new: Entry, settings: Settings) -> list[str]:
    """What makes `new` anomalous against `previous`: each with its figures; [] when it is not."""
    found = []
    size_pct = float(settings["SIZE_CHANGE_ALERT_PCT"])
    if previous.size and abs(new.size - previous.size) * 100.0 / previous.size > size_pct:
        change = (new.size - previous.size) * 100.0 / previous.size
        found.append(f"size {previous.size} -> {new.size} bytes ({change:+.0f}%, SIZE_CHANGE_ALERT_PCT={size_pct:g})")
    rows_pct = float(settings["ROW_DROP_ALERT_PCT"])
    before, after = (previous.manifest or {}).get("tables", {}), (new.manifest or {}).get("tables", {})
    for table, rows in sorted(before.items()):
        if table not in after:
            found.append(f"table {table} is gone (it had {rows} rows)")
        elif rows and (rows - after[table]) * 100.0 / rows > rows_pct:
            found.append(
                f"{table}: {rows} -> {after[table]} rows ({(after[table] - rows) * 100.0 / rows:+.0f}%, "
                f"ROW_DROP_ALERT_PCT={rows_pct:g})"
            )
    return found


def pin_content(reason: str) -> bytes:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (json.dumps({"pinned_at": stamp, "reason": reason}, ensure_ascii=False) + "\n").encode()


def pin_name(dump: str) -> str:
    return dump + names.PIN_SUFFIX


def pin_local(directory: Path, dump: str, content: bytes) -> None:
    files.write_atomic(directory, pin_name(dump), content, replace=True)


def read_local(directory: Path, dump: str) -> bytes:
    with open(directory / pin_name(dump), "rb") as f:
        return f.read(64 * 1024)


def release_local(directory: Path) -> list[str]:
    """Remove every pin in a local directory; the dumps they pinned."""
    released = []
    for name in sorted(os.listdir(directory)):
        dump = name[: -len(names.PIN_SUFFIX)]
        if name.endswith(names.PIN_SUFFIX) and names.parse(dump):
            os.unlink(directory / name)
            released.append(dump)
    if released:
        files.fsync_dir(directory)
    return released
