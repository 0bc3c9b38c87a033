import os

from kwbackup import names, retention


def plan(entries, keep):
    pairs = [(names.parse(n), ok) for n, ok in entries]
    return [d.name for d in retention.to_remove(pairs, keep)]


def test_keeps_the_newest_valid_dumps():
    entries = [(f"db-2024-01-{d:02d}.sql.gz", True) for d in range(1, 6)]
    assert plan(entries, 2) == ["db-2024-01-03.sql.gz", "db-2024-01-02.sql.gz", "db-2024-01-01.sql.gz"]
    assert plan(entries, 5) == [] and plan(entries, 9) == []


def test_invalid_dumps_do_not_count_and_never_push_good_ones_out():
    entries = [
        ("db-2024-01-01.sql.gz", True),
        ("db-2024-01-02.sql.gz", True),
        ("db-2024-01-03.sql.gz", False),
        ("db-2024-01-04.sql.gz", False),
        ("db-2024-01-05.sql.gz", False),
    ]
    assert plan(entries, 2) == []
    assert plan(entries, 1) == ["db-2024-01-01.sql.gz"]


def test_newest_valid_dump_is_never_removed_even_with_keep_1():
    entries = [("db-2024-01-01.sql.gz", True), ("db-2024-01-02.sql.gz", False)]
    assert plan(entries, 1) == []


def test_only_nightly_dumps_are_removed():
    entries = [
        ("kw_app_production-20200101-000000.sql", True),
        ("db-2024-01-01.sql.gz", True),
        ("db-2024-01-02.sql.gz", True),
        ("db-2024-01-03.sql.gz", True),
    ]
    assert plan(entries, 1) == ["db-2024-01-02.sql.gz", "db-2024-01-01.sql.gz"]


def test_timed_dump_of_the_same_day_is_newer():
    entries = [("db-2024-01-02.sql.gz", True), ("db-2024-01-02-000000.sql.gz", True)]
    assert plan(entries, 1) == ["db-2024-01-02.sql.gz"]


def test_a_plain_and_an_encrypted_copy_of_a_dump_count_once():
    entries = [
        ("db-2024-01-03.sql.gz.age", True),
        ("db-2024-01-03.sql.gz", True),
        ("db-2024-01-02.sql.gz", True),
        ("db-2024-01-01.sql.gz.age", True),
    ]
    assert plan(entries, 2) == ["db-2024-01-01.sql.gz.age"]
    assert plan(entries, 1) == ["db-2024-01-02.sql.gz", "db-2024-01-01.sql.gz.age"]


def test_calendar_keeps_both_forms_of_a_picked_dump():
    entries = [
        ("db-2024-03-01.sql.gz", True),
        ("db-2024-02-01.sql.gz.age", True),
        ("db-2024-02-01.sql.gz", True),
        ("db-2024-01-01.sql.gz.age", True),
    ]
    pairs = [(names.parse(n), ok) for n, ok in entries]
    doomed = [d.name for d in retention.to_remove(pairs, 1, retention.Calendar(monthly=2))]
    assert doomed == ["db-2024-01-01.sql.gz.age"]


def walk(days: int, keep: int, calendar: retention.Calendar, valid=lambda day: True) -> list[str]:
    """Rotate after each of `days` nightly dumps from 2024-01-01, as a place would; what remains."""
    from datetime import date, timedelta

    present: dict[str, bool] = {}
    for i in range(days):
        present[f"db-{date(2024, 1, 1) + timedelta(days=i)}.sql.gz"] = valid(i)
        doomed = retention.to_remove([(names.parse(n), ok) for n, ok in present.items()], keep, calendar)
        for dump in doomed:
            del present[dump.name]
    return sorted(present)


def test_120_days_of_calendar_retention_keep_exactly_these():
    remaining = walk(120, 3, retention.Calendar(daily=7, weekly=4, monthly=3))
    # 2024-01-01 + 119 days = 2024-04-29, a Monday (ISO week 18).
    assert remaining == [
        "db-2024-02-29.sql.gz",  # newest of February (monthly)
        "db-2024-03-31.sql.gz",  # newest of March (monthly)
        "db-2024-04-14.sql.gz",  # newest of ISO week 15 (weekly; weeks 18, 17, 16, 15 are the last 4)
        "db-2024-04-21.sql.gz",  # newest of ISO week 16 (weekly)
        "db-2024-04-23.sql.gz",
        "db-2024-04-24.sql.gz",
        "db-2024-04-25.sql.gz",
        "db-2024-04-26.sql.gz",
        "db-2024-04-27.sql.gz",
        "db-2024-04-28.sql.gz",  # daily (the 28th is also week 17's newest)
        "db-2024-04-29.sql.gz",  # the newest: April (monthly), week 18, daily, KEEP
    ]


def test_a_run_of_bad_nights_never_pushes_the_monthly_copies_out():
    # from day 60 on every dump is invalid (a compromised or broken prod): they never count
    remaining = walk(120, 3, retention.Calendar(daily=7, weekly=4, monthly=3), valid=lambda day: day < 60)
    assert "db-2024-02-29.sql.gz" in remaining and "db-2024-01-31.sql.gz" in remaining
    assert len([n for n in remaining if n <= "db-2024-02-29.sql.gz"]) >= 3  # the last good ones stay


def test_without_a_calendar_nothing_changes():
    assert walk(30, 3, retention.NO_CALENDAR) == [
        "db-2024-01-28.sql.gz",
        "db-2024-01-29.sql.gz",
        "db-2024-01-30.sql.gz",
    ]


def test_migration_dumps_neither_count_toward_keep_nor_go():
    entries = [
        ("kw_app_production-20240110-000000.sql.gz", True),
        ("db-2024-01-08.sql.gz", True),
        ("db-2024-01-09.sql.gz", True),
        ("db-2024-01-07.sql.gz", True),
    ]
    assert plan(entries, 2) == ["db-2024-01-07.sql.gz"]  # the two newest nightly ones stay, the migration dump too


def test_excluded_dumps_neither_count_nor_go():
    """Pinned and future-dated dumps: kept beyond KEEP, and never counted toward it."""
    entries = [(f"db-2024-01-{d:02d}.sql.gz", True) for d in range(1, 6)] + [("db-2099-01-01.sql.gz", True)]
    pairs = [(names.parse(n), ok) for n, ok in entries]
    exclude = {"db-2024-01-02.sql.gz", "db-2099-01-01.sql.gz"}
    doomed = [d.name for d in retention.to_remove(pairs, 2, exclude=exclude)]
    assert doomed == ["db-2024-01-03.sql.gz", "db-2024-01-01.sql.gz"]  # 04 and 05 count; 02 is pinned


def test_rotation_in_a_directory_honours_pins_and_the_clock(tmp_path):
    from datetime import UTC, datetime, timedelta

    from tests import world

    for day in range(1, 6):
        world.synthetic_dump(tmp_path, f"db-2024-01-{day:02d}.sql.gz", rows=5)
    world.synthetic_dump(tmp_path, "db-2024-02-01.sql.gz", rows=5)  # a day after this clock: future-dated
    (tmp_path / "db-2024-01-01.sql.gz.pin").write_text('{"pinned_at": "2024-01-05T03:00:00Z", "reason": "test"}\n')
    clock = names.Clock(datetime(2024, 1, 31, tzinfo=UTC), timedelta(minutes=60))
    removed = retention.rotate_local(tmp_path, 2, clock)
    assert removed == ["db-2024-01-03.sql.gz", "db-2024-01-02.sql.gz"]
    left = sorted(n for n in os.listdir(tmp_path) if n.endswith(".gz"))
    assert left == ["db-2024-01-01.sql.gz", "db-2024-01-04.sql.gz", "db-2024-01-05.sql.gz", "db-2024-02-01.sql.gz"]
