"""bin/restore-production-db: a restore completes and is verified, or DB_NAME is exactly as it was.

prod is a freshly provisioned server over ssh (tests/conftest.py `remote_prod`: nothing of
kw-backup on its PATH, the database through the docker stand-in) unless a test says otherwise.
"""

import gzip
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests import world
from tests.damage import databases, forge_manifest, rewrite, spoil, with_sql_error


@pytest.fixture(scope="session")
def template_dump(pg, tmp_path_factory):
    """backup-db's dump of the Rails-like template (what every `db` starts as), made once."""
    base = tmp_path_factory.mktemp("template-dump")
    env_file = world.write_env(
        base / "backup.env",
        {"DB_NAME": "kw_template", "DB_EXEC": "direct", "PROD_HOST": "local", "PROD_DIR": base / "backups"},
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KW_", "PG", "DB_", "PROD_"))},
        **pg.env,
        "KW_BACKUP_ENV": str(env_file),
        "KW_BACKUP_SYSLOG": str(base / "no-syslog"),
    }
    result = world.run_script("backup-db", env=env)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def dumped(remote_prod, pg, db, template_dump):
    """A real dump of `db` in PROD_DIR, then a change to the data that a restore must undo."""
    remote_prod.prod_dir.mkdir(mode=0o700, parents=True)
    for suffix in ("", ".json"):
        shutil.copy(f"{template_dump}{suffix}", remote_prod.prod_dir / (template_dump.name + suffix))
    pg.psql("DELETE FROM orders WHERE id > 1500; UPDATE users SET name = 'changed'", db)
    return str(remote_prod.prod_dir / template_dump.name)


def state(pg, db):
    """What a test compares before and after: the rows, and every database's name."""
    return (pg.row_counts(db), pg.psql("SELECT md5(string_agg(name, ',' ORDER BY id)) FROM users", db))


def leftovers(pg, db):
    return [n for n in pg.psql("SELECT datname FROM pg_database").split() if n.startswith(f"{db}_restore_")]


def staging_dirs():
    return sorted(world.staging_leftovers())


def test_restores_the_dump_and_keeps_the_old_database(kw, pg, db, dumped):
    pg.psql(
        f"ALTER DATABASE {db} SET statement_timeout = '5min'; CREATE ROLE kw_app_reader; "
        f"GRANT CONNECT ON DATABASE {db} TO kw_app_reader"
    )
    try:
        result = kw.run("restore-production-db", "--local", "latest", "--yes")
        assert result.returncode == 0, result.stderr
        assert pg.row_counts(db) == world.RAILS_TABLE_ROWS
        assert pg.psql("SELECT count(*) FROM users WHERE name = 'changed'", db) == "0"
        previous = [
            n for n in pg.psql("SELECT datname FROM pg_database").split() if n.startswith(f"{db}_before_restore_")
        ]
        assert len(previous) == 1 and pg.psql("SELECT count(*) FROM orders", previous[0]) == "1500"
        settings = pg.psql(
            f"SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
            f"WHERE datname = '{db}'"
        )
        assert settings == "{statement_timeout=5min}"
        assert pg.psql(f"SELECT has_database_privilege('kw_app_reader', '{db}', 'CONNECT')") == "t"
        assert not leftovers(pg, db) and not staging_dirs()
        assert "as the manifest says" in result.stderr
    finally:
        pg.psql("DROP ROLE IF EXISTS kw_app_reader", check=False)


def test_drop_previous(kw, pg, db, dumped):
    result = kw.run("restore-production-db", "--local", os.path.basename(dumped), "--yes", "--drop-previous")
    assert result.returncode == 0, result.stderr
    assert not [n for n in pg.psql("SELECT datname FROM pg_database").split() if n.startswith(f"{db}_before_restore_")]


def test_truncated_dump_leaves_db_as_it_was(kw, pg, db, dumped):
    data = open(dumped, "rb").read()
    open(dumped, "wb").write(data[: len(data) - 200])  # gzip fails at the very end, after most was applied
    forge_manifest(dumped)
    before = state(pg, db)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 3, result.stderr
    assert "damaged" in result.stderr
    assert state(pg, db) == before and not leftovers(pg, db) and not staging_dirs()


def test_sql_error_in_the_middle_leaves_db_as_it_was(kw, pg, db, dumped):
    rewrite(dumped, with_sql_error)
    before = state(pg, db)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 1, result.stderr
    assert "no_such_function" in result.stderr
    assert state(pg, db) == before and not leftovers(pg, db)


def test_missing_role_is_named_before_loading(kw, pg, db, dumped):
    rewrite(dumped, lambda sql: sql.replace(b"OWNER TO postgres;", b"OWNER TO kw_ghost_role;", 1))
    before = state(pg, db)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 1
    assert "roles kw_ghost_role" in result.stderr and "CREATE ROLE" in result.stderr
    assert state(pg, db) == before and not leftovers(pg, db)


def test_kill_9_mid_restore_then_a_normal_run_cleans_up(remote_prod, pg, db, big_db):
    kw = remote_prod
    kw.settings["DB_NAME"] = big_db
    made = kw.run("backup-db", timeout=300)
    assert made.returncode == 0, made.stderr
    before = pg.row_counts(big_db)
    proc = subprocess.Popen(
        [str(world.BIN / "restore-production-db"), "--local", "latest", "--yes"],
        env=kw.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not pg.psql(
        f"SELECT 1 FROM pg_stat_activity WHERE query LIKE 'COPY public.events%' AND datname LIKE '{big_db}_restore_%'"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert pg.row_counts(big_db) == before
    result = kw.run("restore-production-db", "--local", "latest", "--yes", "--drop-previous", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "half-made database left by an interrupted restore" in result.stderr
    assert pg.row_counts(big_db) == before and not leftovers(pg, big_db) and not staging_dirs()


def test_a_link_dropped_mid_load_stops_the_load_on_prod_and_changes_nothing(remote_prod, pg, db, big_db):
    """The loader runs on prod under the ssh login that drops: it and its psql sessions end there (no load goes
    on for ever on prod), the script fails, DB_NAME is as it was, and the next run cleans up. (The loader's own
    stop when its output is gone is test_parallel_load's test_a_loader_whose_caller_is_gone_...)"""
    kw = remote_prod
    kw.settings["DB_NAME"] = big_db
    made = kw.run("backup-db", timeout=300)
    assert made.returncode == 0, made.stderr
    before = pg.row_counts(big_db)
    proc = start_restore(kw)
    loading = f"SELECT 1 FROM pg_stat_activity WHERE datname LIKE '{big_db}\\_restore\\_%' AND query LIKE 'COPY %'"
    wait_for(lambda: pg.psql(loading), 120, "the load")
    assert kw.fresh_prod.drop_sessions() > 0
    assert proc.wait(120) == 1, "".join(proc.lines)
    sessions = f"SELECT 1 FROM pg_stat_activity WHERE datname LIKE '{big_db}\\_restore\\_%'"
    wait_for(lambda: not pg.psql(sessions), 60, "the load's sessions on prod to end")
    assert pg.row_counts(big_db) == before
    result = kw.run("restore-production-db", "--local", "latest", "--yes", "--drop-previous", timeout=600)
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(big_db) == before and not leftovers(pg, big_db) and not staging_dirs()


def test_the_cleanup_spares_a_staging_directory_another_run_has_just_made(kw, pg, db, dumped):
    """Between its mktemp and its lock a directory has no .lock yet: a restore of another database on the
    same server may be there. Only an hour later is such a directory a dead run's."""
    young = Path(tempfile.mkdtemp(prefix="kw-restore.", dir=world.PLACES_TMP))  # in prod's TMPDIR
    old = Path(tempfile.mkdtemp(prefix="kw-restore.", dir=world.PLACES_TMP))
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    try:
        result = kw.run("restore-production-db", "--local", "latest", "--yes")
        assert result.returncode == 0, result.stderr
        assert young.is_dir() and not old.exists()
    finally:
        shutil.rmtree(young, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def test_the_apps_sessions_are_ended_at_swap_time(kw, pg, db, dumped):
    app = subprocess.Popen(
        ["psql", "-X", "-d", db, "-c", "SELECT pg_sleep(600)"],
        env={**os.environ, **pg.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not pg.psql(f"SELECT 1 FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE '%pg_sleep%'"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert app.wait(timeout=30) != 0  # its session was terminated
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "db-2024-01-01.sql.gz; touch /tmp/pwned"])
@pytest.mark.parametrize("option", ["--local", "--from-nas", "--from-pi5"])
def test_hostile_names_exit_2_and_run_nothing(kw, pg, db, option, hostile):
    kw.settings["DB_EXEC"] = "docker"
    result = kw.run("restore-production-db", option, hostile, "--yes")
    assert result.returncode == 2 and "is not a dump name" in result.stderr
    assert not kw.standin_log.exists() and not os.path.exists("/tmp/pwned")


def test_no_terminal_and_no_yes_exits_5_changing_nothing(kw, pg, db, dumped):
    before = state(pg, db)
    result = kw.run("restore-production-db", "--local", "latest")
    assert result.returncode == 5 and "--yes" in result.stderr
    assert state(pg, db) == before and not leftovers(pg, db)


def test_dry_run_changes_nothing(kw, pg, db, dumped):
    before = state(pg, db)
    result = kw.run("restore-production-db", "--local", "latest", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "[dry-run] would restore" in result.stderr
    assert state(pg, db) == before and not leftovers(pg, db)


def test_stop_app_starts_it_again_also_on_failure(kw, pg, db, dumped):
    rewrite(dumped, with_sql_error)
    result = kw.run("restore-production-db", "--local", "latest", "--yes", "--stop-app")
    assert result.returncode == 1
    assert world.standin_calls(kw.standin_log) == [
        ["kamal", "app", "stop", "-d", "production"],
        ["kamal", "app", "start", "-d", "production"],
    ]


@pytest.mark.parametrize("jobs", ["1", None])
@pytest.mark.parametrize("mode", ["docker", "kamal"])
def test_docker_and_kamal_command_lines(kw, pg, db, dumped, mode, jobs):
    """RESTORE_JOBS=1: one psql in one transaction; by default one session per core (at most 4)."""
    kw.settings["DB_EXEC"] = mode
    if jobs:
        kw.settings["RESTORE_JOBS"] = jobs
    result = kw.run("restore-production-db", "--local", "latest", "--yes", env=kw.env(PGPASSWORD="hunter2-secret"))
    assert result.returncode == 0, result.stderr
    log = kw.fresh_prod.standin_log if mode == "docker" else kw.standin_log  # docker runs on prod, kamal here
    calls = world.standin_calls(log)
    assert "hunter2-secret" not in log.read_text()
    psql = ["psql", "-U", "postgres", "--no-password", "-X", "-v", "ON_ERROR_STOP=1", "-d"]
    if jobs == "1":
        loads = [c for c in calls if "--single-transaction" in c]
        assert len(loads) == 1
        assert loads[0][-2:] == ["--single-transaction", "-e"]
    else:
        loads = [c for c in calls if c[-2:] == ["-A", "-t"] and "_restore_" in c[-3]]
        assert len(loads) == min(4, os.cpu_count()) and not [c for c in calls if "--single-transaction" in c]
        assert "parallel load: loaded with" in result.stderr
    for load in loads:
        if mode == "docker":
            assert load[:4] == ["docker", "exec", "-i", "kw-app-postgres"] and load[4:12] == psql
        else:
            assert load[:8] == ["kamal", "accessory", "exec", "--reuse", "-i", "-d", "production", "postgres"]
            assert load[8:16] == psql
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS


def test_from_the_nas_over_ssh_streamed_to_prod(kw, pg, db, dumped):
    made = os.path.basename(dumped)
    kw.nas_dir.mkdir(mode=0o700)
    for suffix in ("", ".json"):
        os.link(dumped + suffix, kw.nas_dir / (made + suffix))
    result = kw.run("restore-production-db", "--from-nas", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS and not staging_dirs()


def test_direct_on_prod_without_kw_backup(kw, pg, db, dumped):
    kw.settings["DB_EXEC"] = "direct"  # prod's own psql (the login's PG* reach the server)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS and not staging_dirs()
    assert "size and sha256 as its manifest says" in result.stderr


def test_from_file_over_ssh_to_prod_and_a_named_dump_that_does_not_exist(kw, pg, db, dumped, tmp_path):
    copy = tmp_path / "mine.sql.gz"
    copy.write_bytes(open(dumped, "rb").read())
    result = kw.run("restore-production-db", "--from-file", str(copy), "--yes")
    assert result.returncode == 0, result.stderr
    assert "gzip stream and completion line (no manifest)" in result.stderr
    assert "tables, newest record" in result.stderr
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS and not staging_dirs()
    missing = kw.run("restore-production-db", "--local", "db-2020-01-01.sql.gz", "--yes")
    assert missing.returncode == 1 and "not on prod" in missing.stderr


def test_not_enough_disk_on_prod_stops_before_changing_anything(kw, tmp_path):
    """A server whose data directory is on a small filesystem with too little room for a second copy."""
    base = Path(tempfile.mkdtemp(prefix="kwtest-small-"))
    disk = world.Tmpfs(base, "200m", mode="0755")
    small = world.Postgres(base)
    try:
        small.start()
        small.create_db("kw_small")
        small.psql(
            world.RAILS_SCHEMA + "CREATE TABLE blobs AS SELECT repeat(md5(i::text), 30) AS v "
            "FROM generate_series(1, 30000) i;",
            "kw_small",
        )
        kw.settings["DB_NAME"] = "kw_small"
        env = kw.env(PGHOST=str(small.sockets), PGPORT=str(small.port))
        assert kw.run("backup-db", env=env).returncode == 0
        free = os.statvfs(base).f_bavail * os.statvfs(base).f_frsize
        with open(base / "ballast", "wb") as ballast:  # leave less than the database's size free
            ballast.write(b"\0" * max(0, free - 4 * 1024 * 1024))
        before = small.row_counts("kw_small")
        result = kw.run("restore-production-db", "--local", "latest", "--yes", env=env)
        assert result.returncode == 1, result.stderr
        assert "not enough space on prod for a second copy of kw_small" in result.stderr
        assert small.row_counts("kw_small") == before
        assert not [n for n in small.psql("SELECT datname FROM pg_database").split() if "_restore_" in n]
    finally:
        small.stop()
        disk.close()
        shutil.rmtree(base, ignore_errors=True)


def run_on_a_terminal(kw, answer: str, *args: str) -> tuple[int, str]:
    """Run the script with a pseudo-terminal as stdin, typing `answer` at its prompt."""
    import pty

    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [str(world.BIN / "restore-production-db"), *args],
        env=kw.env(),
        stdin=child_fd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(child_fd)
    os.write(main_fd, answer.encode() + b"\n")
    out, err = proc.communicate(timeout=120)
    os.close(main_fd)
    return proc.returncode, err


def test_typing_the_database_name_confirms(kw, pg, db, dumped):
    code, err = run_on_a_terminal(kw, db, "--local", "latest")
    assert code == 0, err
    assert "Type its name to go on" in err and pg.row_counts(db) == world.RAILS_TABLE_ROWS


def test_typing_something_else_declines_with_exit_5(kw, pg, db, dumped):
    before = state(pg, db)
    code, err = run_on_a_terminal(kw, "yes", "--local", "latest")
    assert code == 5 and "not confirmed" in err
    assert state(pg, db) == before and not leftovers(pg, db)


def test_two_restores_at_once(remote_prod, pg, big_db, tmp_path):
    kw = remote_prod
    kw.settings["DB_NAME"] = big_db
    assert kw.run("backup-db", timeout=300).returncode == 0
    # The first restore is held at its swap (a lock on DB_NAME's catalog entry) for as long as the others take: a
    # load that merely runs meanwhile can end before the second laptop asks (CI's faster load did).
    lock = world.HeldTransaction(pg, "postgres", f"COMMENT ON DATABASE {big_db} IS 'held'")
    try:
        first = subprocess.Popen(
            [str(world.BIN / "restore-production-db"), "--local", "latest", "--yes", "--drop-previous"],
            env=kw.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: swap_waiting(pg), 120, "the first restore's swap waiting on the server")
        same_laptop = kw.run("restore-production-db", "--local", "latest", "--yes")
        assert same_laptop.returncode == 4, same_laptop.stderr
        kw.settings["WORK_DIR"] = str(tmp_path / "another-laptop")
        other_laptop = kw.run("restore-production-db", "--local", "latest", "--yes")
        assert other_laptop.returncode == 4 and "is running on prod" in other_laptop.stderr
    finally:
        lock.end("ROLLBACK", check=False)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err


def test_a_shared_work_dir_keeps_its_mode(kw, pg, db, dumped, tmp_path):
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    kw.settings["WORK_DIR"] = str(shared)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert shared.stat().st_mode & 0o7777 == 0o1777


def test_a_dump_from_a_newer_pg_dump_is_refused(kw, pg, db, dumped):
    rewrite(dumped, lambda sql: sql.replace(b"-- Dumped by pg_dump version 15", b"-- Dumped by pg_dump version 99", 1))
    before = state(pg, db)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 1, result.stderr
    assert "made by pg_dump 99.18, newer than prod's server (PostgreSQL 15." in result.stderr
    assert state(pg, db) == before and not leftovers(pg, db) and not staging_dirs()


def test_a_missing_extension_is_named_before_loading(kw, pg, db, dumped):
    rewrite(
        dumped,
        lambda sql: sql.replace(
            b"\nCREATE TABLE", b"\nCREATE EXTENSION IF NOT EXISTS kw_no_such_ext WITH SCHEMA public;\n\nCREATE TABLE", 1
        ),
    )
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 1 and "extensions kw_no_such_ext" in result.stderr
    assert not leftovers(pg, db)


def test_stop_app_around_a_good_restore(kw, pg, db, dumped):
    result = kw.run("restore-production-db", "--local", "latest", "--yes", "--stop-app")
    assert result.returncode == 0, result.stderr
    assert world.standin_calls(kw.standin_log) == [
        ["kamal", "app", "stop", "-d", "production"],
        ["kamal", "app", "start", "-d", "production"],
    ]
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS


def test_from_the_pi5_when_it_is_local(kw, pg, db, dumped):
    pi5 = kw.tmp / "pi5"
    pi5.mkdir(mode=0o700)
    for suffix in ("", ".json"):
        shutil.copy(dumped + suffix, pi5 / (os.path.basename(dumped) + suffix))
    result = kw.run("restore-production-db", "--from-pi5", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS


ROLES = ["kw app, reader", 'kw "quoted" role', "kw o'brien"]


def carried(pg, dbname):
    """What a restore carries over: per-role and database settings, grants (exploded), owner, connection limit."""
    return (
        pg.psql(
            "SELECT coalesce(setrole::regrole::text, '-') || ' ' || setconfig::text FROM pg_db_role_setting s "
            f"JOIN pg_database d ON d.oid = s.setdatabase WHERE datname = '{dbname}' ORDER BY 1"
        ),
        pg.psql(
            "SELECT string_agg(format('%s %s %s', "
            "CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, "
            "a.privilege_type, a.is_grantable), '; ' ORDER BY 1) FROM pg_database d, aclexplode(d.datacl) a "
            f"WHERE datname = '{dbname}'"
        ),
        pg.psql(f"SELECT datdba::regrole::text || ' ' || datconnlimit FROM pg_database WHERE datname = '{dbname}'"),
    )


def test_settings_grants_and_owner_are_carried_over_by_the_server(kw, pg, db, dumped):
    quoted = ['"' + r.replace('"', '""') + '"' for r in ROLES]
    pg.psql("; ".join(f"CREATE ROLE {q}" for q in quoted))
    try:
        pg.psql(
            f"ALTER DATABASE {db} SET search_path = app, public;"
            f"ALTER DATABASE {db} SET statement_timeout = '5min';"
            f"ALTER ROLE {quoted[0]} IN DATABASE {db} SET work_mem = '8MB';"
            f'ALTER ROLE {quoted[2]} IN DATABASE {db} SET search_path = "my schema", public;'
            f"REVOKE ALL ON DATABASE {db} FROM PUBLIC; GRANT CONNECT ON DATABASE {db} TO {', '.join(quoted)};"
            f"GRANT CREATE ON DATABASE {db} TO {quoted[1]} WITH GRANT OPTION;"
            f"ALTER DATABASE {db} OWNER TO {quoted[1]}; ALTER DATABASE {db} CONNECTION LIMIT 40"
        )
        before = carried(pg, db)
        assert "search_path=app, public" in before[0] and "kw o'brien" in before[1]
        result = kw.run("restore-production-db", "--local", "latest", "--yes")
        assert result.returncode == 0, result.stderr
        assert pg.row_counts(db) == world.RAILS_TABLE_ROWS
        assert carried(pg, db) == before
        assert pg.psql("SHOW search_path", db) == "app, public"  # a list, not the one identifier "app, public"
        previous = [
            n for n in pg.psql("SELECT datname FROM pg_database").split() if n.startswith(f"{db}_before_restore_")
        ]
        assert len(previous) == 1 and carried(pg, previous[0]) == before
    finally:
        for name in databases(pg, db):
            pg.drop_db(name)
        pg.psql("; ".join(f"DROP ROLE IF EXISTS {q}" for q in quoted))


def test_latest_when_the_only_dump_fails_verification_says_which_and_why(kw, pg, db, dumped):
    data = open(dumped, "rb").read()
    open(dumped, "wb").write(data[: len(data) - 200])
    before = state(pg, db)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 3, result.stderr
    name = os.path.basename(dumped)
    assert f"{name} on prod failed verification: its size {len(data) - 200} differs" in result.stderr
    assert f"no place holds a verified copy of {name}, nor any other verified dump (list-backups)" in result.stderr
    assert state(pg, db) == before and not leftovers(pg, db)


@pytest.mark.parametrize(
    "damage, says",
    [
        ("junk", " on prod failed verification: its size"),  # the listing shows it: size differs from its manifest
        ("flip", ": sha256 differs from the manifest's"),  # same size: only the full check on prod finds it
    ],
)
def test_latest_with_a_bad_newest_dump_stops_naming_the_nas_copy_and_never_takes_an_older_one(
    kw, pg, db, dumped, damage, says
):
    name = os.path.basename(dumped)
    kw.nas_dir.mkdir(mode=0o700)
    for suffix in ("", ".json"):
        shutil.copy(dumped + suffix, kw.nas_dir / (name + suffix))
    world.synthetic_dump(kw.prod_dir, "db-2024-01-01.sql.gz", rows=10)  # older and verified: not taken by itself
    spoil(dumped, damage)
    before = state(pg, db)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 3, result.stderr
    assert f"{name}{says}" in result.stderr, result.stderr
    assert f"-- a verified copy of {name} is on nas: restore-production-db --from-nas {name}" in result.stderr
    assert state(pg, db) == before and not leftovers(pg, db) and not staging_dirs()
    named = kw.run("restore-production-db", "--local", "db-2024-01-01.sql.gz", "--yes")
    assert named.returncode == 0, named.stderr
    assert pg.row_counts(db) == {"public.t": 10}


def test_latest_takes_a_newest_dump_without_a_manifest_saying_so(kw, pg, db, dumped):
    world.synthetic_dump(kw.prod_dir, "db-2024-01-01.sql.gz", rows=10)
    os.unlink(dumped + ".json")
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert f"{os.path.basename(dumped)} on prod has no manifest: taking it unverified" in result.stderr
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS


@pytest.mark.parametrize(
    "damage, says",
    [
        ("flip", "sha256 differs from the manifest's"),  # same size, other bytes: the listing cannot tell
        ("truncate-unverified", "corrupt gzip stream"),  # no manifest: the whole gzip stream is read on prod
        ("incomplete-unverified", "incomplete dump: pg_dump's completion line is missing"),
    ],
)
def test_a_bad_dump_is_named_on_prod_with_exit_3_before_anything(kw, pg, db, dumped, damage, says):
    data = bytearray(open(dumped, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate-unverified":
        data = data[: len(data) - 200]
    else:
        data = gzip.compress(gzip.decompress(bytes(data)).replace(b"-- PostgreSQL database dump complete", b"--"))
    open(dumped, "wb").write(bytes(data))
    if damage != "flip":
        os.unlink(dumped + ".json")
    before = state(pg, db)
    result = kw.run("restore-production-db", "--local", os.path.basename(dumped), "--yes")
    assert result.returncode == 3, result.stderr
    assert f"{os.path.basename(dumped)}: {says}" in result.stderr, result.stderr
    assert state(pg, db) == before and not leftovers(pg, db)


def test_a_restore_running_from_another_machine_holds_prod_exit_4_changing_nothing(kw, pg, db, dumped):
    """Another machine's run holds the server's lock and has a half-made database: neither is touched."""
    half = pg.create_db(f"{db}_restore_20240101000000")
    holder = subprocess.Popen(
        ["psql", "-X", "-q", "-At", "-d", "postgres"],
        env={**os.environ, **pg.env},
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    holder.stdin.write(f"SELECT pg_advisory_lock(hashtext('kw-backup restore'), hashtext('{db}')) IS NULL;\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "f"  # pg_advisory_lock returns void: held
    try:
        before = state(pg, db)
        result = kw.run("restore-production-db", "--local", "latest", "--yes")
        assert result.returncode == 4, result.stderr
        assert "another restore of" in result.stderr and "is running on prod" in result.stderr
        assert state(pg, db) == before and leftovers(pg, db) == [half]
    finally:
        holder.stdin.close()
        holder.wait(30)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")  # the other run is gone now
    assert result.returncode == 0, result.stderr
    assert f"dropping {half}, a half-made database left by an interrupted restore" in result.stderr
    assert not leftovers(pg, db)


def start_restore(kw, *args):
    """restore-production-db in its own session (a terminal of its own), its stderr lines collected as they come."""
    proc = subprocess.Popen(
        [str(world.BIN / "restore-production-db"), "--local", "latest", "--yes", *args],
        env=kw.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    proc.lines = []
    threading.Thread(target=lambda: proc.lines.extend(proc.stderr), daemon=True).start()
    return proc


def wait_for(condition, seconds: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def accepts_connections_within_10s(pg, db) -> None:
    deadline = time.monotonic() + 10
    while pg.psql("SELECT 1", db, check=False) != "1":
        assert time.monotonic() < deadline, f"{db} does not accept connections 10 s after"
        time.sleep(0.1)


def app_calls(kw) -> list[str]:
    return [c[2] for c in world.standin_calls(kw.standin_log) if c[:2] == ["kamal", "app"]]


def stop(proc, how: str) -> None:
    """kill -9 of everything it started, SIGHUP as a closed terminal sends it (to the group), SIGTERM to the script."""
    if how == "SIGKILL":
        os.killpg(proc.pid, signal.SIGKILL)
    elif how == "SIGHUP":
        os.killpg(proc.pid, signal.SIGHUP)
    else:
        os.kill(proc.pid, signal.SIGTERM)


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.4])
@pytest.mark.parametrize("how", ["SIGKILL", "SIGHUP", "SIGTERM", "dropped link"])
def test_a_signal_around_the_swap_leaves_db_name_old_or_new_and_open(kw, pg, db, dumped, how, delay):
    old, new = state(pg, db), (world.RAILS_TABLE_ROWS, None)
    proc = start_restore(kw, "--stop-app")
    wait_for(lambda: any(" restored " in line for line in proc.lines), what="the load's end")
    time.sleep(delay)
    if how == "dropped link":
        kw.fresh_prod.drop_sessions()
    else:
        stop(proc, how)
    code = proc.wait(60)
    accepts_connections_within_10s(pg, db)
    now = state(pg, db)
    assert now == old or now[0] == new[0], now
    if how == "dropped link":
        assert code in (0, 1), "".join(proc.lines)
        assert app_calls(kw) == ["stop", "start"], "".join(proc.lines)
    elif how != "SIGKILL":
        # Done before the signal came: 0; or, during the interpreter's exit, killed by it (a shell sees 128 + n too).
        assert code in (0, 128 + signal.Signals[how], -signal.Signals[how]), "".join(proc.lines)
        assert app_calls(kw) == ["stop", "start"], "".join(proc.lines)
        assert not leftovers(pg, db) and not staging_dirs()


def swap_waiting(pg) -> bool:
    return (
        pg.psql("SELECT 1 FROM pg_stat_activity WHERE application_name = 'kw-backup swap' AND wait_event_type = 'Lock'")
        == "1"
    )


@pytest.mark.parametrize("how", ["SIGKILL", "SIGHUP", "SIGTERM", "dropped link"])
def test_once_the_server_has_the_swap_it_completes_whatever_happens_to_the_script(kw, pg, db, dumped, how):
    # A lock on DB_NAME's catalog entry (as COMMENT takes it), so the swap waits on the server.
    lock = world.HeldTransaction(pg, "postgres", f"COMMENT ON DATABASE {db} IS 'held'")
    try:
        proc = start_restore(kw, "--stop-app")
        wait_for(lambda: swap_waiting(pg), what="the swap waiting on the server")
        if how == "dropped link":
            assert kw.fresh_prod.drop_sessions() > 0
        else:
            stop(proc, how)
        time.sleep(0.5)
    finally:
        lock.end("ROLLBACK", check=False)
    code = proc.wait(60)
    accepts_connections_within_10s(pg, db)
    wait_for(lambda: not swap_waiting(pg), 10, "the swap to end")
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS  # the server completed it
    assert pg.psql("SELECT count(*) FROM users WHERE name = 'changed'", db) == "0"
    if how == "dropped link":
        assert code == 0, "".join(proc.lines)
        assert "the server completed the swap" in "".join(proc.lines)
    elif how != "SIGKILL":
        assert code == 128 + signal.Signals[how], "".join(proc.lines)
    if how != "SIGKILL":
        assert app_calls(kw) == ["stop", "start"], "".join(proc.lines)
        assert not leftovers(pg, db) and not staging_dirs()
