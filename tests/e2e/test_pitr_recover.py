"""Recovering a moment from the WAL tier (issue 24): pitr-recover on the pi5, and --at from the laptop.

One world per module (setup-pitr costs ~16 s): prod's PostgreSQL writes numbered rows with their commit times,
one per 100 ms, while the pi5 streams; each test then asks for moments between two commits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from tests import pitr_world, world

DB = "kw_app_production"


class Ticker(threading.Thread):
    """Rows on prod, one per `every` seconds, each committed alone with its commit time (clock_timestamp())."""

    def __init__(self, pitr, every: float = 0.1):
        super().__init__(daemon=True)
        self.pitr, self.every = pitr, every
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:  # a restore's swap ends this session, a hard stop of prod all of them: connect again
                with psycopg.connect(host=str(self.pitr.pg.sockets), port=self.pitr.pg.port, dbname=DB,
                                     user="postgres", autocommit=True, connect_timeout=5) as conn:  # fmt: skip
                    while not self.halt.wait(self.every):
                        conn.execute("INSERT INTO ticks (at) VALUES (clock_timestamp())")
            except psycopg.Error:
                self.halt.wait(0.2)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


def ticks(pitr, db: str = DB) -> list[tuple[int, datetime]]:
    out = pitr.prod_sql("SELECT id, extract(epoch FROM at) FROM ticks ORDER BY id", db)
    return [(int(i), datetime.fromtimestamp(float(t), UTC)) for i, t in (line.split("|") for line in out.splitlines())]


@pytest.fixture(scope="module")
def world_(tmp_path_factory, ssh_world, pi, pitr_install):
    base = tmp_path_factory.mktemp("pitr-recover")
    os.chown(base, pi.pw_uid, pi.pw_gid)
    ssh_world.base.chmod(0o711)
    place = pitr_world.PitrWorld(base, ssh_world, pi, pitr_install)
    try:
        place.start()
        place.prod_sql("CREATE TABLE ticks (id bigserial PRIMARY KEY, at timestamptz NOT NULL)", DB)
        place.prod_sql("CREATE TABLE other (id int PRIMARY KEY, note text)", DB)
        place.prod_sql("INSERT INTO other SELECT n, 'note ' || n FROM generate_series(1, 50) n", DB)
        place.start_tunnel()
        done = place.laptop("setup-pitr")
        assert done.returncode == 0, done.stderr
        place.ticker = Ticker(place)
        place.ticker.start()
        time.sleep(3)  # a few seconds of ticks after the base backup
        yield place
    finally:
        if getattr(place, "ticker", None):
            place.ticker.stop()
        place.stop()


def recovered_ticks(path: Path) -> list[int]:
    """The ids of the ticks table in a dump's COPY block."""
    out = subprocess.run(["zcat", str(path)], capture_output=True, text=True, check=True).stdout
    block = out.split("COPY public.ticks (id, at) FROM stdin;\n", 1)[1].split("\n\\.\n", 1)[0]
    return [int(line.split("\t")[0]) for line in block.splitlines() if line]


def test_pitr_recover_on_the_pi5_holds_exactly_the_rows_before_the_moment(world_):
    rows = ticks(world_)
    assert len(rows) > 10
    (_, a), (_, b) = rows[-6], rows[-5]
    target = a + (b - a) / 2
    done = world_.on_pi("pitr-recover", "--at", target.isoformat())
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    path = Path(found["dir"]) / found["name"]
    assert recovered_ticks(path) == [r[0] for r in rows if r[1] <= target]
    assert found["reached"] and datetime.fromisoformat(found["reached"]) <= target


def between(rows: list[tuple[int, datetime]], back: int) -> datetime:
    """A moment halfway between two commits, `back` rows from the newest."""
    (_, a), (_, b) = rows[-back - 1], rows[-back]
    return a + (b - a) / 2


def test_restore_production_db_at_a_moment_keeps_its_dump_and_names_the_moment(world_):
    rows = ticks(world_)
    target = between(rows, 8)
    prod_dir = world_.base / "prod-dumps"
    started = datetime.now(UTC)
    done = world_.laptop(
        "restore-production-db", "--at", target.strftime("%Y-%m-%d %H:%M:%S.%f"), "--yes", "--keep-dump",
        PROD_DIR=str(prod_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The restored database holds the ticks up to the moment, then only the ticker's new ones (after the swap).
    restored = [i for i, at in ticks(world_) if at < started]
    assert restored == [i for i, at in rows if at <= target]
    assert "the newest transaction replayed before it is from" in done.stderr, done.stderr
    kept = [p.name for p in prod_dir.iterdir()]
    name = f"kw_app_production-{target:%Y%m%d-%H%M%S}.sql.gz"
    assert sorted(kept) == [name, name + ".json"], kept
    assert not (world_.dir / "recovered" / name).exists()  # the pi5's copy went once restored
    assert not list(world_.dir.glob("kw-recover-run-*")) and not list(Path("/tmp").glob("kw-recover-socket-*"))


@pytest.fixture
def fresh_prod(world_):
    """A freshly provisioned prod: its own PostgreSQL 15 without DB_NAME, behind an sshd place of its own whose
    login finds only the docker stand-in."""
    pg = world.Postgres(Path(tempfile.mkdtemp(prefix="kwtest-fresh-pg-"))).start()
    bin_dir = world_.base / "fresh-bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "docker").exists():
        (bin_dir / "docker").symlink_to(world.STANDINS / "docker")
    name = f"{world_.name}-fresh"
    sshd = world_.ssh_world.add_place(
        name,
        next(pitr_world.ADDRESSES),
        f"{bin_dir}:/usr/bin:/bin",
        {**pg.env, "STANDIN_LOG": str(world_.base / "fresh.log")},
    )
    try:
        yield name, pg
    finally:
        sshd.stop()
        pg.stop()
        shutil.rmtree(pg.base, ignore_errors=True)


def test_setup_fresh_production_db_at_a_moment_on_a_fresh_prod(world_, fresh_prod):
    host, pg = fresh_prod
    rows = ticks(world_)
    target = between(rows, 3)
    done = world_.laptop("setup-fresh-production-db", "--at", target.isoformat(), "--yes", PROD_HOST=host)
    assert done.returncode == 0, done.stderr
    got = pg.psql("SELECT id FROM ticks ORDER BY id", DB).split()
    assert [int(i) for i in got] == [i for i, at in rows if at <= target]
    assert pg.psql("SELECT count(*) FROM other", DB) == "50"


def test_backup_drill_at_a_moment_reports_each_step_and_what_it_reached(world_):
    rows = ticks(world_)
    target = between(rows, 4)
    report = world_.base / "drill-at.jsonl"
    done = world_.laptop("backup-drill", "--at", target.isoformat(), "--report", str(report))
    assert done.returncode == 0, done.stderr + done.stdout
    line = json.loads(report.read_text().splitlines()[-1])
    assert line["result"] == "ok" and line["at"] == target.isoformat() and line["source"] == "the pi5's WAL tier"
    # The newest commit replayed: the last row's, a little after its clock_timestamp(), and before the moment.
    assert max(at for _, at in rows if at <= target) <= datetime.fromisoformat(line["reached"]) <= target
    assert all(line[f"{step}_seconds"] > 0 for step in ("recover", "replay", "dump", "restore"))
    assert line["tables"] == 2 and line["rows"] == 50 + len([1 for _, at in rows if at <= target])
    assert "moment:   " + target.isoformat() in done.stdout
