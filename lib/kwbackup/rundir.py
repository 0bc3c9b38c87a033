"""Run directories of private temporary PostgreSQL servers (the drill's, a recovered moment's).

Each server lives in a 0700 directory that its process holds an flock on; the kernel drops the lock
when the process dies, even by kill -9, so the next run knows a server there is a leftover, stops it
and removes the directory (`sweep`). The server runs as an unprivileged user when run as root.
"""

from __future__ import annotations

import fcntl
import glob
import os
import pwd
import re
import secrets
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import Failed, KwError
from .log import add_secrets, log
from .run import Cmd, run

# In /tmp itself, not $TMPDIR: that may be private to this user, and the server runs as another.
RUN_ROOT = Path("/tmp")
BINDIR_FILE = "bindir"  # the server's PostgreSQL programs, for whoever stops it (a later sweep too)


def service_user() -> str | None:
    """PostgreSQL refuses to run as root: a temporary server runs as an unprivileged user."""
    if os.geteuid() != 0:
        return None
    for candidate in ("postgres", "nobody"):
        try:
            pwd.getpwnam(candidate)
            return candidate
        except KeyError:
            continue
    raise Failed("no unprivileged user to run a temporary PostgreSQL as", "create the postgres user")


def as_user(user: str | None, argv: list) -> list:
    return ["runuser", "-u", user, "--", *argv] if user else argv


def owner(base: Path) -> str | None:
    """Whom a run directory's server runs as: its owner, when that is not this process's user."""
    uid = base.stat().st_uid
    return None if uid == os.geteuid() else pwd.getpwuid(uid).pw_name


def password() -> str:
    secret = secrets.token_urlsafe(24)
    add_secrets([secret])
    return secret


def new_locked_dir(root: Path, prefix: str) -> tuple[Path, int]:
    """A new 0700 directory and the descriptor of its flock: it is in use until that is closed."""
    while True:
        base = Path(tempfile.mkdtemp(prefix=prefix, dir=root))  # 0700
        try:
            lock = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        fcntl.flock(lock, fcntl.LOCK_EX)
        if base.exists():
            return base, lock
        os.close(lock)  # a sweep took it for a leftover before it was locked, and removed it


def in_use(base: Path) -> bool:
    """Whether a live process holds the lock of a directory new_locked_dir made."""
    try:
        lock = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(lock)


@contextmanager
def run_dir(prefix: str, user: str | None, bindir: Path | None = None, root: Path = RUN_ROOT):
    """A new 0700 directory for one server, flock'ed while this process lives; torn down at the end."""
    base, lock = new_locked_dir(root, prefix)
    try:
        if bindir:
            (base / BINDIR_FILE).write_text(f"{bindir}\n")
        if user:
            shutil.chown(base, user)
        yield base
    finally:
        try:
            teardown(base)
        finally:
            os.close(lock)


def _pg_ctl(base: Path) -> Path:
    try:
        return Path((base / BINDIR_FILE).read_text().strip()) / "pg_ctl"
    except OSError:
        newest = sorted(
            glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: [int(n) for n in re.findall(r"\d+", p)]
        )
        return Path(newest[-1] if newest else shutil.which("pg_ctl") or "pg_ctl")


def teardown(base: Path) -> bool:
    """Stop what runs in a run directory (a container, a cluster, or a run directory inside it: a recovery's in a
    work directory) and remove it; False when it could not."""
    for inner in base.glob(f"*/{BINDIR_FILE}"):
        if not teardown(inner.parent):
            return False
    container = base / "container"
    if container.exists():
        name = container.read_text().strip()
        code, _, err = run(Cmd(["docker", "rm", "-f", name], name="docker rm"), check=False, timeout=120)
        if code and "No such container" not in err:
            log.warning("could not remove the container %s (%s); the next run tries again", name, " ".join(err.split()))
            return False
    data = base / "data"
    # Also when interrupted during `pg_ctl start`: the server may be up before pg_ctl says so, and
    # its socket would appear in `base` after rmtree had emptied it.
    if (data / "postmaster.pid").exists():
        run(
            Cmd(as_user(owner(base), [_pg_ctl(base), "-D", data, "-m", "immediate", "-w", "stop"]), name="pg_ctl stop"),
            check=False,
            timeout=120,
        )
    for _ in range(100):  # pg_ctl returns once the pid file is gone; the server removes its socket last
        shutil.rmtree(base, ignore_errors=True)
        if not base.exists():
            return True
        time.sleep(0.1)
    log.warning("could not remove %s; the next run tries again", base)
    return False


def sweep(prefix: str, root: Path = RUN_ROOT) -> None:
    """Stop and remove what killed runs left: run directories whose lock no live process holds."""
    mine = {os.geteuid()}
    if user := service_user():
        mine.add(pwd.getpwnam(user).pw_uid)
    for base in sorted(root.glob(prefix + "*")):
        try:
            st = os.lstat(base)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid not in mine:
                continue  # not one of this user's: another user's, or planted
            lock = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            continue  # its process is alive
        try:
            if teardown(base):
                log.info("removed %s, left by a run that was killed", base)
        except KwError as exc:
            log.warning("could not clean up %s, left by a run that was killed: %s", base, exc.line())
        finally:
            os.close(lock)
