"""Where a dump comes from: a place (prod, pi5, nas, old-prod), the offsite remote, or a path.

`Origin` is what `places.Place` and `offsite.Offsite` both are: something that lists its dumps
and writes one to standard output. `resolve` turns `latest` into the newest dump's name,
`naming_a_copy` makes a failure of that dump say where a verified copy of it is, `choose` maps
the scripts' source options to a `Source`, and `reader` gives the commands that stream a dump's
plain bytes to stdout, decrypting on this machine.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import crypto, names
from .errors import Failed, KwError, UsageError, VerificationError, failure_line
from .log import log
from .offsite import Offsite
from .places import Entry, Multiplexer, place
from .run import Cmd, run
from .settings import HOST_RE, Settings


class Origin(Protocol):
    name: str
    dir: str
    is_local: bool

    @property
    def label(self) -> str: ...

    def listing(self, timeout: float = 60) -> list[Entry]: ...

    def read(self, name: str) -> Cmd: ...

    def exists(self, name: str) -> bool: ...


@dataclass
class Source:
    """A dump at an origin (by name, or `latest`), or a path (a local file, or user@host:/path)."""

    option: str
    origin: Origin | None = None
    name: str = "latest"
    path: str | None = None
    chosen_as_latest: bool = False  # by resolve: a failure of it names a verified copy (naming_a_copy)


# The option (restore-production-db) or options (setup-fresh-production-db, backup-drill) that take
# a dump by name from each place: how a failed newest dump's message says what to run instead.
TAKE_NAMED = {
    "restore-production-db": {"prod": "--local", "nas": "--from-nas", "pi5": "--from-pi5", "offsite": "--from-offsite"},
    "setup-fresh-production-db": {p: f"--from-{p} --dump" for p in ("nas", "pi5", "offsite")},
    "backup-drill": {p: f"--from {p} --dump" for p in ("nas", "pi5", "prod", "offsite")},
}


def why_bad(entry: Entry) -> str:
    """Why a listed dump whose status is not verified or unverified cannot be taken."""
    manifest = entry.manifest or {}
    if manifest.get("file") not in (None, entry.name):
        return f"its manifest describes {manifest.get('file')}"
    if "bytes" not in manifest:
        return "its manifest is unreadable"
    return f"its size {entry.size} differs from its manifest's {manifest.get('bytes')} (damaged or incomplete)"


def resolve(source: Source, clock: names.Clock) -> Source:
    """Turn `latest` into the newest dump's name; check that a named dump exists at its origin.

    `latest` never takes a future-dated name (by `clock`): it is passed over with a warning. Nor
    does it ever take an older dump in place of a newest one that fails verification: that is
    VerificationError naming it (an older dump is the operator's to choose, by name). A newest
    dump without a manifest is taken, unverified, as the contract allows, with a warning.
    """
    if source.origin is None:
        return source
    origin = source.origin
    listing = origin.listing()
    if source.name == "latest":
        for future in (e for e in listing if clock.is_future(e.name)):
            log.warning(
                "passing over %s on %s: it is dated ahead of this clock (%s UTC)",
                future.name,
                origin.name,
                f"{clock.now:%Y-%m-%d %H:%M}",
            )
        newest = next((e for e in listing if not clock.is_future(e.name)), None)
        if newest is None:
            raise Failed(f"no dump on {origin.name} ({origin.dir})", "list-backups shows what exists")
        source.name, source.chosen_as_latest = newest.name, True
        if newest.status == "SIZE MISMATCH":
            raise VerificationError(
                f"{newest.name} on {origin.name} failed verification: {why_bad(newest)}",
                "list-backups shows the verified copies; an older dump is taken only by its name",
            )
        if newest.status == "unverified":
            log.warning(
                "%s on %s has no manifest: taking it unverified (its gzip stream and completion line are "
                "checked, its row counts cannot be)",
                newest.name,
                origin.name,
            )
    elif source.name not in {e.name for e in listing}:
        raise Failed(f"{source.name} is not on {origin.name} ({origin.dir})", "list-backups shows what exists")
    log.info("dump: %s from %s", source.name, origin.label)
    return source


@contextmanager
def naming_a_copy(settings: Settings, source: Source, script: str, shared: Multiplexer | None = None):
    """When the dump `latest` chose fails verification inside this block (when resolved or in a later
    check), the error's hint says where a verified copy of it is, as the command of `script` that
    takes it; the other places are listed only then."""
    try:
        yield
    except VerificationError as exc:
        if not source.chosen_as_latest:
            raise
        raise VerificationError(exc.message, _take_instead(settings, source, script, shared)) from exc


def resolve_naming_a_copy(settings: Settings, source: Source, script: str, shared: Multiplexer | None) -> Source:
    """`resolve`, a failed newest dump saying where a verified copy of it is."""
    with naming_a_copy(settings, source, script, shared):
        return resolve(source, names.Clock.from_settings(settings))


def _take_instead(settings: Settings, failed: Source, script: str, shared: Multiplexer | None) -> str:
    """What to run instead of a failed newest dump: a verified copy of it at another place, else the newest
    verified dump anywhere, to take by name if the operator chooses it. A place that cannot be listed is
    warned about and skipped: the failure itself is what the operator must see."""
    takes, wanted = TAKE_NAMED[script], names.plain_name(failed.name)
    clock = names.Clock.from_settings(settings)
    others: list[tuple[str, Entry]] = []  # other verified dumps, for when no place has a copy
    # The failed dump's own place last: there only its older dumps are of use.
    for where in sorted(takes, key=lambda p: p == failed.origin.name):
        if where == "offsite" and Offsite.from_settings(settings) is None:
            continue
        try:
            listing = origin(settings, where, shared).listing(timeout=30)
        except (KwError, OSError) as exc:
            log.warning("could not look for a verified copy of %s on %s: %s", failed.name, where, failure_line(exc))
            continue
        for entry in listing:
            if entry.status != "verified" or clock.is_future(entry.name):
                continue
            if names.plain_name(entry.name) != wanted:
                others.append((where, entry))
            elif where != failed.origin.name:
                return f"a verified copy of {failed.name} is on {where}: {script} {takes[where]} {entry.name}"
    if not others:
        return f"no place holds a verified copy of {failed.name}, nor any other verified dump (list-backups)"
    where, newest = max(others, key=lambda found: names.parse(found[1].name).sort_key)
    older = names.parse(newest.name).sort_key < names.parse(failed.name).sort_key
    return (
        f"no place holds a verified copy of {failed.name}; the newest verified dump is {newest.name} on {where}"
        f"{', older: only if you choose it' if older else ''}: {script} {takes[where]} {newest.name}"
    )


def offsite_or_fail(settings: Settings) -> Offsite:
    offsite = Offsite.from_settings(settings)
    if offsite is None:
        raise UsageError("--from-offsite: OFFSITE_REMOTE is not set", "set it in the env file (an rclone remote)")
    return offsite


def origin(settings: Settings, name: str, shared: Multiplexer | None = None) -> Origin:
    """A place by name (sharing ssh connections through `shared`), or `offsite`."""
    if name == "offsite":
        return offsite_or_fail(settings)
    found = place(settings, name)
    return shared(found) if shared is not None else found


def choose(
    settings: Settings,
    *,
    local: str | None = None,
    from_nas: str | None = None,
    from_pi5: str | None = None,
    from_offsite: str | None = None,
    from_file: str | None = None,
    from_ssh: str | None = None,
) -> Source:
    """The one source given: NAME|latest at prod (--local), the nas, the pi5 or offsite; a file; USER@HOST:/PATH."""
    given = {"prod": local, "nas": from_nas, "pi5": from_pi5, "offsite": from_offsite}
    for place_name, option in TAKE_NAMED["restore-production-db"].items():
        if given[place_name] is not None:
            return Source(option, origin(settings, place_name), names.require(given[place_name], option))
    if from_file:
        if not os.path.isfile(from_file):
            raise Failed(f"--from-file: no such file: {from_file}")
        return Source("--from-file", path=os.path.abspath(from_file), name=Path(from_file).name)
    if from_ssh:
        host, sep, path = from_ssh.partition(":")
        if not sep or not HOST_RE.fullmatch(host) or not path.startswith("/") or "\n" in path:
            raise UsageError(f"--from-ssh: {from_ssh!r} is not USER@HOST:/PATH")
        return Source("--from-ssh", path=from_ssh, name=Path(path).name)
    raise UsageError("say where the dump is: --local, --from-nas, --from-pi5, --from-offsite or --from-file")


def first_good(settings: Settings, shared: Multiplexer, wanted: str) -> Source:
    """Latest on the nas; the pi5 when the nas is unreachable, empty or its newest dump fails verification at
    listing; then offsite if set (saying so each time)."""
    offsite = Offsite.from_settings(settings)
    clock = names.Clock.from_settings(settings)
    try:
        return resolve(Source("--from-nas", shared(place(settings, "nas")), wanted), clock)
    except (Failed, VerificationError) as exc:
        log.warning("no dump to take on the nas (%s); taking the pi5 instead", exc.message)
    try:
        return resolve(Source("--from-pi5", shared(place(settings, "pi5")), wanted), clock)
    except (Failed, VerificationError) as exc:
        if offsite is None:
            raise
        log.warning("no dump to take on the pi5 either (%s); taking the offsite copy", exc.message)
    return resolve(Source("--from-offsite", offsite, wanted), clock)


def local_path(source: Source) -> str | None:
    """The dump's path when it is a file on this machine."""
    if source.path and source.option != "--from-ssh":  # --from-file, or a moment recovered here (--at)
        return source.path
    if source.origin is not None and source.origin.is_local:
        return str(Path(os.path.expanduser(source.origin.dir)) / source.name)
    return None


def key_for(settings: Settings, source: Source) -> str | None:
    """The age identity file for an encrypted dump (UsageError when there is none); None for a plain one."""
    return crypto.identity(settings, source.name) if names.is_encrypted(source.name) else None


def reader(source: Source, key: str | None) -> list[Cmd]:
    """Commands that write the dump's plain bytes to stdout (none for a local file: it is read directly)."""
    steps = [] if local_path(source) else [source.origin.read(source.name)]
    return steps + ([crypto.decrypt_cmd(key)] if key else [])


def manifest_bytes(source: Source) -> bytes | None:
    """The dump's manifest as it is at its origin, or None."""
    name = source.name + names.MANIFEST_SUFFIX
    path = local_path(source)
    if path:
        return Path(path + names.MANIFEST_SUFFIX).read_bytes() if os.path.exists(path + names.MANIFEST_SUFFIX) else None
    return run(source.origin.read(name), timeout=600)[1] if source.origin.exists(name) else None
