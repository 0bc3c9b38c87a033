"""Files that only ever appear complete: temporary name, fsync, rename, fsync of the directory.

Also the private modes (0600 files in 0700 directories) and the per-script lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

from .errors import Failed, LockHeld

FILE_MODE = 0o600
DIR_MODE = 0o700
TEMP_MARK = ".partial-"


def temp_name_for(final: str) -> str:
    """A hidden name beside `final` that no dump pattern matches and cleanup can recognise."""
    return f".{final}{TEMP_MARK}{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) as 0700 when missing; tighten an existing one we own."""
    path = Path(path)
    if not path.is_dir():
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise Failed(f"cannot create directory {path}: {exc.strerror}", "check the path and permissions") from exc
    mode = path.stat().st_mode
    if mode & 0o1000:
        raise Failed(f"{path} is a shared directory (like /tmp)", "give dumps a directory of their own")
    if mode & 0o777 != DIR_MODE and path.stat().st_uid == os.geteuid():
        path.chmod(DIR_MODE)
    return path


def own_subdir(base: Path, name: str) -> Path:
    """`base/name`, 0700 and ours, in a shared directory such as /tmp (which is left as it is)."""
    path = Path(base) / name
    try:
        os.makedirs(base, exist_ok=True)
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise Failed(f"cannot create directory {path}: {exc.strerror}", "check WORK_DIR") from exc
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise Failed(f"{path} is not a private directory of this user", "remove it, or set WORK_DIR elsewhere")
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A new file written under a temporary name and published by `commit()`.

    Leaving the `with` block without commit() (an exception, a failed check) removes the
    temporary file, so a final name only ever holds a complete, fsynced file.
    """

    def __init__(self, directory: Path, final_name: str, replace: bool = False, durable: bool = True):
        self.directory = Path(directory)
        self.final = self.directory / final_name
        self.temp = self.directory / temp_name_for(final_name)
        self.replace = replace
        self.durable = durable  # False: a working copy that a crash may lose (it is made again), never a dump
        self.committed = False
        self.fd = -1

    def __enter__(self) -> AtomicFile:
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        return self

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def commit(self) -> Path:
        if self.durable:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        publish(self.temp, self.final, self.replace, self.durable)
        self.committed = True
        return self.final

    def __exit__(self, *exc_info) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed:
            self.temp.unlink(missing_ok=True)


def publish(temp: Path, final: Path, replace: bool = False, durable: bool = True) -> None:
    """Give a complete temporary file its final name, then make the rename durable."""
    if replace:
        os.rename(temp, final)
    else:
        try:
            os.link(temp, final)  # fails when `final` exists: never overwrite a dump
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise Failed(f"{final} already exists; not overwriting it") from exc
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if final.exists():
                raise Failed(f"{final} already exists; not overwriting it") from exc
            os.rename(temp, final)
        else:
            os.unlink(temp)
    if durable:
        fsync_dir(final.parent)


def write_atomic(directory: Path, name: str, data: bytes, replace: bool = False) -> Path:
    with AtomicFile(directory, name, replace) as out:
        out.write(data)
        return out.commit()


def remove_stale_temps(directory: Path, prefix: str = "") -> list[str]:
    """Remove temporary files left by a killed run. Call only while holding the lock."""
    removed = []
    for entry in os.scandir(directory):
        if is_temp_name(entry.name) and entry.name[1:].startswith(prefix) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
    if removed:
        fsync_dir(Path(directory))
    return removed


@contextmanager
def lock(directory: Path, script: str):
    """Hold `<directory>/.<script>.lock` with flock for the block; LockHeld (exit 4) if taken.

    flock dies with its process, so a kill -9 never leaves a stale lock behind.
    """
    path = Path(directory) / f".{script}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(
                f"another {script} is running (lock {path} held by pid {holder})",
                "wait for it to finish; a stale lock is impossible (flock ends with its process)",
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def digest(path: Path, kind: str = "sha256") -> str:
    """The hex digest of a file's bytes (sha256, or another hashlib algorithm)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, kind).hexdigest()
