"""The restore engine: a restore either completes and is verified, or DB_NAME is exactly as it was.

fetch -> verify -> check versions, roles, extensions and space -> confirm -> (stop app) ->
load into <DB_NAME>_restore_<ts> -> row counts against the manifest -> swap (one transaction,
settings and grants carried over) -> (start app) -> cleanup, always, in `finally`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import crypto, dumps, files, names
from .database import Database
from .errors import Declined, Failed, KwError, LockHeld, UsageError, VerificationError
from .log import Progress, dry, log, size
from .offsite import Offsite
from .places import Multiplexer, Place, place
from .run import Cmd, ProgressTap, StageFailed, Tap, background, pipeline, run
from .settings import HOST_RE, Settings

STAGING_PREFIX = "kw-restore."
# $1: the dump; then the psql command. Decompresses on prod and reports a failed decompression
# (a truncated or corrupt file) even though psql, at the end of the pipe, exited 0.
LOAD_SCRIPT = r"""
dump=$1; shift
status=$(mktemp) || exit 1
if [ "${dump%.gz}" = "$dump" ]; then dec="cat"; elif command -v pigz >/dev/null 2>&1; then dec="pigz -dc"
else dec="gzip -dc"; fi
{ $dec -- "$dump" 2>"$status.err" || { echo "exit $?:"; tail -n 2 "$status.err"; } >"$status"; } | "$@"
code=$?
if [ -s "$status" ]; then echo "decompressing failed: $(tr '\n' ' ' <"$status")" >&2; code=97; fi
rm -f "$status" "$status.err"
exit $code
"""
DECOMPRESS_FAILED = 97
# $1: the staged dump, $2: PROD_DIR, $3: the name to keep it under.
KEEP_SCRIPT = r"""
set -e
mkdir -p -m 700 -- "$2"
tmp="$2/.$3.partial-keep"
cp -- "$1" "$tmp"
chmod 600 -- "$tmp"
if [ -e "$2/$3" ]; then rm -f -- "$tmp"; echo "$2/$3 exists already" >&2; exit 1; fi
mv -- "$tmp" "$2/$3"
"""
# A staging directory is in use while its .lock is held (by the run that made it): only the
# ones of dead runs go.
CLEAN_STAGING_SCRIPT = r"""
for d in /tmp/kw-restore.*; do
  if [ -d "$d" ] && [ -O "$d" ] && flock -n "$d/.lock" true 2>/dev/null; then rm -rf -- "$d" && echo "$d"; fi
done
"""


@dataclass
class Source:
    """Where the dump comes from: a place and a dump name, or a path (a local file or user@host:/path)."""

    option: str
    place: Place | Offsite | None = None
    name: str = "latest"
    path: str | None = None


@dataclass
class Staged:
    path: str  # the dump on prod
    name: str
    size: int = 0
    staging_dir: str | None = None  # ours, removed at the end
    holder: object = None  # keeps the staging directory's lock while this run lives
    info: dict = field(default_factory=dict)

    @property
    def manifest_tables(self) -> dict[str, int] | None:
        return self.info.get("tables") if self.info.get("status") == "verified" else None


def resolve(source: Source) -> Source:
    """Turn `latest` into a name, and check that a named dump exists at its place."""
    if source.place is None:
        return source
    listing = source.place.listing()
    if source.name == "latest":
        good = [e for e in listing if e.status == "verified"] or [e for e in listing if e.status == "unverified"]
        if not good:
            raise Failed(f"no dump on {source.place.name} ({source.place.dir})", "list-backups shows what exists")
        if good[0] is not listing[0]:
            log.warning("the newest dump on %s, %s, is %s; taking %s", source.place.name, listing[0].name,
                        listing[0].status, good[0].name)
        source.name = good[0].name
    elif source.name not in {e.name for e in listing}:
        raise Failed(f"{source.name} is not on {source.place.name} ({source.place.dir})",
                     "list-backups shows what exists")
    log.info("dump: %s from %s", source.name, source.place.label)
    return source


class Restorer:
    def __init__(self, settings: Settings, prod: Place):
        self.settings = settings
        self.prod = prod
        self.db = Database(settings, prod)
        self.name = settings["DB_NAME"]
        self.stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        self.new = f"{self.name}_restore_{self.stamp}"
        self.previous = f"{self.name}_before_restore_{self.stamp}"
        self.loaded: dict[str, int] = {}  # rows per table, as the server reported loading them

    # --- staging --------------------------------------------------------------------------------
    def stage(self, source: Source) -> Staged:
        """The dump on prod: in place when it is there already, else streamed into a private temp dir.

        An encrypted dump is decrypted on this machine as it streams (the key never leaves it);
        prod receives the plain dump and its plain manifest.
        """
        key = crypto.identity(self.settings, source.name) if names.is_encrypted(source.name) else None
        if source.place is not None and source.place.name == "prod" and not key:
            path = str(source.place.local_dir() / source.name) if self.prod.is_local \
                else source.place.remote_path(source.name)
            return Staged(path, source.name)
        local_path = self._local_path(source)
        if self.prod.is_local and local_path and not key:
            return Staged(local_path, Path(local_path).name)
        return self._upload(source, local_path, key)

    def _local_path(self, source: Source) -> str | None:
        if source.option == "--from-file":
            return source.path
        if source.place is not None and source.place.is_local:
            return str(source.place.local_dir() / source.name)
        return None

    def _upload(self, source: Source, local_path: str | None, key: str | None) -> Staged:
        plain = names.plain_name(source.name)
        name = plain if names.parse(plain) else "dump.sql.gz" if plain.endswith(".gz") else "dump.sql"
        size_hint = os.path.getsize(local_path) if local_path else self._remote_size(source)
        self._check_tmp_space(size_hint)
        staging = self._mkdtemp()
        staged = Staged(f"{staging}/{name}", name, size_hint, staging)
        try:
            staged.holder = self._hold(staging)
            self._stream(source, local_path, f"{staging}/{name}", size_hint, key)
            self._stream_manifest(source, local_path, f"{staging}/{name}{names.MANIFEST_SUFFIX}", key)
        except BaseException:
            self.cleanup(staged)
            raise
        return staged

    def _remote_size(self, source: Source) -> int:
        entries = {e.name: e for e in source.place.listing()} if source.place else {}
        return entries[source.name].size if source.name in entries else 0

    def _mkdtemp(self) -> str:
        if self.prod.is_local:
            return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir="/tmp")
        _, out, _ = run(self.prod.command(["mktemp", "-d", f"/tmp/{STAGING_PREFIX}XXXXXXXX"], name="mktemp on prod"))
        return out.decode().strip()

    def _hold(self, directory: str):
        """flock on <directory>/.lock for as long as this run lives (a killed run's lock dies with it)."""
        if self.prod.is_local:
            fd = os.open(f"{directory}/.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        holder = background(self.prod.command(["flock", f"{directory}/.lock", "sh", "-c", "echo locked; exec cat"],
                                              name="hold the staging lock"))
        if holder.stdout.readline().strip() != b"locked":
            raise Failed("could not lock the staging directory on prod", "is flock (util-linux) installed there?")
        return holder

    @staticmethod
    def _release(holder) -> None:
        if isinstance(holder, int):
            os.close(holder)
        elif holder is not None:
            holder.stdin.close()
            holder.wait(30)

    def _write_on_prod(self, target: str) -> Cmd:
        return self.prod.command(["sh", "-c", 'cat > "$1.partial" && mv -- "$1.partial" "$1"', "sh", target],
                                 name="write on prod")

    def _stream(self, source: Source, local_path: str | None, target: str, total: int, key: str | None) -> None:
        """Copy the dump to prod through this machine: nothing lands here, nothing partial there."""
        reader = dumps.FileChunks(Path(local_path)) if local_path else None
        steps = ([] if local_path else [source.place.read(source.name)]) + ([crypto.decrypt_cmd(key)] if key else [])
        progress = Progress(f"copying {Path(target).name} to prod", total or None)
        try:
            pipeline([*steps, ProgressTap(progress), self._write_on_prod(target)], stdin=reader)
        except StageFailed as exc:
            if exc.stage == crypto.DECRYPT_STAGE:
                raise crypto.decryption_error(exc, source.name) from exc
            raise Failed(f"copying the dump to prod failed: {exc.message}", "check the source and prod") from exc
        finally:
            progress.finish()

    def _stream_manifest(self, source: Source, local_path: str | None, target: str, key: str | None) -> None:
        """The dump's manifest beside it on prod; for a decrypted dump, the plain dump's manifest."""
        name = source.name + names.MANIFEST_SUFFIX
        if local_path:
            if not os.path.exists(local_path + names.MANIFEST_SUFFIX):
                return
            data = Path(local_path + names.MANIFEST_SUFFIX).read_bytes()
        elif source.place.exists(name):
            data = run(source.place.read(name), timeout=600)[1]
        else:
            return
        if key:
            data = dumps.Manifest.from_json(data, name).plain().to_json()
        run(self._write_on_prod(target), input=data, timeout=600)

    def _check_tmp_space(self, needed: int) -> None:
        free = self._free_bytes(self.prod.command(["df", "-Pk", "/tmp"], name="df on prod"))
        if free is not None and needed and free < needed * 1.05:
            raise Failed(f"not enough space in prod's /tmp for the dump: need {size(needed)}, have {size(free)}",
                         "free space on prod or clean /tmp")

    @staticmethod
    def _free_bytes(cmd: Cmd) -> int | None:
        _, out, _ = run(cmd, timeout=60)
        lines = out.decode().strip().splitlines()
        fields = lines[-1].split() if lines else []
        return int(fields[3]) * 1024 if len(fields) >= 4 and fields[3].isdigit() else None

    def cleanup(self, staged: Staged | None) -> None:
        if staged is None or staged.staging_dir is None:
            return
        self._release(staged.holder)
        if self.prod.is_local:
            shutil.rmtree(staged.staging_dir, ignore_errors=True)
        else:
            run(self.prod.command(["rm", "-rf", "--", staged.staging_dir], name="cleanup on prod"), check=False,
                timeout=60)
        log.info("removed %s on prod", staged.staging_dir)

    def clean_leftovers(self) -> None:
        """Report and remove what a killed run left: staging dirs, a half-made database, a locked DB_NAME."""
        _, out, _ = run(self.prod.script(CLEAN_STAGING_SCRIPT, name="clean staging on prod"), check=False,
                           timeout=60)
        for line in out.decode().split():
            log.warning("removed %s on prod, left by an interrupted restore", line)
        for half, sessions in self.db.query(
                f"SELECT datname, (SELECT count(*) FROM pg_stat_activity a WHERE a.datname = d.datname) "
                f"FROM pg_database d WHERE datname LIKE '{self.name}\\_restore\\_%' "
                f"OR (datname = '{self.name}' AND NOT datallowconn) ORDER BY 1"):
            if half == self.name:
                log.warning("%s did not allow connections (an interrupted swap); allowing them again", self.name)
                self.db.query(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')
                continue
            if sessions != "0":
                raise LockHeld(f"a restore into {half} is running on prod ({sessions} sessions)",
                               "wait for it; if it is dead, end its sessions and run again")
            log.warning("dropping %s, a half-made database left by an interrupted restore", half)
            self.db.query(f'DROP DATABASE IF EXISTS "{half}" WITH (FORCE)')

    # --- checks ---------------------------------------------------------------------------------
    def verify(self, staged: Staged) -> None:
        """Integrity, completion and manifest; the roles, extensions and pg_dump version it needs."""
        if self.prod.is_local:
            verified = dumps.verify_file(Path(staged.path), whole=False)
            staged.info = {"status": verified.status, "bytes": verified.size, "tables": verified.tables,
                           **dumps.requirements(Path(staged.path))}
        else:
            cmd = self.prod.command(["verify-backup", "--quick", "--json", staged.path], name="verify-backup on prod")
            code, out, err = run(cmd, check=False, timeout=3600)
            if code == 3:
                raise VerificationError(f"the dump failed verification on prod: {_last_error(err)}",
                                        "use another copy (list-backups)")
            if code != 0:
                raise Failed(f"could not verify the dump on prod: {_last_error(err)}",
                             "is kw-backup installed on prod (make install-prod)?")
            staged.info = json.loads(out.decode().strip().splitlines()[-1])
        staged.size = staged.info["bytes"]
        log.info("verified %s: %s, %s, %d tables", staged.name, staged.info["status"], size(staged.size),
                 len(staged.info.get("tables") or {}))

    def check_target(self, staged: Staged) -> dict:
        """What the target server has and lacks for this dump; Failed before anything is changed."""
        version = run(self.db.shell(["psql", "--version"], name="psql --version"), timeout=120)[1].decode()
        psql_major = _major(version.split()[2] if len(version.split()) > 2 else "0")
        dump_major = _major(staged.info.get("pg_dump_version") or "0")
        if dump_major > psql_major:
            raise Failed(f"the dump was made by pg_dump {staged.info['pg_dump_version']}, newer than prod's psql "
                         f"{psql_major}", "restore with a PostgreSQL at least as new as the dump's")
        roles, extensions, data_dir, database = self.db.query(
            "SELECT (SELECT json_agg(rolname) FROM pg_roles), (SELECT json_agg(name) FROM pg_available_extensions), "
            "current_setting('data_directory'), (SELECT json_build_array(pg_database_size(datname), "
            "pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datcollate, datctype) FROM pg_database "
            f"WHERE datname = '{self.name}')")[0]
        missing_roles = sorted(set(staged.info.get("roles", [])) - set(json.loads(roles)))
        missing_ext = sorted(set(staged.info.get("extensions", [])) - set(json.loads(extensions)))
        if missing_roles or missing_ext:
            parts = ([f"roles {', '.join(missing_roles)}"] if missing_roles else []) + \
                    ([f"extensions {', '.join(missing_ext)}"] if missing_ext else [])
            raise Failed(f"prod lacks what the dump needs: {'; '.join(parts)}",
                         "create the roles (CREATE ROLE ...) / install the extensions, then run again")
        target = {"exists": bool(database)}
        if database:
            size_bytes, owner, encoding, collate, ctype = json.loads(database)
            target.update(size=int(size_bytes), owner=owner, encoding=encoding, collate=collate, ctype=ctype)
            free = self._free_bytes(self.db.shell(["df", "-Pk", data_dir], name="df data directory"))
            needed = int(target["size"] * 1.1)
            if free is not None and free < needed:
                raise Failed(f"not enough space on prod for a second copy of {self.name}: need {size(needed)}, "
                             f"have {size(free)} in {data_dir}", "free space on prod (or --drop-previous later)")
        return target

    def holds_tables(self) -> bool:
        rows = self.db.query(f"SELECT 1 FROM pg_database WHERE datname = '{self.name}'")
        if not rows:
            return False
        return bool(self.db.query("SELECT 1 FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
                                  "'information_schema') LIMIT 1", self.name))

    # --- load, check, swap ----------------------------------------------------------------------
    def load(self, staged: Staged, target: dict) -> None:
        owner = target.get("owner") or self.settings["DB_USER"]
        options = f" OWNER \"{owner}\" TEMPLATE template0"
        if target.get("exists"):
            options += (f" ENCODING '{target['encoding']}' LC_COLLATE '{target['collate']}' "
                        f"LC_CTYPE '{target['ctype']}'")
        self.db.query(f'CREATE DATABASE "{self.new}"{options}')
        log.info("restoring into %s", self.new)
        # -e echoes each COPY statement and psql prints its `COPY n` tag: the rows the server loaded.
        psql = self.db.psql(self.new, "--single-transaction", "-e", quiet=False)
        watcher = _SizeWatcher(self.db, self.new, staged.info.get("bytes", 0) * 6)
        watcher.start()
        try:
            self._run_load(staged, psql)
        finally:
            watcher.stop()

    def _run_load(self, staged: Staged, psql: Cmd) -> None:
        remote_pipe = not self.prod.is_local and self.db.mode in ("docker", "direct")
        try:
            if remote_pipe:  # decompress and load on prod: the SQL never crosses the network
                inner = Database(self.settings, None).psql(self.new, "--single-transaction", "-e", quiet=False).argv
                code, out, err = run(self.prod.script(LOAD_SCRIPT, staged.path, *inner, name="restore on prod"),
                                     check=False, timeout=None)
                self.loaded = dumps.copy_counts(out)
                if code == DECOMPRESS_FAILED:
                    raise VerificationError(f"the dump is damaged: {_last_error(err)}", "use another copy")
                if code != 0:
                    raise Failed(f"psql failed: {_last_error(err)}", "see the error; DB_NAME is unchanged")
            else:
                decompress = (dumps.decompressor() + ["--", staged.path]) if staged.path.endswith(".gz") \
                    else ["cat", "--", staged.path]
                echo = _Collect()
                pipeline([self.prod.command(decompress, name="gzip stream check"), psql, echo])
                self.loaded = dumps.copy_counts(bytes(echo.data))
        except StageFailed as exc:
            if exc.stage == "gzip stream check":
                raise VerificationError(f"the dump is damaged: {exc.tail or exc.detail}", "use another copy") from exc
            raise Failed(f"{exc.message}", "see the error; DB_NAME is unchanged") from exc

    def check_restored(self, staged: Staged) -> str:
        expected = staged.manifest_tables
        actual_tables = [f"{s}.{t}" for s, t in self.db.query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%'", self.new)]
        if expected is None:
            if not actual_tables:
                raise VerificationError(f"{self.new} has no tables after the restore")
            newest = self._newest_record()
            return f"{len(actual_tables)} tables, newest record {newest or 'unknown'} (no manifest)"
        missing = sorted(set(expected) - set(actual_tables))
        if missing:
            raise VerificationError(f"restored database lacks tables of the dump: {', '.join(missing[:5])}")
        counts = self.loaded
        wrong = [f"{k} ({counts.get(k)} rows, dump has {v})" for k, v in sorted(expected.items()) if counts.get(k) != v]
        if wrong:
            raise VerificationError(f"restored row counts differ from the manifest: {', '.join(wrong[:5])}")
        return f"{len(expected)} tables, {sum(expected.values())} rows, as the manifest says"

    def _newest_record(self) -> str | None:
        columns = self.db.query(
            "SELECT format('%I.%I', table_schema, table_name), quote_ident(column_name) "
            "FROM information_schema.columns WHERE column_name IN ('created_at', 'updated_at') "
            "AND data_type LIKE 'timestamp%' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')", self.new)
        if not columns:
            return None
        sql = "SELECT max(m) FROM (" + " UNION ALL ".join(f"SELECT max({c})::timestamp AS m FROM {t}"
                                                          for t, c in columns) + ") x"
        return self.db.query(sql, self.new)[0][0] if columns else None

    def swap(self, target: dict) -> None:
        """Rename DB_NAME away and the new database in, in one transaction, with its settings and grants."""
        carry = self._carried_over() if target.get("exists") else ""
        if not target.get("exists"):
            self.db.query(f'ALTER DATABASE "{self.new}" RENAME TO "{self.name}"')
            return
        end_sessions = (f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.name}' "
                        f"AND pid <> pg_backend_pid();")
        self.db.query(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false; {end_sessions}')
        try:
            for attempt in range(20):
                try:
                    self.db.query(f'BEGIN; ALTER DATABASE "{self.name}" RENAME TO "{self.previous}"; '
                                  f'ALTER DATABASE "{self.new}" RENAME TO "{self.name}"; {carry} COMMIT; '
                                  f'ALTER DATABASE "{self.previous}" ALLOW_CONNECTIONS true;')
                    break
                except StageFailed as exc:  # a session still ending, or an app reconnecting before the flag
                    if "being accessed by other users" not in exc.tail or attempt == 19:
                        raise
                    time.sleep(0.25)
                    self.db.query(end_sessions)
        except BaseException:
            self.db.query(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')
            raise
        log.info("swapped: %s is the restored database; the old one is %s", self.name, self.previous)

    def _carried_over(self) -> str:
        """SQL giving the new database DB_NAME's database-level settings, grants and connection limit."""
        statements = []
        acl, limit, settings = self.db.query(
            "SELECT coalesce(datacl::text, ''), datconnlimit, coalesce((SELECT json_agg(json_build_array("
            "coalesce(r.rolname, ''), cfg)) FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole, "
            f"unnest(s.setconfig) cfg WHERE s.setdatabase = d.oid), '[]') FROM pg_database d "
            f"WHERE datname = '{self.name}'")[0]
        for role, setting in json.loads(settings):
            key, _, value = setting.partition("=")
            in_role = f' IN ROLE "{role}"' if role else ""
            statements.append(f'ALTER DATABASE "{self.name}"{in_role} SET "{key}" = {_literal(value)};')
        if acl:
            statements.append(f'REVOKE ALL ON DATABASE "{self.name}" FROM PUBLIC;')
            for item in acl.strip("{}").split(","):
                grantee, _, rest = item.strip('"').partition("=")
                privileges = rest.split("/")[0]
                words = [w for letter, w in (("C", "CREATE"), ("T", "TEMPORARY"), ("c", "CONNECT"))
                         if letter in privileges]
                if words:
                    to = f'"{grantee}"' if grantee else "PUBLIC"
                    statements.append(f'GRANT {", ".join(words)} ON DATABASE "{self.name}" TO {to};')
        if limit != "-1":
            statements.append(f'ALTER DATABASE "{self.name}" CONNECTION LIMIT {int(limit)};')
        return " ".join(statements)

    def keep(self, staged: Staged, name: str) -> None:
        """Keep the restored dump on prod as a dump in PROD_DIR (--keep-dump); never over another file."""
        run(self.prod.script(KEEP_SCRIPT, staged.path, self.prod.remote_path() if not self.prod.is_local
                             else str(self.prod.local_dir()), name, name="keep the dump on prod"), timeout=3600)
        log.info("kept the dump on prod as %s", self.prod.remote_path(name))

    def drop_new(self) -> None:
        try:
            self.db.query(f'DROP DATABASE IF EXISTS "{self.new}" WITH (FORCE)')
            log.info("dropped the half-made %s; %s is as it was", self.new, self.name)
        except KwError as exc:
            log.error("could not drop %s: %s -- drop it by hand", self.new, exc.message)

    def drop_previous(self) -> None:
        self.db.query(f'DROP DATABASE IF EXISTS "{self.previous}" WITH (FORCE)')
        log.info("dropped %s (--drop-previous)", self.previous)


class _Collect(Tap):
    name = "psql output"

    def __init__(self):
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk


class _SizeWatcher(threading.Thread):
    """Progress of a load: the new database's size, polled, against a rough expected size."""

    def __init__(self, db: Database, name: str, expected: int):
        super().__init__(daemon=True)
        self.db, self.dbname = db, name
        self.progress = Progress(f"restoring into {name}", expected or None)
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = 1.0 if self.progress.tty else self.progress.interval
        while not self.stopped.wait(interval):
            try:
                now = int(self.db.query(f"SELECT pg_database_size('{self.dbname}')")[0][0])
            except (KwError, IndexError, ValueError):
                continue
            self.progress.add(max(0, now - self.progress.done))

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.progress.finish()


def confirm(dbname: str, yes: bool) -> None:
    """The operator types the database name; exit 5 without a terminal and without --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise Declined("confirmation needed but there is no terminal", "pass --yes to confirm non-interactively")
    sys.stderr.write(f"This replaces the database {dbname}. Type its name to go on: ")
    sys.stderr.flush()
    if sys.stdin.readline().strip() != dbname:
        raise Declined("not confirmed; nothing was changed")


def app_command(settings: Settings, which: str) -> None:
    argv = settings.command(which)
    log.info("running %s: %s", which, " ".join(argv))
    run(Cmd(argv, name=which), timeout=600)


def restore(settings: Settings, source: Source, *, yes: bool, dry_run: bool, stop_app: bool = False,
            drop_previous: bool = False, refuse_tables: bool = False, keep_as: str | None = None) -> None:
    """restore-production-db / setup-fresh-production-db: the whole safe restore."""
    work = files.own_subdir(Path(settings["WORK_DIR"]), f"kw-backup-{os.geteuid()}")
    with files.lock(work, "kw-restore"), Multiplexer() as shared:
        if isinstance(source.place, Place):
            source.place = shared(source.place)
        _restore(settings, shared(place(settings, "prod")), source, yes=yes, dry_run=dry_run, stop_app=stop_app,
                 drop_previous=drop_previous, refuse_tables=refuse_tables, keep_as=keep_as)


def _restore(settings: Settings, prod: Place, source: Source, *, yes: bool, dry_run: bool, stop_app: bool,
             drop_previous: bool, refuse_tables: bool, keep_as: str | None) -> None:
    restorer = Restorer(settings, prod)
    source = resolve(source)
    if not dry_run:
        restorer.clean_leftovers()
    if refuse_tables and restorer.holds_tables():
        raise Failed(f"{restorer.name} on prod already holds tables", "use restore-production-db, or --force")
    staged = None
    try:
        staged = restorer.stage(source)
        restorer.verify(staged)
        target = restorer.check_target(staged)
        if dry_run:
            what = f"replace {restorer.name} (kept as {restorer.previous})" if target["exists"] \
                else f"create {restorer.name}"
            dry("would restore %s into %s, check its row counts, then %s", staged.name, restorer.new, what)
            return
        confirm(restorer.name, yes)
        stopped = False
        try:
            if stop_app:
                app_command(settings, "APP_STOP_CMD")
                stopped = True
            _load_check_swap(restorer, staged, target)
        finally:
            if stopped:
                app_command(settings, "APP_START_CMD")
        if drop_previous and target["exists"]:
            restorer.drop_previous()
        if keep_as:
            try:
                restorer.keep(staged, keep_as)
            except KwError as exc:  # the restore itself is done and verified
                log.warning("the database is restored, but the dump was not kept in PROD_DIR: %s", exc.message)
    finally:
        restorer.cleanup(staged)


def _load_check_swap(restorer: Restorer, staged: Staged, target: dict) -> None:
    started = time.monotonic()
    try:
        restorer.load(staged, target)
        summary = restorer.check_restored(staged)
        log.info("restored %s in %.1fs: %s", restorer.new, time.monotonic() - started, summary)
        restorer.swap(target)
    except BaseException:
        restorer.drop_new()
        raise


def _major(version: str) -> int:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _last_error(stderr: bytes | str) -> str:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-3:]) or "no message"


def source_from_args(settings: Settings, args) -> Source:
    """--local/--from-nas/--from-pi5/--from-offsite NAME|latest, --from-file PATH, --from-ssh USER@HOST:/PATH."""
    for option, place_name in (("local", "prod"), ("from_nas", "nas"), ("from_pi5", "pi5"),
                               ("from_offsite", "offsite")):
        value = getattr(args, option, None)
        if isinstance(value, str):  # setup-fresh's --from-nas/--from-pi5/--from-offsite are flags, not names
            flag = "--" + option.replace("_", "-")
            origin = offsite_or_fail(settings) if place_name == "offsite" else place(settings, place_name)
            return Source(flag, origin, names.require(value, flag))
    if getattr(args, "from_file", None):
        if not os.path.isfile(args.from_file):
            raise Failed(f"--from-file: no such file: {args.from_file}")
        return Source("--from-file", path=os.path.abspath(args.from_file), name=Path(args.from_file).name)
    if getattr(args, "from_ssh", None):
        host, sep, path = args.from_ssh.partition(":")
        if not sep or not HOST_RE.fullmatch(host) or not path.startswith("/") or "\n" in path:
            raise UsageError(f"--from-ssh: {args.from_ssh!r} is not USER@HOST:/PATH")
        return Source("--from-ssh", path=args.from_ssh, name=Path(path).name)
    raise UsageError("say where the dump is: --local, --from-nas, --from-pi5, --from-offsite or --from-file")


def offsite_or_fail(settings: Settings) -> Offsite:
    offsite = Offsite.from_settings(settings)
    if offsite is None:
        raise UsageError("--from-offsite: OFFSITE_REMOTE is not set", "set it in the env file (an rclone remote)")
    return offsite

