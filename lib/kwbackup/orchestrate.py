"""backup-orchestrator's work, on the pi5: pull what prod has new, verify it whole, pin, push, rotate, check freshness.

The pi5 trusts nothing it cannot check. Every dump on prod newer than the pi5's newest verified
copy (and not future-dated) is pulled into `<DIR>/.incoming/` (0700, never listed as dumps) and
checked whole while it arrives: gzip stream, completion line, every table's row count, size and
sha256, all against the manifest. Only then does it get its final name, by a rename in the same
filesystem, manifest first, never over another file. Every other prod dump the pi5 holds under
the same name is compared with the pi5's copy, every run. A new dump that looks wrong against the one
before it (size, a table gone, rows lost) pins that one everywhere (pins.py). Then every
verified pi5 dump a destination lacks is pushed (destinations.py: the nas, then the offsite
remote, whose failure is only a warning), and the pi5 is rotated. A run ends failed when a dump
failed its checks, a name was held with other bytes, or the newest verified dump is older than
MAX_DUMP_AGE_HOURS. With AGE_RECIPIENTS, only encrypted copies (made in `<DIR>/.outgoing/`)
leave the pi5.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import crypto, destinations, dumps, files, names, pins, retention, space
from .destinations import NasDestination, Parcel
from .errors import Failed, KwError, UsageError, VerificationError
from .log import dry, log, size
from .monitor import Monitor
from .offsite import Offsite
from .pitr import nas as pitr_nas
from .places import Entry, Multiplexer, Place, local_listing, place
from .settings import Settings
from .transfer import RsyncSource, receive_verified, with_retries

INCOMING = ".incoming"
OUTGOING = ".outgoing"


@dataclass
class Summary:
    dump: str = "-"
    bytes: int = 0
    pull_seconds: float = 0.0
    push_seconds: float = 0.0
    offsite_seconds: float = 0.0
    offsite: str = "off"  # off (no OFFSITE_REMOTE), ok, failed
    wal: str = "off"  # the WAL tier's copy to the nas: off (PITR off), ok, failed
    wal_seconds: float = 0.0
    pushed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def line(self, result: str) -> str:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f"summary: time={now} dump={self.dump} size={self.bytes} pull={self.pull_seconds:.1f}s "
            f"push={self.push_seconds:.1f}s total={time.monotonic() - self.started:.1f}s "
            f"pushed={len(self.pushed)} removed={len(self.removed)} pinned={','.join(self.pinned) or '-'} "
            f"wal={self.wal} wal_copy={self.wal_seconds:.1f}s offsite={self.offsite} "
            f"offsite_push={self.offsite_seconds:.1f}s result={result}"
        )


class Run:
    """One orchestrator run's shared state: settings, clock, monitor, summary, and what went wrong."""

    def __init__(self, settings: Settings, monitor: Monitor | None, summary: Summary):
        self.settings = settings
        self.clock = names.Clock.from_settings(settings)
        self.monitor = monitor
        self.summary = summary
        self.problems: list[KwError] = []
        self.in_question: set[str] = set()  # names held here with other bytes than prod's: kept, never counted

    def warn(self, message: str) -> None:
        """A warning in the log, the summary's result and an alert (a dry run only says it)."""
        if self.monitor is None:
            dry("warning: %s", message)
            return
        log.warning("%s", message)
        self.summary.warnings.append(message)
        self.monitor.warn(message)

    def fail_if_any(self) -> None:
        """The run's failure: a verification problem (exit 3) comes first; every problem is named."""
        if not self.problems:
            return
        first = next((p for p in self.problems if isinstance(p, VerificationError)), self.problems[0])
        if len(self.problems) == 1:
            raise first
        raise type(first)("; ".join(p.message for p in self.problems), first.hint)


def orchestrate(
    settings: Settings, dry_run: bool = False, no_push: bool = False, release_pins: bool = False
) -> Summary:
    pi5 = place(settings, "pi5")
    if not pi5.is_local:
        raise UsageError("backup-orchestrator runs on the pi5 itself: set PI5_HOST=local there")
    directory = pi5.local_dir()
    summary = Summary()
    os.umask(0o077)  # what rclone creates in a local-directory remote is private too
    with Multiplexer() as shared:
        prod, nas = shared(place(settings, "prod")), shared(place(settings, "nas"))
        if dry_run:
            _plan(Run(settings, None, summary), prod, pi5, nas, no_push, release_pins)
            return summary
        files.ensure_private_dir(directory)
        with files.lock(directory, "backup-orchestrator"), Monitor(settings, "backup-orchestrator", "pi5") as monitor:
            this = Run(settings, monitor, summary)
            try:
                _run(this, prod, pi5, nas, no_push, release_pins)
            except Exception as exc:
                log.info(summary.line(f"failed ({type(exc).__name__})"))
                raise
            finally:
                monitor.record(
                    dump=summary.dump if summary.dump != "-" else None,
                    bytes=summary.bytes or None,
                    pull_seconds=summary.pull_seconds,
                    push_seconds=summary.push_seconds,
                    offsite_seconds=summary.offsite_seconds,
                )
            log.info(summary.line("ok" if not summary.warnings else "ok-with-warnings"))
    return summary


def _run(this: Run, prod: Place, pi5: Place, nas: Place, no_push: bool, release_pins: bool) -> None:
    directory = pi5.local_dir()
    incoming = files.ensure_private_dir(directory / INCOMING)
    offsite = Offsite.from_settings(this.settings)
    targets = [NasDestination(nas), *([offsite] if offsite else [])]
    if release_pins:
        _release_pins(this, directory, targets)
    pulled = _pull(this, prod, directory, incoming)
    _pin_before_anomalies(this, directory, pulled)
    if no_push:
        log.info("--no-push: not pushing to the nas, and so not rotating either")
    else:
        _push_everywhere(this, pi5, nas, offsite)
        for removed in retention.rotate_local(
            directory, pi5.keep, this.clock, calendar=pi5.calendar, held=this.in_question
        ):
            this.summary.removed.append(f"pi5:{removed}")
        _check_space(this, directory, nas)
        pitr_nas.copy_in_run(this, nas)  # PITR=on: the WAL tier too; its failure is the run's, never the dumps'
    this.summary.pinned = sorted(retention.pinned_in(directory))
    if this.summary.pinned:
        log.info("pinned (kept beyond KEEP until --release-pins): %s", ", ".join(this.summary.pinned))
    _check_freshness(this, directory)
    this.fail_if_any()


# --- pull ---------------------------------------------------------------------------------------
def _verified_here(this: Run, directory: Path) -> list[Entry]:
    """The pi5's verified dumps, newest first, future-dated ones left out."""
    return [e for e in local_listing(directory) if e.status == "verified" and not this.clock.is_future(e.name)]


def _to_pull(this: Run, listing: list[Entry], directory: Path) -> list[Entry]:
    """Prod's dumps newer than the pi5's newest verified copy, oldest first, with future-dated names warned about."""
    for entry in listing:
        if this.clock.is_future(entry.name):
            this.warn(
                f"prod has {entry.name}, dated ahead of this clock ({this.clock.now:%Y-%m-%d %H:%M} UTC): "
                "not pulling it; remove or rename it on prod if it is wrong"
            )
    listing = [e for e in listing if not this.clock.is_future(e.name)]
    here = _verified_here(this, directory)
    newest = names.parse(here[0].name).sort_key if here else None
    return [e for e in reversed(listing) if newest is None or names.parse(e.name).sort_key > newest]


def _held_here(this: Run, listing: list[Entry], wanted: list[Entry], directory: Path) -> list[Entry]:
    """Prod's dumps the pi5 will not pull but holds a file of the same name for (at most PROD_KEEP of them)."""
    pulling = {e.name for e in wanted}
    return [
        e
        for e in listing
        if e.name not in pulling and not this.clock.is_future(e.name) and (directory / e.name).is_file()
    ]


def _pull(this: Run, prod: Place, directory: Path, incoming: Path) -> list[Entry]:
    """Pull and verify what prod has new, then compare the rest with the pi5's copies; the newly verified dumps,
    oldest first."""
    source = RsyncSource(prod)
    listing = source.listing()
    if not listing:
        raise Failed(f"no dump in {prod.dir} on prod", "check that backup-db ran on prod (cron 02:00 UTC)")
    wanted = _to_pull(this, listing, directory)
    held = _held_here(this, listing, wanted, directory)
    newest_on_prod = next((e for e in listing if not this.clock.is_future(e.name)), None)
    if newest_on_prod:
        this.summary.dump, this.summary.bytes = newest_on_prod.name, newest_on_prod.size
    keep = {n for e in wanted for n in (e.name, e.name + names.MANIFEST_SUFFIX)}
    for stale in os.listdir(incoming):
        if stale not in keep:
            os.unlink(incoming / stale)
            log.info("removed %s from %s, left by an interrupted run", stale, incoming)
    if not wanted:
        log.info("nothing to pull: the pi5 has prod's newest dump, verified")
    pulled = []
    for entry in wanted:
        with _settled(this, entry.name):
            pulled.append(_pull_one(this, source, entry, directory, incoming))
    for entry in held:  # after the pulls: comparing an older name never stands in the way of tonight's dump
        with _settled(this, entry.name):
            _compare_held(source, entry, directory, incoming)
    return pulled


class _TooSmall(Failed):
    """A dump under MIN_DUMP_BYTES: a failed dump (exit 1), not a transfer problem."""


class _Conflict(VerificationError):
    """A name the pi5 holds with other bytes than prod's (exit 3): its copy is left as it was."""

    @classmethod
    def over(cls, name: str) -> _Conflict:
        return cls(
            f"the pi5 already holds {name} with other bytes than prod's: not replacing it",
            "compare the two by hand; the pi5's copy and prod's are as they were",
        )


@contextmanager
def _settled(this: Run, name: str):
    """A dump that fails its checks or conflicts is the run's problem; the run goes on with the other dumps."""
    try:
        yield
    except _Conflict as exc:
        this.in_question.add(name)
        this.problems.append(exc)
    except (VerificationError, _TooSmall) as exc:
        log.warning("not promoted: %s", exc.line())
        this.problems.append(exc)


def _pull_one(this: Run, source: RsyncSource, entry: Entry, directory: Path, incoming: Path) -> Entry:
    min_bytes = this.settings.int("MIN_DUMP_BYTES")
    if entry.size < min_bytes:
        raise _TooSmall(
            f"the prod dump {entry.name} is only {entry.size} bytes (MIN_DUMP_BYTES={min_bytes})",
            "a failed dump: check backup-db on prod",
        )
    manifest_size = source.seen.get(entry.name + names.MANIFEST_SUFFIX)
    if manifest_size is not None and manifest_size > dumps.MAX_MANIFEST_BYTES:
        raise VerificationError(
            f"prod's manifest of {entry.name} is {manifest_size} bytes, more than a manifest "
            f"may be ({dumps.MAX_MANIFEST_BYTES}): not fetching it",
            "check backup-db on prod",
        )
    started = time.monotonic()
    log.info("pulling %s (%s) from prod", entry.name, size(entry.size))
    try:
        verified = receive_verified(source, entry.name, manifest_size is not None, incoming)
    except VerificationError:
        for leftover in (entry.name, entry.name + names.MANIFEST_SUFFIX):
            (incoming / leftover).unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - started
    this.summary.pull_seconds += seconds
    manifest = verified.manifest or _manifest_from(verified, entry.name)
    _promote_local(incoming, directory, entry.name, manifest)
    log.info("pulled and verified %s in %.1fs (%s)", entry.name, seconds, verified.status)
    return Entry(entry.name, verified.size, manifest=json.loads(manifest.to_json()))


def _manifest_from(verified: dumps.Verified, name: str) -> dumps.Manifest:
    """A dump that came without a manifest gets one from its own verification on the pi5."""
    return dumps.Manifest(
        file=name,
        bytes=verified.size,
        sha256=verified.sha256,
        created_at=dumps.now_iso(),
        database=None,
        server_version=None,
        pg_dump_version=None,
        tables=verified.tables,
    )


def _promote_local(incoming: Path, directory: Path, name: str, manifest: dumps.Manifest) -> None:
    """Give a verified dump its final name on the pi5: fsynced, manifest first, never over another file."""
    dump_path, final = incoming / name, directory / name
    if final.exists():
        for leftover in (name, name + names.MANIFEST_SUFFIX):
            (incoming / leftover).unlink(missing_ok=True)
        if files.digest(final) != manifest.sha256:
            raise _Conflict.over(name)
        if not final.with_name(name + names.MANIFEST_SUFFIX).exists():  # the same dump: only its manifest was lost
            files.write_atomic(directory, name + names.MANIFEST_SUFFIX, manifest.to_json())
        log.info("%s is already here with the same bytes", name)
        return
    fd = os.open(dump_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(dump_path, files.FILE_MODE)
    # No dump under this name: a manifest there is an orphan of a crash between the two renames.
    files.write_atomic(directory, name + names.MANIFEST_SUFFIX, manifest.to_json(), replace=True)
    (incoming / (name + names.MANIFEST_SUFFIX)).unlink(missing_ok=True)
    files.publish(dump_path, final)


def _compare_held(source: RsyncSource, entry: Entry, directory: Path, incoming: Path) -> None:
    """_Conflict unless prod's `entry` has the bytes of the pi5's file of that name (hashed here, never trusted).

    Prod's manifest is only a cheap "the same": when it describes a file of the size prod lists and the pi5's
    sha256. Anything else reads prod's file (a night already gone wrong; at most PROD_KEEP dumps). A same-size
    file under a manifest that lies passes: none of it reaches the pi5 or the nas, and any read of it on prod
    (a restore, verify-backup) fails its sha256; re-reading prod's dumps every night to catch it is not worth it.
    """
    pi5_copy = directory / entry.name
    if pi5_copy.stat().st_size != entry.size:
        raise _Conflict.over(entry.name)
    pi5_sha256 = files.digest(pi5_copy)
    manifest = _prod_manifest(source, entry.name, incoming)
    if manifest is not None and (manifest.bytes, manifest.sha256) == (entry.size, pi5_sha256):
        log.debug("%s: prod's manifest describes the pi5's copy", entry.name)
        return
    try:  # read as a pull is (checked whole, resumed after a dropped link), and never promoted
        prod_sha256 = receive_verified(source, entry.name, False, incoming).sha256
    finally:
        (incoming / entry.name).unlink(missing_ok=True)
    if prod_sha256 != pi5_sha256:
        raise _Conflict.over(entry.name)
    log.debug("%s: prod's copy has the pi5's bytes", entry.name)


def _prod_manifest(source: RsyncSource, name: str, incoming: Path) -> dumps.Manifest | None:
    """Prod's manifest of `name` when it lists one of a manifest's size and it is valid, else None."""
    manifest_name = name + names.MANIFEST_SUFFIX
    listed = source.seen.get(manifest_name)
    if listed is None or listed > dumps.MAX_MANIFEST_BYTES:
        return None
    with_retries(
        lambda _: source.fetch([manifest_name], incoming),
        f"fetching {manifest_name} from prod",
        "check the network and prod; run again",
    )
    try:
        return dumps.read_manifest(incoming / name)
    except VerificationError:
        return None
    finally:
        (incoming / manifest_name).unlink(missing_ok=True)


# --- anomalies and pins -------------------------------------------------------------------------
def _pin_before_anomalies(this: Run, directory: Path, pulled: list[Entry]) -> None:
    """For each new dump that looks wrong against the one before it, pin that one on the pi5 (before rotation)."""
    verified = _verified_here(this, directory)
    for new in pulled:
        key = names.parse(new.name).sort_key
        previous = next((e for e in verified if names.parse(e.name).sort_key < key), None)
        found = pins.anomalies(previous, new, this.settings) if previous else []
        if not found:
            continue
        figures = "; ".join(found)
        if not previous.pinned:
            pins.pin_local(directory, previous.name, pins.pin_content(f"the next dump, {new.name}: {figures}"))
            previous.pinned = True
        this.warn(
            f"anomaly: {new.name} against {previous.name}: {figures}; pinned {previous.name} on the pi5 and "
            "the destinations until backup-orchestrator --release-pins (list-backups --tables shows the rows)"
        )


def _release_pins(this: Run, directory: Path, targets: list) -> None:
    released = pins.release_local(directory)
    log.info("released the pins on the pi5: %s", ", ".join(released) or "none")
    for target in targets:
        try:
            log.info("released the pins on the %s: %s", target.name, ", ".join(destinations.release(target)) or "none")
        except KwError as exc:
            if isinstance(target, Offsite):
                this.warn(f"offsite: could not release its pins: {exc.message}")
            else:
                raise


# --- push ---------------------------------------------------------------------------------------
class Outgoing:
    """What leaves the pi5 for a dump: the file itself, or with AGE_RECIPIENTS its encrypted copy.

    An encrypted copy is made once per run, in <DIR>/.outgoing/ (0700), used for the nas and the
    offsite remote alike, and removed at the end of the run (a killed run's is removed by the next).
    """

    def __init__(self, directory: Path, keys: list[str]):
        self.directory = directory
        self.keys = keys
        self.dir = directory / OUTGOING
        self.made: dict[str, Entry] = {}
        self.clear()

    def name_for(self, entry: Entry) -> str:
        return entry.name + names.AGE_SUFFIX if self.keys else entry.name

    def parcel_for(self, entry: Entry) -> Parcel:
        if not self.keys:
            return Parcel(self.directory, entry)
        if entry.name not in self.made:
            files.ensure_private_dir(self.dir)
            encrypted = crypto.encrypt(
                self.directory / entry.name, dumps.read_manifest(self.directory / entry.name), self.dir, self.keys
            )
            log.info("encrypted %s for %d recipient(s)", entry.name, len(self.keys))
            self.made[entry.name] = Entry(encrypted.file, encrypted.bytes, manifest=json.loads(encrypted.to_json()))
        return Parcel(self.dir, self.made[entry.name])

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _push_everywhere(this: Run, pi5: Place, nas: Place, offsite: Offsite | None) -> None:
    directory = pi5.local_dir()
    here = _verified_here(this, directory)
    pinned = {e.name: pins.read_local(directory, e.name) for e in here if e.pinned}
    outgoing = Outgoing(directory, crypto.recipients(this.settings))
    try:
        steps, this.summary.push_seconds = destinations.push(
            NasDestination(nas), here, outgoing.parcel_for, outgoing.name_for, pinned, this.clock
        )
        this.summary.pushed = [e.name for e in steps.send]
        this.summary.removed += [f"nas:{name}" for name in steps.remove]
        _conflicts(this, "nas", steps.conflicts)
        if offsite is not None:
            try:
                steps, this.summary.offsite_seconds = destinations.push(
                    offsite, here, outgoing.parcel_for, outgoing.name_for, pinned, this.clock
                )
            except KwError as exc:  # the fourth copy: the run still succeeds, with a warning and an alert
                this.summary.offsite = "failed"
                this.warn(f"offsite copy failed: {exc.message}; the pi5 and the nas are done, the next run catches up")
            else:
                this.summary.offsite = "ok"
                this.summary.removed += [f"offsite:{name}" for name in steps.remove]
                _conflicts(this, "offsite", steps.conflicts)
    finally:
        outgoing.clear()


def _conflicts(this: Run, where: str, conflicting: list[str]) -> None:
    for name in conflicting:
        this.problems.append(
            VerificationError(
                f"the {where} already holds {name} with other bytes than the pi5's verified copy: not replacing it",
                "compare the copies by hand; the existing one is as it was",
            )
        )


# --- free space ---------------------------------------------------------------------------------
def _check_space(this: Run, directory: Path, nas: Place) -> None:
    """After the push and rotation: warn when the pi5 or the nas has room for fewer than MIN_FREE_DUMPS dumps."""
    here = _verified_here(this, directory)
    newest = here[0].size if here else None
    for name, free in (("pi5", space.free_local(directory)), ("nas", space.free_at(nas))):
        if free is None:
            this.warn(f"could not tell the free space on the {name}")
            continue
        this.monitor.record_free(name, free)
        if warning := space.low(this.settings, name, free, newest):
            this.warn(warning)


# --- freshness ----------------------------------------------------------------------------------
def _check_freshness(this: Run, directory: Path) -> None:
    """Fail (and alert) when the pi5's newest verified dump is older than MAX_DUMP_AGE_HOURS by its name."""
    here = _verified_here(this, directory)
    if not here:
        return  # the pull has failed already, saying why
    age = this.clock.age_hours(here[0].name)
    if this.monitor:
        this.monitor.record(age_hours=round(age, 2))
    limit = float(this.settings["MAX_DUMP_AGE_HOURS"])
    if age > limit:
        this.problems.append(
            Failed(
                f"no new dump for {age:.0f} hours: the pi5's newest verified dump is {here[0].name} "
                f"(MAX_DUMP_AGE_HOURS={limit:g})",
                "check backup-db and the clock on prod, and list-backups",
            )
        )


# --- dry run ------------------------------------------------------------------------------------
def _plan(this: Run, prod: Place, pi5: Place, nas: Place, no_push: bool, release_pins: bool) -> None:
    directory = pi5.local_dir()
    if release_pins:
        dry(
            "would release every pin (on the pi5: %s)",
            ", ".join(sorted(retention.pinned_in(directory))) if directory.is_dir() else "none",
        )
    listing = RsyncSource(prod).listing()
    wanted = _to_pull(this, listing, directory)
    if not listing:
        dry("prod has no dump; nothing would be pulled")
    elif not wanted:
        dry("the pi5 has prod's newest dump, verified; nothing would be pulled")
    for entry in wanted:
        dry("would pull %s (%s) from prod into %s and verify it whole", entry.name, size(entry.size), pi5.dir)
    for entry in _held_here(this, listing, wanted, directory):
        dry("would compare prod's %s with the pi5's copy (size and sha256)", entry.name)
    if no_push:
        dry("--no-push: would not push or rotate")
        return
    keys = crypto.recipients(this.settings)
    if keys:
        dry("would encrypt what it sends for %d age recipient(s)", len(keys))
    here = _verified_here(this, directory) + wanted  # the wanted ones have no manifest yet: held nowhere
    offsite = Offsite.from_settings(this.settings)
    for target in filter(None, (nas, offsite)):
        try:
            there = {e.name: e for e in target.listing()}
        except KwError as exc:
            dry("%s: %s", target.name, exc.message)
            continue
        for entry in here:
            if not destinations.holds(entry, there):
                dry(
                    "would push %s to %s and check its checksum there",
                    entry.name + (names.AGE_SUFFIX if keys else ""),
                    target.name,
                )
    dry(
        "would rotate the pi5 to %d and the nas to %d valid dumps%s",
        pi5.keep,
        nas.keep,
        f", offsite to {offsite.keep}" if offsite else "",
    )
    pitr_nas.plan_in_run(this.settings, nas)
