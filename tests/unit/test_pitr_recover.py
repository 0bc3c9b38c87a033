"""pitr/recover.py's pure parts: TIME, the window, the base backup and the WAL a moment needs."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kwbackup import rundir
from kwbackup.errors import Failed, UsageError
from kwbackup.pitr import recover, status
from kwbackup.pitr.recover import Target, Window

NOW = datetime(2024, 1, 15, 12, 0, tzinfo=UTC)
MB = 1 << 20


@pytest.mark.parametrize(
    "text, expected",
    [
        ("latest", None),
        ("2024-01-15 10:30", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
        ("2024-01-15 10:30:05", datetime(2024, 1, 15, 10, 30, 5, tzinfo=UTC)),
        ("2024-01-15 10:30:05.250", datetime(2024, 1, 15, 10, 30, 5, 250000, tzinfo=UTC)),
        ("2024-01-15T11:30:05+01:00", datetime(2024, 1, 15, 10, 30, 5, tzinfo=UTC)),
        ("2024-01-15T10:30:05Z", datetime(2024, 1, 15, 10, 30, 5, tzinfo=UTC)),
    ],
)
def test_a_time_is_read_as_the_contract_says(text, expected):
    assert recover.parse_time(text).when == expected


@pytest.mark.parametrize(
    "text", ["2024-01-15T10:30:05", "yesterday", "2024-13-01 10:00", "2024-01-15", "10:30", "2024-01-15 10:30 UTC"]
)
def test_anything_else_is_a_usage_error(text):
    with pytest.raises(UsageError, match="is not a time"):
        recover.parse_time(text)


def test_a_moment_in_the_future_of_the_machine_that_holds_the_wal_is_refused_naming_the_window():
    # A time is read whatever the clock; the window judges it by the clock of the machine holding the WAL, so
    # a laptop clock ahead of the pi5's asking for "a second ago" is told the pi5's now and window.
    ahead = NOW + timedelta(seconds=1)
    assert recover.parse_time(ahead.isoformat()).when == ahead
    for live in (True, False):
        window = Window(NOW - timedelta(days=2), NOW - timedelta(minutes=5), live=live)
        with pytest.raises(UsageError) as refused:
            window.check(Target(ahead), NOW)
        assert str(refused.value) == (
            "--at 2024-01-15 12:00:01 UTC is in the future (now: 2024-01-15 12:00:00 UTC): recoverable from "
            f"2024-01-13 12:00:00 UTC to {'2024-01-15 12:00:00' if live else '2024-01-15 11:55:00'} UTC"
        )


def test_the_window_refuses_moments_outside_it_naming_it():
    window = Window(NOW - timedelta(days=2), NOW - timedelta(minutes=5), live=False)
    window.check(Target(NOW - timedelta(days=1)), NOW)
    window.check(Target(None), NOW)
    for outside in (NOW - timedelta(days=3), NOW - timedelta(minutes=1)):
        with pytest.raises(UsageError, match="outside the window: recoverable from 2024-01-13 12:00:00 UTC to"):
            window.check(Target(outside), NOW)
    # With the link live, every moment up to now is held.
    Window(window.start, window.to, live=True).check(Target(NOW - timedelta(minutes=1)), NOW)
    with pytest.raises(Failed, match="no complete base backup"):
        Window(None, None, live=False).check(Target(None), NOW)


def backup(backup_id: str, begin: int, ended: datetime, state: str = "DONE") -> status.BaseBackup:
    return status.BaseBackup(backup_id, state, f"000000010000000000000{begin:03X}", ended, 100 * MB, MB)


def wal(segno: int, at: datetime) -> status.Wal:
    return status.Wal(f"000000010000000000000{segno:03X}", MB, at.timestamp())


def files(listed: list[status.Wal], missing: tuple[str, ...] = (), streaming: tuple = ()) -> status.Files:
    backups = [backup("b1", 2, NOW - timedelta(hours=10)), backup("b2", 8, NOW - timedelta(hours=4))]
    backups.insert(1, backup("failed", 5, NOW - timedelta(hours=6), "FAILED"))
    return status.Files(backups, listed, list(missing), list(streaming), 0)


def hourly(first: int, last: int) -> list[status.Wal]:
    return [wal(n, NOW - timedelta(hours=12 - n)) for n in range(first, last + 1)]


def test_the_newest_complete_base_backup_before_the_moment_is_chosen():
    held = files(hourly(2, 11))
    assert recover.choose_backup(held, Target(None)).backup_id == "b2"
    assert recover.choose_backup(held, Target(NOW - timedelta(hours=5))).backup_id == "b1"  # not the FAILED one
    with pytest.raises(UsageError, match="before the oldest base backup"):
        recover.choose_backup(held, Target(NOW - timedelta(hours=11)))


def test_barman_copies_every_segment_from_the_base_backups_first_whatever_the_target():
    held = files(hourly(2, 11), streaming=(wal(12, NOW),))
    chosen = recover.choose_backup(held, Target(None))
    assert [w.name[-3:] for w in recover.wals_from(held, chosen)] == ["008", "009", "00A", "00B", "00C"]


def test_a_gap_on_the_way_to_the_moment_is_found_and_one_after_it_is_not():
    listed = hourly(2, 11)
    held = files(listed, missing=(listed[7].name,))  # segment 009, listed but not on disk
    chosen = recover.choose_backup(held, Target(None))
    assert recover.first_gap(held, chosen, Target(None)) == 9
    assert recover.first_gap(held, chosen, Target(NOW - timedelta(hours=4))) is None  # 008, ended 08:00, holds it
    unlisted = files([w for w in listed if not w.name.endswith("00A")])
    assert recover.first_gap(unlisted, chosen, Target(None)) == 10


def test_a_base_backup_of_another_major_than_this_machines_server_is_refused_naming_both(tmp_path, monkeypatch):
    for major in ("16", "17"):
        bindir = tmp_path / major / "bin"
        bindir.mkdir(parents=True)
        for tool in ("postgres", "pg_ctl", "pg_controldata", "pg_dump", "pg_waldump"):
            (bindir / tool).touch()
    monkeypatch.setattr(recover, "PG_LIB", tmp_path)
    assert recover.server_bindir(16) == tmp_path / "16" / "bin"
    with pytest.raises(Failed, match=r"the base backup is PostgreSQL 15.*no PostgreSQL 15 server \(it has: 16, 17\)"):
        recover.server_bindir(15)


def test_the_moment_names_its_dump_and_the_json_the_laptop_reads(tmp_path):
    reached = NOW - timedelta(seconds=3)
    made = recover.Recovered(Path(tmp_path / "kw_app_production-20240115-115957.sql.gz"), Target(None), reached, "b2")
    assert made.moment == reached
    assert made.as_json()["reached"] == reached.isoformat() and made.as_json()["target"] is None
    assert recover.MOMENT_NAME.format(reached) == "kw_app_production-20240115-115957.sql.gz"


def test_the_next_run_removes_the_moments_no_live_run_holds(tmp_path):
    def moment(prefix: str, manifest: bool = True, days: float = 0) -> tuple[Path, int]:
        made, lock = rundir.new_locked_dir(tmp_path, prefix)
        (made / "kw_app_production-20240115-143100.sql.gz").write_bytes(b"x")
        if manifest:
            (made / "kw_app_production-20240115-143100.sql.gz.json").write_text("{}")
        os.utime(made, (time.time() - days * 86400,) * 2)
        return made, lock

    held_alive, lock = moment(recover.HELD_PREFIX)
    holder_killed, gone = moment(recover.HELD_PREFIX)
    asked, by_hand = moment(recover.KEPT_PREFIX)
    killed_mid_dump, mid = moment(recover.KEPT_PREFIX, manifest=False)
    a_day_old, old = moment(recover.KEPT_PREFIX, days=1.1)
    for ended in (gone, by_hand, mid, old):
        os.close(ended)
    recover._remove_leftovers(tmp_path)
    assert sorted(tmp_path.iterdir()) == sorted([held_alive, asked])
    os.close(lock)
