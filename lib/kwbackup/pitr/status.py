"""The WAL tier's state, read from Barman's files (so the nas copy reads the same way) and, on the pi5, from prod.

From the files alone: the base backups, the window (from the oldest complete base backup's end to the newest
WAL received), the size, and the WAL chain, checked segment by segment from the oldest base backup's first WAL
to the newest, the one still being streamed included: Barman's own check does not see a segment missing in
the middle. A gap before the newest base backup only moves the window's start past it; one after it fails.
On the pi5, PITR_DIR's room for the next segment. From prod, through the tunnel: the slot (missing, or
invalidated once the pi5 was away longer than max_slot_wal_keep_size allowed) and how far the pi5 trails.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..errors import Failed
from ..settings import Settings
from . import barman as barmanmod
from .barman import SERVER, SLOT, Tier

WAL_NAME = re.compile(r"([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?")
DEFAULT_SEGMENT = 16 << 20


@dataclass
class BaseBackup:
    backup_id: str
    status: str
    begin_wal: str
    end_time: datetime | None
    size: int
    segment_size: int


@dataclass
class Wal:
    name: str
    size: int
    time: float


@dataclass
class State:
    """What pitr-status and list-backups show; `problems` are the reasons to fail."""

    base_backups: list[BaseBackup] = field(default_factory=list)
    recoverable_from: datetime | None = None
    recoverable_to: datetime | None = None
    bytes: int = 0
    bytes_per_day: int = 0
    lag_seconds: float | None = None
    gaps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    prod: str = "not asked"

    @property
    def window_hours(self) -> float:
        if not (self.recoverable_from and self.recoverable_to):
            return 0.0
        return max(0.0, (self.recoverable_to - self.recoverable_from).total_seconds() / 3600)

    @property
    def status(self) -> str:
        return "ok" if not self.problems else "FAILING"

    def as_json(self) -> dict:
        def stamp(when: datetime | None) -> str | None:
            return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if when else None

        return {
            "from": stamp(self.recoverable_from),
            "to": stamp(self.recoverable_to),
            "lag_seconds": None if self.lag_seconds is None else round(self.lag_seconds, 1),
            "base_backups": len([b for b in self.base_backups if b.status == "DONE"]),
            "bytes": self.bytes,
            "bytes_per_day": self.bytes_per_day,
            "window_hours": round(self.window_hours, 2),
            "gaps": self.gaps,
            "prod": self.prod,
            "status": self.status,
            "problems": self.problems,
        }


def _info(lines: list[str]) -> dict[str, str]:
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _time(text: str | None) -> datetime | None:
    if not text or text == "None":
        return None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def base_backup(backup_id: str, info_lines: list[str]) -> BaseBackup:
    """One base backup from the lines of its meta/<id>-backup.info."""
    info = _info(info_lines)
    return BaseBackup(
        backup_id=backup_id,
        status=info.get("status", "UNKNOWN"),
        begin_wal=info.get("begin_wal", ""),
        end_time=_time(info.get("end_time")),
        size=int(info.get("size") or 0) if (info.get("size") or "").isdigit() else 0,
        segment_size=int(info["xlog_segment_size"])
        if (info.get("xlog_segment_size") or "").isdigit()
        else DEFAULT_SEGMENT,
    )


def base_backups(server_home: Path) -> list[BaseBackup]:
    """The base backups Barman holds, oldest first."""
    meta = server_home / "meta"
    return [
        base_backup(info_file.name.removesuffix("-backup.info"), info_file.read_text(errors="replace").splitlines())
        for info_file in (sorted(meta.glob("*-backup.info")) if meta.is_dir() else [])
    ]


def listed_wals(xlog_lines: list[str]) -> list[Wal]:
    """The WAL segments the xlog.db lists (name, size, time, compression per line)."""
    listed = []
    for line in xlog_lines:
        parts = line.split("\t")
        if len(parts) >= 3 and WAL_NAME.fullmatch(parts[0]):  # not history and backup label files
            listed.append(Wal(parts[0], int(parts[1]), float(parts[2])))
    return listed


def wals(server_home: Path) -> tuple[list[Wal], list[str]]:
    """The WAL files Barman lists (xlog.db) and, of those, the ones missing on disk."""
    db = server_home / "wals" / f"{SERVER}-xlog.db"
    listed = listed_wals(db.read_text(errors="replace").splitlines()) if db.exists() else []
    missing = [w.name for w in listed if not (server_home / "wals" / w.name[:16] / w.name).exists()]
    return listed, missing


def streamed(server_home: Path) -> list[Wal]:
    """The segments in streaming/: the one pg_receivewal is writing (.partial, its time the last WAL that reached
    it) and the complete ones Barman's next cron moves to wals/ (within a minute: they count as received)."""
    streaming = server_home / "streaming"
    found = []
    for entry in os.scandir(streaming) if streaming.is_dir() else []:
        if WAL_NAME.fullmatch(entry.name):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # Barman archived it meanwhile: the xlog.db, read after this, lists it
            found.append(Wal(entry.name, st.st_size, st.st_mtime))
    return found


def _segno(name: str, segment_size: int) -> int:
    per_log = 0x100000000 // segment_size
    return int(name[8:16], 16) * per_log + int(name[16:24], 16)


def _name(timeline: str, segno: int, segment_size: int) -> str:
    per_log = 0x100000000 // segment_size
    return f"{timeline}{segno // per_log:08X}{segno % per_log:08X}"


def _gap_runs(backups: list[BaseBackup], listed: list[Wal], streaming: list[Wal]) -> list[tuple[int, int]]:
    """The runs of segment numbers missing between the oldest complete base backup's first WAL and the newest WAL
    received. A new timeline carries on where the old one stopped, so a segment is there when any timeline has it."""
    done = [b for b in backups if b.status == "DONE" and WAL_NAME.fullmatch(b.begin_wal or "")]
    if not done:
        return []
    segment_size = done[-1].segment_size
    start = min(_segno(b.begin_wal, segment_size) for b in done)
    have = {_segno(w.name, segment_size) for w in [*listed, *streaming]}
    have = {n for n in have if n >= start}
    if not have:
        return []
    runs, run_start = [], None
    for segno in range(start, max(have) + 1):
        if segno not in have and run_start is None:
            run_start = segno
        elif segno in have and run_start is not None:
            runs.append((run_start, segno - 1))
            run_start = None
    return runs


def _gap_name(backups: list[BaseBackup], run: tuple[int, int]) -> str:
    done = [b for b in backups if b.status == "DONE" and WAL_NAME.fullmatch(b.begin_wal or "")]
    timeline, segment_size = done[-1].begin_wal[:8], done[-1].segment_size
    first, last = _name(timeline, run[0], segment_size), _name(timeline, run[1], segment_size)
    return first if first == last else f"{first}..{last}"


def chain_gaps(backups: list[BaseBackup], listed: list[Wal], streaming: list[Wal]) -> list[str]:
    """Segments missing between the oldest complete base backup's first WAL and the newest WAL received."""
    return [_gap_name(backups, run) for run in _gap_runs(backups, listed, streaming)]


def du(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue  # Barman moved it meanwhile
    return total


@dataclass
class Files:
    """What a copy of Barman's home holds, as read: from its files here (read), or from a listing of another
    place's (pitr/nas.py)."""

    backups: list[BaseBackup]
    listed: list[Wal]  # what the xlog.db lists
    missing: list[str]  # of those, the ones not on disk
    streaming: list[Wal]
    bytes: int


def read(server_home: Path) -> Files:
    backups = base_backups(server_home)
    # streaming/ before the xlog.db: a segment Barman archives in between is then seen in one or the other.
    streaming = streamed(server_home)
    listed, missing = wals(server_home)
    return Files(backups, listed, missing, streaming, du(server_home))


def _newest_start(done: list[BaseBackup]) -> int:
    """The first segment of the newest complete base backup: a gap before it cuts the window, a gap after it fails."""
    newest = next((b for b in reversed(done) if WAL_NAME.fullmatch(b.begin_wal or "")), None)
    return _segno(newest.begin_wal, newest.segment_size) if newest else 0


def _gap_runs_of(files: Files) -> list[tuple[int, int]]:
    return _gap_runs(files.backups, [w for w in files.listed if w.name not in files.missing], files.streaming)


def from_files(server_home: Path, now: datetime | None = None) -> State:
    """The state a copy of Barman's home holds, with the problems the files alone show."""
    files = read(server_home)
    done = [b for b in files.backups if b.status == "DONE"]
    if any(run[1] >= _newest_start(done) for run in _gap_runs_of(files)):
        time.sleep(0.5)  # Barman unlinks a segment from streaming/ a moment before its xlog.db line lands
        files = read(server_home)
    return judge(files, now)


def judge(files: Files, now: datetime | None = None) -> State:
    """The state `files` hold, with the problems they alone show."""
    now = now or datetime.now(UTC)
    state = State()
    state.base_backups = files.backups
    done = [b for b in state.base_backups if b.status == "DONE"]
    # A gap before the newest base backup's first WAL cuts the window, no more: what lies after it is recoverable
    # from that base backup on, what lies before it from the older ones. Alarming about it until retention drops
    # the older base backups (PITR_WINDOW_DAYS) would be an alarm nobody can clear; a gap after it is a loss now.
    newest_start = _newest_start(done)
    listed, streaming, runs = files.listed, files.streaming, _gap_runs_of(files)
    if done:
        state.recoverable_from = min((b.end_time for b in done if b.end_time), default=None)
    received = max((w.time for w in [*listed, *streaming]), default=None)
    if received is not None:
        state.recoverable_to = datetime.fromtimestamp(received, UTC)
    state.bytes = files.bytes
    if state.recoverable_from and listed:
        days = max((now - state.recoverable_from).total_seconds() / 86400, 1 / 24)
        state.bytes_per_day = int(sum(w.size for w in listed if w.time >= state.recoverable_from.timestamp()) / days)
    state.gaps = [_gap_name(state.base_backups, run) for run in runs]
    if not done:
        state.problems.append("no complete base backup")
        state.hints.append("take one: pitr-barman backup --wait prod")
    failing = [name for run, name in zip(runs, state.gaps, strict=True) if run[1] >= newest_start]
    if runs and not failing:
        after = [b for b in done if b.end_time and WAL_NAME.fullmatch(b.begin_wal or "")]
        after = [b for b in after if _segno(b.begin_wal, b.segment_size) > runs[-1][1]]
        state.recoverable_from = min((b.end_time for b in after), default=state.recoverable_from)
    if failing:
        state.problems.append(f"the WAL chain has a gap: {', '.join(failing)} missing")
        state.hints.append(
            "recovery cannot pass a gap: take a new base backup now (pitr-barman backup --wait prod); "
            "moments before the gap stay recoverable from the older base backups"
        )
    return state


def check_base_age(state: State, settings: Settings, now: datetime) -> None:
    done = [b for b in state.base_backups if b.status == "DONE" and b.end_time]
    allowed = timedelta(days=settings.int("PITR_BASE_BACKUP_DAYS") + 1)
    if done and now - done[-1].end_time > allowed:
        age = (now - done[-1].end_time).total_seconds() / 86400
        state.problems.append(
            f"the newest base backup ({done[-1].backup_id}) is {age:.1f} days old "
            f"(PITR_BASE_BACKUP_DAYS={settings['PITR_BASE_BACKUP_DAYS']})"
        )
        state.hints.append("check the pitr-base-backup cron line and its log; take one: pitr-base-backup")


def space_problem(tier: Tier) -> tuple[str, str] | None:
    """PITR_DIR too full for the next WAL segment (pg_receivewal writes each one whole, zero-filled first): the
    stream stops and prod's slot holds its WAL meanwhile, up to PITR_PROD_WAL_KEEP_GB."""
    from ..log import size

    fs = os.statvfs(tier.dir)
    free = fs.f_bavail * fs.f_frsize
    backups = base_backups(tier.server_home)
    segment = backups[-1].segment_size if backups else DEFAULT_SEGMENT
    if free >= 2 * segment:
        return None
    return (
        f"PITR_DIR {tier.dir} is full ({size(free)} free; each WAL segment needs {size(segment)}): "
        "WAL from prod is not being received",
        f"free space there (or move PITR_DIR to a larger disk) within PITR_PROD_WAL_KEEP_GB="
        f"{tier.settings['PITR_PROD_WAL_KEEP_GB']} GB of prod's WAL, then run pitr-cron",
    )


def check_prod(state: State, tier: Tier, settings: Settings, now: datetime) -> None:
    """Through the tunnel: prod's major against the pi5's tools, the slot, and the lag."""
    import psycopg

    try:
        conn = tier.connect()
    except psycopg.OperationalError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        state.prod = "unreachable"
        state.problems.append(f"prod's PostgreSQL is unreachable through the tunnel: {reason}")
        state.hints.append(
            "check the tunnel (systemctl status kw-backup-pitr-tunnel) and prod; prod keeps WAL for the slot "
            f"up to PITR_PROD_WAL_KEEP_GB={settings['PITR_PROD_WAL_KEEP_GB']}"
        )
        return
    state.prod = "reachable"
    with conn:
        major = int(conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()[0])
        try:
            barmanmod.check_client(tier, major)
        except Failed as exc:
            state.problems.append(exc.message)
            state.hints.append(exc.hint)
        recorded = tier.prod_major()
        if recorded != major:
            state.problems.append(
                f"prod runs PostgreSQL {major} but the pi5's WAL tier was set up for PostgreSQL {recorded} "
                f"(Barman streams and restores with the pi5's {recorded} client tools)"
            )
            state.hints.append(
                f"install postgresql-client-{major} on the pi5, run setup-pitr again, then start a new chain: "
                "pitr-base-backup --new-chain"
            )
        slot = conn.execute(
            "SELECT active, wal_status FROM pg_replication_slots WHERE slot_name = %s", [SLOT]
        ).fetchone()
        # sent_lsn, not flush_lsn: the receiver reports what it flushed only every 10 s (no --synchronous), while
        # what prod has sent reaches the pi5 within the link's round trip.
        caught_up = conn.execute(
            "SELECT coalesce(bool_or(sent_lsn >= pg_current_wal_lsn()), false) FROM pg_stat_replication "
            "WHERE application_name = 'barman_receive_wal'"
        ).fetchone()[0]
    # One command of ours, not Barman's five: the steps depend on what is there (a receiver running, a slot left)
    # and must not race the minute's barman cron starting receive-wal between them.
    repair = "pitr-base-backup --new-chain"
    if slot is None:
        state.problems.append(f"prod has no replication slot {SLOT}: WAL is not kept for the pi5")
        state.hints.append(f"recreate it and start a new chain: {repair}")
    elif slot[1] == "lost":
        state.problems.append(
            f"prod invalidated the replication slot {SLOT}: the pi5 was away longer than "
            f"max_slot_wal_keep_size ({settings['PITR_PROD_WAL_KEEP_GB']} GB) allowed, and WAL was lost"
        )
        state.hints.append(
            f"start a new chain (a new slot, streaming from prod's position now, a base backup): {repair}; "
            "moments before the loss stay recoverable from the older base backups"
        )
    newest = state.recoverable_to
    if caught_up:
        state.lag_seconds = 0.0
    elif newest is not None:
        state.lag_seconds = max(0.0, (now - newest).total_seconds())
    if state.lag_seconds is None:
        state.problems.append("no WAL has arrived from prod yet")
        state.hints.append("run setup-pitr")
    elif state.lag_seconds > settings.int("PITR_MAX_LAG_MINUTES") * 60:
        state.problems.append(
            f"no WAL has arrived from prod for {state.lag_seconds / 60:.0f} minutes "
            f"(PITR_MAX_LAG_MINUTES={settings['PITR_MAX_LAG_MINUTES']})"
        )
        state.hints.append(
            f"is Barman's receive-wal running? see {tier.log_file} and the pitr-cron line; "
            f"pitr-barman receive-wal {SERVER} shows why it stops"
        )


def gather(settings: Settings, now: datetime | None = None, ask_prod: bool = True) -> State:
    """The pi5's WAL tier, checked."""
    now = now or datetime.now(UTC)
    tier = Tier(settings)
    tier.check_owner()
    state = from_files(tier.server_home, now)
    full = space_problem(tier)
    if full:
        state.problems.append(full[0])
        state.hints.append(full[1])
    check_base_age(state, settings, now)
    if ask_prod:
        check_prod(state, tier, settings, now)
    return state


def as_text(state: State, title: str = "Point in time (pi5)") -> str:
    def stamp(when: datetime | None) -> str:
        return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "-"

    from ..log import size

    lag = "-" if state.lag_seconds is None else f"{state.lag_seconds:.0f} s"
    done = [b for b in state.base_backups if b.status == "DONE"]
    lines = [
        f"{title}:",
        f"  recoverable from {stamp(state.recoverable_from)} to {stamp(state.recoverable_to)}"
        f" ({state.window_hours:.1f} hours)",
        f"  lag: {lag}  prod: {state.prod}",
        f"  base backups: {len(done)}"
        + (f" (newest {done[-1].backup_id}, ended {stamp(done[-1].end_time)})" if done else ""),
        f"  size: {size(state.bytes)}  WAL per day: {size(state.bytes_per_day)}",
        *([f"  gaps in the WAL chain: {', '.join(state.gaps)}"] if state.gaps else []),
        f"  status: {state.status}",
        *[f"  problem: {problem}" for problem in state.problems],
    ]
    return "\n".join(lines)
