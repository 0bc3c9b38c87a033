from datetime import UTC

import pytest

from kwbackup import names
from kwbackup.errors import UsageError


def test_parses_both_nightly_forms_and_migration_dumps():
    day = names.parse("db-2024-01-15.sql.gz")
    timed = names.parse("db-2024-01-15-143000.sql.gz")
    migration = names.parse("kw_app_production-20260118-000001.sql")
    assert day.nightly and not day.timed and day.when.isoformat() == "2024-01-15T00:00:00+00:00"
    assert timed.timed and timed.when.hour == 14
    assert not migration.nightly and not migration.compressed
    assert names.parse("kw_app_production-20260118-000001.sql.gz").compressed


def test_an_encrypted_copy_is_the_same_dump():
    encrypted = names.parse("db-2024-01-15.sql.gz.age")
    assert encrypted.encrypted and encrypted.nightly and encrypted.stem == "db-2024-01-15.sql.gz"
    assert encrypted.sort_key == names.parse("db-2024-01-15.sql.gz").sort_key
    assert names.parse("kw_app_production-20260118-000001.sql.gz.age").encrypted
    assert names.plain_name("db-2024-01-15-010000.sql.gz.age") == "db-2024-01-15-010000.sql.gz"
    assert names.require("db-2024-01-15.sql.gz.age") == "db-2024-01-15.sql.gz.age"


@pytest.mark.parametrize(
    "name",
    [
        "db-2024-13-01.sql.gz",
        "db-2024-02-30.sql.gz",
        "db-2024-01-15.sql",
        "db-2024-1-15.sql.gz",
        "db-2024-01-15.sql.gz.json",
        "db-2024-01-15-25000.sql.gz",
        "other.sql.gz",
        "kw_app_production-2026011-000001.sql",
        ".db-2024-01-15.sql.gz.partial-abcd",
        "db-2024-01-15-246000.sql.gz",
        "db-2024-01-15.sql.age",
        "db-2024-01-15.sql.gz.age.age",
        "db-2024-01-15.sql.gz.age.json",
        "kw_app_production-20260118-000001.sql.age",
    ],
)
def test_refuses_other_names(name):
    assert names.parse(name) is None


def test_newest_is_by_the_timestamp_in_the_name_not_string_order():
    found = [
        "db-2024-01-09.sql.gz",
        "db-2024-01-15.sql.gz",
        "db-2024-01-15-010000.sql.gz",
        "kw_app_production-20231231-235958.sql",
        "notes.txt",
        "db-2023-12-31-235959.sql.gz",
    ]
    ordered = [d.name for d in names.dumps_in(found)]
    assert ordered == [
        "db-2024-01-15-010000.sql.gz",
        "db-2024-01-15.sql.gz",
        "db-2024-01-09.sql.gz",
        "db-2023-12-31-235959.sql.gz",
        "kw_app_production-20231231-235958.sql",
    ]
    assert names.newest(found).name == "db-2024-01-15-010000.sql.gz"
    assert names.newest(["x", "y.json"]) is None


@pytest.mark.parametrize(
    "hostile",
    [
        "../../etc/passwd",
        "db-2024-01-01.sql.gz; touch /tmp/pwned",
        "/var/backups/db-2024-01-01.sql.gz",
        "db-2024-01-01.sql.gz/..",
        "..",
        "db-2024-01-01.sql.gz\n",
        "$(touch x)",
        "-rf",
        "",
    ],
)
def test_require_refuses_hostile_names_with_exit_2(hostile):
    with pytest.raises(UsageError) as caught:
        names.require(hostile, "--local")
    assert caught.value.exit_status == 2 and "--local" in caught.value.line()


def test_require_passes_names_and_latest():
    assert names.require("latest") == "latest"
    assert names.require("db-2024-01-01.sql.gz") == "db-2024-01-01.sql.gz"
    with pytest.raises(UsageError):
        names.require("latest", allow_latest=False)


def test_nightly_name_takes_the_time_when_the_date_is_taken():
    from datetime import datetime

    now = datetime(2024, 1, 15, 2, 5, 9, tzinfo=UTC)
    assert names.nightly_name_for(now, set()) == "db-2024-01-15.sql.gz"
    assert names.nightly_name_for(now, {"db-2024-01-15.sql.gz"}) == "db-2024-01-15-020509.sql.gz"


def test_a_name_dated_beyond_the_slack_is_future_dated():
    from datetime import datetime, timedelta

    clock = names.Clock(datetime(2024, 3, 10, 3, 0, tzinfo=UTC), timedelta(minutes=60))
    assert not clock.is_future("db-2024-03-10.sql.gz")
    assert not clock.is_future("db-2024-03-10-040000.sql.gz")  # within the slack
    assert clock.is_future("db-2024-03-10-040001.sql.gz") and clock.is_future("db-2024-03-11.sql.gz")
    assert clock.is_future("kw_app_production-20240311-000000.sql.gz")
    assert not clock.is_future("notes.txt")
    assert clock.age_hours("db-2024-03-09.sql.gz") == 27


def test_a_day_that_already_has_a_timed_dump_gets_a_timed_name():
    from datetime import datetime

    now = datetime(2024, 3, 10, 2, 0, tzinfo=UTC)
    assert names.nightly_name_for(now, {"db-2024-03-09.sql.gz"}) == "db-2024-03-10.sql.gz"
    # the day's first, untimed dump was rotated away: an untimed name would sort before 01:00's
    assert names.nightly_name_for(now, {"db-2024-03-10-010000.sql.gz"}) == "db-2024-03-10-020000.sql.gz"
