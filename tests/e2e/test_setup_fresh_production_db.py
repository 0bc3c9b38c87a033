"""bin/setup-fresh-production-db: a backup restored into an empty server's DB_NAME, nothing left behind.

The laptop runs the script; prod is a freshly provisioned server over ssh (Docker and PostgreSQL only,
nothing of kw-backup: tests/conftest.py `remote_prod`), the nas a real sshd place, the pi5 local.
"""

import gzip
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests import world
from tests.damage import content, databases, forge_manifest, spoil, with_sql_error

USER = pwd.getpwuid(os.geteuid()).pw_name
# Around the real dump, made today (db-<today>.sql.gz): NEWER sorts after it and is not future-dated.
OLDER, NEWER = "db-2024-01-01.sql.gz", datetime.now(UTC).strftime("db-%Y-%m-%d-000001.sql.gz")


@pytest.fixture
def laptop(remote_prod):
    """The laptop: prod and the nas over ssh, a private TMPDIR, and what runs had left on prod before this one."""
    net = remote_prod
    net.before = staging_dirs()
    net.laptop_tmp = tempfile.mkdtemp(prefix="kwt-")  # short: ssh control sockets live in it
    yield net
    shutil.rmtree(net.laptop_tmp)


@pytest.fixture
def fresh(laptop, pg, db):
    """A real dump of `db` (laptop.dump, in PROD_DIR); DB_NAME then names a database the server lacks."""
    made = laptop.run("backup-db")
    assert made.returncode == 0, made.stderr
    laptop.dump = Path(made.stdout.strip().splitlines()[-1])
    laptop.expected = pg.row_counts(db)
    laptop.settings["DB_NAME"] = f"{db}_fresh"
    return laptop


def place_real_dump(net, directory: Path) -> None:
    directory.mkdir(mode=0o700, exist_ok=True)
    for suffix in ("", ".json"):
        shutil.copyfile(f"{net.dump}{suffix}", directory / (net.dump.name + suffix))


def staging_dirs() -> set[str]:
    """What runs left in prod's TMPDIR (this session's places' own: compared before and after)."""
    return world.staging_leftovers()


def run(net, *args):
    """The script with a private TMPDIR on the laptop, so that what it leaves there is seen."""
    return net.run("setup-fresh-production-db", *args, env=net.env(TMPDIR=net.laptop_tmp))


def files_in(directory) -> list[str]:
    """What a run left under `directory`: the private directory and lock file it keeps for the next run do not count."""
    return [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names if not f.endswith(".lock")]


def assert_nothing_left(net) -> None:
    left = files_in(net.settings["WORK_DIR"]) + os.listdir(net.laptop_tmp)
    assert not left, f"left on the laptop: {left}"
    assert staging_dirs() <= net.before, f"left on prod: {staging_dirs() - net.before}"


def test_default_takes_the_latest_on_the_nas(fresh, pg, db):
    place_real_dump(fresh, fresh.nas_dir)
    world.synthetic_dump(fresh.nas_dir, OLDER, rows=10)
    world.synthetic_dump(fresh.pi5_dir, NEWER, rows=10)  # newer, but the nas comes first
    result = run(fresh, "--yes")
    assert result.returncode == 0, result.stderr
    assert content(pg, f"{db}_fresh") == content(pg, db) and fresh.expected == world.RAILS_TABLE_ROWS
    assert fresh.dump.name in result.stderr and "taking the pi5" not in result.stderr
    assert "parallel load: loaded with" in result.stderr  # RESTORE_JOBS by default: a session per core
    assert databases(pg, db) == [db, f"{db}_fresh"]
    assert_nothing_left(fresh)


@pytest.mark.parametrize("nas", ["unreachable", "empty"])
def test_the_pi5_when_the_nas_is_unreachable_or_empty(fresh, pg, db, nas):
    if nas == "unreachable":
        fresh.settings["NAS_HOST"] = "gone"
    else:
        fresh.nas_dir.mkdir(mode=0o700)
    place_real_dump(fresh, fresh.pi5_dir)
    result = run(fresh, "--yes")
    assert result.returncode == 0, result.stderr
    assert "taking the pi5 instead" in result.stderr
    assert pg.row_counts(f"{db}_fresh") == fresh.expected
    assert_nothing_left(fresh)


def test_from_nas_does_not_fall_back_to_the_pi5(fresh, pg, db):
    fresh.settings["NAS_HOST"] = "gone"
    place_real_dump(fresh, fresh.pi5_dir)
    result = run(fresh, "--from-nas", "--yes")
    assert result.returncode == 1, result.stderr
    assert "unreachable" in result.stderr and databases(pg, db) == [db]
    assert_nothing_left(fresh)


def test_from_nas_with_a_named_dump(fresh, pg, db):
    place_real_dump(fresh, fresh.nas_dir)
    world.synthetic_dump(fresh.nas_dir, OLDER, rows=1234)
    result = run(fresh, "--from-nas", "--dump", OLDER, "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(f"{db}_fresh") == {"public.t": 1234}
    assert_nothing_left(fresh)


def test_from_pi5_takes_its_latest_even_when_the_nas_has_dumps(fresh, pg, db):
    place_real_dump(fresh, fresh.nas_dir)
    world.synthetic_dump(fresh.pi5_dir, OLDER, rows=1111)
    world.synthetic_dump(fresh.pi5_dir, NEWER, rows=2222)
    os.utime(fresh.pi5_dir / OLDER)  # the newest by mtime is the older one: the name decides
    result = run(fresh, "--from-pi5", "--dump", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(f"{db}_fresh") == {"public.t": 2222}
    assert_nothing_left(fresh)


def test_a_nas_whose_newest_dump_fails_gives_way_to_the_pi5_saying_why(fresh, pg, db):
    place_real_dump(fresh, fresh.nas_dir)
    world.synthetic_dump(fresh.nas_dir, OLDER, rows=10)  # older and verified: never taken in the newest's place
    spoil(fresh.nas_dir / fresh.dump.name, "junk")
    place_real_dump(fresh, fresh.pi5_dir)
    result = run(fresh, "--yes")
    assert result.returncode == 0, result.stderr
    assert f"no dump to take on the nas ({fresh.dump.name} on nas failed verification: its size" in result.stderr
    assert "taking the pi5 instead" in result.stderr
    assert pg.row_counts(f"{db}_fresh") == fresh.expected
    assert_nothing_left(fresh)


@pytest.mark.parametrize("damage", ["junk", "flip"])  # the listing shows it; only the check here finds it
def test_from_nas_with_a_bad_newest_dump_stops_naming_the_pi5_copy(fresh, pg, db, damage):
    place_real_dump(fresh, fresh.nas_dir)
    world.synthetic_dump(fresh.nas_dir, OLDER, rows=10)
    place_real_dump(fresh, fresh.pi5_dir)
    spoil(fresh.nas_dir / fresh.dump.name, damage)
    result = run(fresh, "--from-nas", "--yes")
    assert result.returncode == 3, result.stderr
    copy = f"-- a verified copy of {fresh.dump.name} is on pi5: setup-fresh-production-db --from-pi5 --dump "
    assert copy + fresh.dump.name in result.stderr
    assert databases(pg, db) == [db]
    assert_nothing_left(fresh)


def test_from_file(fresh, pg, db):
    mine = fresh.tmp / "mine.sql.gz"
    shutil.copyfile(fresh.dump, mine)
    result = run(fresh, "--from-file", str(mine), "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(f"{db}_fresh") == fresh.expected
    assert mine.read_bytes() == fresh.dump.read_bytes()  # the given file is left as it was
    assert_nothing_left(fresh)


def test_from_ssh(fresh, pg, db):
    remote = fresh.tmp / "elsewhere"
    place_real_dump(fresh, remote)
    result = run(fresh, "--from-ssh", f"{USER}@old-prod:{remote / fresh.dump.name}", "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(f"{db}_fresh") == fresh.expected
    assert sorted(os.listdir(remote)) == [fresh.dump.name, fresh.dump.name + ".json"]
    assert_nothing_left(fresh)


@pytest.mark.parametrize(
    "given, status",
    [
        ("old-prod:/tmp/x.sql.gz; touch /tmp/pwned", 1),
        ("-oProxyCommand=touch /tmp/pwned:/tmp/x.sql.gz", 2),
        ("old-prod:relative/x.sql.gz", 2),
    ],
)
def test_from_ssh_refuses_what_is_not_user_host_path_and_runs_no_shell(fresh, pg, db, given, status):
    result = run(fresh, "--from-ssh", given, "--yes")
    assert result.returncode == status and "Traceback" not in result.stderr, result.stderr
    assert not os.path.exists("/tmp/pwned") and databases(pg, db) == [db]
    assert_nothing_left(fresh)


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "db-2024-01-01.sql.gz; touch /tmp/pwned"])
@pytest.mark.parametrize("source", [[], ["--from-nas"], ["--from-pi5"]])
def test_hostile_dump_names_exit_2_and_run_nothing(laptop, hostile, source):
    laptop.settings["DB_EXEC"] = "docker"
    result = run(laptop, *source, "--dump", hostile, "--yes")
    assert result.returncode == 2, result.stderr
    assert "is not a dump name" in result.stderr
    assert not laptop.standin_log.exists() and not os.path.exists("/tmp/pwned")
    assert not Path(laptop.settings["WORK_DIR"]).exists() and not os.listdir(laptop.laptop_tmp)


def test_an_existing_empty_database_is_filled(fresh, pg, db):
    pg.create_db(f"{db}_fresh")
    place_real_dump(fresh, fresh.nas_dir)
    result = run(fresh, "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(f"{db}_fresh") == fresh.expected
    assert_nothing_left(fresh)


def test_refuses_a_database_that_holds_tables_unless_force(fresh, pg, db):
    fresh.settings["DB_NAME"] = db
    world.synthetic_dump(fresh.nas_dir, OLDER, rows=1234)
    refused = run(fresh, "--yes")
    assert refused.returncode == 1, refused.stderr
    assert "already holds tables" in refused.stderr and "--force" in refused.stderr
    assert pg.row_counts(db) == fresh.expected and databases(pg, db) == [db]
    assert_nothing_left(fresh)

    forced = run(fresh, "--yes", "--force")
    assert forced.returncode == 0, forced.stderr
    assert pg.row_counts(db) == {"public.t": 1234}
    previous = [n for n in databases(pg, db) if n.startswith(f"{db}_before_restore_")]
    assert len(previous) == 1 and pg.row_counts(previous[0]) == fresh.expected
    assert_nothing_left(fresh)


def test_dry_run_changes_nothing(fresh, pg, db):
    place_real_dump(fresh, fresh.nas_dir)
    result = run(fresh, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"[dry-run] would restore {fresh.dump.name}" in result.stderr
    assert databases(pg, db) == [db]
    assert_nothing_left(fresh)


def test_no_terminal_and_no_yes_exits_5(fresh, pg, db):
    place_real_dump(fresh, fresh.nas_dir)
    result = run(fresh)
    assert result.returncode == 5, result.stderr
    assert "--yes" in result.stderr and databases(pg, db) == [db]
    assert_nothing_left(fresh)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])


def add_sql_error(path: Path) -> None:
    path.write_bytes(gzip.compress(with_sql_error(gzip.decompress(path.read_bytes()))))


@pytest.mark.parametrize("damage, status, says", [(truncate, 3, "corrupt"), (add_sql_error, 1, "no_such_function")])
def test_a_failure_leaves_nothing_behind(fresh, pg, db, damage, status, says):
    place_real_dump(fresh, fresh.nas_dir)
    dump = fresh.nas_dir / fresh.dump.name
    damage(dump)
    forge_manifest(dump)
    result = run(fresh, "--yes")
    assert result.returncode == status, result.stderr
    assert says in result.stderr
    assert databases(pg, db) == [db]
    assert_nothing_left(fresh)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_mid_restore_cleans_up_and_exits_128_plus_n(fresh, pg, db, signum):
    place_real_dump(fresh, fresh.nas_dir)
    proc = subprocess.Popen(
        [str(world.BIN / "setup-fresh-production-db"), "--yes"],
        env=fresh.env(TMPDIR=fresh.laptop_tmp),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if " restoring into " in line:
            os.killpg(proc.pid, signum)  # a closed terminal: the whole group
            break
    lines.extend(proc.stderr)
    code = proc.wait(60)
    restored = f"{db}_fresh" in databases(pg, db)
    assert code in (128 + signum, -signum) or (code == 0 and restored), "".join(lines)
    assert not restored or pg.row_counts(f"{db}_fresh") == fresh.expected  # nothing half-made under DB_NAME
    assert not [n for n in databases(pg, db) if "_restore_" in n]
    assert_nothing_left(fresh)
