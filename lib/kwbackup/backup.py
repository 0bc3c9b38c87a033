"""backup-db's work: dump, count, compress, hash and write in one pass; manifest; rotation.

pg_dump's plain SQL flows once through: DumpScanner (rows per table, completion line,
CRC32 of the SQL) -> pigz (or gzip) -> HashingWriter (sha256, size) -> a temporary file.
The file gets its final name only after every check passed; the gzip trailer's CRC32 and
length must match the SQL that went in, which proves the compressed file holds exactly
what pg_dump produced without reading it again.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from . import dumps, files, names, retention, space
from .database import Database
from .errors import Failed, VerificationError
from .log import Progress, dry, log, size
from .monitor import Monitor
from .places import Place
from .run import Cmd, ProgressTap, StageFailed, pipeline
from .settings import Settings


def compressor() -> list[str]:
    """pigz writes the same gzip format on every core; gzip where pigz is not installed."""
    return ["pigz", "-6", "-c"] if shutil.which("pigz") else ["gzip", "-6", "-c"]


@dataclass
class DumpResult:
    path: Path
    manifest: dumps.Manifest
    seconds: float
    removed: list[str]


def write_dump(db: Database, directory: Path, name: str, min_bytes: int) -> dumps.Manifest:
    """Stream a new dump to `directory/name` with its manifest; it appears only if valid."""
    scanner = dumps.DumpScanner(crc=True)
    progress = Progress(f"dumping {db.name}")
    created_at = dumps.now_iso()
    with files.AtomicFile(directory, name) as out:
        writer = dumps.HashingWriter(out)
        try:
            pipeline([db.dump(), scanner, ProgressTap(progress), Cmd(compressor(), name="compress"), writer])
        except StageFailed as exc:
            hint = (
                "check DB_NAME, DB_EXEC and that PostgreSQL is running"
                if exc.stage.startswith("pg_dump")
                else "check free space and permissions in the backup directory"
                if exc.stage == writer.name
                else ""
            )
            raise Failed(f"dump failed, no new dump kept: {exc.message}", hint) from exc
        finally:
            progress.finish()
        problem = scanner.problem()
        if problem:
            raise VerificationError(f"dump failed verification, no new dump kept: {problem}")
        crc, length = struct.unpack("<II", writer.last8) if writer.size >= 18 else (None, None)
        if (crc, length) != (scanner.crc, scanner.size & 0xFFFFFFFF):
            raise VerificationError(
                "dump failed verification, no new dump kept: the gzip trailer does not match the SQL pg_dump produced"
            )
        if writer.size < min_bytes:
            raise Failed(
                f"dump is only {writer.size} bytes (MIN_DUMP_BYTES={min_bytes}), no new dump kept",
                "check that DB_NAME is the production database",
            )
        if os.fstat(out.fd).st_size != writer.size:
            raise VerificationError("dump failed verification: the file's size differs from what was written")
        manifest = dumps.Manifest(
            file=name,
            bytes=writer.size,
            sha256=writer.sha256.hexdigest(),
            created_at=created_at,
            database=db.name,
            server_version=scanner.version("from database"),
            pg_dump_version=scanner.version("by pg_dump"),
            tables=scanner.tables,
        )
        # The manifest goes first: a dump never appears without one, and a failed manifest
        # write leaves no new dump. A crash between the two leaves only an orphan manifest.
        manifest_path = manifest.write_beside(directory)
        try:
            out.commit()
        except BaseException:
            manifest_path.unlink(missing_ok=True)
            raise
    return manifest


def new_name(directory: Path, clock: names.Clock) -> str:
    """The name of tonight's dump; Failed when a nightly dump there is dated after it.

    Names come from this machine's clock: a later name means the clock is behind (or a
    future-dated file was put there), and a dump under an earlier name would be the first one
    rotation removes.
    """
    existing = os.listdir(directory) if directory.is_dir() else []
    name = names.nightly_name_for(clock.now, set(existing))
    later = [d for d in names.dumps_in(existing) if d.nightly and d.sort_key > names.parse(name).sort_key]
    if later:
        raise Failed(
            f"not dumping: {later[0].name} in {directory} is dated after this clock "
            f"({clock.now:%Y-%m-%d %H:%M:%S} UTC), so the new dump {name} would sort before it",
            "fix the clock (timedatectl), or remove the future-dated dump by hand",
        )
    return name


def backup(settings: Settings, prod: Place, keep: int, dry_run: bool = False) -> DumpResult | None:
    """The whole of backup-db on this machine (prod)."""
    db = Database(settings)
    directory = Path(os.path.expanduser(prod.dir))
    min_bytes = settings.int("MIN_DUMP_BYTES")
    clock = names.Clock.from_settings(settings)
    if dry_run:
        name = new_name(directory, clock)
        dry("would dump %s with: %s", db.name, db.dump().display())
        dry("would write %s (mode 0600) and its manifest, then verify it", directory / name)
        if directory.is_dir():
            retention.rotate_local(directory, keep, clock, dry_run=True, calendar=prod.calendar)
        else:
            dry("would create %s (mode 0700)", directory)
        return None
    files.ensure_private_dir(directory)
    with files.lock(directory, "backup-db"), Monitor(settings, "backup-db", prod.name) as monitor:
        for stale in files.remove_stale_temps(directory):
            log.warning("removed %s, left by an interrupted run", stale)
        name = new_name(directory, clock)
        started = time.monotonic()
        log.info("dumping %s into %s", db.name, directory / name)
        manifest = write_dump(db, directory, name, min_bytes)
        seconds = time.monotonic() - started
        rows = sum(manifest.tables.values())
        log.info(
            "wrote %s: %s, %d rows in %d tables, verified, in %.1fs",
            name,
            size(manifest.bytes),
            rows,
            len(manifest.tables),
            seconds,
        )
        monitor.record(dump=name, bytes=manifest.bytes)
        removed = retention.rotate_local(directory, keep, clock, calendar=prod.calendar)
        free = space.free_local(directory)
        monitor.record_free(prod.name, free)
        if warning := space.low(settings, prod.name, free, manifest.bytes):
            log.warning("%s", warning)
            monitor.warn(warning)
        return DumpResult(directory / name, manifest, seconds, removed)
