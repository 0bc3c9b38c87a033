"""pins.anomalies: what makes a night's dump look wrong against the one before it, with its figures."""

import pytest

from kwbackup import pins, settings
from kwbackup.places import Entry


@pytest.fixture
def limits(tmp_path):
    env = tmp_path / "backup.env"
    env.write_text("SIZE_CHANGE_ALERT_PCT=50\nROW_DROP_ALERT_PCT=50\n")
    return settings.load(environ={"KW_BACKUP_ENV": str(env)})


def entry(size, tables):
    return Entry("db-2024-03-10.sql.gz", size, manifest={"tables": tables})


def test_a_similar_night_is_not_anomalous(limits):
    before = entry(1000, {"public.users": 2500, "public.orders": 10})
    assert (
        pins.anomalies(before, entry(1100, {"public.users": 2400, "public.orders": 9, "public.new": 5}), limits) == []
    )


def test_growth_and_a_loss_within_the_limit_are_fine(limits):
    before = entry(1000, {"public.users": 2500, "public.empty": 0})
    assert pins.anomalies(before, entry(1400, {"public.users": 1300, "public.empty": 0}), limits) == []


def test_rows_lost_beyond_the_limit_a_table_gone_and_a_size_change_are_named_with_figures(limits):
    before = entry(1000, {"public.users": 2500, "public.orders": 100, "public.gone": 7, "public.empty": 0})
    after = entry(400, {"public.users": 250, "public.orders": 60, "public.empty": 0})
    assert pins.anomalies(before, after, limits) == [
        "size 1000 -> 400 bytes (-60%, SIZE_CHANGE_ALERT_PCT=50)",
        "table public.gone is gone (it had 7 rows)",
        "public.users: 2500 -> 250 rows (-90%, ROW_DROP_ALERT_PCT=50)",
    ]


def test_an_empty_database_after_a_host_move_is_anomalous(limits):
    before = entry(500_000, {"public.users": 2500, "public.orders": 20000})
    found = pins.anomalies(before, entry(2000, {}), limits)
    assert len(found) == 3 and found[1] == "table public.orders is gone (it had 20000 rows)"
