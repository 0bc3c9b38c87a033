"""backup-orchestrator's work, on the pi5: pull the newest prod dump, verify, push to the nas and offsite, rotate.

Incoming files wait in `<DIR>/.incoming/` (0700, never listed as dumps) until verified; a
verified dump gets its final name by a rename in the same filesystem, manifest first. The
nas receives the same way: rsync into its `.incoming/`, then one remote step checks each
copy's sha256 against the manifest, renames it into place and only then rotates. The
offsite remote (OFFSITE_REMOTE) follows the nas the same way through rclone; when it fails,
the run still succeeds with a warning and an alert. With AGE_RECIPIENTS, only encrypted
copies (made in `<DIR>/.outgoing/`) leave the pi5.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from plumbum.commands.base import shquote

from . import crypto, dumps, files, names, retention
from .errors import Failed, KwError, UsageError, VerificationError
from .log import dry, log, size
from .monitor import Monitor
from .offsite import Offsite
from .places import Entry, Multiplexer, Place, local_listing, place
from .run import Cmd, StageFailed, run
from .settings import Settings
from .transfer import ATTEMPTS, RsyncSource, receive_verified, remote_spec, rsync_base

INCOMING = ".incoming"
OUTGOING = ".outgoing"

# $1: the directory; then pairs NAME SHA256 of dumps waiting in .incoming; then --; then dumps to remove.
PROMOTE_SCRIPT = r"""
set -e
cd -- "$1"; shift
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  name=$1; expected=$2; shift 2
  got=$( (openssl dgst -sha256 -r ".incoming/$name" 2>/dev/null || sha256sum -- ".incoming/$name") | cut -d' ' -f1)
  if [ "$got" != "$expected" ]; then echo "sha256 of $name is $got, not $expected" >&2; exit 3; fi
  chmod 600 -- ".incoming/$name" ".incoming/$name.json"
  sync -- ".incoming/$name" ".incoming/$name.json" 2>/dev/null || sync
  mv -f -- ".incoming/$name.json" "$name.json"
  mv -f -- ".incoming/$name" "$name"
  echo "promoted $name"
done
sync . 2>/dev/null || sync
[ $# -gt 0 ] && shift
for name in "$@"; do rm -f -- "$name" "$name.json"; echo "removed $name"; done
"""


@dataclass
class Summary:
    dump: str = "-"
    bytes: int = 0
    pull_seconds: float = 0.0
    push_seconds: float = 0.0
    offsite_seconds: float = 0.0
    offsite: str = "off"  # off (no OFFSITE_REMOTE), ok, failed
    pushed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def line(self, result: str) -> str:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (f"summary: time={now} dump={self.dump} size={self.bytes} pull={self.pull_seconds:.1f}s "
                f"push={self.push_seconds:.1f}s total={time.monotonic() - self.started:.1f}s "
                f"pushed={len(self.pushed)} removed={len(self.removed)} offsite={self.offsite} "
                f"offsite_push={self.offsite_seconds:.1f}s result={result}")


def orchestrate(settings: Settings, dry_run: bool = False, no_push: bool = False) -> Summary:
    pi5 = place(settings, "pi5")
    if not pi5.is_local:
        raise UsageError("backup-orchestrator runs on the pi5 itself: set PI5_HOST=local there")
    directory = pi5.local_dir()
    summary = Summary()
    os.umask(0o077)  # what rclone creates in a local-directory remote is private too
    with Multiplexer() as shared:
        prod, nas = shared(place(settings, "prod")), shared(place(settings, "nas"))
        if dry_run:
            _plan(settings, prod, pi5, nas, no_push)
            return summary
        files.ensure_private_dir(directory)
        with files.lock(directory, "backup-orchestrator"), Monitor(settings, "backup-orchestrator", "pi5") as monitor:
            try:
                _run(settings, prod, pi5, nas, no_push, summary, monitor)
            except Exception as exc:
                log.info(summary.line(f"failed ({type(exc).__name__})"))
                raise
            finally:
                monitor.record(dump=summary.dump if summary.dump != "-" else None, bytes=summary.bytes or None,
                               pull_seconds=summary.pull_seconds, push_seconds=summary.push_seconds,
                               offsite_seconds=summary.offsite_seconds)
            log.info(summary.line("ok" if not summary.warnings else "ok-with-warnings"))
    return summary


def _run(settings: Settings, prod: Place, pi5: Place, nas: Place, no_push: bool, summary: Summary,
         monitor: Monitor) -> None:
    directory = pi5.local_dir()
    incoming = files.ensure_private_dir(directory / INCOMING)
    newest = _pull_newest(settings, prod, directory, incoming, summary)
    _warn_on_size_change(settings, directory, newest, summary)
    for warning in summary.warnings:
        monitor.warn(f"size change: {warning}")
    if no_push:
        log.info("--no-push: not pushing to the nas, and so not rotating either")
        return
    outgoing = Outgoing(directory, crypto.recipients(settings))
    try:
        _push(pi5, nas, summary, outgoing)
        offsite = Offsite.from_settings(settings)
        if offsite is not None:
            _push_offsite_or_warn(pi5, offsite, summary, outgoing, monitor)
    finally:
        outgoing.clear()
    for removed in retention.rotate_local(directory, pi5.keep, calendar=pi5.calendar):
        summary.removed.append(f"pi5:{removed}")


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

    def copy_of(self, entry: Entry) -> tuple[Path, Entry]:
        """The directory holding the file to send for `entry`, and that file's entry."""
        if not self.keys:
            return self.directory, entry
        if entry.name not in self.made:
            files.ensure_private_dir(self.dir)
            encrypted = crypto.encrypt(self.directory / entry.name, dumps.read_manifest(self.directory / entry.name),
                                       self.dir, self.keys)
            log.info("encrypted %s for %d recipient(s)", entry.name, len(self.keys))
            self.made[entry.name] = Entry(encrypted.file, encrypted.bytes, manifest=json.loads(encrypted.to_json()))
        return self.dir, self.made[entry.name]

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _lacks(there: dict[str, Entry], entry: Entry) -> bool:
    """True unless a place has a verified copy of the pi5's `entry`, plain or encrypted."""
    for name in (entry.name, entry.name + names.AGE_SUFFIX):
        copy = there.get(name)
        if copy is not None and copy.status == "verified" and copy.plain_sha256 == entry.sha256:
            return False
    return True


def _plan_for(pi5: Place, there: list[Entry], keep: int, calendar: retention.Calendar, outgoing: Outgoing
              ) -> tuple[list[Entry], list[str]]:
    """The verified pi5 dumps a place lacks, and what rotation removes there once they have arrived."""
    here = [e for e in local_listing(pi5.local_dir()) if e.status == "verified"]
    by_name = {e.name: e for e in there}
    missing = [e for e in here if _lacks(by_name, e)]
    valid_there = [(names.parse(e.name), e.status == "verified") for e in there]
    valid_there += [(names.parse(outgoing.name_for(e)), True) for e in missing
                    if outgoing.name_for(e) not in by_name]
    doomed = {d.name for d in retention.to_remove(valid_there, keep, calendar)}
    # A dump that rotation would remove at once is not sent: the place keeps newer ones.
    missing = [e for e in missing if outgoing.name_for(e) not in doomed]
    return missing, sorted(doomed & set(by_name))


def _pull_newest(settings: Settings, prod: Place, directory: Path, incoming: Path, summary: Summary) -> Entry:
    source = RsyncSource(prod)
    listing = source.listing()
    if not listing:
        raise Failed(f"no dump in {prod.dir} on prod", "check that backup-db ran on prod (cron 02:00 UTC)")
    newest = listing[0]
    summary.dump, summary.bytes = newest.name, newest.size
    min_bytes = settings.int("MIN_DUMP_BYTES")
    if newest.size < min_bytes:
        raise Failed(f"the newest prod dump {newest.name} is only {newest.size} bytes (MIN_DUMP_BYTES={min_bytes})",
                     "a failed dump: check backup-db on prod")
    here = {e.name: e for e in local_listing(directory)}
    copy = here.get(newest.name)
    if copy and copy.status == "verified" and copy.size == newest.size:
        log.info("%s is already here, verified; nothing to pull", newest.name)
        return copy
    for stale in os.listdir(incoming):
        if stale not in (newest.name, newest.name + names.MANIFEST_SUFFIX):
            os.unlink(incoming / stale)
            log.info("removed %s from %s, left by an interrupted run", stale, incoming)
    has_manifest = newest.name + names.MANIFEST_SUFFIX in source.seen
    started = time.monotonic()
    log.info("pulling %s (%s) from prod", newest.name, size(newest.size))
    try:
        verified = receive_verified(source, newest.name, has_manifest, incoming)
    except VerificationError:
        for leftover in (newest.name, newest.name + names.MANIFEST_SUFFIX):
            (incoming / leftover).unlink(missing_ok=True)
        raise
    summary.pull_seconds = time.monotonic() - started
    manifest = verified.manifest or _manifest_from(verified, newest.name)
    _promote_local(incoming, directory, newest.name, manifest)
    log.info("pulled and verified %s in %.1fs (%s)", newest.name, summary.pull_seconds, verified.status)
    return Entry(newest.name, verified.size, manifest=vars(manifest))


def _manifest_from(verified: dumps.Verified, name: str) -> dumps.Manifest:
    """A dump that came without a manifest gets one from its own verification on the pi5."""
    return dumps.Manifest(file=name, bytes=verified.size, sha256=verified.sha256, created_at=dumps.now_iso(),
                          database=None, server_version=None, pg_dump_version=None, tables=verified.tables)


def _promote_local(incoming: Path, directory: Path, name: str, manifest: dumps.Manifest) -> None:
    """Give a verified dump its final name on the pi5: fsynced, manifest first."""
    dump_path = incoming / name
    fd = os.open(dump_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(dump_path, files.FILE_MODE)
    files.write_atomic(directory, name + names.MANIFEST_SUFFIX, manifest.to_json(), replace=True)
    (incoming / (name + names.MANIFEST_SUFFIX)).unlink(missing_ok=True)
    files.publish(dump_path, directory / name, replace=True)


def _warn_on_size_change(settings: Settings, directory: Path, newest: Entry, summary: Summary) -> None:
    previous = [e for e in local_listing(directory) if e.name != newest.name and e.status == "verified"
                and names.parse(e.name).sort_key < names.parse(newest.name).sort_key]
    if not previous or not previous[0].size:
        return
    change = 100.0 * (newest.size - previous[0].size) / previous[0].size
    if abs(change) > float(settings["SIZE_CHANGE_ALERT_PCT"]):
        message = (f"{newest.name} is {size(newest.size)}, {change:+.0f}% against {previous[0].name} "
                   f"({size(previous[0].size)}); SIZE_CHANGE_ALERT_PCT={settings['SIZE_CHANGE_ALERT_PCT']}")
        log.warning("size change: %s", message)
        summary.warnings.append(message)


def _push(pi5: Place, nas: Place, summary: Summary, outgoing: Outgoing) -> None:
    """Push every verified pi5 dump the nas lacks, check the copies' sha256, then rotate the nas."""
    missing, doomed = _plan_for(pi5, nas.listing(), nas.keep, nas.calendar, outgoing)
    if not missing and not doomed:
        log.info("the nas has every verified dump already")
        return
    started = time.monotonic()
    sending = [outgoing.copy_of(e) for e in missing]
    if sending:
        _send(nas, [folder / n for folder, e in sending for n in (e.name, e.name + names.MANIFEST_SUFFIX)])
    pairs = [arg for _, e in sending for arg in (e.name, e.sha256)]
    code, out, err = run(nas.script(PROMOTE_SCRIPT, nas.remote_path(), *pairs, "--", *doomed,
                                    name=f"verify on {nas.name}"), check=False, timeout=3600)
    for line in out.decode(errors="replace").splitlines():
        log.info("nas: %s", line)
    if code == 3:
        raise VerificationError(f"the nas copy failed its sha256 check: {err.strip()}", "run the orchestrator again")
    if code != 0:
        raise Failed(f"nas ({nas.host}): could not verify and promote the copies: {err.strip()}",
                     "check the nas and run the orchestrator again")
    summary.push_seconds = time.monotonic() - started
    summary.pushed = [e.name for _, e in sending]
    summary.removed += [f"nas:{name}" for name in doomed]
    if sending:
        log.info("pushed %s to the nas and checked their sha256 in %.1fs", ", ".join(summary.pushed),
                 summary.push_seconds)


def _send(nas: Place, sources: list[Path]) -> None:
    dest = remote_spec(nas, nas.remote_path(INCOMING) + "/")
    if nas.is_local:
        files.ensure_private_dir(nas.local_dir() / INCOMING)
        files.ensure_private_dir(nas.local_dir())
        prepare = []
    else:  # the nas's directories are made private by the same ssh session that receives
        top, incoming = shquote(nas.remote_path()), shquote(nas.remote_path(INCOMING))
        prepare = [f"--rsync-path=mkdir -p -- {incoming} && chmod 700 -- {top} {incoming} && rsync"]
    for attempt in range(1, ATTEMPTS + 1):
        argv = [*rsync_base(nas), *prepare, "--inplace", "--chmod=F600",
                *(["--append-verify"] if attempt > 1 else []), *map(str, sources), dest]
        try:
            run(Cmd(argv, name=f"rsync to {nas.name}"))
            return
        except StageFailed as exc:
            if attempt == ATTEMPTS:
                raise Failed(f"nas ({nas.host}): push failed after {ATTEMPTS} attempts: {exc.tail or exc.detail}",
                             "check the nas; the next run catches up") from exc
            log.warning("pushing to the nas failed (%s); retrying, resuming what arrived", exc.tail or exc.detail)
            time.sleep(attempt)


def _push_offsite_or_warn(pi5: Place, offsite: Offsite, summary: Summary, outgoing: Outgoing,
                          monitor: Monitor) -> None:
    """The offsite copy is the fourth: when it fails, the run still succeeds, with a warning and an alert."""
    try:
        _push_offsite(pi5, offsite, summary, outgoing)
        summary.offsite = "ok"
    except KwError as exc:
        summary.offsite = "failed"
        message = f"offsite copy failed: {exc.message}; the pi5 and the nas are done, the next run catches up"
        log.warning("%s", message)
        summary.warnings.append(message)
        monitor.warn(message)


def _push_offsite(pi5: Place, offsite: Offsite, summary: Summary, outgoing: Outgoing) -> None:
    """Upload every verified pi5 dump the remote lacks into its .incoming/, check, promote, then rotate."""
    missing, doomed = _plan_for(pi5, offsite.listing(), offsite.keep, offsite.calendar, outgoing)
    if not missing and not doomed:
        log.info("offsite has every verified dump already")
        return
    started = time.monotonic()
    sending = [outgoing.copy_of(e) for e in missing]
    if sending:
        paths = [folder / n for folder, e in sending for n in (e.name, e.name + names.MANIFEST_SUFFIX)]
        offsite.upload(paths)
        checked = offsite.check_uploaded(paths)
        offsite.promote([e.name for _, e in sending])
        log.info("pushed %s offsite and checked their %s in %.1fs", ", ".join(e.name for _, e in sending), checked,
                 time.monotonic() - started)
    offsite.remove(doomed)
    offsite.clear_incoming([e.name for _, e in sending])
    summary.offsite_seconds = time.monotonic() - started
    summary.removed += [f"offsite:{name}" for name in doomed]


def _plan(settings: Settings, prod: Place, pi5: Place, nas: Place, no_push: bool) -> None:
    listing = RsyncSource(prod).listing()
    if not listing:
        dry("prod has no dump; nothing would be pulled")
        return
    newest = listing[0]
    here = {e.name: e for e in local_listing(pi5.local_dir())}
    if newest.name in here and here[newest.name].status == "verified":
        dry("%s is already on the pi5, verified; nothing would be pulled", newest.name)
    else:
        dry("would pull %s (%s) from prod into %s and verify it", newest.name, size(newest.size), pi5.dir)
    if no_push:
        dry("--no-push: would not push or rotate")
        return
    keys = crypto.recipients(settings)
    if keys:
        dry("would encrypt what it sends for %d age recipient(s)", len(keys))
    offsite = Offsite.from_settings(settings)
    for target in filter(None, (nas, offsite)):
        try:
            there = {e.name: e for e in target.listing()}
        except KwError as exc:
            dry("%s: %s", target.name, exc.message)
            continue
        for name in sorted(set(here) | {newest.name}):
            if name in here and not _lacks(there, here[name]):
                continue
            dry("would push %s to %s and check its checksum there", name + (names.AGE_SUFFIX if keys else ""),
                target.name)
    dry("would rotate the pi5 to %d and the nas to %d valid dumps%s", pi5.keep, nas.keep,
        f", offsite to {offsite.keep}" if offsite else "")
