"""list-backups: every place's dumps at the same time, as text or JSON, without downloading dumps."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .errors import KwError, UsageError
from .offsite import Offsite
from .places import Entry, Place, place
from .settings import Settings

JSON_KEYS = ("place", "host", "dir", "name", "bytes", "created_at", "sha256", "status")


@dataclass
class PlaceListing:
    place: Place | Offsite
    entries: list[Entry]
    error: str | None = None


def places_to_list(settings: Settings, only: list[str] | None) -> list[Place | Offsite]:
    offsite = Offsite.from_settings(settings)
    chosen = ["prod", "pi5", "nas"] + (["old-prod"] if settings.is_given("OLD_PROD_HOST") else []) + \
        (["offsite"] if offsite else [])
    if only:
        if "offsite" in only and offsite is None:
            raise UsageError("--only offsite: OFFSITE_REMOTE is not set")
        chosen = [name for name in ("prod", "pi5", "nas", "old-prod", "offsite") if name in only]
    return [offsite if name == "offsite" else place(settings, name) for name in chosen]


def gather(places: list[Place | Offsite]) -> list[PlaceListing]:
    """Ask every place at once: the time is the slowest place's, not the sum."""
    def one(target: Place | Offsite) -> PlaceListing:
        try:
            return PlaceListing(target, target.listing(timeout=30))
        except KwError as exc:
            return PlaceListing(target, [], exc.message.split("unreachable: ", 1)[-1])

    with ThreadPoolExecutor(max_workers=max(1, len(places))) as pool:
        return list(pool.map(one, places))


def short_size(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{value:.0f}{unit}" if value >= 10 or unit == "B" else f"{value:.1f}{unit}"


def as_text(listings: list[PlaceListing]) -> str:
    blocks = []
    for listing in listings:
        lines = [f"{listing.place.label}:"]
        if listing.error:
            lines.append(f"  unreachable: {listing.error}")
        elif not listing.entries:
            lines.append("  (no dumps)")
        width = max((len(e.name) for e in listing.entries), default=0)
        size_width = max((len(short_size(e.size)) for e in listing.entries), default=0)
        for e in listing.entries:
            lines.append(f"  {e.name.ljust(width)}  {short_size(e.size).rjust(size_width)}  "
                         f"{e.created_at:%Y-%m-%d %H:%M}  {e.status}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def as_json(listings: list[PlaceListing]) -> str:
    rows = [dict(zip(JSON_KEYS, (
        listing.place.name, listing.place.host, listing.place.dir, e.name, e.size,
        e.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"), e.sha256, e.status,
    ), strict=True)) for listing in listings for e in listing.entries]
    return json.dumps(rows, indent=2)
