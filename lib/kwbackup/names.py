"""Dump names: the contract's forms, their timestamps, and refusal of anything else."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .errors import UsageError

# `.age`: the same dump encrypted by the orchestrator for the nas and offsite (issue 8).
NIGHTLY_RE = re.compile(r"db-(\d{4}-\d{2}-\d{2})(?:-(\d{6}))?\.sql\.gz(\.age)?")
MIGRATION_RE = re.compile(r"kw_app_production-(\d{8})-(\d{6})\.sql(\.gz(\.age)?)?")
MANIFEST_SUFFIX = ".json"
PIN_SUFFIX = ".pin"
AGE_SUFFIX = ".age"


@dataclass(frozen=True, order=False)
class DumpName:
    name: str
    when: datetime  # UTC, from the name
    timed: bool  # db-DATE-HHMMSS: made later the same day than a bare db-DATE
    nightly: bool  # a db-* dump: the only kind rotation may remove
    compressed: bool
    encrypted: bool = False

    @property
    def stem(self) -> str:
        """The plain dump's name: an encrypted copy and its plain original are the same dump."""
        return self.name[: -len(AGE_SUFFIX)] if self.encrypted else self.name

    @property
    def sort_key(self) -> tuple[datetime, bool, str]:
        return (self.when, self.timed, self.stem)

    @property
    def manifest(self) -> str:
        return self.name + MANIFEST_SUFFIX


def parse(name: str) -> DumpName | None:
    """The DumpName for a contract-conforming file name, else None."""
    try:
        if m := NIGHTLY_RE.fullmatch(name):
            date, time, age = m.groups()
            when = datetime.strptime(date + (time or "000000"), "%Y-%m-%d%H%M%S")
            return DumpName(name, when.replace(tzinfo=UTC), time is not None, True, True, bool(age))
        if m := MIGRATION_RE.fullmatch(name):
            when = datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S")
            return DumpName(name, when.replace(tzinfo=UTC), True, False, bool(m.group(3)), bool(m.group(4)))
    except ValueError:  # a well-shaped name with an impossible date
        return None
    return None


def require(name: str, option: str = "dump name", allow_latest: bool = True) -> str:
    """Validate a dump name typed by a user; `latest` passes through. UsageError otherwise."""
    if allow_latest and name == "latest":
        return name
    if parse(name) is None:
        raise UsageError(
            f"{option}: {name!r} is not a dump name",
            "use db-YYYY-MM-DD[-HHMMSS].sql.gz[.age], kw_app_production-YYYYMMDD-HHMMSS.sql[.gz[.age]]"
            + (" or latest" if allow_latest else "")
            + " (no paths)",
        )
    return name


def dumps_in(names) -> list[DumpName]:
    """The dump names among arbitrary file names, newest first (by the name's timestamp)."""
    parsed = [d for n in names if (d := parse(n))]
    return sorted(parsed, key=lambda d: d.sort_key, reverse=True)


def is_encrypted(name: str) -> bool:
    return name.endswith(AGE_SUFFIX)


def plain_name(name: str) -> str:
    """The name a dump has once decrypted."""
    return name[: -len(AGE_SUFFIX)] if is_encrypted(name) else name


def newest(names) -> DumpName | None:
    found = dumps_in(names)
    return found[0] if found else None


def nightly_name_for(now: datetime, taken) -> str:
    """db-YYYY-MM-DD.sql.gz for the UTC date, or db-YYYY-MM-DD-HHMMSS.sql.gz when taken.

    Also timed when a dump of the same day with a time exists (its untimed first one rotated away):
    an untimed name would sort before it.
    """
    now = now.astimezone(UTC)
    day = f"db-{now:%Y-%m-%d}"
    name = f"{day}.sql.gz"
    same_day = any(t.startswith(day + "-") and parse(t) for t in taken)
    if name in taken or name + MANIFEST_SUFFIX in taken or same_day:
        name = f"{day}-{now:%H%M%S}.sql.gz"
    return name


@dataclass(frozen=True)
class Clock:
    """The reading machine's clock: a dump name dated more than `slack` ahead of it is future-dated."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    slack: timedelta = timedelta(minutes=60)

    @classmethod
    def from_settings(cls, settings) -> Clock:
        return cls(datetime.now(UTC), timedelta(minutes=settings.int("FUTURE_SLACK_MINUTES")))

    def is_future(self, name: str) -> bool:
        dump = parse(name)
        return dump is not None and dump.when > self.now + self.slack

    def age_hours(self, name: str) -> float:
        """How old a dump is by its name's timestamp."""
        return (self.now - parse(name).when).total_seconds() / 3600
