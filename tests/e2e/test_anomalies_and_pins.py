"""A night of deleted data, or an empty database after a host move, never pushes the last good dump out anywhere.

Real nights: backup-db dumps the real database on prod at 02:00 and the orchestrator runs at 03:00, each on
a clock moved by datefudge; between nights the database really changes.
"""

import json
import os

import pytest

from tests import world

PINNED = "db-2024-03-10.sql.gz"


@pytest.fixture
def recorder():
    server = world.Recorder()
    yield server
    server.close()


def night(kw, day, **expect):
    """backup-db at 02:00 and the orchestrator at 03:00 of 2024-03-<day>; the orchestrator's result."""
    made = kw.run("backup-db", at=f"2024-03-{day} 02:00:00", timeout=300)
    assert made.returncode == 0, made.stderr
    assert os.path.exists(made.stdout.strip().splitlines()[-1])
    result = kw.run("backup-orchestrator", at=f"2024-03-{day} 03:00:00", timeout=300)
    assert result.returncode == expect.get("code", 0), result.stderr
    return result


def dumps_in(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith((".gz", ".age")))


def summary(result):
    return [line for line in result.stderr.splitlines() if "summary:" in line][-1]


def test_a_night_of_deleted_rows_pins_the_last_good_dump_everywhere_until_released(net, pg, db, recorder):
    offsite = net.tmp / "offsite"
    net.settings.update(
        PI5_KEEP="3",
        NAS_KEEP="3",
        OFFSITE_REMOTE=str(offsite),
        OFFSITE_KEEP="3",
        NOTIFY_URLS=f"json://{recorder.url[7:]}/notify",
    )
    first = night(net, "10")
    assert "anomaly" not in first.stderr and "pinned=-" in summary(first)

    pg.psql("DELETE FROM orders WHERE user_id > 30; DELETE FROM users WHERE id > 30", db)  # 300 users -> 30
    bad = night(net, "11")
    warning = next(line for line in bad.stderr.splitlines() if "anomaly:" in line)
    assert "public.users: 300 -> 30 rows (-90%, ROW_DROP_ALERT_PCT=50)" in warning
    assert "public.orders: 2000 -> 209 rows" in warning and f"pinned {PINNED}" in warning
    note = json.loads(next(r["body"] for r in recorder.requests if r["path"].startswith("/notify")))
    assert "warning" in note["title"] and "public.users: 300 -> 30" in note["message"]
    assert f"pinned={PINNED}" in summary(bad) and "result=ok-with-warnings" in summary(bad)
    for place in (net.pi5_dir, net.nas_dir, offsite):
        pin = json.loads((place / (PINNED + ".pin")).read_text())
        assert set(pin) == {"pinned_at", "reason"} and "public.users: 300 -> 30" in pin["reason"]
        assert (place / (PINNED + ".pin")).stat().st_mode & 0o777 == 0o600

    for day in ("12", "13", "14"):  # three more nights of the small database: KEEP 3 would have removed it
        later = night(net, day)
        assert f"pinned={PINNED}" in summary(later) and "anomaly" not in later.stderr
    kept = ["db-2024-03-10.sql.gz", "db-2024-03-12.sql.gz", "db-2024-03-13.sql.gz", "db-2024-03-14.sql.gz"]
    for place in (net.pi5_dir, net.nas_dir, offsite):
        assert dumps_in(place) == kept, place

    listed = net.run("list-backups", at="2024-03-14 04:00:00")
    assert listed.returncode == 0, listed.stderr
    pinned_lines = [line for line in listed.stdout.splitlines() if line.rstrip().endswith("pinned")]
    assert len(pinned_lines) == 3 and all(PINNED in line for line in pinned_lines)  # pi5, nas, offsite
    rows = json.loads(net.run("list-backups", "--json", at="2024-03-14 04:00:00").stdout)
    assert {(r["place"], r["name"]) for r in rows if r["pinned"]} == {(p, PINNED) for p in ("pi5", "nas", "offsite")}
    assert all(r["pinned"] is False for r in rows if r["name"] != PINNED)

    tables = net.run("list-backups", "--tables", "users", "public.orders", "--only", "pi5", at="2024-03-14 04:00:00")
    assert tables.returncode == 0, tables.stderr
    lines = tables.stdout.splitlines()
    assert lines[0].split() == ["table", "db-2024-03-10", "db-2024-03-12", "db-2024-03-13", "db-2024-03-14", "change"]
    assert lines[1].split() == ["public.orders", "2000", "209", "209", "209"]
    assert lines[2].split() == ["public.users", "300", "30", "30", "30"]
    unknown = net.run("list-backups", "--tables", "no_such_table", "--only", "pi5", at="2024-03-14 04:00:00")
    assert unknown.returncode == 1 and "no table no_such_table" in unknown.stderr

    made = net.run("backup-db", at="2024-03-15 02:00:00")
    assert made.returncode == 0, made.stderr
    planned = net.run("backup-orchestrator", "--dry-run", "--release-pins", at="2024-03-15 03:00:00")
    assert planned.returncode == 0, planned.stderr
    assert f"[dry-run] would release every pin (on the pi5: {PINNED})" in planned.stderr
    assert all("[dry-run]" in line for line in planned.stderr.splitlines())
    assert all((place / (PINNED + ".pin")).exists() for place in (net.pi5_dir, net.nas_dir, offsite))
    released = net.run("backup-orchestrator", "--release-pins", at="2024-03-15 03:00:00")
    assert released.returncode == 0, released.stderr
    assert "pinned=-" in summary(released)
    for place in (net.pi5_dir, net.nas_dir, offsite):
        assert dumps_in(place) == ["db-2024-03-13.sql.gz", "db-2024-03-14.sql.gz", "db-2024-03-15.sql.gz"], place
        assert not [n for n in os.listdir(place) if n.endswith(".pin")]


def test_an_empty_database_after_a_host_move_keeps_the_last_full_dump(net, pg, db):
    net.settings.update(PI5_KEEP="2", NAS_KEEP="2", MIN_DUMP_BYTES="100")
    night(net, "10")
    net.settings["DB_NAME"] = pg.create_db(db + "_fresh")  # the new host's database: nothing restored into it yet
    empty = night(net, "11")
    warning = next(line for line in empty.stderr.splitlines() if "anomaly:" in line)
    for table, rows in world.RAILS_TABLE_ROWS.items():
        assert f"table {table} is gone (it had {rows} rows)" in warning
    for day in ("12", "13"):
        night(net, day)
    for place in (net.pi5_dir, net.nas_dir):
        assert dumps_in(place) == ["db-2024-03-10.sql.gz", "db-2024-03-12.sql.gz", "db-2024-03-13.sql.gz"], place
        assert json.loads((place / "db-2024-03-10.sql.gz.json").read_text())["tables"] == world.RAILS_TABLE_ROWS


def test_a_migration_dump_never_takes_a_nightly_slot(net):
    migration = "kw_app_production-20240301-120000.sql.gz"
    world.synthetic_dump(net.prod_dir, migration)  # kept by migrate-database-to-new-prod --keep-dump
    net.settings.update(PROD_KEEP="2", PI5_KEEP="2", NAS_KEEP="2")
    for day in ("10", "11", "12"):
        night(net, day)
    nightly = ["db-2024-03-11.sql.gz", "db-2024-03-12.sql.gz"]
    for place in (net.prod_dir, net.pi5_dir, net.nas_dir):
        assert dumps_in(place) == sorted(nightly + [migration]), place
