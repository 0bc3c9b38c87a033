"""A restore's footing on prod: the lock, the dump staged and checked there, and the cleanup.

Nothing of kw-backup runs on prod: the remote scripts below are constants for a POSIX shell with
coreutils, gzip (pigz when present), flock and openssl or sha256sum, taking every value as a
positional argument. A dump not already on prod is streamed into a private `kw-restore.*`
directory in prod's temporary directory (its login's TMPDIR, as mktemp has it, else /tmp),
locked (flock) by the run that made it, so a later run removes only those of dead runs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from . import catalog, crypto, dumps, names, sources
from .database import Database
from .errors import Failed, KwError, LockHeld, VerificationError
from .log import Progress, log, size
from .places import Place
from .run import Cmd, ProgressTap, StageFailed, background, pipeline, run

STAGING_PREFIX = "kw-restore."
HEAD_LIMIT = 16 * 1024 * 1024  # a bound: the schema part of a dump, before its first COPY, is far smaller
# $1: the dump; then a command reading its SQL. Reports a failed decompression (a truncated or
# corrupt file) even though the command at the end of the pipe exited 0.
DECOMPRESS_INTO = r"""
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
# $1: the dump; then parallel_load.py's arguments. The program itself comes on stdin, for the OS's
# own python3 (nothing of kw-backup is installed on prod); exit 98 when there is no python3 >= 3.6.
PARALLEL_LOAD = r"""
dump=$1; shift
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 6))' 2>/dev/null
then echo "no python3 (3.6 or newer) on prod" >&2; exit 98; fi
exec python3 - --dump "$dump" "$@"
"""
NO_PYTHON = 98
# $1: the dump, $2: a byte count. Its SQL up to the first COPY (the schema part), at most $2 bytes;
# the decompressor stops there. Without sed it is the first $2 bytes.
HEAD_SCRIPT = r"""
if [ "${1%.gz}" = "$1" ]; then dec="cat"; elif command -v pigz >/dev/null 2>&1; then dec="pigz -dc"
else dec="gzip -dc"; fi
schema() { if command -v sed >/dev/null 2>&1; then sed '/^COPY /q'; else cat; fi; }
$dec -- "$1" 2>/dev/null | schema | head -c "$2"
"""
# $1: a file. Its size and sha256 (openssl's SHA instructions where it is installed).
SUM_SCRIPT = r"""
set -e
size=$(wc -c < "$1")
sum=$( (openssl dgst -sha256 -r < "$1" 2>/dev/null || sha256sum < "$1") | cut -d' ' -f1)
echo "$size $sum"
"""
# $1: a file: exit 3 when there is none, else its bytes.
READ_IF_THERE = '[ -e "$1" ] || exit 3; exec cat -- "$1"'
# $1: the staged dump, $2: PROD_DIR, $3: the name to keep it under.
# The manifest, when there is one, comes on stdin ($4 = manifest) and lands first, as backup-db writes them: a
# dump never appears without it.
KEEP_SCRIPT = r"""
set -e
mkdir -p -m 700 -- "$2"
tmp="$2/.$3.partial-keep"
cp -- "$1" "$tmp"
chmod 600 -- "$tmp"
if [ -e "$2/$3" ]; then rm -f -- "$tmp"; echo "$2/$3 exists already" >&2; exit 1; fi
if [ "$4" = manifest ]; then
  cat > "$tmp.json"; chmod 600 -- "$tmp.json"; mv -- "$tmp.json" "$2/$3.json"
fi
mv -- "$tmp" "$2/$3"
"""
# A staging directory is in use while its .lock is held (by the run that made it): only the
# ones of dead runs go. One without a .lock yet is another run's, between its mktemp and its
# lock (a restore of another database on the same server), unless it is an hour old.
CLEAN_STAGING_SCRIPT = r"""
for d in "${TMPDIR:-/tmp}"/kw-restore.*; do
  [ -d "$d" ] && [ "$(stat -c %u -- "$d")" = "$(id -u)" ] || continue
  if [ -e "$d/.lock" ]; then flock -n "$d/.lock" true 2>/dev/null || continue
  elif [ -z "$(find "$d" -maxdepth 0 -mmin +60)" ]; then continue; fi
  rm -rf -- "$d" && echo "$d"
done
"""
# Staging is in the login's TMPDIR, else /tmp: where mktemp puts files by itself, as an operator expects
# (a private per-user one, pam_tmpdir's, say). $1: a name's prefix.
MKTEMP_DIR_SCRIPT = 'exec mktemp -d "${TMPDIR:-/tmp}/$1XXXXXXXX"'
TMP_SPACE_SCRIPT = 'exec df -Pk -- "${TMPDIR:-/tmp}"'  # the free space there
# $1: the staging directory's lock; holds it for as long as its stdin is open.
HOLD_SCRIPT = 'exec flock "$1" sh -c "echo locked; exec cat"'


@dataclass
class Staged:
    path: str  # the dump on prod
    name: str  # its name at the source (plain: what an encrypted copy decrypts to)
    manifest: dumps.Manifest | None
    directory: str | None = None  # our staging directory on prod, removed at the end

    @property
    def tables(self) -> dict[str, int] | None:
        return self.manifest.tables if self.manifest else None


@contextmanager
def restore_lock(db: Database, name: str):
    """The server's advisory lock for restores of `name`, held by a psql session for the whole run."""
    holder = background(db.psql("postgres", "-A", "-t", "-v", f"target={name}"))
    try:
        holder.stdin.write(catalog.LOCK.encode())
        holder.stdin.flush()
        answer = holder.stdout.readline().strip()
    except BrokenPipeError:
        answer = b""
    try:
        if answer == b"f":
            raise LockHeld(
                f"another restore of {name} is running on prod (it holds the server's restore lock)",
                "wait for it to finish; a killed run's lock goes with its connection",
            )
        if answer != b"t":
            db.sql("SELECT 1;\n")  # says why the server cannot be reached
            raise Failed("could not take the restore lock on prod's server", "check DB_EXEC and the database")
        yield
    finally:
        _release(holder)


def _release(holder) -> None:
    if holder is None:  # the lock was never taken
        return
    if isinstance(holder, int):
        os.close(holder)
        return
    try:
        holder.stdin.close()
    except BrokenPipeError:
        pass
    try:
        holder.wait(30)
    except Exception:  # noqa: BLE001 - it goes with this process anyway
        holder.kill()


def prod_path(prod: Place, name: str) -> str:
    return str(prod.local_dir() / name) if prod.is_local else prod.remote_path(name)


def clean_leftovers(prod: Place, db: Database, name: str) -> None:
    """What killed runs left (under the lock, so no live run's): staging directories, half-made databases."""
    _, out, _ = run(prod.script(CLEAN_STAGING_SCRIPT, name="clean staging on prod"), check=False, timeout=60)
    for line in out.decode().split():
        log.warning("removed %s on prod, left by an interrupted restore", line)
    for half in catalog.leftovers(db, name):
        log.warning("dropping %s, a half-made database left by an interrupted restore", half)
        catalog.drop(db, half)


@contextmanager
def staged(settings, prod: Place, source: sources.Source):
    """The dump on prod: in place when it is there already, else streamed into a private directory.

    An encrypted dump is decrypted on this machine as it streams (the key never leaves it);
    prod receives the plain dump, checked against the plain dump's manifest.
    """
    key = sources.key_for(settings, source)
    plain = names.plain_name(source.name)
    if source.option == "--local" and not key:
        path = prod_path(prod, source.name)
        code, raw, _ = run(
            prod.script(READ_IF_THERE, path + names.MANIFEST_SUFFIX, name="read the manifest"), check=False, timeout=600
        )
        yield Staged(path, plain, _manifest(raw if code == 0 else None, source.name, key))
        return
    raw = sources.manifest_bytes(source)
    manifest = _manifest(raw, source.name, key)
    local = sources.local_path(source)
    if prod.is_local and local and not key:
        yield Staged(local, plain, manifest)
        return
    total = os.path.getsize(local) if local else _listed_size(source)
    _check_tmp_space(prod, total)
    directory = _mkdtemp(prod)
    holder = None
    try:
        holder = _hold(prod, directory)
        target = f"{directory}/{plain if names.parse(plain) else 'dump.sql' + ('.gz' if plain.endswith('.gz') else '')}"
        _stream(prod, source, local, key, target, total)
        yield Staged(target, plain, manifest, directory)
    finally:
        # Removed while still locked: no other run's cleanup ever sees it unlocked and half removed.
        if prod.is_local:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            run(prod.command(["rm", "-rf", "--", directory], name="cleanup on prod"), check=False, timeout=60)
        _release(holder)
        log.info("removed %s on prod", directory)


def _manifest(raw: bytes | None, name: str, key: str | None) -> dumps.Manifest | None:
    if raw is None:
        return None
    manifest = dumps.Manifest.from_json(raw, name + names.MANIFEST_SUFFIX)
    return manifest.plain() if key else manifest


def _listed_size(source: sources.Source) -> int:
    entries = {e.name: e for e in source.origin.listing()} if source.origin else {}
    return entries[source.name].size if source.name in entries else 0


def _mkdtemp(prod: Place) -> str:
    if prod.is_local:  # where the cleanup, a shell here, looks
        return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=os.environ.get("TMPDIR") or "/tmp")
    _, out, _ = run(prod.script(MKTEMP_DIR_SCRIPT, STAGING_PREFIX, name="mktemp on prod"))
    return out.decode().strip()


def _hold(prod: Place, directory: str):
    """flock on <directory>/.lock for as long as this run lives (a killed run's lock dies with it)."""
    if prod.is_local:
        fd = os.open(f"{directory}/.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    holder = background(prod.script(HOLD_SCRIPT, f"{directory}/.lock", name="hold the staging lock"))
    if holder.stdout.readline().strip() != b"locked":
        raise Failed("could not lock the staging directory on prod", "is flock (util-linux) installed there?")
    return holder


def _stream(prod: Place, source: sources.Source, local: str | None, key: str | None, target: str, total: int) -> None:
    """Copy the dump to prod through this machine: nothing lands here, nothing partial there."""
    reader = dumps.FileChunks(Path(local)) if local else None
    write = prod.command(
        ["sh", "-c", 'cat > "$1.partial" && mv -- "$1.partial" "$1"', "sh", target], name="write on prod"
    )
    progress = Progress(f"copying {Path(target).name} to prod", total or None)
    try:
        pipeline([*sources.reader(source, key), ProgressTap(progress), write], stdin=reader)
    except StageFailed as exc:
        if exc.stage == crypto.DECRYPT_STAGE:
            raise crypto.decryption_error(exc, source.name) from exc
        raise Failed(f"copying the dump to prod failed: {exc.message}", "check the source and prod") from exc
    finally:
        progress.finish()


def free_bytes(cmd: Cmd) -> int | None:
    """Free bytes from `df -Pk`'s output; None when it says nothing usable."""
    _, out, _ = run(cmd, timeout=60)
    lines = out.decode().strip().splitlines()
    fields = lines[-1].split() if lines else []
    return int(fields[3]) * 1024 if len(fields) >= 4 and fields[3].isdigit() else None


def _check_tmp_space(prod: Place, needed: int) -> None:
    free = free_bytes(prod.script(TMP_SPACE_SCRIPT, name="df on prod"))
    if free is not None and needed and free < needed * 1.05:
        raise Failed(
            f"not enough space in prod's temporary directory (TMPDIR, else /tmp) for the dump: need {size(needed)}, "
            f"have {size(free)}",
            "free space there on prod",
        )


def verify(prod: Place, staged_dump: Staged) -> dict:
    """The dump checked on prod with stock tools; the roles, extensions and pg_dump version it needs.

    With a manifest: size and sha256 (the content was checked whole when it was made, and the
    load counts its rows again). Without one: the whole gzip stream and pg_dump's completion line.
    """
    name, manifest = staged_dump.name, staged_dump.manifest
    if manifest is not None:
        _, out, _ = run(prod.script(SUM_SCRIPT, staged_dump.path, name="sha256 on prod"), timeout=3600)
        bytes_, _, sha256 = out.decode().strip().partition(" ")
        dumps.check_against_manifest(name, manifest, int(bytes_), sha256, manifest.tables)
    else:
        code, tail, err = run(
            prod.script(
                DECOMPRESS_INTO, staged_dump.path, "tail", "-c", str(dumps.TAIL_BYTES), name="gzip stream check on prod"
            ),
            check=False,
            timeout=None,
        )
        if code == DECOMPRESS_FAILED:
            raise VerificationError(
                f"{name}: corrupt gzip stream ({last_error(err)})", "use another copy (list-backups)"
            )
        if code != 0:
            raise Failed(f"could not read {name} on prod: {last_error(err)}")
        problem = dumps.completion_problem(tail)
        if problem:
            raise VerificationError(f"{name}: incomplete dump: {problem}", "use another copy (list-backups)")
    _, head, _ = run(
        prod.script(HEAD_SCRIPT, staged_dump.path, str(HEAD_LIMIT), name="read the dump's schema"), timeout=600
    )
    needs = dumps.needs(head)
    log.info(
        "verified %s on prod: %s",
        name,
        "size and sha256 as its manifest says" if manifest else "gzip stream and completion line (no manifest)",
    )
    return needs


def keep(prod: Place, staged_dump: Staged, name: str) -> None:
    """Keep the restored dump on prod as a dump in PROD_DIR (--keep-dump); never over another file."""
    directory = str(prod.local_dir()) if prod.is_local else prod.remote_path()
    manifest = staged_dump.manifest
    try:
        run(
            prod.script(
                KEEP_SCRIPT,
                staged_dump.path,
                directory,
                name,
                "manifest" if manifest else "",
                name="keep the dump on prod",
            ),
            input=replace(manifest, file=name).to_json() if manifest else None,
            timeout=3600,
        )
    except KwError as exc:  # the restore itself is done and verified
        log.warning("the database is restored, but the dump was not kept in PROD_DIR: %s", exc.message)
        return
    log.info("kept the dump on prod as %s", prod.remote_path(name))


def last_error(stderr: bytes | str) -> str:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-3:]) or "no message"
