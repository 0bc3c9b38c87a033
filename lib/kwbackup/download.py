"""Copies of dumps on this machine (WORK_DIR): streamed from a place, complete or absent."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from . import files, names
from .errors import Failed
from .log import Progress
from .places import Place
from .run import StageFailed, Tap, pipeline, run


class _Writer(Tap):
    def __init__(self, out: files.AtomicFile, progress: Progress):
        self.out, self.progress = out, progress
        self.name = f"write {out.final}"

    def __call__(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.progress.add(len(chunk))


def fetch(origin: Place, remote: str, directory: Path, name: str, total: int | None = None) -> Path:
    """Stream `remote` from `origin` into `directory/name`; it appears only when complete."""
    progress = Progress(f"downloading {name}", total)
    with files.AtomicFile(directory, name, replace=True) as out:
        try:
            pipeline([origin.command(["cat", "--", remote], name=f"read from {origin.name}"), _Writer(out, progress)])
        except StageFailed as exc:
            raise Failed(f"downloading {remote} from {origin.name} failed: {exc.message}",
                         "check the place and the network") from exc
        finally:
            progress.finish()
        return out.commit()


def exists(origin: Place, remote: str) -> bool:
    return run(origin.command(["test", "-f", remote], name="test"), check=False, timeout=60)[0] == 0


@contextmanager
def work_dir(base: str):
    """A private directory in WORK_DIR, removed with everything in it at the end, also on failure."""
    mine = files.own_subdir(Path(base), f"kw-backup-{os.geteuid()}")
    path = Path(tempfile.mkdtemp(prefix="work.", dir=mine))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fetch_dump(origin: Place, name: str, directory: Path, total: int | None = None) -> Path:
    """A dump and (when it has one) its manifest from a place's DIR."""
    if origin.is_local:
        source = origin.local_dir() / name
        for suffix in ("", names.MANIFEST_SUFFIX):
            if (source.parent / (name + suffix)).exists():
                shutil.copyfile(source.parent / (name + suffix), directory / (name + suffix))
        return directory / name
    path = fetch(origin, origin.remote_path(name), directory, name, total)
    if exists(origin, origin.remote_path(name + names.MANIFEST_SUFFIX)):
        fetch(origin, origin.remote_path(name + names.MANIFEST_SUFFIX), directory, name + names.MANIFEST_SUFFIX)
    return path
