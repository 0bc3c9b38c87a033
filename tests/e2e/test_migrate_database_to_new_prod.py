"""bin/migrate-database-to-new-prod: old-prod's newest dump restored into the new prod's DB_NAME.

old-prod is a real sshd place, only ever read; prod the new server before anything is set up there
(Docker and PostgreSQL only, nothing of kw-backup: tests/conftest.py `remote_prod`).
"""

import gzip
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import world
from tests.damage import content, databases, with_sql_error

NEWEST = "kw_app_production-20240105-120000.sql"  # plain SQL: a real dump of `db`, gunzipped
OLDER = "kw_app_production-20231201-090000.sql.gz"  # one table public.t of 1234 rows, the newer mtime


@pytest.fixture
def old_prod(remote_prod, pg, db):
    """old-prod's OLD_PROD_DIR under root's home (as ~/...) holding NEWEST and OLDER; DB_NAME is missing on prod."""
    net = remote_prod
    made = net.run("backup-db")
    assert made.returncode == 0, made.stderr
    real = Path(made.stdout.strip().splitlines()[-1])
    top = Path(pwd.getpwuid(os.geteuid()).pw_dir) / f"kwtest-{db}"
    net.old_dir = top / "baza_dump" / "sql"
    net.old_dir.mkdir(parents=True, mode=0o700)
    (net.old_dir / NEWEST).write_bytes(gzip.decompress(real.read_bytes()))
    os.utime(net.old_dir / NEWEST, (1e9, 1e9))  # by mtime OLDER is newer: the name decides
    world.synthetic_dump(net.old_dir, OLDER, rows=1234, manifest=False)
    net.settings.update(OLD_PROD_HOST="old-prod", OLD_PROD_DIR=f"~/{top.name}/baza_dump/sql", DB_NAME=f"{db}_new")
    net.expected = pg.row_counts(db)
    net.before = world.staging_leftovers()
    net.laptop_tmp = tempfile.mkdtemp(prefix="kwt-")  # short: ssh control sockets live in it
    yield net
    shutil.rmtree(top)
    shutil.rmtree(net.laptop_tmp)


def snapshot(directory: Path) -> dict:
    return {
        e.name: (hashlib.sha256(Path(e.path).read_bytes()).hexdigest(), e.stat().st_mtime_ns, e.stat().st_mode)
        for e in os.scandir(directory)
    }


def files_in(directory) -> list[str]:
    """What a run left under `directory`: the private directory and lock file it keeps for the next run do not count."""
    return [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names if not f.endswith(".lock")]


def migrate(net, *args):
    """Runs the script; whatever it did, old-prod's files are as they were and no temporary file stays."""
    untouched = snapshot(net.old_dir)
    result = net.run("migrate-database-to-new-prod", *args, env=net.env(TMPDIR=net.laptop_tmp))
    assert snapshot(net.old_dir) == untouched, f"old-prod's files changed\n{result.stderr}"
    left = files_in(net.settings["WORK_DIR"]) + os.listdir(net.laptop_tmp)
    left += sorted(world.staging_leftovers() - net.before)
    assert not left, f"left behind: {left}\n{result.stderr}"
    return result


def migration_dumps_on_prod(net) -> list[str]:
    return [n for n in net.dumps() if n.startswith("kw_app_production-")]


def test_migrates_the_newest_into_a_database_it_creates(old_prod, pg, db):
    result = migrate(old_prod, "--yes", "--verbose")
    assert result.returncode == 0, result.stderr
    # Its copies on old-prod (compressed) and prod (staged) were in their logins' TMPDIR, where migrate() looks.
    assert (
        f"{world.PLACES_TMP}/kw-migrate." in result.stderr
        and f"removed {world.PLACES_TMP}/kw-restore." in result.stderr
    )
    assert f"migrating {NEWEST}" in result.stderr
    assert "parallel load: loaded with" in result.stderr  # RESTORE_JOBS by default: a session per core
    assert content(pg, f"{db}_new") == content(pg, db) and old_prod.expected == world.RAILS_TABLE_ROWS
    assert databases(pg, db) == [db, f"{db}_new"] and not migration_dumps_on_prod(old_prod)


def test_dump_names_the_one_to_take(old_prod, pg, db):
    result = migrate(old_prod, "--dump", OLDER, "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(f"{db}_new") == {"public.t": 1234}
    missing = migrate(old_prod, "--dump", "kw_app_production-20200101-000000.sql", "--yes")
    assert missing.returncode == 1 and "is not in" in missing.stderr


def test_an_existing_database_is_kept_as_before_restore(old_prod, pg, db):
    old_prod.settings["DB_NAME"] = db
    pg.psql("DELETE FROM orders WHERE id > 1500", db)
    result = migrate(old_prod, "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(db) == old_prod.expected
    previous = [n for n in databases(pg, db) if n.startswith(f"{db}_before_restore_")]
    assert len(previous) == 1 and pg.psql("SELECT count(*) FROM orders", previous[0]) == "1500"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def add_sql_error(path: Path) -> None:
    path.write_bytes(with_sql_error(path.read_bytes()))


@pytest.mark.parametrize("damage, status", [(truncate, 3), (add_sql_error, 1)])
def test_a_failed_restore_leaves_the_database_as_it_was(old_prod, pg, db, damage, status):
    old_prod.settings["DB_NAME"] = db
    damage(old_prod.old_dir / NEWEST)
    result = migrate(old_prod, "--yes")
    assert result.returncode == status, result.stderr
    assert pg.row_counts(db) == old_prod.expected and databases(pg, db) == [db]


def test_dry_run_stops_after_download_and_verification(old_prod, pg, db):
    result = migrate(old_prod, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "verified the migration dump" in result.stderr and "[dry-run]" in result.stderr
    assert databases(pg, db) == [db] and pg.row_counts(db) == old_prod.expected


def test_no_terminal_and_no_yes_exits_5(old_prod, pg, db):
    result = migrate(old_prod)
    assert result.returncode == 5 and "--yes" in result.stderr
    assert databases(pg, db) == [db]


def test_keep_dump_keeps_it_on_prod_as_a_private_dump(old_prod, pg, db):
    result = migrate(old_prod, "--yes", "--keep-dump")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(f"{db}_new") == old_prod.expected
    assert migration_dumps_on_prod(old_prod) == [NEWEST + ".gz"]
    kept = old_prod.prod_dir / (NEWEST + ".gz")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(old_prod.prod_dir.stat().st_mode) == 0o700
    assert gzip.decompress(kept.read_bytes()) == (old_prod.old_dir / NEWEST).read_bytes()
    assert not [n for n in old_prod.dumps() if "partial" in n]


def test_an_encrypted_migration_dump_is_decrypted_on_the_laptop(old_prod, pg, db, tmp_path):
    key, public = world.age_key(tmp_path)
    encrypted = "kw_app_production-20240201-000000.sql.gz.age"  # the newest now
    subprocess.run(
        [
            "sh",
            "-c",
            'gzip -c -- "$1" | age -r "$2" > "$3"',
            "sh",
            str(old_prod.old_dir / NEWEST),
            public,
            str(old_prod.old_dir / encrypted),
        ],
        check=True,
    )
    without = migrate(old_prod, "--yes")
    assert without.returncode == 2 and "set AGE_IDENTITY_FILE" in without.stderr, without.stderr
    old_prod.settings["AGE_IDENTITY_FILE"] = str(key)
    result = migrate(old_prod, "--yes", "--keep-dump")
    assert result.returncode == 0, result.stderr
    assert f"migrating {encrypted}" in result.stderr
    assert content(pg, f"{db}_new") == content(pg, db)
    assert migration_dumps_on_prod(old_prod) == ["kw_app_production-20240201-000000.sql.gz"]  # kept plain


@pytest.mark.parametrize("hostile", ["../../etc/passwd", f"{NEWEST}; touch /tmp/pwned", f"../sql/{NEWEST}"])
def test_hostile_dump_names_exit_2_and_run_nothing(remote_prod, hostile):
    net = remote_prod
    net.settings.update(OLD_PROD_HOST="old-prod")
    result = net.run("migrate-database-to-new-prod", "--dump", hostile, "--yes")
    assert result.returncode == 2, result.stderr
    assert "is not a dump name" in result.stderr
    assert not net.standin_log.exists() and not os.path.exists("/tmp/pwned")
    assert not Path(net.settings["WORK_DIR"]).exists()
