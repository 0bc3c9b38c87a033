"""rsync between places: listing by rsync alone, resumable transfers, verified while receiving, one retry rule.

The pi5's key on prod may be restricted to `rrsync -ro PROD_DIR`: then the only thing it can
do is read PROD_DIR through rsync, with every path rooted there (PROD_DIR itself is `/`).
`RsyncSource` finds out which way the key works from rsync's own answer and names files
accordingly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from plumbum.commands.base import shquote_list

from . import dumps, names
from .errors import Failed, VerificationError
from .log import log
from .places import Entry, Place
from .run import Cmd, StageFailed, run

IO_TIMEOUT = 60  # seconds without data before rsync gives up (a dead link never hangs a night)
ATTEMPTS = 3
T = TypeVar("T")


def with_retries(action: Callable[[int], T], what: str, hint: str, attempts: int = ATTEMPTS) -> T:
    """`action(attempt)` until it does not fail with StageFailed (a dropped link), waiting a little longer each time.

    After the last attempt: Failed naming `what`. An action resumes what arrived (rsync --append-verify).
    """
    for attempt in range(1, attempts + 1):
        try:
            return action(attempt)
        except StageFailed as exc:
            if attempt == attempts:
                raise Failed(f"{what} failed after {attempts} attempts: {exc.tail or exc.detail}", hint) from exc
            log.warning("%s failed (%s); retrying, resuming what arrived", what, exc.tail or exc.detail)
            time.sleep(attempt)
    raise AssertionError("unreachable")


def rsync_base(place: Place) -> list[str]:
    argv = ["rsync", f"--timeout={IO_TIMEOUT}"]
    if not place.is_local:
        argv += ["-e", " ".join(shquote_list(place.ssh()))]
    return argv


def remote_spec(place: Place, path: str) -> str:
    return path if place.is_local else f"{place.host}:{path}"


class RsyncSource:
    """A place read through rsync only (works with an `rrsync -ro` key)."""

    def __init__(self, place: Place):
        self.place = place
        self.rooted = False  # True when the key is restricted by rrsync to PROD_DIR
        self.seen: dict[str, int] = {}  # every file's size in the last listing, manifests included

    def path(self, name: str = "") -> str:
        if self.place.is_local:
            return str(self.place.local_dir() / name) if name else str(self.place.local_dir()) + "/"
        if self.rooted:
            return "/" + name
        return self.place.remote_path(name) if name else self.place.remote_path() + "/"

    def listing(self) -> list[Entry]:
        """Dumps with sizes and times (no manifests: reading them needs a transfer)."""
        try:
            out = self._list()
        except StageFailed as exc:
            if "rrsync" not in exc.tail or self.rooted:
                raise Failed(
                    f"{self.place.name} ({self.place.host}) unreachable: {exc.tail or exc.detail}",
                    "check the network, the ssh key and SSH_CONFIG",
                ) from exc
            self.rooted = True
            log.debug("%s: the key is restricted by rrsync; paths are rooted at its directory", self.place.name)
            out = self._list()
        entries, self.seen = _parse_list_only(out)
        return entries

    def _list(self) -> str:
        cmd = Cmd(
            [*rsync_base(self.place), "--list-only", "--no-h", remote_spec(self.place, self.path())],
            name=f"rsync list {self.place.name}",
        )
        return run(cmd, timeout=IO_TIMEOUT * 2)[1].decode(errors="replace")

    def fetch(self, files: list[str], dest: Path, append: bool = False) -> None:
        """Copy `files` from the place into local `dest`, in place (so a retry can resume)."""
        sources = [remote_spec(self.place, self.path(files[0]))] + [
            (self.path(f) if self.place.is_local else ":" + self.path(f)) for f in files[1:]
        ]
        argv = [
            *rsync_base(self.place),
            "--inplace",
            "--chmod=F600",
            *(["--append-verify"] if append else []),
            *sources,
            str(dest) + "/",
        ]
        run(Cmd(argv, name=f"rsync from {self.place.name}"))


def _parse_list_only(text: str) -> tuple[list[Entry], dict[str, int]]:
    found, seen = {}, {}
    for line in text.splitlines():
        parts = line.split(None, 4)
        if len(parts) == 5 and parts[0].startswith("-") and parts[1].isdigit():
            seen[parts[4]] = int(parts[1])
        if len(parts) == 5 and parts[0].startswith("-") and parts[1].isdigit() and names.parse(parts[4]):
            try:
                mtime = datetime.strptime(f"{parts[2]} {parts[3]}", "%Y/%m/%d %H:%M:%S").timestamp()
            except ValueError:
                mtime = 0.0
            found[parts[4]] = Entry(parts[4], int(parts[1]), mtime)
    order = {d.name: i for i, d in enumerate(names.dumps_in(found))}
    return sorted(found.values(), key=lambda e: order[e.name]), seen


def receive_verified(source: RsyncSource, name: str, with_manifest: bool, incoming: Path) -> dumps.Verified:
    """Pull `name` (and its manifest) into `incoming`, checking the dump whole while it arrives.

    The gzip stream, pg_dump's completion line and every table's rows are checked as the bytes
    arrive (the scanner follows the growing file), then size, sha256 and row counts against the
    manifest: a manifest that matches junk makes nothing valid. A dropped connection is retried
    (resuming what arrived), and then the file is checked whole from disk.
    VerificationError when the dump is not valid; Failed when it cannot be fetched.
    """
    wanted = [name] + ([name + names.MANIFEST_SUFFIX] if with_manifest else [])
    target = incoming / name
    resumed = target.exists()  # left by an interrupted run: append to it, then check it whole
    checked: dict = {}

    def attempt(number: int) -> None:
        received, stop = threading.Event(), threading.Event()
        reader = dumps.FileChunks(target, growing=received, abandon=stop)
        checker = threading.Thread(target=_check_into, args=(reader, target, name, checked), daemon=True)
        checker.start()
        try:
            source.fetch(wanted, incoming, append=resumed or number > 1)
        except StageFailed:
            stop.set()
            raise
        finally:
            received.set()
            checker.join()
        checked["whole"] = number == 1 and not resumed

    with_retries(attempt, f"fetching {name} from {source.place.name}", "check the network and the place; run again")
    manifest = dumps.read_manifest(target) if with_manifest else None
    if checked.get("whole") and "error" not in checked:
        verified = checked["verified"]
        if manifest is not None:
            dumps.check_against_manifest(name, manifest, verified.size, verified.sha256, verified.tables)
        return dumps.Verified(target, verified.size, verified.sha256, manifest, verified.tables)
    if isinstance(checked.get("error"), VerificationError) and checked.get("whole"):
        raise checked["error"]
    # A resumed or rewritten file: check what is on disk now, from the start.
    return dumps.verify_file(target, manifest, use_manifest=False, name=name)


def _check_into(reader: dumps.FileChunks, target: Path, name: str, outcome: dict) -> None:
    outcome.pop("error", None)
    try:
        outcome["verified"] = dumps.verify_file(target, use_manifest=False, reader=reader, name=name)
    except Exception as exc:  # noqa: BLE001 - decided by the caller once the transfer is over
        outcome["error"] = exc
