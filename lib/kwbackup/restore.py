"""The restore flow: a restore either completes and is verified, or DB_NAME is exactly as it was.

resolve the dump -> the restore lock on prod's server (exit 4 while another run holds it) ->
leftovers of killed runs removed -> dump staged on prod and checked there with stock tools ->
versions, roles, extensions and space -> confirm -> (stop app) -> load into
<DB_NAME>_restore_<ts> -> row counts against the manifest -> the swap, one statement the server
completes or rolls back by itself -> (start app) -> cleanup, always, in `finally`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import catalog, cli, dumps, files, names, parallel_load, staging
from .database import Database
from .errors import Declined, Failed, KwError, VerificationError
from .log import Progress, dry, loader_notes, log, size
from .places import Multiplexer, Place, place
from .run import Cmd, StageFailed, Tap, pipeline, run
from .settings import Settings
from .sources import Source, naming_a_copy, resolve


def restore(
    settings: Settings,
    source: Source,
    *,
    yes: bool,
    dry_run: bool,
    stop_app: bool = False,
    drop_previous: bool = False,
    refuse_tables: bool = False,
    keep_as: str | None = None,
    about: str = "",
) -> None:
    """restore-production-db, setup-fresh-production-db and migrate-database-to-new-prod: the safe restore.
    `about` opens the confirmation (--at: the moment, and the newest transaction replayed before it)."""
    with on_prod(settings, source) as op:
        db, name = op.db, op.name
        if refuse_tables and catalog.holds_tables(db, name):
            raise Failed(f"{name} on prod already holds tables", "use restore-production-db, or --force")
        with verified(settings, op, source, dry_run=dry_run, keep_as=keep_as) as (dump, target):
            previous = f"{name}_before_restore_{op.stamp}"
            if dry_run:
                what = f"replace {name} (kept as {previous})" if target.exists else f"create {name}"
                dry("would restore %s into %s, check its row counts, then %s", dump.name, op.new, what)
                return
            confirm(name, yes, f"{about}This replaces the database {name}. Type its name to go on: ")
            with app_stopped(settings, stop_app):
                load_check_swap(settings, op, dump, previous, expected_size(dump, target))
            if drop_previous and target.exists:
                catalog.drop(db, previous)
                log.info("dropped %s (--drop-previous)", previous)


@dataclass
class OnProd:
    """One restore's footing: prod, its database server, DB_NAME, and this run's UTC stamp."""

    prod: Place
    db: Database
    name: str
    stamp: str

    @property
    def new(self) -> str:
        """Where the dump is loaded: a name the next run's cleanup recognises when this one is killed."""
        return f"{self.name}_restore_{self.stamp}"


@contextmanager
def on_prod(settings: Settings, source: Source) -> Iterator[OnProd]:
    """The work lock here, the dump resolved (`latest` named), and prod's restore lock (exit 4 while another
    run holds it) for as long as the block runs."""
    work = files.own_subdir(Path(settings["WORK_DIR"]), f"kw-backup-{os.geteuid()}")
    with (
        files.lock(work, "kw-restore"),
        Multiplexer() as shared,
        naming_a_copy(settings, source, "restore-production-db", shared),
    ):
        if isinstance(source.origin, Place):
            source.origin = shared(source.origin)
        prod = shared(place(settings, "prod"))
        db = Database(settings, prod)
        name = settings["DB_NAME"]
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        resolve(source, names.Clock.from_settings(settings))
        with staging.restore_lock(db, name):
            yield OnProd(prod, db, name, stamp)


@contextmanager
def verified(
    settings: Settings, op: OnProd, source: Source, *, dry_run: bool, keep_as: str | None = None
) -> Iterator[tuple[staging.Staged, catalog.Target]]:
    """What killed runs left removed (not in a dry run); the dump staged on prod and verified there; the server
    checked for it (versions, roles, extensions, space). Kept in PROD_DIR as `keep_as` when the block succeeds."""
    if not dry_run:
        staging.clean_leftovers(op.prod, op.db, op.name)
    with staging.staged(settings, op.prod, source) as dump:
        yield dump, preflight(op.db, op.name, dump, staging.verify(op.prod, dump))
        if keep_as and not dry_run:
            staging.keep(op.prod, dump, keep_as)


def preflight(db: Database, name: str, dump: staging.Staged, needs: dict) -> catalog.Target:
    """What the target server has and lacks for this dump; Failed before anything is created."""
    target = catalog.target(db, name)
    made_by = needs["pg_dump_version"] or (dump.manifest.pg_dump_version if dump.manifest else None)
    if made_by and _major(made_by) > target.major:
        raise Failed(
            f"{dump.name} was made by pg_dump {made_by}, newer than prod's server (PostgreSQL "
            f"{target.version.split()[0]})",
            "restore it on a PostgreSQL at least as new as the dump's",
        )
    missing_roles = sorted(set(needs["roles"]) - target.roles)
    missing_ext = sorted(set(needs["extensions"]) - target.extensions)
    if missing_roles or missing_ext:
        parts = ([f"roles {', '.join(missing_roles)}"] if missing_roles else []) + (
            [f"extensions {', '.join(missing_ext)}"] if missing_ext else []
        )
        raise Failed(
            f"prod lacks what the dump needs: {'; '.join(parts)}",
            "create the roles (CREATE ROLE ...) / install the extensions, then run again",
        )
    if target.exists:
        free = staging.free_bytes(db.shell(["df", "-Pk", target.data_dir], name="df data directory"))
        needed = int(target.size * 1.1)
        if free is not None and free < needed:
            raise Failed(
                f"not enough space on prod for a second copy of {name}: need {size(needed)}, "
                f"have {size(free)} in {target.data_dir}",
                "free space on prod (or --drop-previous later)",
            )
    return target


def confirm(dbname: str, yes: bool, prompt: str = "") -> None:
    """The operator types the database name after `prompt` (what the run does); exit 5 without a terminal and
    without --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise Declined("confirmation needed but there is no terminal", "pass --yes to confirm non-interactively")
    sys.stderr.write(prompt or f"This replaces the database {dbname}. Type its name to go on: ")
    sys.stderr.flush()
    if sys.stdin.readline().strip() != dbname:
        raise Declined("not confirmed; nothing was changed")


def app_command(settings: Settings, which: str) -> None:
    argv = settings.command(which)
    log.info("running %s: %s", which, " ".join(argv))
    run(Cmd(argv, name=which, own_session=True), timeout=600)


@contextmanager
def app_stopped(settings: Settings, stop: bool):
    """APP_STOP_CMD before and APP_START_CMD after, also after a failure or a signal (even one that comes
    while the app starts: the start runs to its end first)."""
    if not stop:
        yield
        return
    try:
        app_command(settings, "APP_STOP_CMD")
        yield
    finally:
        with cli.shielded():
            try:
                app_command(settings, "APP_START_CMD")
            except KwError as exc:
                raise Failed(
                    f"the app was stopped and could not be started again: {exc.message}",
                    f"start it by hand: {' '.join(settings.command('APP_START_CMD'))}",
                ) from exc


def expected_size(dump: staging.Staged, target: catalog.Target) -> int:
    """About how big the restored database gets: the one it replaces, else a guess from the dump's size."""
    if target.exists and target.size:
        return target.size
    return (dump.manifest.bytes if dump.manifest else 0) * 6


def load_check_swap(settings: Settings, op: OnProd, dump: staging.Staged, previous: str, expected: int) -> None:
    db, name, new = op.db, op.name, op.new
    swapping = False
    try:
        load_checked(settings, op, dump, expected)
        swapping = True
        catalog.swap(db, name, new, previous)
    except BaseException as exc:
        if swapping and _swapped_anyway(db, name, new):
            if isinstance(exc, StageFailed):  # only the connection was lost: the server completed it
                log.info("swapped: %s is the restored database; the old one is %s", name, previous)
                return
            raise
        drop_scratch(db, new, f"dropped the half-made {new}; {name} is as it was")
        if swapping and isinstance(exc, StageFailed):
            raise Failed(
                f"the swap failed: {exc.tail or exc.detail}; {name} is as it was", "see the error, then run again"
            ) from exc
        raise
    log.info("swapped: %s is the restored database; the old one is %s", name, previous)


def load_checked(settings: Settings, op: OnProd, dump: staging.Staged, expected: int) -> None:
    """The dump loaded into a new database `op.new` (DB_NAME's encoding and collation), every table's rows
    checked against the manifest. The caller drops it on failure."""
    started = time.monotonic()
    catalog.create(op.db, op.new, op.name)
    counts = load(settings, op.prod, op.db, dump, op.new, expected)
    summary = check_restored(op.db, op.new, dump, counts)
    log.info("restored %s in %.1fs: %s", op.new, time.monotonic() - started, summary)


def load(
    settings: Settings, prod: Place, db: Database, dump: staging.Staged, new: str, expected: int
) -> dict[str, int]:
    """Load the dump into `new`; the rows the server loaded per table.

    RESTORE_JOBS sessions (parallel_load.py; default the server's cores, at most 4); with 1, or
    without a python3 on prod, one psql session in one transaction. For docker and direct the dump
    is decompressed on prod and the SQL never crosses the network; kamal runs here, so there
    prod's decompressed SQL is piped into the sessions.
    """
    log.info("restoring into %s", new)
    # -e echoes each COPY statement and psql prints its `COPY n` tag: the rows the server loaded.
    watcher = _SizeWatcher(db, new, expected)
    watcher.start()
    try:
        jobs = restore_jobs(settings, db)
        if jobs != "1":
            counts = _parallel(settings, prod, db, dump, new, jobs)
            if counts is not None:
                return counts
        if db.mode in ("docker", "direct"):
            inner = Database(settings, None).psql(new, "--single-transaction", "-e", quiet=False).argv
            code, out, err = run(
                prod.script(staging.DECOMPRESS_INTO, dump.path, *inner, name="restore on prod"),
                check=False,
                timeout=None,
            )
            _check_exit(dump, code, err, "psql failed")
            return dumps.copy_counts(out)
        out, _ = _piped(prod, dump, db.psql(new, "--single-transaction", "-e", quiet=False), "psql failed")
        return dumps.copy_counts(out)
    finally:
        watcher.stop()


def restore_jobs(settings: Settings, db: Database) -> str:
    """RESTORE_JOBS, or "auto" (the server's cores, at most 4: counted where the loader runs, on prod;
    for kamal, in the accessory's container)."""
    if settings["RESTORE_JOBS"]:
        return settings["RESTORE_JOBS"]
    if db.mode != "kamal":
        return "auto"
    code, out, _ = run(db.shell(["nproc"], name="nproc on prod"), check=False, timeout=120)
    cores = out.decode().strip()
    return str(min(4, int(cores))) if code == 0 and cores.isdigit() and int(cores) > 0 else "2"


def _parallel(
    settings: Settings, prod: Place, db: Database, dump: staging.Staged, new: str, jobs: str
) -> dict[str, int] | None:
    """parallel_load.py: on prod with its own python3 (docker, direct), here for kamal; None when prod
    has no python3 (the caller loads in one session)."""
    if db.mode in ("docker", "direct"):
        session = Database(settings, None).psql(new, "-A", "-t", quiet=False).argv
        cmd = prod.script(
            staging.PARALLEL_LOAD,
            dump.path,
            "--jobs",
            jobs,
            "--session",
            json.dumps(session),
            name="parallel restore on prod",
        )
        code, out, err = run(cmd, input=parallel_load.program(), check=False, timeout=None)
        if code == staging.NO_PYTHON:
            log.warning(
                "%s: loading in one session instead of %s",
                staging.last_error(err),
                "RESTORE_JOBS=" + jobs if jobs != "auto" else "one per core",
            )
            return None
        loader_notes(err, failed=code != 0)
        _check_exit(dump, code, err, "the load failed")
        return dumps.copy_counts(out)
    loader = Cmd(
        [
            sys.executable,
            parallel_load.__file__,
            "--jobs",
            jobs,
            "--session",
            json.dumps(db.psql(new, "-A", "-t", quiet=False).argv),
        ],
        name="parallel load",
    )
    out, said = _piped(prod, dump, loader, "the load failed")
    loader_notes(said.get(loader.name, ""), failed=False)
    return dumps.copy_counts(out)


def _check_exit(dump: staging.Staged, code: int, err: bytes, failed: str) -> None:
    """The exit of a load run on prod behind DECOMPRESS_INTO or PARALLEL_LOAD: a damaged dump, or
    `failed` and the error."""
    if code == staging.DECOMPRESS_FAILED:
        raise VerificationError(f"{dump.name} is damaged: {staging.last_error(err)}", "use another copy")
    if code != 0:
        raise Failed(f"{failed}: {staging.last_error(err)}", "see the error; DB_NAME is unchanged")


def _piped(prod: Place, dump: staging.Staged, loader: Cmd, failed: str) -> tuple[bytes, dict[str, str]]:
    """prod's decompressed SQL into `loader` here (kamal): its stdout, and each stage's stderr; a
    failed decompression is a damaged dump, any other failure `failed` and the error."""
    echo = _Collect()
    sql = prod.script(staging.DECOMPRESS_INTO, dump.path, "cat", name="gzip stream check")
    try:
        said = pipeline([sql, loader, echo])
    except StageFailed as exc:
        if exc.stage == sql.name:
            raise VerificationError(f"{dump.name} is damaged: {exc.tail or exc.detail}", "use another copy") from exc
        raise Failed(f"{failed}: {exc.tail or exc.detail}", "see the error; DB_NAME is unchanged") from exc
    return bytes(echo.data), said


def check_restored(db: Database, new: str, dump: staging.Staged, loaded: dict[str, int]) -> str:
    """Every table's rows as loaded against the manifest; without one, tables and the newest record."""
    expected = dump.tables
    tables = catalog.tables(db, new)
    actual = {f"{row[0]}.{row[1]}": row for row in tables}
    if expected is None:
        if not actual:
            raise VerificationError(f"{new} has no tables after the restore")
        newest = catalog.newest_record(db, new)
        return f"{len(actual)} tables, newest record {newest or 'unknown'} (no manifest)"
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise VerificationError(f"restored database lacks tables of the dump: {', '.join(missing[:5])}")
    differ = [k for k, v in expected.items() if loaded.get(k) != v]
    if differ:
        # A COPY's tag counts its rows under the table it names: a partition's rows loaded through its
        # root (pg_dump --load-via-partition-root) count as the root's. The table's own rows settle it.
        loaded = {**loaded, **catalog.own_rows(db, new, [actual[k] for k in differ])}
    wrong = [f"{k} ({loaded.get(k)} rows, dump has {v})" for k, v in sorted(expected.items()) if loaded.get(k) != v]
    if wrong:
        raise VerificationError(f"restored row counts differ from the manifest: {', '.join(wrong[:5])}")
    return f"{len(expected)} tables, {sum(expected.values())} rows, as the manifest says"


def _swapped_anyway(db: Database, name: str, new: str) -> bool:
    """After a lost connection or a signal during the swap: whether the server completed it."""
    try:
        done = catalog.swapped(db, name, new)
    except (KwError, KeyboardInterrupt):
        return False
    if done:
        log.warning("the server completed the swap: %s is the restored database", name)
    return done


def drop_scratch(db: Database, new: str, said: str) -> None:
    """Drop the database `new` this run made, logging `said`; a failure is logged: the next restore drops it."""
    try:
        catalog.drop(db, new)
        log.info("%s", said)
    except KwError as exc:
        log.error("could not drop %s: %s -- the next restore drops it", new, exc.message)


class _Collect(Tap):
    name = "psql output"

    def __init__(self):
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk


class _SizeWatcher(threading.Thread):
    """Progress of a load: the new database's size, polled, against an estimate of its final size."""

    def __init__(self, db: Database, name: str, expected: int):
        super().__init__(daemon=True)
        self.db, self.dbname = db, name
        self.progress = Progress(f"restoring into {name}", expected or None, estimated=True)
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = 1.0 if self.progress.tty else self.progress.interval
        while not self.stopped.wait(interval):
            try:
                now = catalog.size_of(self.db, self.dbname)
            except (KwError, IndexError, ValueError):
                continue
            self.progress.add(max(0, now - self.progress.done))

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.progress.finish()


def _major(version: str) -> int:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0
