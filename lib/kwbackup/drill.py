"""backup-drill: prove a backup restores, row for row, on a scratch server; never touches prod.

fetch (default: the nas; an encrypted copy is decrypted on the way) -> verify -> throwaway
database on a scratch PostgreSQL (DRILL_DATABASE_URL, or a temporary cluster started here and
removed afterwards, also on failure or Ctrl-C) ->
psql ON_ERROR_STOP in one transaction -> every table's count(*) against the manifest ->
DRILL_SQL checks -> report on stdout and one JSON line in DRILL_LOG.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from . import dumps, names
from .download import fetch_dump, local_dump, work_dir
from .errors import Failed, KwError, VerificationError
from .log import log, size
from .monitor import Monitor
from .places import Multiplexer, place
from .restore import Source, offsite_or_fail, resolve
from .run import Cmd, StageFailed, pipeline, run
from .settings import Settings

LIBPQ_ENV = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
             "sslmode": "PGSSLMODE"}


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    if shutil.which(tool):
        return tool
    raise Failed(f"{tool} not found", "apt-get install postgresql (the drill starts a temporary cluster)")


def _service_user() -> str | None:
    """PostgreSQL refuses to run as root: the temporary cluster runs as an unprivileged user."""
    if os.geteuid() != 0:
        return None
    for candidate in ("postgres", "nobody"):
        try:
            pwd.getpwnam(candidate)
            return candidate
        except KeyError:
            continue
    raise Failed("no unprivileged user to run a temporary PostgreSQL as", "create the postgres user")


def _as(user: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


@contextmanager
def temporary_cluster():
    """A PostgreSQL of its own in a temporary directory, on a free port; removed at the end, whatever happens."""
    # In /tmp itself, not $TMPDIR: that may be private to this user, and the server runs as another.
    base = Path(tempfile.mkdtemp(prefix="kw-drill-cluster-", dir="/tmp"))
    base.chmod(0o755)
    user = _service_user()
    if user:
        shutil.chown(base, user)
    data = base / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        run(Cmd(_as(user, [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                           "--locale=C.UTF-8", "--no-sync"]), name="initdb"), timeout=300)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{base}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        run(Cmd(_as(user, [_pg_bin("pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "120",
                           "start"]), name="pg_ctl start"), timeout=180)
        log.info("started a temporary PostgreSQL in %s", base)
        yield {"host": str(base), "port": str(port), "user": "postgres", "dbname": "postgres"}
    finally:
        # Also when interrupted during `pg_ctl start`: the server may be up before pg_ctl says so, and
        # its socket would appear in `base` after rmtree had emptied it.
        if (data / "postmaster.pid").exists():
            run(Cmd(_as(user, [_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                    name="pg_ctl stop"), check=False, timeout=120)
        for _ in range(100):  # pg_ctl returns once the pid file is gone; the server removes its socket last
            shutil.rmtree(base, ignore_errors=True)
            if not base.exists():
                break
            time.sleep(0.1)
        log.info("removed the temporary PostgreSQL")


def _libpq_env(params: dict) -> dict[str, str]:
    """Connection settings for psql as environment variables: a password never goes on a command line."""
    return {LIBPQ_ENV[k]: str(v) for k, v in params.items() if k in LIBPQ_ENV and v}


def _connect(params: dict, dbname: str):
    return psycopg.connect(**{**params, "dbname": dbname}, autocommit=True, connect_timeout=30)


def drill(settings: Settings, args) -> dict:
    report = {"time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "source": None, "dump": None, "bytes": 0,
              "download_seconds": 0.0, "restore_seconds": 0.0, "tables": 0, "rows": 0, "checks": [],
              "result": "failed", "error": None}
    wanted = names.require(args.dump or "latest", "--dump")
    try:
        with Monitor(settings, "backup-drill", "here"), Multiplexer() as shared, \
                work_dir(settings["WORK_DIR"]) as local:
            started = time.monotonic()
            if args.from_file:
                report["source"] = str(Path(args.from_file).resolve())
                path = local_dump(Path(args.from_file), local, settings)
            else:
                origin = offsite_or_fail(settings) if args.source == "offsite" else shared(place(settings, args.source))
                chosen = resolve(Source(f"--from {args.source}", origin, wanted))
                report["source"] = origin.label
                path = fetch_dump(origin, chosen.name, local, settings)
            report["download_seconds"] = round(time.monotonic() - started, 2)
            verified = dumps.verify_file(path)
            report.update(dump=path.name, bytes=verified.size)
            url = args.database_url or settings["DRILL_DATABASE_URL"]
            started = time.monotonic()
            if url:
                _restore_and_check(conninfo_to_dict(url), path, verified, settings, report, create_roles=False)
            else:
                with temporary_cluster() as params:
                    _restore_and_check(params, path, verified, settings, report, create_roles=True)
            report["restore_seconds"] = round(time.monotonic() - started, 2)
    except KwError as exc:
        report["error"] = exc.line()
        report["result"] = "failed"
        _record(settings, args, report)
        raise
    except KeyboardInterrupt:
        report["error"] = "interrupted"
        _record(settings, args, report)
        raise
    report["result"] = "ok"
    _record(settings, args, report)
    return report


def _restore_and_check(params: dict, path: Path, verified: dumps.Verified, settings: Settings, report: dict,
                       create_roles: bool) -> None:
    throwaway = f"kw_drill_{datetime.now(UTC):%Y%m%d%H%M%S}_{os.getpid()}"
    admin_db = params.get("dbname") or "postgres"
    with _connect(params, admin_db) as admin:
        needs = dumps.requirements(path)
        have = {r for (r,) in admin.execute("SELECT rolname FROM pg_roles")}
        missing = sorted(set(needs["roles"]) - have)
        if missing and not create_roles:
            raise Failed(f"the scratch server lacks roles the dump needs: {', '.join(missing)}",
                         "create them there, or drop DRILL_DATABASE_URL to use a temporary cluster")
        for role in missing:
            admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(throwaway)))
        log.info("restoring %s into the throwaway database %s", path.name, throwaway)
        try:
            _load(params, throwaway, path)
            _compare(params, throwaway, verified, settings, report)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(throwaway)))


def _load(params: dict, dbname: str, path: Path) -> None:
    decompress = Cmd([*dumps.decompressor(), "--", str(path)] if path.name.endswith(".gz") else ["cat", "--",
                                                                                               str(path)],
                     name="gzip stream check")
    psql = Cmd(["psql", "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d", dbname],
               name="psql", env=_libpq_env(params))
    try:
        pipeline([decompress, psql])
    except StageFailed as exc:
        raise VerificationError(f"the dump does not restore: {exc.message}", "use another copy; investigate") \
            from exc


def _compare(params: dict, dbname: str, verified: dumps.Verified, settings: Settings, report: dict) -> None:
    with _connect(params, dbname) as conn:
        tables = conn.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON "
                              "n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN "
                              "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'").fetchall()
        counts = {f"{s}.{t}": conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(s, t)))
                  .fetchone()[0] for s, t in tables}
        report.update(tables=len(counts), rows=sum(counts.values()))
        expected = verified.manifest.tables if verified.manifest else verified.tables
        wrong = [f"{k} ({counts.get(k)} rows, dump has {v})" for k, v in sorted(expected.items())
                 if counts.get(k) != v]
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
    line = json.dumps(report)
    drill_log = settings["DRILL_LOG"] or str(Path(settings["LOG_FILE"]).parent / "backup-drill.log")
    for target in filter(None, (drill_log, args.report)):
        try:
            with open(target, "a") as out:
                out.write(line + "\n")
        except OSError as exc:
            log.warning("could not write the drill report to %s: %s", target, exc.strerror)


def print_report(report: dict) -> None:
    print(f"source:   {report['source']}\ndump:     {report['dump']} ({size(report['bytes'])})\n"
          f"download: {report['download_seconds']:.1f}s\nrestore:  {report['restore_seconds']:.1f}s\n"
          f"tables:   {report['tables']}\nrows:     {report['rows']}\n"
          + "".join(f"check:    {c['sql']} -> {'true' if c['passed'] else 'NOT TRUE'}\n" for c in report["checks"])
          + f"result:   {report['result']}", flush=True)
