"""list-backups: every place's dumps at the same time, as text or JSON, without downloading dumps.

Statuses come from the listing alone: `verified` (a valid manifest whose size and name match),
`unverified` (no manifest), `SIZE MISMATCH` (a manifest that does not match, or is not valid),
and `FUTURE` for a name dated ahead of this machine's clock. A place whose newest usable dump is
older than MAX_DUMP_AGE_HOURS is `stale`; each reachable place's block ends with its free space.
`--tables` lays the manifests' row counts side by side.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import humanize

from . import names
from .errors import KwError, UsageError
from .offsite import Offsite
from .places import Entry, Place, place
from .settings import Settings

JSON_KEYS = ("place", "host", "dir", "name", "bytes", "created_at", "sha256", "status", "pinned")


@dataclass
class PlaceListing:
    place: Place | Offsite
    entries: list[Entry]
    clock: names.Clock
    error: str | None = None
    stale: str | None = None  # "newest dump is 3 days old"
    free: int | None = None  # bytes free in its DIR's filesystem; None: unknown


def places_to_list(settings: Settings, only: list[str] | None) -> list[Place | Offsite]:
    offsite = Offsite.from_settings(settings)
    chosen = (
        ["prod", "pi5", "nas"]
        + (["old-prod"] if settings.is_given("OLD_PROD_HOST") else [])
        + (["offsite"] if offsite else [])
    )
    if only:
        if "offsite" in only and offsite is None:
            raise UsageError("--only offsite: OFFSITE_REMOTE is not set")
        chosen = [name for name in ("prod", "pi5", "nas", "old-prod", "offsite") if name in only]
    return [offsite if name == "offsite" else place(settings, name) for name in chosen]


def gather(places: list[Place | Offsite], settings: Settings) -> list[PlaceListing]:
    """Ask every place at once: the time is the slowest place's, not the sum."""
    clock = names.Clock.from_settings(settings)
    limit = float(settings["MAX_DUMP_AGE_HOURS"])

    def one(target: Place | Offsite) -> PlaceListing:
        try:
            entries = target.listing(timeout=30)
        except KwError as exc:
            return PlaceListing(target, [], clock, exc.message.split("unreachable: ", 1)[-1])
        free = target.free(timeout=30) if isinstance(target, Offsite) else entries.free
        found = PlaceListing(target, entries, clock, free=free)
        usable = [e for e in found.entries if status(e, clock) in ("verified", "unverified")]
        if target.name != "old-prod" and usable and clock.age_hours(usable[0].name) > limit:
            age = humanize.naturaldelta(timedelta(hours=clock.age_hours(usable[0].name)))
            found.stale = f"newest dump is {age} old"
        return found

    with ThreadPoolExecutor(max_workers=max(1, len(places))) as pool:
        return list(pool.map(one, places))


def status(entry: Entry, clock: names.Clock) -> str:
    return "FUTURE" if clock.is_future(entry.name) else entry.status


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
            pinned = "  pinned" if e.pinned else ""
            lines.append(
                f"  {e.name.ljust(width)}  {short_size(e.size).rjust(size_width)}  "
                f"{e.created_at:%Y-%m-%d %H:%M}  {status(e, listing.clock)}{pinned}"
            )
        if listing.stale:
            lines.append(f"  stale: {listing.stale}")
        if not listing.error:
            lines.append(f"  free: {short_size(listing.free) if listing.free is not None else 'unknown'}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def json_rows(listings: list[PlaceListing]) -> list[dict]:
    """One object per dump, with exactly the contract's JSON_KEYS."""
    return [
        dict(
            zip(
                JSON_KEYS,
                (
                    listing.place.name,
                    listing.place.host,
                    listing.place.dir,
                    e.name,
                    e.size,
                    e.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    e.sha256,
                    status(e, listing.clock),
                    e.pinned,
                ),
                strict=True,
            )
        )
        for listing in listings
        for e in listing.entries
    ]


def row_counts(listings: list[PlaceListing], wanted: list[str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Each dump's rows per table from the manifests, oldest dump first (a plain and an encrypted copy once);
    and the wanted names no manifest has. A wanted name is `schema.table` or just `table`."""
    by_stem: dict[str, tuple[names.DumpName, dict[str, int]]] = {}
    for listing in listings:
        for e in listing.entries:
            dump = names.parse(e.name)
            if e.status == "verified" and dump.stem not in by_stem:
                by_stem[dump.stem] = (dump, e.manifest["tables"])
    ordered = sorted(by_stem.values(), key=lambda pair: pair[0].sort_key)

    def chosen(table: str) -> bool:
        return not wanted or table in wanted or table.split(".", 1)[-1] in wanted

    counts = {dump.stem: {t: n for t, n in tables.items() if chosen(t)} for dump, tables in ordered}
    known = {t for tables in counts.values() for t in tables}
    unknown = [w for w in wanted if not any(t == w or t.split(".", 1)[-1] == w for t in known)]
    return counts, unknown


def tables_text(counts: dict[str, dict[str, int]]) -> str:
    """Tables down, dumps across (oldest left), and the newest dump's change against the one before it."""
    if not counts:
        return "(no verified dump with a manifest)"
    columns = [stem.removesuffix(".sql.gz").removesuffix(".sql") for stem in counts]
    tables = sorted({t for rows in counts.values() for t in rows})
    width = max([len("table")] + [len(t) for t in tables])
    widths = [max(len(c), 9) for c in columns]
    lines = ["  ".join(["table".ljust(width), *(c.rjust(w) for c, w in zip(columns, widths, strict=True)), "change"])]
    for table in tables:
        values = [rows.get(table) for rows in counts.values()]
        cells = ["-" if v is None else str(v) for v in values]
        change = ""
        if len(values) > 1 and values[-2] is not None:
            if values[-1] is None:
                change = "gone"
            elif values[-2] and values[-1] != values[-2]:
                change = f"{(values[-1] - values[-2]) * 100.0 / values[-2]:+.0f}%"
        lines.append(
            "  ".join([table.ljust(width), *(c.rjust(w) for c, w in zip(cells, widths, strict=True)), change]).rstrip()
        )
    return "\n".join(lines)
