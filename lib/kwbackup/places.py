"""Places: where dumps live. A place is this machine (`local`) or an ssh destination.

ssh always runs with BatchMode (never a password prompt in cron), a connect timeout,
keep-alives (a dead link fails instead of hanging), and `-F $SSH_CONFIG` when set; a run
that talks to a place several times shares one connection (ControlMaster). Remote commands
are argument lists that plumbum quotes for the remote shell; the few remote scripts are
constants that take every value as a positional argument.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from plumbum.commands.base import shquote_list

from . import dumps, names
from .errors import Failed
from .retention import NO_CALENDAR, Calendar
from .run import Cmd, StageFailed, run
from .settings import PLACES, Settings

LABELS = {
    "prod": "Production Server",
    "pi5": "Raspberry Pi 5",
    "nas": "CM3588 NAS",
    "old-prod": "Old Production Server",
}
SSH_OPTIONS = [
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=10",
    "-o",
    "ServerAliveInterval=10",
    "-o",
    "ServerAliveCountMax=3",
]

# Lists dump files with size and mtime, manifests of at most $2 bytes with their JSON on one line
# (a larger one is only named: it is invalid, and never read), pins, and the free space (df).
LIST_SCRIPT = r"""
cd -- "$1" 2>/dev/null || { echo NODIR; exit 0; }
for f in db-* kw_app_production-*; do
  [ -f "$f" ] || continue
  case "$f" in
    *.json)
      if [ "$(wc -c < "$f" | tr -d ' ')" -le "$2" ]; then printf 'M\t%s\t' "$f"; tr -d '\n\r' < "$f"; printf '\n'
      else printf 'B\t%s\n' "$f"; fi ;;
    *.pin) printf 'P\t%s\n' "$f" ;;
    *) printf 'F\t%s\t%s\t%s\n' "$f" "$(wc -c < "$f" | tr -d ' ')" "$(date -r "$f" +%s 2>/dev/null || echo 0)" ;;
  esac
done
printf 'D\t%s\n' "$(df -Pk . 2>/dev/null | tail -n 1)"
"""


def ssh_base(ssh_config: str | None, control_dir: str | None = None) -> list[str]:
    argv = ["ssh", *(["-F", ssh_config] if ssh_config else []), *SSH_OPTIONS]
    if control_dir:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir}/%C", "-o", "ControlPersist=120"]
    return argv


class Listing(list):
    """A place's dumps, newest first, and the free space of its DIR's filesystem (None: unknown)."""

    free: int | None = None


@dataclass
class Entry:
    """A dump file as a place lists it."""

    name: str
    size: int
    mtime: float = 0.0
    manifest: dict | None = None  # validated: {} when present but not a valid manifest
    pinned: bool = False  # a <name>.pin beside it: kept beyond KEEP (see orchestrate.py)

    @property
    def status(self) -> str:
        """`SIZE MISMATCH` when the file is not what its manifest describes (its size, or another file's name)."""
        if self.manifest is None:
            return "unverified"
        matches = self.manifest.get("bytes") == self.size and self.manifest.get("file") == self.name
        return "verified" if matches else "SIZE MISMATCH"

    @property
    def sha256(self) -> str | None:
        return self.manifest.get("sha256") if self.manifest else None

    @property
    def plain_sha256(self) -> str | None:
        """The sha256 of the dump itself: for an encrypted copy, of what it decrypts to."""
        encryption = (self.manifest or {}).get("encryption")
        return encryption.get("plain_sha256") if isinstance(encryption, dict) else self.sha256

    @property
    def created_at(self) -> datetime:
        """The dump's time: its manifest's, else the file's mtime, else its name's."""
        stamp = (self.manifest or {}).get("created_at")
        if isinstance(stamp, str):
            try:
                return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            except ValueError:
                pass
        if self.mtime:
            return datetime.fromtimestamp(self.mtime, UTC)
        return names.parse(self.name).when


@dataclass(frozen=True)
class Place:
    name: str  # prod, pi5, nas, old-prod
    host: str  # `local` or an ssh destination
    dir: str  # absolute, or ~/ for that place's home
    keep: int | None
    ssh_config: str | None = None
    control_dir: str | None = field(default=None, compare=False)
    calendar: Calendar = NO_CALENDAR

    @property
    def is_local(self) -> bool:
        return self.host == "local"

    @property
    def label(self) -> str:
        where = self.host.split("@", 1)[-1]
        return f"{LABELS[self.name]} ({where}:{self.dir.rstrip('/')}/)"

    def local_dir(self) -> Path:
        """The directory on this machine (local places only)."""
        assert self.is_local, self.name
        return Path(os.path.expanduser(self.dir))

    def remote_path(self, name: str = "") -> str:
        """A path for commands run on the place: `~/x` becomes relative to the login's home."""
        base = self.dir[2:] if self.dir.startswith("~/") else self.dir
        return f"{base.rstrip('/')}/{name}" if name else base

    def ssh(self) -> list[str]:
        return ssh_base(self.ssh_config, self.control_dir)

    def command(self, argv: list[str], name: str = "") -> Cmd:
        """A command run on this place: as is when local, through ssh otherwise."""
        if self.is_local:
            return Cmd(argv, name=name)
        remote = " ".join(shquote_list([str(a) for a in argv]))
        return Cmd([*self.ssh(), "--", self.host, remote], name=name or f"ssh {self.name}: {argv[0]}")

    def script(self, script: str, *args: str, name: str) -> Cmd:
        """A constant sh script run on the place with `args` as $1, $2, ..."""
        return self.command(["sh", "-c", script, "sh", *args], name=name)

    def read(self, name: str) -> Cmd:
        """A command writing the file `name` of DIR to its standard output."""
        path = str(self.local_dir() / name) if self.is_local else self.remote_path(name)
        return self.command(["cat", "--", path], name=f"read from {self.name}")

    def exists(self, name: str) -> bool:
        path = str(self.local_dir() / name) if self.is_local else self.remote_path(name)
        return run(self.command(["test", "-f", path], name="test"), check=False, timeout=60)[0] == 0

    def listing(self, timeout: float = 60) -> Listing:
        """The dumps in DIR (newest first) with sizes, manifests and pins, and its free space; Failed when
        unreachable."""
        if self.is_local:
            return local_listing(self.local_dir())
        try:
            _, out, _ = run(
                self.script(LIST_SCRIPT, self.remote_path(), str(dumps.MAX_MANIFEST_BYTES), name=f"list {self.name}"),
                timeout=timeout,
            )
        except StageFailed as exc:
            raise Failed(
                f"{self.name} ({self.host}) unreachable: {exc.tail or exc.detail}",
                "check the network, the ssh key and SSH_CONFIG",
            ) from exc
        return _parse_listing(out.decode(errors="replace"))

    def multiplexed(self, control_dir: str) -> Place:
        return self if self.is_local else replace(self, control_dir=control_dir)


def _dump_of(file_name: str, suffix: str) -> str | None:
    """The dump a manifest or pin file belongs to."""
    if file_name.endswith(suffix) and names.parse(file_name[: -len(suffix)]):
        return file_name[: -len(suffix)]
    return None


def local_listing(directory: Path) -> Listing:
    if not directory.is_dir():
        return Listing()
    found, manifests, pins = {}, {}, set()
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False):
            continue
        if names.parse(entry.name):
            stat = entry.stat()
            found[entry.name] = Entry(entry.name, stat.st_size, stat.st_mtime)
        elif dump := _dump_of(entry.name, names.MANIFEST_SUFFIX):
            too_big = entry.stat().st_size > dumps.MAX_MANIFEST_BYTES
            manifests[dump] = {} if too_big else manifest_or_none(Path(entry.path).read_bytes())
        elif dump := _dump_of(entry.name, names.PIN_SUFFIX):
            pins.add(dump)
    listing = combine_listing(found, manifests, pins)
    stat = os.statvfs(directory)
    listing.free = stat.f_bavail * stat.f_frsize
    return listing


def _parse_listing(text: str) -> Listing:
    found, manifests, pins, free = {}, {}, set(), None
    for line in text.splitlines():
        parts = line.split("\t", 2)
        if parts[0] == "F" and len(parts) == 3:
            name, rest = parts[1], parts[2].split("\t")
            if names.parse(name) and len(rest) == 2 and rest[0].isdigit():
                found[name] = Entry(name, int(rest[0]), float(rest[1]) if rest[1].isdigit() else 0.0)
        elif parts[0] == "M" and len(parts) == 3 and (dump := _dump_of(parts[1], names.MANIFEST_SUFFIX)):
            manifests[dump] = manifest_or_none(parts[2].encode())
        elif parts[0] == "B" and len(parts) == 2 and (dump := _dump_of(parts[1], names.MANIFEST_SUFFIX)):
            manifests[dump] = {}  # over the size limit: not valid, and not read
        elif parts[0] == "P" and len(parts) == 2 and (dump := _dump_of(parts[1], names.PIN_SUFFIX)):
            pins.add(dump)
        elif parts[0] == "D" and len(parts) == 2:
            df = parts[1].split()
            free = int(df[3]) * 1024 if len(df) >= 4 and df[3].isdigit() else None
    listing = combine_listing(found, manifests, pins)
    listing.free = free
    return listing


def manifest_or_none(data: bytes) -> dict:
    """A listed manifest: its fields when valid, else {} (present but never "verified")."""
    try:
        manifest = json.loads(data) if len(data) <= dumps.MAX_MANIFEST_BYTES else None
    except ValueError:
        return {}
    return manifest if dumps.manifest_problem(manifest) is None else {}


def combine_listing(
    found: dict[str, Entry], manifests: dict[str, dict | None], pins: set[str] = frozenset()
) -> Listing:
    for name, entry in found.items():
        entry.manifest = manifests.get(name)
        entry.pinned = name in pins
    order = {d.name: i for i, d in enumerate(names.dumps_in(found))}
    return Listing(sorted(found.values(), key=lambda e: order[e.name]))


def place(settings: Settings, name: str) -> Place:
    prefix = PLACES[name]
    keep = settings[f"{prefix}_KEEP"] if f"{prefix}_KEEP" in settings.names() else None
    calendar = (
        Calendar(*(int(settings[f"{prefix}_KEEP_{period}"] or 0) for period in ("DAILY", "WEEKLY", "MONTHLY")))
        if f"{prefix}_KEEP_DAILY" in settings.names()
        else NO_CALENDAR
    )
    return Place(
        name,
        settings[f"{prefix}_HOST"],
        settings[f"{prefix}_DIR"],
        int(keep) if keep else None,
        settings["SSH_CONFIG"],
        calendar=calendar,
    )


class Multiplexer:
    """One ssh connection per place for a whole run (ControlMaster), closed at the end."""

    def __enter__(self) -> Multiplexer:
        self.dir = tempfile.mkdtemp(prefix="kw-ssh-", dir="/tmp")  # a short path: sockets' names are limited
        self.used: list[Place] = []
        return self

    def __call__(self, place_: Place) -> Place:
        shared = place_.multiplexed(self.dir)
        if not shared.is_local:
            self.used.append(shared)
        return shared

    def __exit__(self, *exc_info) -> None:
        for used in self.used:
            run(Cmd([*used.ssh(), "-O", "exit", used.host], name="ssh -O exit"), check=False, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)  # a master may still be removing its socket
