"""A moment of prod's database, recovered from the WAL tier into a private temporary server, as a dump.

TIME (or latest) -> against the window (outside it or in the future: exit 2) -> the newest base backup
before it, its PostgreSQL major against this machine's server programs (exit 1 naming both) and the room
for it and its WAL (exit 1) -> `barman restore` into a run directory of its own (0700, flock'ed while this
process lives, swept by the next run when killed) -> its control data read (a Pi is arm64, prod usually
x86_64) -> the server started socket-only, replaying to TIME and pausing there (latest: to the end of the
WAL held, then promoted) -> checked: it reached TIME and replayed the WAL held up to it (a gap or missing
WAL: exit 3 naming the latest reachable moment) -> recovery ended there (what was open then rolls back,
releasing the locks the replay held for it) -> pg_dump of DB_NAME counted, compressed and hashed as
backup-db does -> each table's rows against the recovered server's own -> a dump and its manifest under the
moment's name, ready for the safe restore. Prod, its data directory and its WAL stream are never touched.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from .. import backup, catalog, files, names, rundir
from ..errors import Failed, UsageError, VerificationError
from ..log import log, size
from ..run import Cmd, run
from ..settings import Settings
from . import status
from .barman import PG_LIB, SERVER, Tier

RUN_PREFIX = "kw-recover-run-"
SOCKET_PREFIX = "kw-recover-socket-"  # in /tmp: a socket's path must fit 107 bytes, wherever the data goes
SOCKET_PORT = 5432  # only names the socket, in a directory of its own
READY_SECONDS = 600  # pg_ctl start: until the server is consistent (the base backup's own WAL replayed)
PROGRESS_SECONDS = 10
MOMENT_NAME = "kw_app_production-{:%Y%m%d-%H%M%S}.sql.gz"  # a migration-form name: rotation never counts it
# What PostgreSQL says when the WAL ended before a commit after the target: a moment after the last commit
# received, or WAL missing.
ENDED_EARLY = "recovery ended before configured recovery target was reached"
LAST_COMMIT = re.compile(r"last completed transaction was at log time (.+?)(?:$|\n)")
REDO_DONE = re.compile(r"redo done at ([0-9A-F]+)/([0-9A-F]+)")
COMMIT = re.compile(r"desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


@dataclass(frozen=True)
class Target:
    """The moment asked for: a UTC time, or None for the newest WAL held (`latest`)."""

    when: datetime | None

    def __str__(self) -> str:
        return "latest" if self.when is None else stamp(self.when)


def stamp(when: datetime | None) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "none"


def parse_time(text: str) -> Target:
    """`latest`, ISO 8601 with an offset, or `YYYY-MM-DD HH:MM[:SS]` as UTC; UsageError otherwise. Whether it is
    in the future is the window's to say (Window.check), by the clock of the machine that holds the WAL."""
    if text == "latest":
        return Target(None)
    utc = re.fullmatch(r"(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)", text)
    try:
        when = datetime.fromisoformat(f"{utc[1]}T{utc[2]}" if utc else text)
    except ValueError:
        when = None
    if when is None or (not utc and when.tzinfo is None) or not re.match(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}", text):
        raise UsageError(
            f"--at {text!r} is not a time",
            "give ISO 8601 with an offset (2024-01-15T14:31:00+01:00), YYYY-MM-DD HH:MM[:SS] as UTC, or latest",
        )
    return Target(when.replace(tzinfo=UTC) if utc else when.astimezone(UTC))


@dataclass
class Window:
    """What a WAL tier can recover: from its oldest complete base backup's end to `to`."""

    start: datetime | None
    to: datetime | None
    live: bool  # the pi5 has received all prod has written: every moment up to now is held

    def check(self, target: Target, now: datetime) -> None:
        if self.start is None:
            raise Failed("the WAL tier holds no complete base backup: nothing to recover", "pitr-status says why")
        end = now if self.live else self.to
        if target.when is None or self.start <= target.when <= end:
            return
        # Now is this machine's: with a laptop clock ahead of it, "a second ago" there is in the future here.
        why = f"is in the future (now: {stamp(now)})" if target.when > now else "is outside the window"
        raise UsageError(
            f"--at {target} {why}: recoverable from {stamp(self.start)} to {stamp(end)}",
            "give a moment inside it, or latest (list-backups --point-in-time shows each place's window)",
        )


@dataclass
class Recovered:
    """A moment as a dump: its file, what it reached, and how long each step took."""

    path: Path
    target: Target
    reached: datetime | None  # the newest transaction replayed
    base_backup: str
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def moment(self) -> datetime:
        """The moment the data is from: the target, or for latest the newest transaction replayed."""
        return self.target.when or self.reached or datetime.now(UTC)

    def as_json(self) -> dict:
        return {
            "name": self.path.name,
            "dir": str(self.path.parent),
            "target": None if self.target.when is None else self.target.when.isoformat(),
            "reached": None if self.reached is None else self.reached.isoformat(),
            "base_backup": self.base_backup,
            "seconds": self.seconds,
        }


def choose_backup(files_: status.Files, target: Target) -> status.BaseBackup:
    """The newest complete base backup that ended before the target."""
    done = [b for b in files_.backups if b.status == "DONE" and b.end_time]
    before = [b for b in done if target.when is None or b.end_time <= target.when]
    if not before:
        raise UsageError(
            f"--at {target} is before the oldest base backup"
            + (f" (it ended {stamp(done[0].end_time)})" if done else ""),
            "give a later moment (list-backups --point-in-time shows the window)",
        )
    return before[-1]


def server_bindir(major: int) -> Path:
    """This machine's PostgreSQL server programs of the base backup's major: recovery needs that very major."""
    bindir = PG_LIB / str(major) / "bin"
    if not all((bindir / tool).exists() for tool in ("postgres", "pg_ctl", "pg_controldata", "pg_dump", "pg_waldump")):
        have = sorted(p.name for p in PG_LIB.glob("*") if (p / "bin" / "postgres").exists()) if PG_LIB.is_dir() else []
        raise Failed(
            f"the base backup is PostgreSQL {major}, and this machine has no PostgreSQL {major} server "
            f"(it has: {', '.join(have) or 'none'})",
            f"apt-get install postgresql-{major} here (PGDG's apt repository for other majors)",
        )
    return bindir


def wals_from(files_: status.Files, chosen: status.BaseBackup) -> list[status.Wal]:
    """The segments Barman copies for a recovery of `chosen`: every one from the backup's first to the newest, the
    one still being streamed included, whatever the target (measured: bench/pitr_restore)."""
    segment = chosen.segment_size
    first = status._segno(chosen.begin_wal, segment)
    held = sorted({w.name: w for w in [*files_.listed, *files_.streaming]}.values(), key=lambda w: w.name)
    return [wal for wal in held if status._segno(wal.name, segment) >= first]


def first_gap(files_: status.Files, chosen: status.BaseBackup, target: Target) -> int | None:
    """The first segment a recovery of `chosen` to `target` needs that is not on disk: recovery stops before it."""
    segment = chosen.segment_size
    present = {
        status._segno(w.name, segment): w
        for w in [*(w for w in files_.listed if w.name not in files_.missing), *files_.streaming]
    }
    segno = status._segno(chosen.begin_wal, segment)
    newest = max(present, default=segno)
    while segno <= newest:
        wal = present.get(segno)
        if wal is None:
            return segno
        if target.when is not None and wal.time >= target.when.timestamp():
            return None
        segno += 1
    return None


def last_commit_before(home: Path, files_: status.Files, chosen: status.BaseBackup, gap: int, bindir: Path, work: Path):
    """The newest commit in the segments of the WAL tier `home` before `gap`: the latest reachable moment."""
    segment = chosen.segment_size
    by_segno = {status._segno(w.name, segment): w for w in [*files_.listed, *files_.streaming]}
    paths = []
    for segno in range(gap - 1, status._segno(chosen.begin_wal, segment) - 1, -1):
        wal = by_segno.get(segno)
        if wal is None:
            break
        archived = home / "wals" / wal.name[:16] / wal.name
        paths.append(archived if archived.exists() else home / "streaming" / wal.name)
    return newest_commit(paths, bindir, work)


def newest_commit(segments: list[Path], bindir: Path, work: Path) -> datetime | None:
    """The newest commit pg_waldump finds in `segments` (newest first; gzip'd or not)."""
    for found in segments:
        plain = work / found.name.removesuffix(".partial")  # pg_waldump reads the segment from its name
        with open(found, "rb") as src, open(plain, "wb") as dst:
            head = src.read(2)
            src.seek(0)
            shutil.copyfileobj(gzip.open(src) if head == b"\x1f\x8b" else src, dst)
        try:
            _, out, _ = run(Cmd([bindir / "pg_waldump", "-r", "Transaction", plain], name="pg_waldump"), check=False)
        finally:
            plain.unlink(missing_ok=True)
        commits = COMMIT.findall(out.decode(errors="replace"))
        if commits:
            return datetime.fromisoformat(commits[-1]).replace(tzinfo=UTC)
    return None


def check_room(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if free < needed:
        raise Failed(
            f"not enough space in {where} to recover: need {size(needed)} (the base backup, its WAL and the dump), "
            f"have {size(free)}",
            "free space there, or recover from the nas copy on a machine with room (--from-nas)",
        )


class _Server:
    """The recovered server: its run directory, started and polled."""

    def __init__(self, base: Path, sockets: Path, bindir: Path, user: str | None, db_user: str):
        self.base, self.sockets, self.bindir, self.user = base, sockets, bindir, user
        self.data = base / "data"
        self.log_file = base / "server.log"
        self.params = {"host": str(sockets), "port": str(SOCKET_PORT), "user": db_user, "dbname": "postgres"}

    def configure(self) -> None:
        """Prod's settings stay but what would reach out or need prod's files: socket only, in the run directory,
        trust on that 0700 socket alone (no TCP), no archiving, no extensions preloaded, a small cache."""
        hba = self.base / "hba.conf"
        hba.write_text("local all all trust\n")
        overrides = {
            "listen_addresses": "",
            "port": str(SOCKET_PORT),
            "unix_socket_directories": str(self.sockets),
            "unix_socket_permissions": "0700",
            "hba_file": str(hba),
            "ident_file": "",
            "archive_mode": "off",
            "shared_preload_libraries": "",
            "hot_standby": "on",
            "logging_collector": "off",
            "shared_buffers": "128MB",
            "huge_pages": "off",
            "fsync": "off",
            "synchronous_commit": "off",
        }
        with open(self.data / "postgresql.auto.conf", "a") as conf:  # after Barman's recovery settings: last wins
            conf.write("# kw-backup: a private recovered server\n")
            conf.writelines(f"{key} = '{value}'\n" for key, value in overrides.items())
        if self.user:
            run(Cmd(["chown", "-R", f"{self.user}:", str(self.base)], name="chown recovered data"), timeout=3600)
        self.data.chmod(0o700)

    def control_data(self) -> str:
        code, out, err = run(
            Cmd(rundir.as_user(self.user, [self.bindir / "pg_controldata", self.data]), name="pg_controldata"),
            check=False,
            timeout=60,
        )
        if code:
            raise Failed(
                f"this machine cannot read the recovered control data: {err.strip()}",
                "recover on a machine of prod's PostgreSQL major and architecture's byte order (docs/pitr.md)",
            )
        return out.decode(errors="replace")

    def start(self) -> None:
        argv = [self.bindir / "pg_ctl", "-D", self.data, "-l", self.log_file, "-w", "-t", str(READY_SECONDS), "start"]
        code, _, err = run(Cmd(rundir.as_user(self.user, argv), name="pg_ctl start"), check=False, timeout=None)
        if code and (self.running() or ENDED_EARLY in self.log_text()):
            return  # consistent only after pg_ctl's wait, or the WAL ended before the target: _replay tells which
        if code:
            raise Failed(f"the recovered server did not start: {self.last_error()}", f"see {self.log_file}")

    def running(self) -> bool:
        code, _, _ = run(
            Cmd(rundir.as_user(self.user, [self.bindir / "pg_ctl", "-D", self.data, "status"]), name="pg_ctl status"),
            check=False,
            timeout=60,
        )
        return code == 0

    def end_recovery(self) -> None:
        """Paused at the moment, recovery ends there: the transactions open then roll back and let go of the locks
        the replay holds for them (a migration's, on a table pg_dump would wait for ever to read)."""
        with self.connect() as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # else promoted at the WAL's end already
                conn.execute("SELECT pg_wal_replay_resume()")  # paused at the recovery target, this promotes
        deadline = time.monotonic() + READY_SECONDS
        while (state := self.poll()) is None or state[0]:
            if state is None and not self.running():
                raise Failed(f"the recovered server stopped: {self.last_error()}", f"see {self.log_file}")
            if time.monotonic() > deadline:
                raise Failed(f"the recovered server kept recovering {READY_SECONDS} s on", f"see {self.log_file}")
            time.sleep(0.2)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def last_error(self) -> str:
        lines = [line for line in self.log_text().splitlines() if "FATAL" in line or "PANIC" in line]
        return (lines[-1].split("FATAL:", 1)[-1].split("PANIC:", 1)[-1].strip()) if lines else "no message"

    def connect(self):
        return psycopg.connect(**self.params, autocommit=True, connect_timeout=10)

    def poll(self) -> tuple[bool, str, datetime | None, int] | None:
        """(in recovery, pause state, newest transaction replayed, replay LSN), or None when it is not up."""
        try:
            with self.connect() as conn:
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() "
                    "ELSE 'promoted' END, pg_last_xact_replay_timestamp(), "
                    "pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint"
                ).fetchone()
        except psycopg.OperationalError:
            return None
        return row[0], row[1], row[2].astimezone(UTC) if row[2] else None, int(row[3] or 0)


def _newest_segno(files_: status.Files, segment: int) -> int:
    return max(status._segno(w.name, segment) for w in [*files_.listed, *files_.streaming])


def _replay(server: _Server, target: Target) -> tuple[datetime | None, int]:
    """Wait for the server to pause at the target (latest: to be promoted at the end of the WAL); the newest
    transaction replayed and the LSN replayed. Failed when it dies or stops replaying; (None, -1) when the WAL
    ended first."""
    last_said = moved = time.monotonic()
    last_lsn = -1
    while True:
        state = server.poll()
        if state is not None:
            recovering, pause, reached, lsn = state
            if (target.when is not None and pause == "paused") or not recovering:
                return reached, lsn
            if lsn != last_lsn:
                last_lsn, moved = lsn, time.monotonic()
            elif time.monotonic() - moved > READY_SECONDS:
                raise Failed(
                    f"the recovered server replayed nothing for {READY_SECONDS} s (at {stamp(reached)})",
                    f"see {server.log_file}",
                )
            if time.monotonic() - last_said > PROGRESS_SECONDS:
                log.info("replaying WAL: at %s, on the way to %s", stamp(reached), target)
                last_said = time.monotonic()
        elif not server.running():
            text = server.log_text()
            if ENDED_EARLY in text:
                return None, -1
            raise Failed(f"the recovered server stopped: {server.last_error()}", f"see {server.log_file}")
        time.sleep(0.2)


def _last_commit(text: str) -> datetime | None:
    found = LAST_COMMIT.findall(text)
    if not found:
        return None
    try:
        return datetime.fromisoformat(found[-1].strip().replace(" UTC", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def _redo_end(text: str) -> int | None:
    found = REDO_DONE.findall(text)
    return (int(found[-1][0], 16) << 32) + int(found[-1][1], 16) if found else None


class _RecoveredDb:
    """The recovered server's DB_NAME, as backup.write_dump dumps a Database."""

    def __init__(self, server: _Server, name: str):
        self.server, self.name = server, name

    def dump(self) -> Cmd:
        argv = [self.server.bindir / "pg_dump", "--no-password", "--format=plain", "-d", self.name]
        env = {"PGHOST": self.server.params["host"], "PGPORT": self.server.params["port"]}
        return Cmd(rundir.as_user(self.server.user, [*argv, "-U", self.server.params["user"]]), name="pg_dump", env=env)


def _own_rows(server: _Server, dbname: str) -> dict[str, int]:
    with psycopg.connect(**{**server.params, "dbname": dbname}, autocommit=True, connect_timeout=10) as conn:
        tables = conn.execute(catalog.TABLES).fetchall()
        counted = conn.execute(catalog.own_rows_sql([quoted for _, _, quoted in tables])).fetchall() if tables else []
    return {f"{tables[i][0]}.{tables[i][1]}": n for i, n in counted}


def recover(settings: Settings, tier: Tier, work: Path, target: Target, window: Window, out: Path) -> Recovered:
    """The moment `target` of the WAL tier `tier` as a dump in `out`; the recovery runs in `work`."""
    now = datetime.now(UTC)
    window.check(target, now)
    held = status.read(tier.server_home)
    chosen = choose_backup(held, target)
    major = major_of(tier.server_home, chosen.backup_id)
    bindir = server_bindir(major)
    gap = first_gap(held, chosen, target)
    if gap is not None:  # Barman would stop at it too, copying; name the latest moment before it instead
        reached = last_commit_before(tier.server_home, held, chosen, gap, bindir, work)
        raise _missing(target, reached, chosen.backup_id)
    wal_bytes = len(wals_from(held, chosen)) * chosen.segment_size  # Barman writes them uncompressed
    user = rundir.service_user()
    # Run as root, the server runs as another user, who cannot pass root's private directories: /tmp, as the drill.
    work = work if user is None else rundir.RUN_ROOT
    check_room(work, int((chosen.size + wal_bytes) * 1.1) + (64 << 20))
    rundir.sweep(RUN_PREFIX, root=work)
    seconds: dict[str, float] = {}
    rundir.sweep(SOCKET_PREFIX)
    with (
        rundir.run_dir(RUN_PREFIX, user, bindir, root=work) as base,
        rundir.run_dir(SOCKET_PREFIX, user) as sockets,
    ):
        server = _Server(base, sockets, bindir, user, settings["DB_USER"])
        started = time.monotonic()
        _barman_restore(tier, chosen.backup_id, target, server.data)
        server.configure()
        server.control_data()
        seconds["recover"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        log.info("replaying prod's WAL from base backup %s to %s", chosen.backup_id, target)
        server.start()
        reached, lsn = _replay(server, target)
        if lsn < 0:  # the WAL ended before a commit after the target: right when the WAL held reaches past it
            text = server.log_text()
            ended, reached = _redo_end(text), _last_commit(text)
            if ended is None or ended // chosen.segment_size < _newest_segno(held, chosen.segment_size):
                raise _missing(target, reached, chosen.backup_id)
            with open(server.data / "postgresql.auto.conf", "a") as conf:
                conf.write("recovery_target_time = ''\n")  # no commit came after it: the end of the WAL is the moment
            server.start()
            reached, lsn = _replay(server, Target(None))
        if reached is None:  # promoted at the WAL's end, the server no longer says; the WAL it replayed does
            timeline = max(w.name[:8] for w in [*held.listed, *held.streaming])  # not the one promotion began
            replayed = [
                p
                for where in ("pg_wal", "barman_wal")
                for p in (server.data / where).glob("0*")
                if status.WAL_NAME.fullmatch(p.name) and p.name[:8] <= timeline
            ]
            reached = newest_commit(sorted(replayed, key=lambda p: p.name, reverse=True), bindir, base)
        if target.when is None and max(lsn - 1, 0) // chosen.segment_size < _newest_segno(held, chosen.segment_size):
            raise _missing(
                target, reached, chosen.backup_id
            )  # promoted before the end of the WAL held: a segment is missing
        if target.when is not None:
            server.end_recovery()
        seconds["replay"] = round(time.monotonic() - started, 2)
        log.info("recovered %s: the newest transaction replayed is from %s", target, stamp(reached))
        started = time.monotonic()
        moment = target.when or reached or now
        name = MOMENT_NAME.format(moment)
        manifest = backup.write_dump(_RecoveredDb(server, settings["DB_NAME"]), out, name, 1)
        own = _own_rows(server, settings["DB_NAME"])
        if own != manifest.tables:
            for path in (out / name, out / (name + names.MANIFEST_SUFFIX)):
                path.unlink(missing_ok=True)
            wrong = sorted(k for k in set(own) | set(manifest.tables) if own.get(k) != manifest.tables.get(k))
            raise VerificationError(f"the dump of the recovered moment differs from it: {', '.join(wrong[:5])}")
        seconds["dump"] = round(time.monotonic() - started, 2)
    return Recovered(out / name, target, reached, chosen.backup_id, seconds)


def _missing(target: Target, reached: datetime | None, backup_id: str) -> VerificationError:
    """Exit 3 naming the latest reachable moment, to the microsecond: the newest commit before the missing WAL."""
    if reached is None:
        return VerificationError(
            f"WAL for {target} is missing: no moment after base backup {backup_id} is reachable",
            "give a moment before it, or take a new base backup (pitr-base-backup); pitr-status shows the gaps",
        )
    moment = reached.astimezone(UTC).isoformat()
    return VerificationError(
        f"WAL for {target} is missing: the latest reachable moment is {moment}",
        f"give --at {moment} or earlier; pitr-status shows the WAL chain's gaps",
    )


def major_of(server_home: Path, backup_id: str) -> int:
    info = status._info((server_home / "meta" / f"{backup_id}-backup.info").read_text(errors="replace").splitlines())
    version = info.get("version", "")
    if not version.isdigit():
        raise Failed(f"base backup {backup_id} does not say its PostgreSQL version", "pitr-barman show-backup prod")
    return int(version) // 10000


def _barman_restore(tier: Tier, backup_id: str, target: Target, data: Path) -> None:
    """Barman copies the base backup and the WAL up to the target (the segment still being streamed too) into
    `data`, with the recovery settings: pause at the target (latest: none)."""
    targets = (
        [] if target.when is None else ["--target-time", target.when.isoformat(sep=" "), "--target-action", "pause"]
    )
    cmd = tier.barman("restore", "--no-get-wal", "--partial-wal", *targets, SERVER, backup_id, str(data))
    code, out, err = run(cmd, check=False, timeout=None)
    if code:
        said = [line for line in (err + out.decode(errors="replace")).splitlines() if line.strip()]
        errors = [line for line in said if "ERROR" in line] or said
        raise Failed(f"barman restore failed: {errors[-1] if errors else f'exit {code}'}", f"see {tier.log_file}")


# --- on the pi5 (bin/pitr-recover) -----------------------------------------------------------------------------
RECOVERED = "recovered"  # PITR_DIR/recovered/<run>/: each moment's dump while its run holds it
HELD_PREFIX = "held-"  # a moment held for a caller (the laptop's --at): removed when the caller is done or gone
KEPT_PREFIX = "moment-"  # a moment asked by hand: kept for a day
KEPT_HOURS = 24


def pi5_window(settings: Settings) -> Window:
    """The pi5's window; live when prod is reachable and the pi5 has all it wrote (then any moment up to now)."""
    state = status.gather(settings)
    live = state.prod == "reachable" and state.lag_seconds == 0.0
    return Window(state.recoverable_from, state.recoverable_to, live)


@contextmanager
def moment_on_pi5(settings: Settings, text: str, held: bool) -> Iterator[Recovered]:
    """pitr-recover: the moment `text` of this pi5's WAL tier as a dump in a directory of its own in
    PITR_DIR/recovered/ (one recovery at a time; a moment asked twice gets two), flock'ed while this process
    lives. A held moment goes when this ends (a killed holder's, with the next run); one asked by hand stays a
    day for whoever asked."""
    target = parse_time(text)
    tier = Tier(settings)
    tier.check_owner()
    recovered = tier.dir / RECOVERED
    recovered.mkdir(mode=0o700, exist_ok=True)
    with files.lock(tier.dir, "pitr-recover"):
        _remove_leftovers(recovered)
        out, lock = rundir.new_locked_dir(recovered, HELD_PREFIX if held else KEPT_PREFIX)
        try:
            moment = recover(settings, tier, tier.dir, target, pi5_window(settings), out)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            os.close(lock)
            raise
    try:
        yield moment
    finally:
        if held:
            shutil.rmtree(out, ignore_errors=True)
        os.close(lock)


def _remove_leftovers(recovered: Path) -> None:
    """Under the lock, the moments no live run holds: a killed run's (without its manifest), a held one's whose
    holder was killed, one asked by hand a day ago."""
    cutoff = time.time() - KEPT_HOURS * 3600
    for made in recovered.iterdir():
        if made.is_dir() and rundir.in_use(made):
            continue
        whole = made.is_dir() and any(p.name.endswith(names.MANIFEST_SUFFIX) for p in made.iterdir())
        if made.name.startswith(HELD_PREFIX) or not whole or made.stat().st_mtime < cutoff:
            shutil.rmtree(made) if made.is_dir() else made.unlink(missing_ok=True)
            log.info("removed %s, left by a recovery that was killed or never collected", made.name)
