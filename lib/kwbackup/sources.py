"""Where a dump comes from: a place (prod, pi5, nas, old-prod), the offsite remote, or a path.

`Origin` is what `places.Place` and `offsite.Offsite` both are: something that lists its dumps
and writes one to standard output. `resolve` turns `latest` into a name (saying which dump it
passes over and why), `choose` maps the scripts' source options to a `Source`, and `reader`
gives the commands that stream a dump's plain bytes to stdout, decrypting on this machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import crypto, names
from .errors import Failed, UsageError, VerificationError
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


def why_bad(entry: Entry) -> str:
    """Why a listed dump whose status is not verified or unverified cannot be taken."""
    manifest = entry.manifest or {}
    if manifest.get("file") not in (None, entry.name):
        return f"its manifest describes {manifest.get('file')}"
    if "bytes" not in manifest:
        return "its manifest is unreadable"
    return f"its size {entry.size} differs from its manifest's {manifest.get('bytes')} (damaged or incomplete)"


def resolve(source: Source, clock: names.Clock) -> Source:
    """Turn `latest` into the newest good dump's name; check that a named dump exists at its origin.

    `latest` never takes a future-dated name (by `clock`): it is passed over with a warning.
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
        listing = [e for e in listing if not clock.is_future(e.name)]
        good = [e for e in listing if e.status == "verified"] or [e for e in listing if e.status == "unverified"]
        if not good and listing:
            bad = listing[0]
            raise VerificationError(
                f"no good dump on {origin.name}: {bad.name} failed verification: {why_bad(bad)}",
                "use another place (list-backups)",
            )
        if not good:
            raise Failed(f"no dump on {origin.name} ({origin.dir})", "list-backups shows what exists")
        for passed in listing[: listing.index(good[0])]:
            why = "it has no manifest" if passed.status == "unverified" else why_bad(passed)
            log.warning("passing over %s on %s, newer than %s: %s", passed.name, origin.name, good[0].name, why)
        source.name = good[0].name
    elif source.name not in {e.name for e in listing}:
        raise Failed(f"{source.name} is not on {origin.name} ({origin.dir})", "list-backups shows what exists")
    log.info("dump: %s from %s", source.name, origin.label)
    return source


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
    for option, place_name, value in (
        ("--local", "prod", local),
        ("--from-nas", "nas", from_nas),
        ("--from-pi5", "pi5", from_pi5),
        ("--from-offsite", "offsite", from_offsite),
    ):
        if value is not None:
            return Source(option, origin(settings, place_name), names.require(value, option))
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
    """Latest on the nas; the pi5 when the nas is unreachable or empty; then offsite if set (saying so)."""
    offsite = Offsite.from_settings(settings)
    clock = names.Clock.from_settings(settings)
    try:
        return resolve(Source("--from-nas", shared(place(settings, "nas")), wanted), clock)
    except (Failed, VerificationError) as exc:
        log.warning("the nas has no usable dump (%s); taking the pi5 instead", exc.message)
    try:
        return resolve(Source("--from-pi5", shared(place(settings, "pi5")), wanted), clock)
    except (Failed, VerificationError) as exc:
        if offsite is None:
            raise
        log.warning("the pi5 has no usable dump either (%s); taking the offsite copy", exc.message)
    return resolve(Source("--from-offsite", offsite, wanted), clock)


def local_path(source: Source) -> str | None:
    """The dump's path when it is a file on this machine."""
    if source.option == "--from-file":
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
