"""Where the pi5 pushes its verified dumps: the nas, and the offsite remote. One push path for both.

A destination lists what it holds, receives files into its `.incoming/`, checks each copy's
checksum against the pi5's verified copy, promotes checked copies to their final names (manifest
first, never over an existing dump), removes what rotation says, and keeps pins. `push()` plans
and runs that for any destination: the nas over ssh and rsync (`NasDestination`), the offsite
remote through rclone (`offsite.Offsite`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from plumbum.commands.base import shquote

from . import files, names, retention
from .errors import Failed, VerificationError
from .log import log
from .places import Entry, Place
from .retention import Calendar
from .run import Cmd, run
from .transfer import remote_spec, rsync_base, with_retries

INCOMING = ".incoming"

# $1: the directory; then pairs NAME SHA256 of copies waiting in .incoming.
CHECK_SCRIPT = r"""
set -e
cd -- "$1"; shift
while [ $# -gt 0 ]; do
  name=$1; expected=$2; shift 2
  got=$( (openssl dgst -sha256 -r ".incoming/$name" 2>/dev/null || sha256sum -- ".incoming/$name") | cut -d' ' -f1)
  if [ "$got" != "$expected" ]; then echo "sha256 of $name is $got, not $expected" >&2; exit 3; fi
done
"""
# $1: the directory; then the names of checked copies in .incoming. Never over an existing dump: mv -n,
# then the copy still waiting in .incoming tells (mv -n exits 0 or 1 by coreutils version).
PROMOTE_SCRIPT = r"""
set -e
cd -- "$1"; shift
for name in "$@"; do
  if [ -e "$name" ]; then echo "$name exists there already with other bytes; not replacing it" >&2; exit 3; fi
  chmod 600 -- ".incoming/$name" ".incoming/$name.json"
  sync -- ".incoming/$name" ".incoming/$name.json" 2>/dev/null || sync
  mv -f -- ".incoming/$name.json" "$name.json"
  mv -n -- ".incoming/$name" "$name" || true
  if [ -e ".incoming/$name" ]; then echo "$name appeared there meanwhile; not replacing it" >&2; exit 3; fi
  echo "promoted $name"
done
sync . 2>/dev/null || sync
"""
# $1: the directory; then dumps to remove with their manifests.
REMOVE_SCRIPT = r"""
cd -- "$1" || exit 1; shift
for name in "$@"; do rm -f -- "$name" "$name.json" && echo "removed $name"; done
"""
# $1: the directory; then pairs DUMP CONTENT: each pin written whole under its final name.
PIN_SCRIPT = r"""
set -e
umask 077
cd -- "$1"; shift
while [ $# -gt 0 ]; do
  printf '%s' "$2" > ".$1.pin.partial"
  mv -f -- ".$1.pin.partial" "$1.pin"
  shift 2
done
"""
# $1: the directory; then dumps whose pins go.
UNPIN_SCRIPT = r"""
cd -- "$1" || exit 1; shift
for name in "$@"; do rm -f -- "$name.pin"; done
"""


@dataclass
class Parcel:
    """A dump to send, as it leaves the pi5 (plain, or its encrypted copy), with its manifest."""

    folder: Path
    entry: Entry

    @property
    def paths(self) -> list[Path]:
        return [self.folder / self.entry.name, self.folder / (self.entry.name + names.MANIFEST_SUFFIX)]


class Destination(Protocol):
    name: str
    keep: int
    calendar: Calendar

    def listing(self, timeout: float = 60) -> list[Entry]: ...
    def send(self, parcels: list[Parcel]) -> None: ...
    def check(self, parcels: list[Parcel]) -> str: ...
    def promote(self, dumps: list[str]) -> None: ...
    def remove(self, dumps: list[str]) -> None: ...
    def pin(self, pins: dict[str, bytes]) -> None: ...
    def unpin(self, dumps: list[str]) -> None: ...
    def finish(self) -> None: ...


class NasDestination:
    """The nas: rsync into .incoming over ssh, then small constant scripts run there."""

    def __init__(self, place: Place):
        self.place = place
        self.name, self.keep, self.calendar = place.name, place.keep, place.calendar

    def listing(self, timeout: float = 60) -> list[Entry]:
        return self.place.listing(timeout)

    def _script(self, script: str, *args: str, what: str) -> str:
        code, out, err = run(
            self.place.script(script, self._dir(), *args, name=f"{what} on {self.name}"), check=False, timeout=3600
        )
        for line in out.decode(errors="replace").splitlines():
            log.info("%s: %s", self.name, line)
        if code == 3:
            raise VerificationError(f"{self.name}: {err.strip()}", "run the orchestrator again; compare by hand")
        if code != 0:
            raise Failed(
                f"{self.name} ({self.place.host}): could not {what}: {err.strip()}",
                "check the nas and run the orchestrator again",
            )
        return out.decode(errors="replace")

    def _dir(self) -> str:
        return str(self.place.local_dir()) if self.place.is_local else self.place.remote_path()

    def send(self, parcels: list[Parcel]) -> None:
        sources = [str(p) for parcel in parcels for p in parcel.paths]
        dest = remote_spec(self.place, self.place.remote_path(INCOMING) + "/")
        if self.place.is_local:
            files.ensure_private_dir(self.place.local_dir() / INCOMING)
            files.ensure_private_dir(self.place.local_dir())
            prepare = []
        else:  # the nas's directories are made private by the same ssh session that receives
            top, incoming = shquote(self.place.remote_path()), shquote(self.place.remote_path(INCOMING))
            prepare = [f"--rsync-path=mkdir -p -- {incoming} && chmod 700 -- {top} {incoming} && rsync"]

        def attempt(number: int) -> None:
            run(
                Cmd(
                    [
                        *rsync_base(self.place),
                        *prepare,
                        "--inplace",
                        "--chmod=F600",
                        *(["--append-verify"] if number > 1 else []),
                        *sources,
                        dest,
                    ],
                    name=f"rsync to {self.name}",
                )
            )

        with_retries(attempt, f"pushing to the {self.name}", "check the nas; the next run catches up")

    def check(self, parcels: list[Parcel]) -> str:
        self._script(CHECK_SCRIPT, *[a for p in parcels for a in (p.entry.name, p.entry.sha256)], what="check sha256")
        return "sha256"

    def promote(self, dumps: list[str]) -> None:
        self._script(PROMOTE_SCRIPT, *dumps, what="promote the copies")

    def remove(self, dumps: list[str]) -> None:
        if dumps:
            self._script(REMOVE_SCRIPT, *dumps, what="rotate")

    def pin(self, pins: dict[str, bytes]) -> None:
        if pins:
            self._script(
                PIN_SCRIPT, *[a for dump, content in pins.items() for a in (dump, content.decode())], what="pin"
            )

    def unpin(self, dumps: list[str]) -> None:
        if dumps:
            self._script(UNPIN_SCRIPT, *dumps, what="release pins")

    def finish(self) -> None:
        """Nothing waits in .incoming after a good push: what is left there came from failed runs."""
        target = self.place.local_dir() / INCOMING if self.place.is_local else self.place.remote_path(INCOMING)
        run(
            self.place.command(["rm", "-rf", "--", str(target)], name=f"clear {self.name} .incoming"),
            check=False,
            timeout=600,
        )


@dataclass
class Plan:
    """What a push does at one destination."""

    send: list[Entry] = field(default_factory=list)  # pi5 dumps it lacks
    remove: list[str] = field(default_factory=list)  # what rotation removes there afterwards
    conflicts: list[str] = field(default_factory=list)  # names it holds with other bytes: never replaced
    pin: dict[str, bytes] = field(default_factory=dict)  # its copies of pinned pi5 dumps, not pinned there yet


def copies_of(entry: Entry, there: dict[str, Entry]) -> list[Entry]:
    """A destination's copies of a pi5 dump: under its plain name, or encrypted."""
    return [there[n] for n in (entry.name, entry.name + names.AGE_SUFFIX) if n in there]


def holds(entry: Entry, there: dict[str, Entry]) -> bool:
    """True when a destination has a verified copy of the pi5's `entry`, plain or encrypted."""
    return any(c.status == "verified" and c.plain_sha256 == entry.sha256 for c in copies_of(entry, there))


def plan(
    here: list[Entry], there: list[Entry], dest: Destination, name_for, pins: dict[str, bytes], clock: names.Clock
) -> Plan:
    """The verified pi5 dumps (`here`) a destination lacks, what rotation removes there once they have arrived,
    the names it holds with other bytes, and the pins it lacks. `name_for` gives a dump's outgoing name."""
    by_name = {e.name: e for e in there}
    result = Plan()
    for entry in here:
        if holds(entry, by_name):
            continue
        if copies_of(entry, by_name):
            result.conflicts.append(entry.name)
        else:
            result.send.append(entry)
    exclude = {names.parse(e.name).stem for e in there if e.pinned or clock.is_future(e.name)}
    exclude |= {names.parse(n).stem for n in [*pins, *result.conflicts]}  # a copy in question stays, uncounted
    valid_there = [(names.parse(e.name), e.status == "verified") for e in there]
    valid_there += [(names.parse(name_for(e)), True) for e in result.send]
    doomed = {d.name for d in retention.to_remove(valid_there, dest.keep, dest.calendar, exclude)}
    # A dump that rotation would remove at once is not sent: the place keeps newer ones.
    result.send = [e for e in result.send if name_for(e) not in doomed]
    result.remove = sorted(doomed & set(by_name))
    arriving = {e.name: name_for(e) for e in result.send}
    for dump, content in pins.items():
        held = [c.name for c in copies_of(Entry(dump, 0), by_name) if not c.pinned]
        result.pin.update({name: content for name in held + ([arriving[dump]] if dump in arriving else [])})
    return result


def push(
    dest: Destination, here: list[Entry], parcel_for, name_for, pins: dict[str, bytes], clock: names.Clock
) -> tuple[Plan, float]:
    """Send every verified pi5 dump the destination lacks, check, promote, pin, rotate; the plan and its seconds.

    Names it holds with other bytes are left as they are and returned in the plan's conflicts.
    """
    steps = plan(here, dest.listing(), dest, name_for, pins, clock)
    for name in steps.conflicts:
        log.error("%s holds %s with other bytes than the pi5's verified copy: not replacing it", dest.name, name)
    if not (steps.send or steps.remove or steps.pin):
        log.info("the %s has every verified dump already", dest.name)
        return steps, 0.0
    started = time.monotonic()
    parcels = [parcel_for(e) for e in steps.send]
    if parcels:
        dest.send(parcels)
        checked = dest.check(parcels)
        dest.promote([p.entry.name for p in parcels])
        log.info(
            "pushed %s %s and checked their %s in %.1fs",
            ", ".join(p.entry.name for p in parcels),
            "offsite" if dest.name == "offsite" else f"to the {dest.name}",
            checked,
            time.monotonic() - started,
        )
    dest.pin(steps.pin)
    dest.remove(steps.remove)
    if parcels:
        dest.finish()
    return steps, time.monotonic() - started


def release(dest: Destination) -> list[str]:
    """Remove every pin at a destination; the dumps they pinned."""
    pinned = [e.name for e in dest.listing() if e.pinned]
    dest.unpin(pinned)
    return pinned
