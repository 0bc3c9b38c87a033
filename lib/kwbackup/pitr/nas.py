"""The WAL tier on the nas: the orchestrator's nightly copy of it, and list-backups' "Point in time" sections.

NAS_DIR/wal/ is a copy of the pi5's Barman home (PITR_DIR/home/), so a barman.conf whose barman_home is
NAS_DIR/wal recovers from it. Barman moves and removes files while the copy runs, so the copy is of one
consistent set, taken in an order where a half-done copy never looks complete:

1. the set: the DONE base backups' meta/*-backup.info first, then wals/prod-xlog.db, then the files under
   wals/ and those base backups' base/<id>/ (Barman appends a segment to the xlog.db only once it is in wals/,
   so every line read names a file there); never streaming/ (the segment being received), locks or errors/;
2. rsync of the WAL files and the base backups' files, then the xlog.db as read (its lines for the copied
   files only), then each base backup's meta/<id>-backup.info last: a base backup looks DONE on the nas only
   once its files and its WAL are there. Every file is written to a temporary name and renamed (rsync);
3. every file sent in this run is checked against the pi5's: an rsync --checksum dry run must list nothing
   to send (each night checks what it copied: the older files were checked the night they came);
4. only then does what the pi5 no longer has (Barman's retention) go from the nas: meta/ first.
A file that vanishes under rsync (retention ran meanwhile) starts the copy over; a dropped link is retried.

Reading a place's state (list-backups) takes one run of READ_SCRIPT there (stock tools: find, stat, cat, awk;
locally the same script), judged as status.from_files judges the files themselves (status.judge).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from plumbum.commands.base import shquote

from .. import files
from ..errors import Failed, KwError, UsageError, VerificationError, failure_line
from ..log import dry, log, size
from ..places import LABELS, Place, place
from ..run import Cmd, StageFailed, run
from ..settings import Settings
from ..transfer import ATTEMPTS, remote_spec, rsync_base
from . import status
from .barman import SERVER, Tier
from .status import WAL_NAME, State

NAS_SUBDIR = "wal"  # NAS_DIR/wal/: Barman's home on the nas
XLOG_DB = f"wals/{SERVER}-xlog.db"
VANISHED = 24  # rsync: some source files vanished before they could be transferred
PARTIAL = 23  # rsync: some files were not transferred
JSON_KEYS = ("place", "from", "to", "lag_seconds", "base_backups", "bytes", "status")


# --- the nightly copy (backup-orchestrator) ---------------------------------------------------------
@dataclass
class Snapshot:
    """The consistent set to copy: relative paths under the pi5's server home."""

    done: list[str]  # DONE base backups' ids
    data: list[str]  # WAL files and the base backups' files (directories too, so rsync makes them 0700)
    xlog: bytes  # the xlog.db as read, its lines for the listed WAL files only
    xlog_mtime: float


def snapshot(server_home: Path) -> Snapshot:
    done = [b.backup_id for b in status.base_backups(server_home) if b.status == "DONE"]
    xlog_path = server_home / XLOG_DB
    try:
        xlog_lines = xlog_path.read_bytes().splitlines(keepends=True)
        xlog_mtime = xlog_path.stat().st_mtime
    except FileNotFoundError:
        xlog_lines, xlog_mtime = [], time.time()
    wal_files: dict[str, str] = {}  # name -> relative path
    data = []
    for top in ["wals", *(f"base/{backup_id}" for backup_id in done)]:
        for root, dirs, names in os.walk(server_home / top):
            dirs.sort()
            relative = os.path.relpath(root, server_home)
            data.append(relative)
            for name in sorted(names):
                if top != "wals":
                    data.append(f"{relative}/{name}")
                elif f"{relative}/{name}" != XLOG_DB:
                    wal_files[name] = f"{relative}/{name}"
    kept = []
    for line in xlog_lines:
        name = line.split(b"\t", 1)[0].decode(errors="replace")
        if name in wal_files:
            kept.append(line)
            data.append(wal_files[name])
    return Snapshot(done, data, b"".join(kept), xlog_mtime)


class NasCopy:
    """rsync from a local directory to NAS_DIR/wal/ on the nas (a local directory too when NAS_HOST=local)."""

    def __init__(self, nas: Place):
        self.nas = nas
        self.dest = str(nas.local_dir() / NAS_SUBDIR) if nas.is_local else nas.remote_path(NAS_SUBDIR)

    def _argv(self, *options: str) -> list[str]:
        if self.nas.is_local:
            files.ensure_private_dir(Path(self.dest))
            prepare = []
        else:  # the copy's root made private by the session that receives, as the dumps' push does
            prepare = [f"--rsync-path=mkdir -p -- {shquote(self.dest)} && chmod 700 -- {shquote(self.dest)} && rsync"]
        return [*rsync_base(self.nas), *prepare, "-t", "--perms", "--chmod=D700,F600", *options]

    def _rsync(self, what: str, argv: list[str]) -> list[str]:
        """The itemized lines rsync printed; StageFailed on a failure, _Vanished when a source file went."""
        code, out, err = run(Cmd(argv, name=f"rsync {what} to the nas"), check=False, timeout=6 * 3600)
        # 24: a file went during the transfer; 23 with the sender's link_stat: before it (gone since the set)
        if code == VANISHED or (code == PARTIAL and re.search(r"\[sender\] link_stat .* No such file", err)):
            said = [line for line in err.splitlines() if "link_stat" in line or "vanished" in line]
            raise _Vanished(said[0] if said else "a file vanished")
        if code != 0:
            raise StageFailed(f"rsync {what} to the nas", f"exit {code}", " | ".join(err.strip().splitlines()[-3:]))
        return out.decode(errors="replace").splitlines()

    def send(self, source: Path, paths: list[str], listing: Path, what: str, checksum: bool = False) -> list[str]:
        """Copy `paths` (relative to `source`); the files it sent."""
        listing.write_text("".join(f"{p}\n" for p in paths))
        lines = self._rsync(
            what,
            self._argv(
                *(["--checksum"] if checksum else []),
                "--out-format=%i %n",
                f"--files-from={listing}",
                f"{source}/",
                remote_spec(self.nas, self.dest),
            ),
        )
        return [line.split(" ", 1)[1] for line in lines if line[:2] in (">f", "<f")]

    def differing(self, source: Path, paths: list[str], listing: Path, what: str) -> list[str]:
        """Of `paths`, the files whose bytes on the nas are not the source's (or that it lacks), by checksum."""
        if not paths:
            return []
        listing.write_text("".join(f"{p}\n" for p in paths))
        lines = self._rsync(
            f"check of {what}",
            self._argv(
                "--dry-run",
                "--checksum",
                "--out-format=%i %n",
                f"--files-from={listing}",
                f"{source}/",
                remote_spec(self.nas, self.dest),
            ),
        )
        return [line.split(" ", 1)[1] for line in lines if line[:1] in "<>ch" and line[1:2] == "f"]

    def remove_gone(self, home: Path, tops: list[str]) -> list[str]:
        """Remove on the nas what is no longer under `tops` of the pi5's Barman home (nothing is sent)."""
        there = [f"{home}/{top}" for top in tops if (home / top).is_dir()]
        if not there:
            return []
        lines = self._rsync(
            "removal of what the pi5 no longer has",
            self._argv(
                "--recursive",
                "--delete",
                "--existing",
                "--ignore-existing",
                "--out-format=%i %n",
                *there,
                remote_spec(self.nas, self.dest + "/" + SERVER + "/"),
            ),
        )
        return [line.split(None, 1)[1] for line in lines if line.startswith("*deleting")]


class _Vanished(Failed):
    """A file went from under rsync: Barman moved or removed it; the copy starts over from a new set."""


@dataclass
class Copied:
    files: int = 0
    bytes: int = 0
    removed: int = 0
    seconds: float = 0.0
    base_backups: int = 0


def copy_to_nas(settings: Settings, nas: Place) -> Copied:
    """Copy the pi5's WAL tier to NAS_DIR/wal/ and check it; Failed (or VerificationError) when it could not."""
    tier = Tier(settings)
    home = tier.home / SERVER
    if not home.is_dir():
        raise Failed(f"no WAL tier to copy: {home} does not exist", "run setup-pitr (PITR=on)")
    started = time.monotonic()
    for left in tier.dir.glob(".nas-copy-*"):  # a killed run's (the orchestrator's lock: no other copy runs)
        shutil.rmtree(left, ignore_errors=True)
    copy = NasCopy(nas)
    last: KwError | None = None
    with tempfile.TemporaryDirectory(dir=tier.dir, prefix=".nas-copy-") as work:
        work = Path(work)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                result = _copy_once(copy, home, work)
            except (_Vanished, StageFailed) as exc:
                last = exc
                if attempt < ATTEMPTS:
                    log.warning("copying the WAL tier to the nas: %s; starting over", exc.message)
                    time.sleep(attempt)
                continue
            result.seconds = time.monotonic() - started
            return result
    raise Failed(
        f"copying the WAL tier to the nas failed after {ATTEMPTS} attempts: {last.message if last else '?'}",
        "check the nas and NAS_DIR; the dumps were pushed, and the next run copies what the nas lacks",
    )


def _copy_once(copy: NasCopy, home: Path, work: Path) -> Copied:
    found = snapshot(home)
    staged = work / "staged"  # the xlog.db as read, at its place under a home of its own
    (staged / SERVER / "wals").mkdir(parents=True, exist_ok=True)
    xlog = staged / SERVER / XLOG_DB
    xlog.write_bytes(found.xlog)
    os.utime(xlog, (found.xlog_mtime, found.xlog_mtime))  # unchanged, it is not sent again
    tops = [SERVER, *(f"{SERVER}/{d}" for d in ("wals", "base", "meta") if (home / d).is_dir())]
    identity = [f"{SERVER}/identity.json"] if (home / "identity.json").is_file() else []
    batches = [  # in this order: a base backup's meta last, once its files and WAL are there
        ("WAL and base backups", home.parent, [*tops, *identity, *(f"{SERVER}/{p}" for p in found.data)]),
        ("the WAL list", staged, [f"{SERVER}/{XLOG_DB}"]),
        ("the base backups' meta", home.parent, [f"{SERVER}/meta/{b}-backup.info" for b in found.done]),
    ]
    sent = []
    for number, (what, source, paths) in enumerate(batches):
        sent.append((what, source, copy.send(source, paths, work / f"list-{number}", what) if paths else []))
    for number, (what, source, paths) in enumerate(sent):
        wrong = copy.differing(source, paths, work / f"check-{number}", what)
        if wrong:  # sent again by content (a quick check by size and time would take it as there), then checked
            log.warning("the nas's copy of %s differs from the pi5's: sending it again", ", ".join(wrong[:3]))
            copy.send(source, wrong, work / f"resend-{number}", what, checksum=True)
            wrong = copy.differing(source, wrong, work / f"check-{number}", what)
        if wrong:
            raise VerificationError(
                f"the nas's copy of {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''} differs from the "
                "pi5's after it was sent twice",
                "check the nas's disk; the next run sends it again",
            )
    removed = copy.remove_gone(home, ["meta", "base", "wals"])
    for path in removed:
        log.info("the nas: removed %s (the pi5 no longer has it)", path)
    sizes = 0
    for _, source, paths in sent:
        for path in paths:
            try:
                sizes += os.lstat(source / path).st_size
            except FileNotFoundError:
                pass
    return Copied(
        files=sum(len(p) for _, _, p in sent), bytes=sizes, removed=len(removed), base_backups=len(found.done)
    )


def copy_in_run(this, nas: Place) -> None:
    """The orchestrator's step (PITR=on, after the dumps' push): its failure is the run's problem (exit 1 and an
    alert at the end), never the dumps'."""
    if this.settings["PITR"] != "on":
        return
    started = time.monotonic()
    try:
        done = copy_to_nas(this.settings, nas)
    except (KwError, OSError) as exc:
        if isinstance(exc, OSError):  # PITR_DIR full or unreadable
            exc = Failed(f"copying the WAL tier to the nas failed: {failure_line(exc)}", "check PITR_DIR on the pi5")
        log.error("the WAL tier's copy to the nas failed: %s", exc.message)
        this.problems.append(exc)
        seconds = time.monotonic() - started
        this.summary.wal = "failed"
    else:
        seconds = done.seconds
        this.summary.wal = "ok"
        log.info(
            "copied the WAL tier to the nas: %d base backup(s), %d file(s) sent (%s), %d removed, checked by "
            "checksum, in %.1fs",
            done.base_backups,
            done.files,
            size(done.bytes),
            done.removed,
            seconds,
        )
    this.summary.wal_seconds = seconds
    if this.monitor:
        this.monitor.gauge("wal.nas_copy_seconds", round(seconds, 3))


def plan_in_run(settings: Settings, nas: Place) -> None:
    """The dry run's line for the step."""
    if settings["PITR"] == "on":
        target = nas.local_dir() / NAS_SUBDIR if nas.is_local else f"{nas.host}:{nas.remote_path(NAS_SUBDIR)}"
        dry("would copy the WAL tier (base backups, WAL) from %s to %s and check it", Tier(settings).home, target)


# --- reading a place's state (list-backups) ----------------------------------------------------------
# $1: Barman's server home. Each base backup's info between `I <name>-backup.info` and `E`, the xlog.db
# between `X` and `E`, then `F <size> <mtime> <path>` for each file under wals/ and streaming/, and `B <bytes>`
# for everything under the home (apparent sizes, as status.du counts).
READ_SCRIPT = r"""
cd -- "$1" 2>/dev/null || { echo NODIR; exit 0; }
for f in meta/*-backup.info; do
  [ -f "$f" ] || continue
  printf 'I %s\n' "${f#meta/}"; cat -- "$f"; printf '\nE\n'
done
if [ -f wals/prod-xlog.db ]; then printf 'X\n'; cat -- wals/prod-xlog.db; printf '\nE\n'; fi
for d in wals streaming; do
  [ -d "$d" ] && find "$d" -type f -exec stat -c 'F %s %Y %n' {} + 2>/dev/null
done
printf 'B %s\n' "$(find . -type f -exec stat -c %s {} + 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')"
exit 0
"""


BACKUP_ID = re.compile(r"[0-9A-Za-z_.-]+")


def parse(text: str, now: datetime | None = None) -> State | None:
    """READ_SCRIPT's output judged as status.from_files judges the files themselves; None when the directory does
    not exist. The size is the place's own count."""
    lines = text.splitlines()
    if lines[:1] == ["NODIR"]:
        return None
    infos: dict[str, list[str]] = {}
    xlog: list[str] = []
    on_disk: dict[str, tuple[int, int]] = {}  # wals/ and streaming/ paths: size, mtime
    total = 0
    block: list[str] | None = None
    for line in lines:
        if block is not None:
            if line == "E":
                block = None
            else:
                block.append(line)
        elif line.startswith("I ") and BACKUP_ID.fullmatch(line[2:]):
            block = infos.setdefault(line[2:], [])
        elif line == "X":
            block = xlog
        elif line.startswith("F "):
            parts = line.split(" ", 3)
            if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
                on_disk[parts[3]] = (int(parts[1]), int(parts[2]))
        elif line.startswith("B ") and line[2:].strip().isdigit():
            total = int(line[2:])
    backups = [
        status.base_backup(name.removesuffix("-backup.info"), info)
        for name, info in sorted(infos.items())
        if name.endswith("-backup.info")
    ]
    listed = status.listed_wals(xlog)
    missing = [w.name for w in listed if f"wals/{w.name[:16]}/{w.name}" not in on_disk]
    streaming = [
        status.Wal(path.removeprefix("streaming/"), length, mtime)
        for path, (length, mtime) in on_disk.items()
        if path.startswith("streaming/") and WAL_NAME.fullmatch(path.removeprefix("streaming/"))
    ]
    return status.judge(status.Files(backups, listed, missing, streaming, total), now)


@dataclass
class Section:
    """One place's "Point in time" section."""

    place: Place  # its dir: the WAL tier's (PITR_DIR on the pi5, NAS_DIR/wal on the nas)
    state: State | None = None
    error: str | None = None  # unreachable: why

    @property
    def label(self) -> str:
        where = self.place.host.split("@", 1)[-1]
        return f"Point in time, {LABELS[self.place.name]} ({where}:{self.place.dir.rstrip('/')}/)"

    @property
    def status(self) -> str:
        return "unreachable" if self.error else self.state.status

    def as_json(self) -> dict:
        if self.error:
            return dict.fromkeys(JSON_KEYS) | {"place": self.place.name, "status": "unreachable"}
        full = self.state.as_json()
        return {"place": self.place.name, **{k: full[k] for k in JSON_KEYS if k != "place"}}


def tier_places(settings: Settings, only: list[str] | None = None) -> list[Place]:
    """The places holding the WAL tier, with their tier's directory as `dir`."""
    chosen = [name for name in ("pi5", "nas") if not only or name in only]
    found = []
    for name in chosen:
        where = place(settings, name)
        tier_dir = settings["PITR_DIR"] if name == "pi5" else where.dir.rstrip("/") + "/" + NAS_SUBDIR
        found.append(replace(where, dir=tier_dir))
    return found


def _server_home(where: Place) -> str:
    home = f"home/{SERVER}" if where.name == "pi5" else SERVER
    if where.is_local:
        return str(where.local_dir() / home)
    return where.remote_path(home)


def read_section(settings: Settings, where: Place, now: datetime | None = None, timeout: float = 30) -> Section:
    now = now or datetime.now(UTC)
    try:
        _, out, _ = run(
            where.script(READ_SCRIPT, _server_home(where), name=f"read {where.name}'s WAL tier"), timeout=timeout
        )
    except StageFailed as exc:
        return Section(where, error=exc.tail or exc.detail)
    except Failed as exc:  # a timeout
        return Section(where, error=exc.message)
    state = parse(out.decode(errors="replace"), now)
    if state is None:
        state = State()
        if where.name == "pi5":
            state.problems.append("no WAL tier here")
            state.hints.append("set PITR_DIR as on the pi5; make install-pi5 PITR=on, then setup-pitr, make it")
        else:
            state.problems.append("no copy of the WAL tier here yet")
            state.hints.append("the pi5's nightly backup-orchestrator (PITR=on there) makes it")
        return Section(where, state)
    status.check_base_age(state, settings, now)
    if state.recoverable_to is not None:
        state.lag_seconds = max(0.0, (now - state.recoverable_to).total_seconds())
    if where.name == "pi5":
        limit = timedelta(minutes=settings.int("PITR_MAX_LAG_MINUTES"))
        if state.lag_seconds is not None and state.lag_seconds > limit.total_seconds():
            state.problems.append(
                f"no WAL has arrived for {state.lag_seconds / 60:.0f} minutes "
                f"(PITR_MAX_LAG_MINUTES={settings['PITR_MAX_LAG_MINUTES']})"
            )
            state.hints.append("pitr-status on the pi5 says why")
    else:
        limit = timedelta(hours=float(settings["MAX_DUMP_AGE_HOURS"]))
        if state.lag_seconds is not None and state.lag_seconds > limit.total_seconds():
            state.problems.append(
                f"its newest WAL is {state.lag_seconds / 3600:.0f} hours old "
                f"(MAX_DUMP_AGE_HOURS={settings['MAX_DUMP_AGE_HOURS']}): the nightly copy has not run"
            )
            state.hints.append("see the pi5's backup-orchestrator log: the WAL tier's copy to the nas")
    return Section(where, state)


def gather(settings: Settings, only: list[str] | None = None) -> list[Section]:
    """Each place's section, asked at once; [] when PITR is off."""
    if settings["PITR"] != "on":
        return []
    places = tier_places(settings, only)
    now = datetime.now(UTC)
    with ThreadPoolExecutor(max_workers=max(1, len(places))) as pool:
        return list(pool.map(lambda where: read_section(settings, where, now), places))


def check_wanted(settings: Settings, only: list[str] | None) -> None:
    """list-backups --point-in-time: UsageError when there is nothing to show."""
    if settings["PITR"] != "on":
        raise UsageError("--point-in-time: PITR is off", "set PITR=on in the env file, as on the pi5")
    if not tier_places(settings, only):
        raise UsageError("--point-in-time: the WAL tier is on the pi5 and the nas", "--only pi5 nas, or no --only")


def as_text(sections: list[Section]) -> str:
    def stamp(when: datetime | None) -> str:
        return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "-"

    blocks = []
    for section in sections:
        lines = [f"{section.label}:"]
        state = section.state
        if section.error:
            lines.append(f"  unreachable: {section.error}")
            blocks.append("\n".join(lines))
            continue
        done = [b for b in state.base_backups if b.status == "DONE"]
        if state.lag_seconds is None:
            lag = "-"
        elif state.lag_seconds < 3600:
            lag = f"{state.lag_seconds:.0f} s"
        else:
            lag = f"{state.lag_seconds / 3600:.1f} hours"
        lag_name = "lag" if section.place.name == "pi5" else "newest WAL's age"
        lines += [
            f"  recoverable from {stamp(state.recoverable_from)} to {stamp(state.recoverable_to)}"
            f" ({state.window_hours:.1f} hours)",
            f"  {lag_name}: {lag}",
            f"  base backups: {len(done)}"
            + (f" (newest {done[-1].backup_id}, ended {stamp(done[-1].end_time)})" if done else ""),
            f"  size: {size(state.bytes)}",
            f"  status: {state.status}",
            *[f"  problem: {problem}" for problem in state.problems],
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def hint(sections: list[Section]) -> str:
    """What to do about failures(): each distinct hint once."""
    found = []
    for section in sections:
        if section.error:
            found.append("check the network, the ssh key and SSH_CONFIG")
        elif section.state.problems:
            found += section.state.hints or ["pitr-status on the pi5 says what to do"]
    return "; ".join(dict.fromkeys(found))


def failures(sections: list[Section]) -> list[str]:
    """What makes list-backups exit 1: an unreachable place, a FAILING tier."""
    found = []
    for section in sections:
        if section.error:
            found.append(f"{section.place.name}'s WAL tier unreachable ({section.error})")
        elif section.state.problems:
            found.append(f"{section.place.name}'s WAL tier FAILING ({'; '.join(section.state.problems)})")
    return found
