"""Which dumps a place keeps: its KEEP newest valid dumps, and optionally a calendar.

Only valid nightly `db-*` dumps count toward KEEP (migration dumps and other names neither
count nor are ever removed); only nightly dumps older than the KEEP-th newest valid one are
removed, so the newest valid dump is never removed, and invalid or planted "newer" files can
never push good dumps out. Pinned dumps (a `.pin` beside them) and future-dated names neither
count nor are removed. With a calendar
(`<P>_KEEP_DAILY`, `_WEEKLY`, `_MONTHLY`), the newest valid dump of each of the last so many
days, ISO weeks and months that have one is kept as well: a monthly copy survives a run of
bad nights noticed late.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import dumps, files, names
from .errors import KwError
from .log import dry, log
from .names import DumpName


@dataclass(frozen=True)
class Calendar:
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def picks(self, valid_newest_first: list[DumpName]) -> set[str]:
        """The stems of the newest valid dump of each of the last `daily` days, `weekly` weeks, `monthly` months."""
        kept: set[str] = set()
        for count, period in (
            (self.daily, lambda d: d.when.date()),
            (self.weekly, lambda d: d.when.isocalendar()[:2]),
            (self.monthly, lambda d: (d.when.year, d.when.month)),
        ):
            seen: set = set()
            for dump in valid_newest_first:
                if len(seen) >= count:
                    break
                if period(dump) not in seen:
                    seen.add(period(dump))
                    kept.add(dump.stem)
        return kept


NO_CALENDAR = Calendar()


def to_remove(
    dumps: list[tuple[DumpName, bool]], keep: int, calendar: Calendar = NO_CALENDAR, exclude: set[str] = frozenset()
) -> list[DumpName]:
    """Given (dump, valid) pairs, the dumps rotation removes, oldest last.

    `exclude`: stems that neither count nor go (pinned and future-dated dumps).
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    ordered = [
        (d, ok)
        for d, ok in sorted(dumps, key=lambda pair: pair[0].sort_key, reverse=True)
        if d.nightly and d.stem not in exclude
    ]
    valid = list({d.stem: d for d, ok in reversed(ordered) if ok}.values())[::-1]  # a plain and an .age copy: one
    if len(valid) <= keep:
        return []
    cutoff = valid[keep - 1].sort_key
    kept = calendar.picks(valid)
    return [d for d, _ in ordered if d.sort_key < cutoff and d.stem not in kept]


def pinned_in(directory: Path) -> set[str]:
    """The dumps of a local directory with a `.pin` beside them."""
    return {
        n[: -len(names.PIN_SUFFIX)]
        for n in os.listdir(directory)
        if n.endswith(names.PIN_SUFFIX) and names.parse(n[: -len(names.PIN_SUFFIX)])
    }


def is_valid_for_rotation(directory: Path, dump: names.DumpName) -> bool:
    """A dump counts toward KEEP when its manifest matches its size, or (no manifest) it verifies."""
    path = directory / dump.name
    try:
        manifest = dumps.read_manifest(path)
        if manifest is None and dump.encrypted:
            raise KwError("an encrypted dump without its manifest cannot be checked")
        if manifest is None:
            dumps.verify_file(path, use_manifest=False)
            return True
        if manifest.file == dump.name and manifest.bytes == path.stat().st_size:
            return True
        problem = "its size or name differs from its manifest"
    except KwError as exc:
        problem = exc.message
    except OSError as exc:
        problem = exc.strerror
    log.warning("not counting %s toward KEEP: %s", dump.name, problem)
    return False


def rotate_local(
    directory: Path,
    keep: int,
    clock: names.Clock,
    dry_run: bool = False,
    calendar: Calendar = NO_CALENDAR,
    held: set[str] = frozenset(),
) -> list[str]:
    """Remove dumps beyond the KEEP newest valid ones in a local directory (with manifests).

    `held`: stems whose copy here is in question (another copy has other bytes): neither counted nor removed.
    """
    found = names.dumps_in(os.listdir(directory))
    future = {d.stem for d in found if clock.is_future(d.name)}
    for name in sorted(future):
        log.warning(
            "%s in %s is future-dated: not counted or removed by rotation (remove it by hand if wrong)", name, directory
        )
    exclude = future | set(held) | {names.parse(n).stem for n in pinned_in(directory)}
    valid = [(d, d.stem not in exclude and is_valid_for_rotation(directory, d)) for d in found]
    doomed = to_remove(valid, keep, calendar, exclude)
    for dump in doomed:
        if dry_run:
            dry("would remove %s (keeping the %d newest valid dumps)", dump.name, keep)
            continue
        (directory / dump.name).unlink()
        (directory / dump.manifest).unlink(missing_ok=True)
        log.info("removed %s (keeping the %d newest valid dumps)", dump.name, keep)
    if doomed and not dry_run:
        files.fsync_dir(directory)
    return [d.name for d in doomed]
