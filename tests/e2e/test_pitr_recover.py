"""Recovering a moment from the WAL tier (issue 24): pitr-recover on the pi5, and --at from the laptop.

One world per module (setup-pitr costs ~16 s): prod's PostgreSQL writes numbered rows with their commit times,
one per 100 ms, while the pi5 streams; each test then asks for moments between two commits.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests import pitr_world, world

DB = "kw_app_production"
FRESH_PRODS = itertools.count()  # each fresh prod its own sshd place


class Ticker(threading.Thread):
    """Rows on prod, one per `every` seconds, each committed alone with its commit time (clock_timestamp())."""

    def __init__(self, pitr, every: float = 0.1):
        super().__init__(daemon=True)
        self.pitr, self.every = pitr, every
        self.halt = threading.Event()
        self.going = threading.Event()
        self.going.set()
        self.errors: list[str] = []  # the latest, for a test that finds too few rows

    def run(self) -> None:
        while not self.halt.is_set():
            try:  # a restore's swap ends this session, a hard stop of prod all of them: connect again
                with psycopg.connect(host=str(self.pitr.pg.sockets), port=self.pitr.pg.port, dbname=DB,
                                     user="postgres", autocommit=True, connect_timeout=5) as conn:  # fmt: skip
                    while not self.halt.wait(self.every):
                        if self.going.is_set():
                            conn.execute("INSERT INTO ticks (at) VALUES (clock_timestamp())")
            except psycopg.Error as error:
                self.errors = [*self.errors[-4:], f"{datetime.now(UTC):%H:%M:%S.%f} {error}"]
                self.halt.wait(0.2)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)

    @contextmanager
    def paused(self):
        self.going.clear()
        time.sleep(0.3)  # an insert under way commits
        try:
            yield
        finally:
            self.going.set()


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
        place.swapped = datetime.now(UTC)  # the last time a restore swapped prod's database: none yet
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
    home = world_.dir / "home" / "prod"
    complete = [*home.glob("wals/*/0*"), *(p for p in (home / "streaming").glob("0*") if p.suffix != ".partial")]
    assert all(p.stat().st_mtime < target.timestamp() for p in complete)  # the moment is in the .partial
    done = world_.on_pi("pitr-recover", "--at", target.isoformat())
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    path = Path(found["dir"]) / found["name"]
    assert recovered_ticks(path) == [r[0] for r in rows if r[1] <= target]
    assert found["reached"] and datetime.fromisoformat(found["reached"]) <= target


def test_a_moment_inside_a_migration_that_holds_a_table_locked_is_recovered(world_):
    """A migration's ALTER TABLE holds `other` locked across the moment: the moment comes back without it (it had
    not committed), rather than pg_dump waiting for ever on the lock the paused replay holds for it."""
    migration = world.HeldTransaction(world_.pg, DB, "ALTER TABLE other ADD COLUMN during_the_migration text")
    try:
        time.sleep(0.3)  # ticks commit meanwhile
        rows = ticks(world_)
        target = between(rows, 1)
        done = world_.on_pi("pitr-recover", "--at", target.isoformat(), timeout=120)
    finally:
        migration.end("ROLLBACK")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    path = Path(found["dir"]) / found["name"]
    assert recovered_ticks(path) == [r[0] for r in rows if r[1] <= target]
    text = subprocess.run(["zcat", str(path)], capture_output=True, text=True, check=True).stdout
    assert "CREATE TABLE public.other" in text and "during_the_migration" not in text


def between(rows: list[tuple[int, datetime]], back: int) -> datetime:
    """A moment halfway between two commits, `back` rows from the newest."""
    (_, a), (_, b) = rows[-back - 1], rows[-back]
    return a + (b - a) / 2


def settled_ticks(pitr, back: int) -> list[tuple[int, datetime]]:
    """Prod's ticks once more than `back` of them came after the last swap of its database. Two neighbouring rows
    around a swap are no moment prod held: between them the swapped-out database had rows this one lacks."""
    deadline = time.monotonic() + 60
    while True:
        rows = ticks(pitr)
        if sum(at > pitr.swapped for _, at in rows) > back:
            return rows
        assert time.monotonic() < deadline, f"too few ticks since the swap: {rows[-3:]}, {pitr.ticker.errors}"
        time.sleep(0.2)


def test_restore_production_db_at_a_moment_keeps_its_dump_and_names_the_moment(world_):
    rows = settled_ticks(world_, 8)
    target = between(rows, 8)
    prod_dir = world_.base / "prod-dumps"
    started = datetime.now(UTC)
    # On a terminal, typing the database name; the prompt names the moment and the newest transaction before it.
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [str(world.BIN / "restore-production-db"), "--at", target.strftime("%Y-%m-%d %H:%M:%S.%f"), "--keep-dump"],
        env=world_.laptop_env(PROD_DIR=str(prod_dir)),
        stdin=child_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(child_fd)
    os.write(main_fd, DB.encode() + b"\n")
    _, err = proc.communicate(timeout=600)
    os.close(main_fd)
    world_.swapped = datetime.now(UTC)
    assert proc.returncode == 0, err
    # The restored database holds the ticks up to the moment, then only the ticker's new ones (after the swap).
    restored = [i for i, at in ticks(world_) if at < started]
    assert restored == [i for i, at in rows if at <= target]
    prompt = f"The moment {target:%Y-%m-%d %H:%M:%S} UTC: the newest transaction replayed before it is from "
    assert prompt in err and "This replaces the database kw_app_production. Type its name" in err, err
    kept = [p.name for p in prod_dir.iterdir()]
    name = f"kw_app_production-{target:%Y%m%d-%H%M%S}.sql.gz"
    assert sorted(kept) == [name, name + ".json"], kept
    assert not list((world_.dir / "recovered").glob(f"*/{name}"))  # the pi5's copy went once restored
    assert not run_dirs(world_)


@pytest.fixture
def fresh_prod(world_):
    """A freshly provisioned prod: its own PostgreSQL 15 without DB_NAME, behind an sshd place of its own whose
    login finds only the docker stand-in."""
    pg = world.Postgres(Path(tempfile.mkdtemp(prefix="kwtest-fresh-pg-"))).start()
    bin_dir = world_.base / "fresh-bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "docker").exists():
        (bin_dir / "docker").symlink_to(world.STANDINS / "docker")
    name = f"{world_.name}-fresh{next(FRESH_PRODS)}"
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
    rows = settled_ticks(world_, 3)
    target = between(rows, 3)
    done = world_.laptop("setup-fresh-production-db", "--at", target.isoformat(), "--yes", PROD_HOST=host)
    assert done.returncode == 0, done.stderr
    got = pg.psql("SELECT id FROM ticks ORDER BY id", DB).split()
    assert [int(i) for i in got] == [i for i, at in rows if at <= target]
    assert pg.psql("SELECT count(*) FROM other", DB) == "50"


def test_backup_drill_at_a_moment_reports_each_step_and_what_it_reached(world_):
    rows = settled_ticks(world_, 4)
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


# --- refusals and faults -------------------------------------------------------------------------------------
def prod_unchanged(world_):
    """What DB_NAME holds now, to compare after a run that must change nothing (the ticker paused meanwhile)."""
    return world_.prod_sql("SELECT count(*), max(id) FROM ticks", DB) + world_.prod_sql(
        "SELECT datname FROM pg_database ORDER BY 1"
    )


def test_a_moment_outside_the_window_in_the_future_or_not_a_time_is_exit_2_naming_the_window(world_):
    before_backup = datetime(2020, 1, 1, tzinfo=UTC)
    for at, said in (
        (before_backup.isoformat(), "is outside the window: recoverable from "),
        ((datetime.now(UTC) + timedelta(hours=1)).isoformat(), "is in the future (now: "),
        ("2026-13-45 10:00", "is not a time"),
        ("2026-12-06T10:00:00", "is not a time"),  # no offset: ambiguous
    ):
        done = world_.laptop("restore-production-db", "--at", at, "--yes")
        assert done.returncode == 2, (at, done.stderr)
        error = done.stderr.strip().splitlines()[-1]
        assert said in error, (at, done.stderr)
        assert "not a time" in said or re.search(r": recoverable from 20\S+ \S+ UTC to 20\S+ \S+ UTC", error), error
    assert not list((world_.dir / "recovered").glob(f"*{datetime.now(UTC):%Y%m%d}*.sql.gz.partial*"))


def test_a_laptop_clock_ahead_of_the_pi5s_is_told_the_pi5s_now_and_window(world_):
    """The laptop reads TIME but never judges it by its own clock: the pi5, which holds the WAL, does."""
    ahead = datetime.now(UTC) + timedelta(minutes=10)
    a_second_ago_there = (ahead - timedelta(seconds=1)).isoformat()
    done = world_.laptop("restore-production-db", "--at", a_second_ago_there, "--yes", at=f"{ahead:%Y-%m-%d %H:%M:%S}")
    assert done.returncode == 2, done.stderr
    pi5_now = re.search(r"on the pi5: --at .* is in the future \(now: (\S+ \S+) UTC\): recoverable from ", done.stderr)
    assert pi5_now, done.stderr
    assert abs(datetime.fromisoformat(pi5_now[1]).replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    assert "-- give a moment inside it, or latest" in done.stderr


def archive_segment(world_, name: str) -> Path:
    """`name`, once complete, archived in wals/ by pitr-cron as cron runs it."""
    archived = world_.dir / "home" / "prod" / "wals" / name[:16] / name
    for _ in range(300):
        if archived.exists():
            return archived
        world_.on_pi("pitr-cron")
        time.sleep(0.2)
    raise AssertionError(f"{name} was not archived")


def test_wal_missing_for_the_moment_is_exit_3_naming_the_latest_reachable_moment(world_):
    switched = datetime.fromisoformat(
        world_.prod_sql("SELECT pg_switch_wal() IS NOT NULL, clock_timestamp()").split("|")[1]
    )
    time.sleep(1)  # ticks in the next segment, the one that goes missing
    missing = world_.prod_sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    world_.prod_sql("SELECT pg_switch_wal() FROM (SELECT pg_logical_emit_message(false, 'kw', 'x')) m")
    archived = archive_segment(world_, missing)
    time.sleep(0.5)
    rows = ticks(world_)
    aside = world_.base / archived.name
    shutil.move(archived, aside)
    try:
        done = world_.laptop("restore-production-db", "--at", "latest", "--yes")
        assert done.returncode == 3, done.stderr
        line = done.stderr.strip().splitlines()[-1]
        assert "is missing: the latest reachable moment is " in line, line
        reachable = datetime.fromisoformat(line.split("the latest reachable moment is ", 1)[1].split(" ", 1)[0])
        # The newest commit before the missing segment: the last tick before the switch (or a heartbeat after it).
        last_before = max(at for _, at in rows if at < switched)
        assert last_before <= reachable <= switched, (last_before, reachable, switched)
        assert ticks(world_)[: len(rows)] == rows  # prod as it was
    finally:
        shutil.move(aside, archived)


def test_a_moment_after_the_last_commit_of_a_quiet_prod_holds_every_row(world_):
    with world_.ticker.paused():
        rows = ticks(world_)
        time.sleep(2)
        target = rows[-1][1] + timedelta(seconds=1)  # no commit after it: the WAL's end is the moment
        done = world_.on_pi("pitr-recover", "--at", target.isoformat())
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert recovered_ticks(Path(found["dir"]) / found["name"]) == [i for i, _ in rows]


def run_dirs(world_) -> list[Path]:
    """This world's recovery run directories, and socket directories in /tmp that no live run holds (other
    worlds' runs, of other test workers, hold theirs)."""
    return [
        *world_.dir.glob("kw-recover-run-*"),
        *(d for d in Path("/tmp").glob("kw-recover-socket-*") if world.flock_held(d) is False),
    ]


def test_pitr_recover_killed_at_each_step_leaves_nothing_after_the_next_run(world_):
    steps = {
        "barman restore": lambda: any(
            p.name == "data" for d in world_.dir.glob("kw-recover-run-*") for p in d.iterdir()
        ),
        "replay": lambda: any((d / "data" / "postmaster.pid").exists() for d in world_.dir.glob("kw-recover-run-*")),
        "pg_dump": lambda: any(world_.dir.joinpath("recovered").glob("*/.*")),
    }
    target = between(settled_ticks(world_, 2), 2)
    for step, reached in steps.items():
        # A step of this small database can pass between two looks (pg_dump takes a moment): a run that ended
        # before it was seen is run again, until one is killed in it.
        for _ in range(10):
            argv, env = world_.pi_argv("pitr-recover", "--at", target.isoformat())
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while not reached() and proc.poll() is None:
                assert time.monotonic() < deadline, step
                time.sleep(0.01)
            if proc.poll() is None:
                break
        else:
            raise AssertionError(f"pitr-recover ended before {step}, ten times")
        os.kill(proc.pid, 9)
        proc.wait(10)
        for pid in pgrep(world_, "pitr-recover"):  # and the script under the runuser wrapper: a whole job killed
            os.kill(int(pid), 9)
    assert run_dirs(world_)  # what the killed runs left: their servers still up
    done = world_.on_pi("pitr-recover", "--at", target.isoformat())
    assert done.returncode == 0, done.stderr
    assert not run_dirs(world_), run_dirs(world_)
    assert not list((world_.dir / "recovered").glob("*/.*"))  # the killed runs' partial dumps went


def test_backup_drill_and_the_restores_at_a_moment_of_the_nas_copy_recover_it_on_this_machine(world_, fresh_prod):
    """The nas holds the WAL tier as the pi5's nightly orchestrator copied it; --from nas (the restores'
    --from-nas) recovers it here."""
    settled_ticks(world_, 3)
    segment = world_.prod_sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    time.sleep(1)
    switched = datetime.now(UTC)
    world_.prod_sql("SELECT pg_switch_wal() FROM (SELECT pg_logical_emit_message(false, 'kw', 'x')) m")
    archive_segment(world_, segment)
    rows = [r for r in ticks(world_) if r[1] < switched]  # the ones in the segments the nas gets
    prod_dumps, nas_dir = world_.base / "nas-prod-dumps", world_.base / "nas"
    world.synthetic_dump(prod_dumps, "db-2024-01-15.sql.gz", rows=10, random_bytes=True)
    world_.pi_own(prod_dumps)
    saved = dict(world_.pi5_settings)
    world_.write_pi5_env(
        PROD_HOST="local", PROD_DIR=str(prod_dumps), PI5_HOST="local", PI5_DIR=str(world_.base / "pi5-dumps"),
        NAS_HOST="local", NAS_DIR=str(nas_dir), MIN_DUMP_BYTES="100", MAX_DUMP_AGE_HOURS="1000000",
    )  # fmt: skip
    try:
        copied = world_.on_pi("backup-orchestrator")
        assert copied.returncode == 0, copied.stdout + copied.stderr
    finally:
        world_.pi5_settings.clear()
        world_.write_pi5_env(**saved)
    target = between(rows, 3)
    done = world_.laptop(
        "backup-drill", "--from", "nas", "--at", target.isoformat(), NAS_HOST="local", NAS_DIR=str(nas_dir)
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "source:   the nas's WAL tier" in done.stdout
    assert f"rows:     {50 + len([1 for _, at in rows if at <= target])}" in done.stdout, done.stdout
    after = datetime.now(UTC) - timedelta(seconds=0.2)  # past the nas's newest WAL: outside its window
    late = world_.laptop(
        "backup-drill", "--from", "nas", "--at", after.isoformat(), NAS_HOST="local", NAS_DIR=str(nas_dir)
    )
    assert late.returncode == 2 and "outside the window" in late.stderr, late.stderr
    future = world_.laptop(
        "backup-drill", "--from", "nas", "--at", f"{datetime.now(UTC) + timedelta(hours=1):%Y-%m-%d %H:%M}",
        NAS_HOST="local", NAS_DIR=str(nas_dir),
    )  # fmt: skip
    assert future.returncode == 2 and "is in the future (now: " in future.stderr, future.stderr
    assert ": recoverable from " in future.stderr, future.stderr
    # The restores take the nas's copy too: one table back, its dump kept on prod; and a fresh prod.
    kept = world_.base / "nas-kept"
    back = world_.laptop(
        "restore-production-db", "--at", target.isoformat(), "--from-nas", "--table", "public.ticks",
        "--into", "from_nas", "--keep-dump", "--yes", NAS_HOST="local", NAS_DIR=str(nas_dir), PROD_DIR=str(kept),
    )  # fmt: skip
    assert back.returncode == 0, back.stderr
    assert [int(i) for i in world_.prod_sql("SELECT id FROM from_nas.ticks ORDER BY id", DB).split()] == [
        i for i, at in rows if at <= target
    ]
    name = f"kw_app_production-{target:%Y%m%d-%H%M%S}.sql.gz"
    assert sorted(p.name for p in kept.iterdir()) == [name, name + ".json"]
    host, pg = fresh_prod
    fresh = world_.laptop(
        "setup-fresh-production-db", "--at", target.isoformat(), "--from-nas", "--yes",
        NAS_HOST="local", NAS_DIR=str(nas_dir), PROD_HOST=host,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    assert [int(i) for i in pg.psql("SELECT id FROM ticks ORDER BY id", DB).split()] == [
        i for i, at in rows if at <= target
    ]
    world_.prod_sql("DROP SCHEMA from_nas CASCADE", DB)  # the monthly drill's nightly dump would hold it
    a_recovery_here_killed_with_9_leaves_nothing_after_the_next_run(world_, nas_dir, target)


def a_recovery_here_killed_with_9_leaves_nothing_after_the_next_run(world_, nas_dir: Path, target: datetime):
    """The nas's copy recovered on this machine: kill -9 of the script while its server replays. The next run
    stops that server and removes its run directory and the work directory with the base backup fetched."""
    nas = {"NAS_HOST": "local", "NAS_DIR": str(nas_dir)}
    argv = ["backup-drill", "--from", "nas", "--at", target.isoformat()]
    env = world_.laptop_env(**nas)
    others = set(Path("/tmp").glob("kw-recover-run-*"))  # other test workers' runs
    proc = subprocess.Popen([str(world.BIN / argv[0]), *argv[1:]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (
        ours := [d for d in Path("/tmp").glob("kw-recover-run-*/data/postmaster.pid") if d.parents[1] not in others]
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "the recovery never started its server"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    run_dir = ours[0].parents[1]
    works = world_.base / f"kw-backup-{os.geteuid()}"
    assert run_dir.exists() and list(works.glob("work.*"))  # what the killed run left
    again = world_.laptop(*argv, **nas)
    assert again.returncode == 0, again.stderr
    assert not run_dir.exists() and not list(works.glob("work.*"))
    assert not subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).stdout


def pgrep(world_, script: str) -> list[str]:
    """The pids of this world's installed `script`: each test worker has an install of its own, and another
    worker's world runs the same scripts as the same user."""
    pattern = f"{world_.install.bin}/{script}"
    return subprocess.run(
        ["pgrep", "-u", world_.pi.pw_name, "-f", pattern], capture_output=True, text=True
    ).stdout.split()


def ancestors(pid: int) -> list[int]:
    found = []
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        found.append(pid)
    return found


def test_the_link_to_the_pi5_lost_mid_recovery_is_exit_1_and_changes_nothing(world_):
    target = between(settled_ticks(world_, 2), 2)
    with world_.ticker.paused():
        before = world_.prod_sql("SELECT count(*), max(id) FROM ticks", DB)
        env = world_.laptop_env()
        proc = subprocess.Popen(
            [str(world.ROOT / "bin" / "restore-production-db"), "--at", target.isoformat(), "--yes"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not any((d / "data").exists() for d in world_.dir.glob("kw-recover-run-*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        # The link drops: the pi5's sshd session serving pitr-recover dies, and with it the laptop's connection.
        recovering = int(pgrep(world_, "pitr-recover")[0])
        session = next(p for p in ancestors(recovering) if "sshd" in Path(f"/proc/{p}/comm").read_text())
        os.kill(session, 9)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        assert len([line for line in err.splitlines() if "error: " in line]) == 1, err
        assert world_.prod_sql("SELECT count(*), max(id) FROM ticks", DB) == before
        assert not [
            d for d in world_.prod_sql("SELECT datname FROM pg_database").split() if d.startswith(f"{DB}_restore_")
        ]
    # The pi5's side stops once its ssh session is gone, and cleans up.
    deadline = time.monotonic() + 30
    while pgrep(world_, "pitr-recover"):
        assert time.monotonic() < deadline, "pitr-recover went on without the laptop"
        time.sleep(0.1)
    assert not run_dirs(world_)
    again = world_.on_pi("pitr-recover", "--at", target.isoformat())
    assert again.returncode == 0, again.stderr
    assert not run_dirs(world_)


def test_the_laptop_killed_while_the_pi5_holds_its_moment_lets_the_pi5_remove_it_at_once(world_):
    """kill -9 of restore-production-db --at at its confirmation: the pi5 removes the moment it held for it then,
    not a day later, and prod is as it was."""
    target = between(settled_ticks(world_, 2), 2)
    with world_.ticker.paused():
        before = world_.prod_sql("SELECT count(*), max(id) FROM ticks", DB)
        env = world_.laptop_env()
        main_fd, child_fd = pty.openpty()
        proc = subprocess.Popen(
            [str(world.BIN / "restore-production-db"), "--at", target.isoformat()],
            env=env, stdin=child_fd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        os.close(child_fd)
        said = bytearray()

        def read() -> None:
            while chunk := proc.stderr.read1():
                said.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 300
        while b"Type its name" not in said:  # the prompt, which has no newline: read as it comes
            assert proc.poll() is None and time.monotonic() < deadline, said.decode()
            time.sleep(0.1)
        held = list((world_.dir / "recovered").glob("held-*/*.sql.gz"))
        assert len(held) == 1, held
        proc.kill()
        proc.wait()
        os.close(main_fd)
        reader.join(10)
        deadline = time.monotonic() + 30
        while held[0].parent.exists() or pgrep(world_, "pitr-recover"):
            assert time.monotonic() < deadline, "the pi5 kept the moment of a laptop that is gone"
            time.sleep(0.1)
        assert world_.prod_sql("SELECT count(*), max(id) FROM ticks", DB) == before


def test_the_monthly_drill_proves_the_wal_tier_too(world_):
    """backup-drill --from pi5 with PITR=on: the newest dump, then the WAL tier at latest and mid-window."""
    nightly = world_.base / "pi5-nightly"
    env_file = world.write_env(world_.base / "backup-db.env", {
        "DB_EXEC": "direct", "DB_HOST": str(world_.pg.sockets), "DB_PORT": str(world_.pg.port),
        "DB_USER": "postgres", "PROD_DIR": str(nightly), "LOG_FILE": str(world_.base / "backup-db.log"),
        "MIN_DUMP_BYTES": "100",
    })  # fmt: skip
    made = world.run_script(
        "backup-db", env={"PATH": world.SYSTEM_PATH, "HOME": "/root", "KW_BACKUP_ENV": str(env_file)}
    )
    assert made.returncode == 0, made.stderr
    world_.pi_own(nightly)
    report = world_.base / "monthly.jsonl"
    done = world_.laptop("backup-drill", "--from", "pi5", "--report", str(report), PI5_DIR=str(nightly))
    assert done.returncode == 0, done.stderr + done.stdout
    dump, latest, middle = [json.loads(line) for line in report.read_text().splitlines()]
    assert dump["result"] == "ok" and "at" not in dump and dump["dump"].startswith("db-")
    assert (latest["result"], latest["at"], latest["compared_with"]) == ("ok", "latest", dump["dump"]), latest
    assert middle["result"] == "ok" and middle["compared_with"] == dump["dump"], middle
    assert datetime.fromisoformat(middle["at"]) < datetime.fromisoformat(latest["reached"])


def test_one_table_back_at_a_moment_and_the_whole_moment_beside_touch_nothing_else(world_):
    """The UPDATE without WHERE at 09:12: ticks as it was at the moment, into a new schema; every other table as
    it is now. And the moment whole beside DB_NAME, never swapped."""
    rows = settled_ticks(world_, 5)
    target = between(rows, 5)
    other = world_.prod_sql("SELECT md5(string_agg(id || note, ',' ORDER BY id)) FROM other", DB)
    done = world_.laptop(
        "restore-production-db", "--at", target.isoformat(), "--table", "public.ticks", "--into", "at_moment", "--yes"
    )
    assert done.returncode == 0, done.stderr
    assert [int(i) for i in world_.prod_sql("SELECT id FROM at_moment.ticks ORDER BY id", DB).split()] == [
        i for i, at in rows if at <= target
    ]
    live = [int(i) for i in world_.prod_sql("SELECT id FROM public.ticks ORDER BY id", DB).split()]
    assert live[: len(rows)] == [i for i, _ in rows]  # the live table as it is now, its new rows too
    assert world_.prod_sql("SELECT md5(string_agg(id || note, ',' ORDER BY id)) FROM other", DB) == other
    assert "INSERT INTO" in done.stdout  # the SQL that copies rows back
    kept = world_.base / "beside-kept"
    beside = world_.laptop(
        "restore-production-db", "--at", target.isoformat(), "--beside", "--keep-dump", "--yes", PROD_DIR=str(kept)
    )
    assert beside.returncode == 0, beside.stderr
    copy = f"{DB}_at_{target:%Y%m%d%H%M%S}"
    assert [int(i) for i in world_.prod_sql("SELECT id FROM ticks ORDER BY id", copy).split()] == [
        i for i, at in rows if at <= target
    ]
    name = f"kw_app_production-{target:%Y%m%d-%H%M%S}.sql.gz"
    assert sorted(p.name for p in kept.iterdir()) == [name, name + ".json"]


def test_latest_after_prod_stopped_hard_restores_the_last_seconds_received(world_):
    """The last test of the module: prod dies mid-write, as a server lost at 18:04."""
    time.sleep(1)
    world_.pg.stop()  # -m immediate: no shutdown checkpoint, the ticker's last inserts in flight
    world_.ticker.stop()
    done = world_.on_pi("pitr-recover", "--at", "latest")
    world_.pg.run_server()
    assert done.returncode == 0, done.stderr
    rows = ticks(world_)  # what prod itself kept (its own WAL replayed at restart)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    got = recovered_ticks(Path(found["dir"]) / found["name"])
    assert rows[len(got) - 1][1] <= datetime.fromisoformat(found["reached"])  # the newest commit replayed, named
    assert got == [i for i, _ in rows[: len(got)]]  # a prefix of prod's rows, nothing invented
    lost = [at for i, at in rows if i not in set(got)]
    assert not lost or (rows[-1][1] - min(lost)).total_seconds() < 1.0, (len(lost), lost[:3])
