"""bin/backup-db against the real PostgreSQL, as cron and operators run it."""

import gzip
import json
import os
import signal
import subprocess
import time

import pytest

from tests import world


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def plant(directory, name, data=b"x" * 2048, manifest=True):
    """An older dump (valid gzip of a complete dump) with its manifest."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = gzip.compress(b"--\n-- PostgreSQL database dump\n--\n" + data + b"\n-- PostgreSQL database dump complete\n")
    (directory / name).write_bytes(body)
    if manifest:
        (directory / (name + ".json")).write_text(
            json.dumps(
                {
                    "file": name,
                    "bytes": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                    "created_at": "2024-01-01T02:00:00Z",
                    "database": "kw",
                    "server_version": "15",
                    "pg_dump_version": "15",
                    "tables": {},
                    "tool_version": "0",
                }
            )
        )
    return directory / name


def snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()} if directory.exists() else {}


def test_backup_writes_a_verified_private_dump_with_manifest(kw, pg, db):
    result = kw.run("backup-db")
    assert result.returncode == 0, result.stderr
    path = last_line(result.stdout)
    assert os.path.dirname(path) == str(kw.prod_dir)
    assert os.path.basename(path) == time.strftime("db-%Y-%m-%d.sql.gz", time.gmtime())
    assert kw.prod_dir.stat().st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(path + ".json").st_mode & 0o777 == 0o600
    manifest = json.loads(open(path + ".json").read())
    assert list(manifest) == [
        "file",
        "bytes",
        "sha256",
        "created_at",
        "database",
        "server_version",
        "pg_dump_version",
        "tables",
        "tool_version",
    ]
    assert manifest["file"] == os.path.basename(path) and manifest["bytes"] == os.path.getsize(path)
    assert manifest["database"] == db and manifest["server_version"].startswith("15")
    assert manifest["tables"] == pg.row_counts(db) == world.RAILS_TABLE_ROWS
    assert manifest["created_at"].endswith("Z")
    check = kw.run("verify-backup", path)
    assert check.returncode == 0 and "verified" in check.stdout
    assert any("kw-backup[" in m and "wrote db-" in m for m in kw.syslog.messages)
    assert kw.dumps() == [".backup-db.lock", os.path.basename(path), os.path.basename(path) + ".json"]


def test_the_dump_restores_to_the_same_rows(kw, pg, db):
    path = last_line(kw.run("backup-db").stdout)
    copy = pg.create_db(db + "_copy")
    try:
        sql = gzip.decompress(open(path, "rb").read())
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", copy],
            input=sql,
            check=True,
            env={**os.environ, **pg.env},
            capture_output=True,
        )
        assert pg.row_counts(copy) == pg.row_counts(db)
        assert pg.psql(
            "SELECT md5(string_agg(details::text || coalesce(note, ''), ',' ORDER BY id)) FROM orders", copy
        ) == pg.psql("SELECT md5(string_agg(details::text || coalesce(note, ''), ',' ORDER BY id)) FROM orders", db)
    finally:
        pg.drop_db(copy)


def test_second_dump_of_the_day_gets_the_time_and_rotation_keeps_prod_keep(kw):
    plant(kw.prod_dir, "db-2020-01-01.sql.gz")
    plant(kw.prod_dir, "db-2020-01-02.sql.gz")
    foreign = ["notes.txt", "kw_app_production-20190101-000000.sql", "db-2019-01-01.sql.gz.bak"]
    for name in foreign:
        (kw.prod_dir / name).write_text("keep me")
    first = last_line(kw.run("backup-db").stdout)
    second = kw.run("backup-db")
    assert second.returncode == 0, second.stderr
    second_path = last_line(second.stdout)
    assert os.path.basename(second_path).startswith(time.strftime("db-%Y-%m-%d-", time.gmtime()))
    left = kw.dumps()
    assert os.path.basename(first) in left and os.path.basename(second_path) in left
    assert "db-2020-01-01.sql.gz" not in left and "db-2020-01-02.sql.gz" not in left
    assert "db-2020-01-02.sql.gz.json" not in left
    assert all(name in left for name in foreign)
    assert (
        "removed db-2020-01-02.sql.gz" in second.stderr
        or "removed db-2020-01-02.sql.gz" in kw.run("backup-db", "--dry-run").stderr + second.stderr
    )


def test_keep_flag_overrides_the_setting(kw):
    for day in ("01", "02", "03"):
        plant(kw.prod_dir, f"db-2020-01-{day}.sql.gz")
    kw.settings["PROD_KEEP"] = "1"
    result = kw.run("backup-db", "--keep", "3")
    assert result.returncode == 0, result.stderr
    assert [n for n in kw.dumps() if n.endswith(".gz")] == [
        "db-2020-01-02.sql.gz",
        "db-2020-01-03.sql.gz",
        os.path.basename(last_line(result.stdout)),
    ]


def test_invalid_dumps_do_not_count_toward_keep(kw):
    good = plant(kw.prod_dir, "db-2020-01-01.sql.gz")
    bad = plant(kw.prod_dir, "db-2020-01-02.sql.gz")
    bad.write_bytes(bad.read_bytes()[:-10])  # no longer matches its manifest
    kw.settings["PROD_KEEP"] = "2"
    result = kw.run("backup-db")
    assert result.returncode == 0, result.stderr
    assert good.exists() and bad.exists()
    assert "not counting db-2020-01-02.sql.gz" in result.stderr


def test_dry_run_changes_nothing_and_says_so(kw):
    result = kw.run("backup-db", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not kw.prod_dir.exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all("[dry-run]" in line for line in lines)
    plant(kw.prod_dir, "db-2020-01-01.sql.gz")
    plant(kw.prod_dir, "db-2020-01-02.sql.gz")
    plant(kw.prod_dir, "db-2020-01-03.sql.gz")
    before = snapshot(kw.prod_dir)
    result = kw.run("backup-db", "--dry-run")
    assert "[dry-run] would remove db-2020-01-01.sql.gz" in result.stderr
    assert snapshot(kw.prod_dir) == before


def old_dumps_intact(kw, before):
    after = snapshot(kw.prod_dir)
    after.pop(".backup-db.lock", None)
    before = dict(before)
    before.pop(".backup-db.lock", None)
    return after == before


@pytest.mark.parametrize("setting, value", [("DB_NAME", "no_such_database"), ("DB_PORT", "1")])
def test_pg_dump_failing_at_once_keeps_everything(kw, setting, value):
    for day in ("01", "02", "03"):
        plant(kw.prod_dir, f"db-2020-01-{day}.sql.gz")
    before = snapshot(kw.prod_dir)
    kw.settings[setting] = value
    kw.settings["PROD_KEEP"] = "1"
    result = kw.run("backup-db", env=kw.env(PGHOST="127.0.0.1") if setting == "DB_PORT" else None)
    assert result.returncode == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "pg_dump failed" in errors[0] and "no new dump kept" in errors[0]
    assert old_dumps_intact(kw, before)


def test_server_down(kw, pg):
    plant(kw.prod_dir, "db-2020-01-01.sql.gz")
    plant(kw.prod_dir, "db-2020-01-02.sql.gz")
    before = snapshot(kw.prod_dir)
    kw.settings["PROD_KEEP"] = "1"
    result = kw.run("backup-db", env=kw.env(PGHOST=str(kw.tmp / "no-server-here")))
    assert result.returncode == 1 and "pg_dump failed" in result.stderr
    assert old_dumps_intact(kw, before)


def wait_for(condition, timeout=30.0, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_pg_dump_dying_mid_stream_leaves_no_dump(kw, pg, big_db):
    plant(kw.prod_dir, "db-2020-01-01.sql.gz")
    plant(kw.prod_dir, "db-2020-01-02.sql.gz")
    before = snapshot(kw.prod_dir)
    kw.settings.update(DB_NAME=big_db, PROD_KEEP="1")
    proc = subprocess.Popen(
        [str(world.BIN / "backup-db")], env=kw.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pid = wait_for(
        lambda: pg.psql(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_dump' AND query LIKE 'COPY public.events%'"
        )
    )
    wait_for(lambda: any(".partial-" in n and os.path.getsize(kw.prod_dir / n) > 0 for n in kw.dumps()))
    pg.psql(f"SELECT pg_terminate_backend({pid})")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert out == "" and "pg_dump failed" in err and "no new dump kept" in err
    assert "terminat" in err  # pg_dump's own last words are shown
    assert old_dumps_intact(kw, before)


def test_disk_full_leaves_no_partial_file(kw, tmp_path):
    kw.prod_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(kw.prod_dir)], check=True)
    try:
        plant(kw.prod_dir, "db-2020-01-01.sql.gz", data=b"y" * 4096)
        before = snapshot(kw.prod_dir)
        kw.settings["PROD_KEEP"] = "1"
        result = kw.run("backup-db")
        assert result.returncode == 1, result.stderr
        assert "No space left on device" in result.stderr and "no new dump kept" in result.stderr
        assert old_dumps_intact(kw, before)
    finally:
        subprocess.run(["umount", str(kw.prod_dir)], check=True)


def test_kill_9_mid_dump_then_a_normal_run(kw, pg, big_db):
    plant(kw.prod_dir, "db-2020-01-01.sql.gz")
    kw.settings.update(DB_NAME=big_db, PROD_KEEP="1")
    proc = subprocess.Popen(
        [str(world.BIN / "backup-db")], env=kw.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for(lambda: any(".partial-" in n and os.path.getsize(kw.prod_dir / n) > 100_000 for n in kw.dumps()))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert [n for n in kw.dumps() if n.startswith("db-")] == ["db-2020-01-01.sql.gz", "db-2020-01-01.sql.gz.json"]
    # pg_dump and the compressor die of SIGPIPE once their reader is gone.
    wait_for(lambda: not pg.psql("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg_dump'"))
    result = kw.run("backup-db", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "left by an interrupted run" in result.stderr
    assert not any(".partial-" in n for n in kw.dumps())
    assert kw.run("verify-backup", last_line(result.stdout)).returncode == 0


def test_two_runs_at_once_one_exits_4(kw, big_db):
    kw.settings.update(DB_NAME=big_db)
    first = subprocess.Popen(
        [str(world.BIN / "backup-db")], env=kw.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: any(".partial-" in n for n in kw.dumps()))
    second = kw.run("backup-db")
    assert second.returncode == 4
    assert "another backup-db is running" in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert len([n for n in kw.dumps() if n.endswith(".sql.gz")]) == 1


@pytest.mark.parametrize(
    "setting, value",
    [
        ("PROD_KEEP", "0"),
        ("PROD_KEEP", "abc"),
        ("PROD_DIR", "relative/backups"),
        ("DB_EXEC", "bogus"),
    ],
)
def test_bad_settings_exit_2_before_touching_anything(kw, setting, value):
    kw.settings[setting] = value
    result = kw.run("backup-db")
    assert result.returncode == 2
    assert setting in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not kw.prod_dir.exists() and not kw.standin_log.exists()


def test_bad_keep_flag(kw):
    result = kw.run("backup-db", "--keep", "0")
    assert result.returncode == 2 and "PROD_KEEP" in result.stderr


def test_too_small_dump_is_a_failed_dump(kw):
    kw.settings["MIN_DUMP_BYTES"] = str(50 * 1024 * 1024)
    result = kw.run("backup-db")
    assert result.returncode == 1 and "MIN_DUMP_BYTES" in result.stderr
    assert not [n for n in kw.dumps() if n.startswith("db-")]


def test_docker_mode_exact_command_line_and_no_password(kw, db):
    kw.settings.update(DB_EXEC="docker")
    result = kw.run("backup-db", env=kw.env(PGPASSWORD="hunter2-secret"))
    assert result.returncode == 0, result.stderr
    calls = world.standin_calls(kw.standin_log)
    assert calls == [
        ["docker", "exec", "-i", "kw-app-postgres", "pg_dump", "-U", "postgres", "--no-password", "--format=plain", db]
    ]
    assert "hunter2-secret" not in kw.standin_log.read_text()
    assert kw.run("verify-backup", last_line(result.stdout)).returncode == 0


def test_kamal_mode_exact_command_line_and_no_password(kw, db):
    kw.settings.update(DB_EXEC="kamal", KAMAL_DESTINATION="production")
    result = kw.run("backup-db", env=kw.env(PGPASSWORD="hunter2-secret"))
    assert result.returncode == 0, result.stderr
    assert world.standin_calls(kw.standin_log) == [
        [
            "kamal",
            "accessory",
            "exec",
            "--reuse",
            "--raw",
            "-d",
            "production",
            "postgres",
            "pg_dump",
            "-U",
            "postgres",
            "--no-password",
            "--format=plain",
            db,
        ]
    ]
    assert "hunter2-secret" not in kw.standin_log.read_text()


def test_docker_container_missing(kw):
    kw.settings.update(DB_EXEC="docker", DB_CONTAINER="not-running")
    result = kw.run("backup-db")
    assert result.returncode == 1 and "No such container" in result.stderr


def test_runs_through_a_symlink_from_anywhere_without_the_venv(kw, tmp_path):
    link_dir = tmp_path / "usr-local-bin"
    link_dir.mkdir()
    (link_dir / "backup-db").symlink_to(world.BIN / "backup-db")
    env = kw.env()
    env["PATH"] = f"{link_dir}:/usr/local/bin:/usr/bin:/bin"
    result = subprocess.run(["backup-db"], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout).startswith(str(kw.prod_dir))


def test_help_and_common_flags(kw):
    result = kw.run("backup-db", "--help")
    assert result.returncode == 0
    for flag in ("--keep", "--dry-run", "--env-file", "--verbose", "--quiet"):
        assert flag in result.stdout
    quiet = kw.run("backup-db", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_env_file_flag(kw, tmp_path):
    other = world.write_env(tmp_path / "other.env", {**kw.settings, "PROD_DIR": str(tmp_path / "elsewhere")})
    env = kw.env()
    del env["KW_BACKUP_ENV"]
    result = kw.run("backup-db", "--env-file", str(other), env=env)
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout).startswith(str(tmp_path / "elsewhere"))


def test_calendar_retention_keeps_a_monthly_copy(kw):
    from datetime import date, timedelta

    for i in range(40):
        plant(kw.prod_dir, f"db-{date(2020, 1, 1) + timedelta(days=i)}.sql.gz")
    kw.settings.update(PROD_KEEP="2", PROD_KEEP_MONTHLY="3")
    result = kw.run("backup-db")
    assert result.returncode == 0, result.stderr
    planted = [n for n in kw.dumps() if n.startswith("db-2020") and n.endswith(".gz")]
    assert planted == ["db-2020-01-31.sql.gz", "db-2020-02-09.sql.gz"]  # January's newest, then KEEP's second
