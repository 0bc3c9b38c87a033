"""backup-drill: prove a backup restores, row for row, on a scratch server; never touches prod.

fetch (default: the nas; an encrypted copy is decrypted on the way) -> verify -> refuse a dump
newer than the scratch server -> throwaway database on a scratch PostgreSQL -> psql ON_ERROR_STOP
in one transaction -> every table's count(*) against the manifest -> DRILL_SQL checks -> report
on stdout and one JSON line in DRILL_LOG (also when it fails or is interrupted).

The scratch server is DRILL_DATABASE_URL's, else a `docker run --rm` container of
DRILL_DOCKER_IMAGE published on 127.0.0.1 only, else a temporary cluster of DRILL_PG_BINDIR.
The last two are private: a password only this process knows (given to clients through the
environment, never argv), and the cluster listens on no TCP port, in a 0700 directory.
Each lives in a run directory /tmp/kw-drill-run-* that the drill holds an flock on; the
kernel drops it when the drill dies, even by kill -9, so the next drill knows the server
there is a leftover and stops and removes it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from . import catalog, dumps, names, parallel_load, rundir
from .download import fetch_dump, local_dump, work_dir
from .errors import Failed, KwError, UsageError, VerificationError
from .log import add_secrets, loader_notes, log, size
from .monitor import Monitor
from .pitr import moment
from .pitr import nas as pitr_nas
from .places import Multiplexer, place
from .run import Cmd, StageFailed, pipeline, run
from .settings import Settings
from .sources import Source, naming_a_copy, offsite_or_fail, resolve

LIBPQ_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "options": "PGOPTIONS",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
}
RUN_PREFIX = "kw-drill-run-"
CLUSTER_PORT = 5432  # only names the socket, in a directory of its own: nothing to collide with
READY_SECONDS = 120


@dataclass
class Scratch:
    """The server a drill restores into, and how errors name it."""

    params: dict  # libpq connection parameters of its admin database
    label: str
    hint: str
    ours: bool  # started by this drill: roles may be created, and it goes away whole
    psql: str


# --- PostgreSQL's programs ----------------------------------------------------------------------


def _major(version: str | None) -> int:
    found = re.match(r"\d+", version or "")
    return int(found.group()) if found else 0


def pg_bindir(setting: str | None, tool: str) -> Path:
    """DRILL_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin that has `tool`, else where PATH finds it."""
    if setting:
        if not (Path(setting) / tool).is_file():
            raise UsageError(
                f"setting DRILL_PG_BINDIR={setting} has no {tool}",
                "point it at a PostgreSQL bin directory such as /usr/lib/postgresql/17/bin",
            )
        return Path(setting)
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.split("/")[4])],
    )
    if found:
        return Path(found[-1]).parent
    if on_path := shutil.which(tool):
        return Path(on_path).parent
    raise Failed(
        f"{tool} not found",
        "apt-get install postgresql (the drill starts a temporary cluster), or set "
        "DRILL_PG_BINDIR, DRILL_DOCKER_IMAGE or DRILL_DATABASE_URL",
    )


def _installed_version(bindir: Path) -> str:
    out = run(Cmd([bindir / "postgres", "--version"], name="postgres --version"), timeout=60)[1].decode()
    found = re.search(r"\(PostgreSQL\) (\S+)", out)
    return found.group(1) if found else out.strip()


def _made_by(needs: dict, verified: dumps.Verified) -> tuple[str, str] | None:
    """What made the dump and its version, the newest major its head and manifest name.

    pg_dump's major is never older than its server's, and it is pg_dump's that psql must understand.
    """
    found = [
        (f"pg_dump {v}", v)
        for v in (needs["pg_dump_version"], verified.manifest and verified.manifest.pg_dump_version)
        if v
    ]
    if verified.manifest and verified.manifest.server_version:
        found.append((f"a PostgreSQL {verified.manifest.server_version} server", verified.manifest.server_version))
    return max(found, key=lambda f: _major(f[1]), default=None)


def _refuse_newer(made_by: tuple[str, str] | None, server_version: str, where: str) -> None:
    """A newer major's dump fails deep inside psql (pg_dump 17 writes SET transaction_timeout): refuse it first."""
    major = _major(made_by[1]) if made_by else 0
    if major > _major(server_version):
        raise Failed(
            f"the dump was made by {made_by[0]}, newer than {where} (PostgreSQL {server_version})",
            f"drill it on PostgreSQL {major} or newer: DRILL_PG_BINDIR=/usr/lib/postgresql/{major}/bin "
            f"(apt-get install postgresql-{major}), DRILL_DOCKER_IMAGE=postgres:{major}, or such a "
            "server as DRILL_DATABASE_URL",
        )


@contextmanager
def temporary_cluster(bindir: Path | None = None):
    """A private PostgreSQL, stopped and removed at the end whatever happens (kill -9: by the next drill).

    Its directory, data and socket directory are 0700 and belong to the user it runs as (an
    unprivileged one when run as root); it listens on no TCP port, and every connection needs a
    password only this process knows: no other local user can connect.
    """
    bindir = bindir or pg_bindir(None, "initdb")
    user = rundir.service_user()
    password = rundir.password()
    with rundir.run_dir(RUN_PREFIX, user, bindir) as base:
        data, pwfile = base / "data", base / "password"
        with os.fdopen(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(password + "\n")
        try:  # initdb reads the password from a file; it stays only until initdb is done
            if user:
                shutil.chown(pwfile, user)
            run(
                Cmd(
                    rundir.as_user(
                        user,
                        [
                            bindir / "initdb",
                            "-D",
                            data,
                            "-U",
                            "postgres",
                            "--auth=scram-sha-256",
                            f"--pwfile={pwfile}",
                            "-E",
                            "UTF8",
                            "--locale=C.UTF-8",
                            "--no-sync",
                        ],
                    ),
                    name="initdb",
                ),
                timeout=300,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {CLUSTER_PORT}\nlisten_addresses = ''\nunix_socket_directories = '{base}'\n"
                "unix_socket_permissions = 0700\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\n"
            )
        run(
            Cmd(
                rundir.as_user(
                    user, [bindir / "pg_ctl", "-D", data, "-l", base / "server.log", "-w", "-t", "120", "start"]
                ),
                name="pg_ctl start",
            ),
            timeout=180,
        )
        log.info("started a private temporary PostgreSQL in %s (socket only, password authentication)", base)
        yield {
            "host": str(base),
            "port": str(CLUSTER_PORT),
            "user": "postgres",
            "password": password,
            "dbname": "postgres",
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def docker_server(image: str):
    """A throwaway `docker run --rm` server of `image`, published on 127.0.0.1 only, its password only ours."""
    password = rundir.password()
    name = f"kw-drill-{os.getpid()}-{secrets.token_hex(4)}"
    with rundir.run_dir(RUN_PREFIX, None) as base:
        (base / "container").write_text(name + "\n")  # first: however this drill dies, the next one knows it
        port = _free_port()
        # `-e NAME` takes the value from docker's environment: the password is on no command line.
        run(
            Cmd(
                [
                    "docker",
                    "run",
                    "--rm",
                    "-d",
                    "--name",
                    name,
                    "-p",
                    f"127.0.0.1:{port}:5432",
                    "-e",
                    "POSTGRES_PASSWORD",
                    image,
                ],
                name="docker run",
                env={"POSTGRES_PASSWORD": password},
            ),
            timeout=1800,
        )  # the first run pulls the image
        params = {
            "host": "127.0.0.1",
            "port": str(port),
            "user": "postgres",
            "password": password,
            "dbname": "postgres",
        }
        _wait_ready(params, f"the container {name} ({image})")
        log.info("started the container %s (%s) on 127.0.0.1:%d; its run directory is %s", name, image, port, base)
        yield params


def _wait_ready(params: dict, what: str) -> None:
    """The postgres image initialises behind a socket-only server first: wait for the real one on TCP."""
    deadline = time.monotonic() + READY_SECONDS
    while True:
        try:
            with _connect(params, timeout=5):
                return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise Failed(
                    f"{what} accepted no connection within {READY_SECONDS}s: {exc}",
                    "check docker and DRILL_DOCKER_IMAGE (a postgres image)",
                ) from exc
        time.sleep(0.5)


@contextmanager
def _scratch(settings: Settings, args, made_by: tuple[str, str] | None):
    """The server of this drill: DRILL_DATABASE_URL's, a DRILL_DOCKER_IMAGE container, or a temporary cluster."""
    url = args.database_url or settings["DRILL_DATABASE_URL"]
    if url:
        source = "--database-url" if args.database_url else "DRILL_DATABASE_URL"
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise UsageError(
                f"{source} is not a PostgreSQL URL ({' '.join(str(exc).split())})", "postgresql://USER@HOST/DATABASE"
            ) from exc
        add_secrets([params.get("password")])
        yield Scratch(
            params,
            f"the scratch server of {source}",
            f"check {source}: the server must be up and its role allowed to log in and create databases",
            False,
            str(pg_bindir(settings["DRILL_PG_BINDIR"], "psql") / "psql"),
        )
    elif image := settings["DRILL_DOCKER_IMAGE"]:
        psql = str(pg_bindir(settings["DRILL_PG_BINDIR"], "psql") / "psql")
        tag = image.split("@")[0].rpartition("/")[2].partition(":")[2]
        if re.match(r"\d", tag):  # postgres:15, postgres:15.8-alpine: refused without pulling or starting it
            _refuse_newer(made_by, tag, f"DRILL_DOCKER_IMAGE {image}")
        with docker_server(image) as params:
            yield Scratch(
                params, f"the drill's container of {image}", "check docker and DRILL_DOCKER_IMAGE", True, psql
            )
    else:
        bindir = pg_bindir(settings["DRILL_PG_BINDIR"], "initdb")
        _refuse_newer(made_by, _installed_version(bindir), f"DRILL_PG_BINDIR {bindir}")
        with temporary_cluster(bindir) as params:
            yield Scratch(
                params,
                "the drill's temporary PostgreSQL",
                "run with --verbose to see its commands",
                True,
                str(bindir / "psql"),
            )


@contextmanager
def _database_errors(scratch: Scratch):
    """A scratch server that is unreachable, refuses or goes away: one line naming it, exit 1."""
    try:
        yield
    except psycopg.Error as exc:
        raise Failed(f"{scratch.label}: {exc}", scratch.hint) from exc


def _libpq_env(params: dict) -> dict[str, str]:
    """Connection settings for psql as environment variables: a password never goes on a command line."""
    return {LIBPQ_ENV[k]: str(v) for k, v in params.items() if k in LIBPQ_ENV and v}


def _connect(params: dict, dbname: str | None = None, timeout: int = 30):
    return psycopg.connect(
        **{"connect_timeout": timeout, **params, "dbname": dbname or params.get("dbname") or "postgres"},
        autocommit=True,
    )


def drills(settings: Settings, args) -> None:
    """backup-drill: the dump's drill, or --at's moment; with PITR=on and neither --at nor --from-file, then the
    WAL tier's own: `latest` and a moment in the middle of its window, each against the nearest nightly dump.
    Every drill appends its line to DRILL_LOG; the first failure is the run's."""
    with Monitor(settings, "backup-drill", "here"), Multiplexer() as shared:
        rundir.sweep(RUN_PREFIX)
        failed: KwError | None = None
        wal_tier = settings["PITR"] == "on" and args.at is None and not args.from_file and args.source in ("pi5", "nas")
        for at in [args.at] + (["latest", "middle"] if wal_tier else []):
            try:
                drill(settings, args, shared, _middle(settings, args, shared) if at == "middle" else at, wal_tier)
            except KwError as exc:
                failed = failed or exc
        if failed:
            raise failed


def _middle(settings: Settings, args, shared: Multiplexer) -> str:
    """The moment halfway through the source's WAL tier window."""
    (where,) = pitr_nas.tier_places(settings, [args.source])
    section = pitr_nas.read_section(settings, replace(where, control_dir=shared(where).control_dir))
    state = section.state
    if section.error or not (state.recoverable_from and state.recoverable_to):
        raise Failed(
            f"the {args.source}'s WAL tier has no window to drill: {section.error or 'no complete base backup'}",
            "list-backups --point-in-time says why",
        )
    return (state.recoverable_from + (state.recoverable_to - state.recoverable_from) / 2).isoformat()


def drill(settings: Settings, args, shared: Multiplexer, at: str | None = None, compare: bool = False) -> dict:
    """One drill: the dump (or the moment `at`, compared with the nearest nightly dump when `compare`) restored
    and checked; its report printed and appended to DRILL_LOG, also when it fails."""
    report = {
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": None,
        "dump": None,
        "bytes": 0,
        "server": None,
        "download_seconds": 0.0,
        "restore_seconds": 0.0,
        "tables": 0,
        "rows": 0,
        "checks": [],
        "result": "error",
        "error": None,
    }
    if at is not None:
        report.update(at=at, reached=None, recover_seconds=0.0, replay_seconds=0.0, dump_seconds=0.0)
    wanted = names.require(args.dump or "latest", "--dump")
    try:
        with work_dir(settings["WORK_DIR"]) as local:
            if at is None:
                path, verified = _fetch_verified(settings, args, shared, wanted, local, report)
                _drill_dump(settings, args, path, verified, report)
            else:
                with moment.moment_source(settings, at, args.source, shared) as (source, recovered):
                    report.update(
                        source=f"the {args.source}'s WAL tier",
                        reached=recovered.reached.isoformat() if recovered.reached else None,
                        **{f"{step}_seconds": seconds for step, seconds in recovered.seconds.items()},
                    )
                    with _timed(report, "download_seconds"):
                        path = (
                            Path(source.path)
                            if source.path
                            else fetch_dump(source.origin, source.name, local, settings)
                        )
                    verified = dumps.verify_file(path)
                    if compare:
                        _compare_with_nearest_dump(settings, args, shared, recovered, verified, report)
                    _drill_dump(settings, args, path, verified, report)
    except KwError as exc:
        # "failed": the dump does not restore or match (exit 3); "error": the drill could not tell.
        report.update(error=exc.line(), result="failed" if isinstance(exc, VerificationError) else "error")
        _record(settings, args, report)
        raise
    except KeyboardInterrupt as exc:
        report["error"] = f"interrupted by {signal.Signals(getattr(exc, 'signum', signal.SIGINT)).name}"
        _record(settings, args, report)
        raise
    report["result"] = "ok"
    _record(settings, args, report)
    return report


def _drill_dump(settings: Settings, args, path: Path, verified: dumps.Verified, report: dict) -> None:
    report.update(dump=path.name, bytes=verified.size)
    needs = dumps.requirements(path)
    made_by = _made_by(needs, verified)
    with _timed(report, "restore_seconds"), _scratch(settings, args, made_by) as scratch:
        _restore_and_check(scratch, path, needs, made_by, verified, settings, report)


def _compare_with_nearest_dump(
    settings: Settings, args, shared: Multiplexer, recovered, verified: dumps.Verified, report: dict
) -> None:
    """The moment holds at least the tables of the source's nightly dump nearest before it (else nearest after)."""
    origin = shared(place(settings, args.source))
    clock = names.Clock.from_settings(settings)
    dumps_there = [
        e
        for e in origin.listing()
        if e.status == "verified" and names.parse(e.name).nightly and not clock.is_future(e.name)
    ]
    if not dumps_there:
        report["compared_with"] = None
        log.warning("no verified nightly dump on the %s to compare the moment with", args.source)
        return
    when = recovered.moment
    before = [e for e in dumps_there if names.parse(e.name).when <= when]
    nearest = (
        max(before, key=lambda e: names.parse(e.name).when)
        if before
        else min(dumps_there, key=lambda e: abs(names.parse(e.name).when - when))
    )
    report["compared_with"] = nearest.name
    have = verified.manifest.tables if verified.manifest else verified.tables
    missing = sorted(set(nearest.manifest.get("tables") or {}) - set(have))
    if missing:
        raise VerificationError(
            f"the moment {recovered.target} lacks tables the nightly dump {nearest.name} holds: "
            + ", ".join(missing[:5]),
            "the WAL tier does not hold what the dumps hold: see pitr-status and the runbook"
            if before
            else "unless a migration created them after the moment (no dump there is older), the WAL tier does not "
            "hold what the dumps hold: see pitr-status and the runbook",
        )


@contextmanager
def _timed(report: dict, key: str):
    """The seconds a step took into `report[key]`, also when it fails: a failed drill's report says how long it ran."""
    started = time.monotonic()
    try:
        yield
    finally:
        report[key] = round(time.monotonic() - started, 2)


def _fetch_verified(
    settings: Settings, args, shared: Multiplexer, wanted: str, local: Path, report: dict
) -> tuple[Path, dumps.Verified]:
    """The dump to drill, here and verified: a given file, or `wanted` fetched from its place (`latest`
    failing verification names a verified copy of it elsewhere)."""
    if args.from_file:
        report["source"] = str(Path(args.from_file).resolve())
        with _timed(report, "download_seconds"):
            path = local_dump(Path(args.from_file), local, settings)
        return path, dumps.verify_file(path)
    origin = offsite_or_fail(settings) if args.source == "offsite" else shared(place(settings, args.source))
    report["source"] = origin.label
    source = Source(f"--from {args.source}", origin, wanted)
    with naming_a_copy(settings, source, "backup-drill", shared):
        with _timed(report, "download_seconds"):
            path = fetch_dump(origin, resolve(source, names.Clock.from_settings(settings)).name, local, settings)
        return path, dumps.verify_file(path)


def _restore_and_check(
    scratch: Scratch,
    path: Path,
    needs: dict,
    made_by: tuple[str, str] | None,
    verified: dumps.Verified,
    settings: Settings,
    report: dict,
) -> None:
    throwaway = f"kw_drill_{datetime.now(UTC):%Y%m%d%H%M%S}_{os.getpid()}"
    with _database_errors(scratch), _connect(scratch.params) as admin:
        version = admin.execute("SELECT current_setting('server_version')").fetchone()[0].split()[0]
        _refuse_newer(made_by, version, scratch.label)
        report["server"] = f"{scratch.label} (PostgreSQL {version})"
        have = {r for (r,) in admin.execute("SELECT rolname FROM pg_roles")}
        missing = sorted((set(needs["roles"]) | verified.roles) - have)
        if missing and not scratch.ours:
            raise Failed(
                f"the scratch server lacks roles the dump needs: {', '.join(missing)}",
                "create them there, or drop DRILL_DATABASE_URL to use a temporary cluster",
            )
        for role in missing:
            admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(throwaway)))
    try:
        log.info("restoring %s into the throwaway database %s", path.name, throwaway)
        _load(scratch, throwaway, path, restore_jobs(settings))
        with _database_errors(scratch):
            _compare(scratch.params, throwaway, verified, settings, report)
    except BaseException:
        _drop(scratch, throwaway, failing=True)
        raise
    _drop(scratch, throwaway, failing=False)


def _drop(scratch: Scratch, dbname: str, failing: bool) -> None:
    """Drop the throwaway database from a server of the user's (a server of the drill's goes away whole)."""
    if scratch.ours:
        return
    try:
        with _connect(scratch.params) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
    except psycopg.Error as exc:
        if not failing:
            raise Failed(
                f"could not drop the throwaway database {dbname} on {scratch.label}: {exc}", "drop it there by hand"
            ) from exc
        log.warning(
            "could not drop the throwaway database %s on %s (drop it by hand): %s",
            dbname,
            scratch.label,
            " ".join(str(exc).split()),
        )


def _load(scratch: Scratch, dbname: str, path: Path, jobs: int = 1) -> None:
    """The dump into the throwaway database: with one psql in one transaction, or over `jobs` sessions
    (parallel_load.py, as a restore does)."""
    env = _libpq_env(scratch.params)
    if jobs > 1:
        session = [scratch.psql, "-X", "--no-password", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-d", dbname]
        loader = Cmd(
            [
                sys.executable,
                parallel_load.__file__,
                "--jobs",
                str(jobs),
                "--session",
                json.dumps(session),
                "--dump",
                str(path),
            ],
            name="parallel load",
            env=env,
        )
        code, _, err = run(loader, check=False, timeout=None)
        loader_notes(err, failed=code != 0)
        if code == parallel_load.DAMAGED:
            raise VerificationError(f"the dump does not restore: {_last(err)}", "use another copy")
        if code != 0:
            _went_away(scratch, _last(err))
            raise VerificationError(f"the dump does not restore: {_last(err)}", "use another copy; investigate")
        return
    decompress = Cmd(
        [*dumps.decompressor(), "--", str(path)] if path.name.endswith(".gz") else ["cat", "--", str(path)],
        name="gzip stream check",
    )
    psql = Cmd(
        [scratch.psql, "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d", dbname],
        name="psql",
        env=env,
    )
    try:
        pipeline([decompress, psql])
    except StageFailed as exc:
        _went_away(scratch, exc.message)
        raise VerificationError(f"the dump does not restore: {exc.message}", "use another copy; investigate") from exc


def _went_away(scratch: Scratch, message: str) -> None:
    """Failed (not the dump's fault) when the scratch server is gone."""
    try:
        with _connect(scratch.params, timeout=10):
            pass
    except psycopg.Error as gone:
        raise Failed(f"{scratch.label} went away during the restore: {message}", scratch.hint) from gone


def _last(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1].removeprefix(parallel_load.PREFIX) if lines else "no message"


def restore_jobs(settings: Settings) -> int:
    """RESTORE_JOBS, else this machine's cores (the drill's server runs here), at most 4."""
    if settings["RESTORE_JOBS"]:
        return int(settings["RESTORE_JOBS"])
    return parallel_load.default_jobs()


def _compare(params: dict, dbname: str, verified: dumps.Verified, settings: Settings, report: dict) -> None:
    with _connect(params, dbname) as conn:
        tables = conn.execute(catalog.TABLES).fetchall()  # the restores' table list; names quoted by the server
        counted = conn.execute(catalog.own_rows_sql([quoted for _, _, quoted in tables])).fetchall() if tables else []
        counts = {f"{tables[i][0]}.{tables[i][1]}": n for i, n in counted}
        report.update(tables=len(counts), rows=sum(counts.values()))
        expected = verified.manifest.tables if verified.manifest else verified.tables
        wrong = [f"{k} ({counts.get(k)} rows, dump has {v})" for k, v in sorted(expected.items()) if counts.get(k) != v]
        if wrong:
            raise VerificationError(f"row counts differ: {', '.join(wrong[:5])}")
        for check in filter(None, (q.strip() for q in (settings["DRILL_SQL"] or "").split(";"))):
            try:
                value = conn.execute(check).fetchone()
            except psycopg.Error as exc:
                raise VerificationError(f"DRILL_SQL check failed to run: {check}: {exc}") from exc
            passed = bool(value) and value[0] is True
            report["checks"].append({"sql": check, "passed": passed})
            if not passed:
                raise VerificationError(f"DRILL_SQL check is not true: {check}")


def _record(settings: Settings, args, report: dict) -> None:
    """The report printed (a failed drill's too, with what it measured) and appended to DRILL_LOG and --report."""
    _print_report(report)
    line = json.dumps(report)
    drill_log = settings["DRILL_LOG"] or str(Path(settings["LOG_FILE"]).parent / "backup-drill.log")
    for target in filter(None, (drill_log, args.report)):
        try:
            with open(target, "a") as out:
                out.write(line + "\n")
        except OSError as exc:
            log.warning("could not write the drill report to %s: %s", target, exc.strerror)


def _print_report(report: dict) -> None:
    moment_lines = (
        f"moment:   {report['at']} (reached: the newest transaction replayed is from {report['reached'] or '-'})\n"
        f"recover:  {report['recover_seconds']:.1f}s\nreplay:   {report['replay_seconds']:.1f}s\n"
        f"dump:     {report['dump_seconds']:.1f}s"
        + (f" (compared with {report['compared_with']})" if report.get("compared_with") else "")
        + "\n"
        if "at" in report
        else ""
    )
    print(
        f"source:   {report['source'] or '-'}\n{moment_lines}"
        f"dump:     {report['dump'] or '-'} ({size(report['bytes'])})\n"
        f"server:   {report['server'] or '-'}\n"
        f"download: {report['download_seconds']:.1f}s\nrestore:  {report['restore_seconds']:.1f}s\n"
        f"tables:   {report['tables']}\nrows:     {report['rows']}\n"
        + "".join(f"check:    {c['sql']} -> {'true' if c['passed'] else 'NOT TRUE'}\n" for c in report["checks"])
        + f"result:   {report['result']}",
        flush=True,
    )
