"""Copies of dumps on this machine (WORK_DIR): streamed from a place or offsite, decrypted, complete or absent."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from . import crypto, dumps, files, names, rundir
from .errors import Failed
from .log import Progress
from .offsite import Offsite
from .places import Place
from .run import Cmd, StageFailed, Tap, pipeline, run
from .settings import Settings


class _Writer(Tap):
    def __init__(self, out: files.AtomicFile, progress: Progress):
        self.out, self.progress = out, progress
        self.name = f"write {out.final}"

    def __call__(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.progress.add(len(chunk))


def fetch(
    reader: Cmd,
    directory: Path,
    name: str,
    total: int | None = None,
    identity_file: str | None = None,
    recipients: list[str] | None = None,
) -> Path:
    """Stream what `reader` prints into `directory/name`, decrypted on the way when given an identity file.

    The file appears only when complete.
    """
    progress = Progress(f"downloading {name}", total)
    steps = [reader, *([crypto.decrypt_cmd(identity_file)] if identity_file else [])]
    with files.AtomicFile(directory, name, replace=True) as out:
        try:
            pipeline([*steps, _Writer(out, progress)])
        except StageFailed as exc:
            if exc.stage == crypto.DECRYPT_STAGE:
                raise crypto.decryption_error(exc, name, identity_file, recipients) from exc
            raise Failed(
                f"downloading {name} ({reader.name}) failed: {exc.message}", "check the place and the network"
            ) from exc
        finally:
            progress.finish()
        return out.commit()


WORK_PREFIX = "work."  # in WORK_DIR/kw-backup-<uid>/


@contextmanager
def work_dir(base: str):
    """A private directory in WORK_DIR, removed with everything in it at the end, also on failure. It is flock'ed
    while this process lives: the next run removes a killed run's (dumps, a base backup and its WAL fetched, a
    recovered moment), stopping a server it left running there."""
    mine = files.own_subdir(Path(base), f"kw-backup-{os.geteuid()}")
    rundir.sweep(WORK_PREFIX, root=mine)
    with rundir.run_dir(WORK_PREFIX, None, root=mine) as path:
        yield path


def fetch_dump(
    origin: Place | Offsite, name: str, directory: Path, settings: Settings, total: int | None = None
) -> Path:
    """A dump and (when it has one) its manifest from a place's DIR or offsite; an encrypted one arrives decrypted.

    A decrypted dump gets the plain dump's manifest (from the encrypted copy's), so the usual
    verification checks that it decrypted to exactly the bytes that were backed up.
    """
    key = crypto.identity(settings, name) if names.is_encrypted(name) else None
    plain = names.plain_name(name)
    manifest_name = name + names.MANIFEST_SUFFIX
    raw = run(origin.read(manifest_name), timeout=600)[1] if origin.exists(manifest_name) else None
    manifest = dumps.Manifest.from_json(raw, f"{origin.name}:{manifest_name}") if raw is not None else None
    path = fetch(
        origin.read(name),
        directory,
        plain,
        total,
        key,
        (manifest.encryption or {}).get("recipients") if manifest else None,
    )
    if manifest is not None:
        files.write_atomic(directory, plain + names.MANIFEST_SUFFIX, manifest.plain().to_json(), replace=True)
    return path


def local_dump(path: Path, directory: Path, settings: Settings) -> Path:
    """A dump file given by path, ready to read: itself, or decrypted into `directory` when it is a `.age`."""
    if not path.is_file():
        raise Failed(f"--from-file: no such file: {path}")
    if not names.is_encrypted(path.name):
        return path
    return crypto.decrypt_file(path, crypto.identity(settings, path.name), directory)
