"""Clocks that jump, and nights that never come: backup-db, the orchestrator and list-backups on a moved clock.

Each script's clock is moved with datefudge (tests/world.clocked): the code has no test hook.
"""

import json
import os
from urllib.parse import urlparse

import pytest

from tests import world


@pytest.fixture
def recorder():
    server = world.Recorder()
    yield server
    server.close()


def errors(result):
    return [line for line in result.stderr.splitlines() if "error:" in line]


def contents(directory):
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory)) if not n.startswith(".")}


def test_backup_db_stops_when_its_clock_is_behind_the_newest_dump_and_removes_nothing(kw, recorder):
    kw.settings.update(HEALTHCHECKS_URL=f"{recorder.url}/hc/abc", PROD_KEEP="2")
    for night in ("2024-03-09 02:00:00", "2024-03-10 02:00:00"):
        made = kw.run("backup-db", at=night)
        assert made.returncode == 0, made.stderr
        assert os.path.exists(made.stdout.strip().splitlines()[-1])  # the path it prints exists
    before = contents(kw.prod_dir)
    behind = kw.run("backup-db", at="2024-03-08 02:00:00")  # the clock went back two days
    assert behind.returncode == 1, behind.stderr
    assert len(errors(behind)) == 1
    assert "db-2024-03-10.sql.gz" in errors(behind)[0] and "2024-03-08 02:00" in errors(behind)[0]
    assert "fix the clock" in errors(behind)[0]
    assert behind.stdout == "" and contents(kw.prod_dir) == before
    assert [urlparse(p).path for p in recorder.paths()][-1] == "/hc/abc/fail"  # and an alert


def test_a_future_dated_dump_on_prod_stops_backup_db_until_it_is_removed(kw):
    world.synthetic_dump(kw.prod_dir, "db-2099-01-01.sql.gz")
    result = kw.run("backup-db")
    assert result.returncode == 1 and "db-2099-01-01.sql.gz" in errors(result)[0]
    assert "remove the future-dated dump by hand" in errors(result)[0]
    (kw.prod_dir / "db-2099-01-01.sql.gz").unlink()
    (kw.prod_dir / "db-2099-01-01.sql.gz.json").unlink()
    again = kw.run("backup-db")
    assert again.returncode == 0, again.stderr
    assert os.path.exists(again.stdout.strip().splitlines()[-1])


def test_the_second_run_of_a_day_whose_first_dump_was_rotated_away_is_named_after_it(kw):
    kw.settings["PROD_KEEP"] = "1"
    for at in ("2024-03-10 00:30:00", "2024-03-10 01:00:00", "2024-03-10 02:00:00"):
        made = kw.run("backup-db", at=at)
        assert made.returncode == 0, made.stderr
        assert os.path.exists(made.stdout.strip().splitlines()[-1])
    left = [n for n in kw.dumps() if n.endswith(".gz")]
    assert len(left) == 1 and left[0].startswith("db-2024-03-10-0200"), left  # the clock ticks on from 02:00:00


def test_no_new_dump_for_longer_than_max_dump_age_fails_the_orchestrator_and_alerts(net, recorder):
    net.settings.update(
        MAX_DUMP_AGE_HOURS="26",
        NOTIFY_URLS=f"json://{recorder.url[7:]}/notify",
        APPSIGNAL_FRONTEND_API_KEY="front",
        APPSIGNAL_ENDPOINT=f"{recorder.url}/appsignal",
    )
    world.synthetic_dump(net.prod_dir, "db-2024-03-09.sql.gz")
    fresh = net.run("backup-orchestrator", at="2024-03-09 03:00:00")
    assert fresh.returncode == 0, fresh.stderr
    metrics = json.loads(next(r["body"] for r in recorder.requests if r["path"].startswith("/appsignal/metrics")))
    age = next(m for m in metrics if m["name"] == "backup.age_hours")
    assert 3 <= age["value"] < 3.1 and age["tags"]["place"] == "pi5"

    stale = net.run("backup-orchestrator", at="2024-03-11 03:00:00")  # two nights later, nothing new on prod
    assert stale.returncode == 1, stale.stderr
    assert len(errors(stale)) == 1 and "no new dump for 51 hours" in errors(stale)[0]
    assert "db-2024-03-09.sql.gz" in errors(stale)[0]
    note = json.loads([r for r in recorder.requests if r["path"].startswith("/notify")][-1]["body"])
    assert "FAILED" in note["title"] and "no new dump for 51 hours" in note["message"]
    assert (net.nas_dir / "db-2024-03-09.sql.gz").exists()  # what it has is kept, pushed and fine


def test_a_future_dated_dump_alone_on_prod_is_warned_about_and_then_caught_as_stale(net):
    net.settings["MAX_DUMP_AGE_HOURS"] = "26"
    world.synthetic_dump(net.pi5_dir, "db-2024-03-09.sql.gz")
    world.synthetic_dump(net.prod_dir, "db-2024-03-09.sql.gz")
    world.synthetic_dump(net.prod_dir, "db-2024-04-09.sql.gz")  # and backup-db stops there every night since
    first = net.run("backup-orchestrator", at="2024-03-09 03:00:00")
    assert first.returncode == 0, first.stderr
    assert "db-2024-04-09.sql.gz, dated ahead of this clock" in first.stderr
    # The next night brings nothing new: by its name the newest dump is 27 hours old
    later = net.run("backup-orchestrator", at="2024-03-10 03:00:00")
    assert later.returncode == 1 and "no new dump for 27 hours" in errors(later)[0]


def test_list_backups_flags_a_stale_place_and_exits_1(net):
    net.settings.update(MAX_DUMP_AGE_HOURS="26", PI5_HOST="pi5")
    world.synthetic_dump(net.prod_dir, "db-2024-03-11.sql.gz")
    world.synthetic_dump(net.pi5_dir, "db-2024-03-09.sql.gz")
    world.synthetic_dump(net.nas_dir, "db-2024-03-11.sql.gz")
    result = net.run("list-backups", at="2024-03-11 12:00:00")
    assert result.returncode == 1
    blocks = world.listing_blocks(result.stdout)
    pi5 = next(lines for heading, lines in blocks.items() if heading.startswith("Raspberry Pi 5"))
    assert pi5[-2:] == ["  stale: newest dump is 2 days old", pi5[-1]] and pi5[-1].startswith("  free: "), pi5
    assert sum("stale:" in line for lines in blocks.values() for line in lines) == 1
    assert len(errors(result)) == 1 and "stale: pi5" in errors(result)[0]
    fresh = net.run("list-backups", at="2024-03-10 01:00:00")  # 25 hours after 03-09's name
    assert fresh.returncode == 0 and "stale:" not in fresh.stdout
