"""Restores loading in parallel (RESTORE_JOBS sessions, issue 15): the same database as one session, on
pagila, through restore-production-db on a prod without kw-backup (docker) and through backup-drill."""

import os
import shutil
import uuid

import pytest

from tests import world
from tests.conftest import backup_db_dump
from tests.damage import rewrite
from tests.e2e.test_parallel_load import same_database


@pytest.fixture(scope="module")
def pagila_dump(tmp_path_factory, pg, pagila_db):
    return backup_db_dump(tmp_path_factory, pg, pagila_db)


def test_pagila_restored_in_four_sessions_equals_one_session(remote_prod, pg, pagila_dump):
    kw = remote_prod
    kw.prod_dir.mkdir(mode=0o700, parents=True)
    for suffix in ("", ".json"):
        shutil.copy(f"{pagila_dump}{suffix}", kw.prod_dir / (pagila_dump.name + suffix))
    made = {}
    try:
        for jobs in ("1", "4"):
            made[jobs] = kw.settings["DB_NAME"] = f"pagila_j{jobs}_{uuid.uuid4().hex[:6]}"
            kw.settings["RESTORE_JOBS"] = jobs
            result = kw.run("restore-production-db", "--local", "latest", "--yes")
            assert result.returncode == 0, result.stderr
            assert "as the manifest says" in result.stderr
            assert ("parallel load: loaded with 4 sessions" in result.stderr) == (jobs == "4")
            assert "one session" not in result.stderr
        same_database(pg, made["1"], made["4"])
        sequences = "SELECT string_agg(format('%s %s', sequencename, last_value), ',' ORDER BY 1) FROM pg_sequences"
        assert pg.psql(sequences, made["1"]) == pg.psql(sequences, made["4"])
        calls = world.standin_calls(kw.fresh_prod.standin_log)
        assert len([c for c in calls if c[-2:] == ["-A", "-t"] and c[-3].startswith(made["4"])]) == 4
    finally:
        for name in made.values():
            pg.drop_db(name)


def test_the_drill_loads_pagila_in_parallel(kw, pagila_dump):
    kw.settings.update(RESTORE_JOBS="4", DRILL_LOG=str(kw.tmp / "drill.log"))
    result = kw.run("backup-drill", "--from-file", str(pagila_dump), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "parallel load: loaded with 4 sessions" in result.stderr and "result:   ok" in result.stdout


@pytest.fixture(scope="module")
def bare_prod(ssh_world, pg, tmp_path_factory):
    """A prod whose logins find no python3: the system's programs but python, and the docker stand-in."""
    base = tmp_path_factory.mktemp("bare-prod-bin")
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        for name in os.listdir(directory):
            if not name.startswith("python") and not (base / name).exists():
                (base / name).symlink_to(os.path.join(directory, name))
    docker = base / "docker"
    docker.unlink(missing_ok=True)
    docker.write_text(f'#!/bin/sh\nexec /usr/bin/python3 {world.STANDINS / "docker"} "$@"\n')
    docker.chmod(0o755)
    # HOME: not the machine's own, whose shell start-up files may put a python3 (pyenv) on PATH
    sshd = ssh_world.add_place(
        "bare-prod", "127.0.0.8", str(base), {**pg.env, "STANDIN_LOG": str(base / "docker.log"), "HOME": str(base)}
    )
    sshd.standin_log = base / "docker.log"
    found = ssh_world.ssh("bare-prod", "command -v python3 || echo none")
    assert found.stdout.strip() == "none", found.stdout
    return sshd


def test_a_prod_without_python3_loads_in_one_session_saying_so(remote_prod, pg, db, bare_prod, template_dump):
    kw = remote_prod
    kw.settings["PROD_HOST"] = "bare-prod"
    kw.prod_dir.mkdir(mode=0o700, parents=True)
    for suffix in ("", ".json"):
        shutil.copy(f"{template_dump}{suffix}", kw.prod_dir / (template_dump.name + suffix))
    pg.psql("DELETE FROM orders WHERE id > 1500", db)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert "no python3 (3.6 or newer) on prod: loading in one session" in result.stderr
    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS
    calls = world.standin_calls(bare_prod.standin_log)
    assert [c for c in calls if "--single-transaction" in c]


@pytest.fixture(scope="module")
def template_dump(pg, tmp_path_factory):
    return backup_db_dump(tmp_path_factory, pg, "kw_template")


def test_no_single_transaction_is_needed_the_new_database_is_dropped_on_failure(remote_prod, pg, db, template_dump):
    """A key violation found in the post-data (the rows loaded, the primary key cannot be made): exit 1,
    the entry named, the half-made database dropped, DB_NAME as it was."""
    kw = remote_prod
    kw.prod_dir.mkdir(mode=0o700, parents=True)
    for suffix in ("", ".json"):
        shutil.copy(f"{template_dump}{suffix}", kw.prod_dir / (template_dump.name + suffix))
    target = kw.prod_dir / template_dump.name
    rewrite(target, lambda sql: sql.replace(b"\n2\tuser2@example.com\t", b"\n1\tuser2@example.com\t", 1))
    pg.psql("DELETE FROM orders WHERE id > 1500", db)
    before = pg.row_counts(db)
    result = kw.run("restore-production-db", "--local", "latest", "--yes")
    assert result.returncode == 1, result.stderr
    assert "loading CONSTRAINT public.users users_pkey" in result.stderr
    assert "could not create unique index" in result.stderr
    assert pg.row_counts(db) == before
    assert not [n for n in pg.psql("SELECT datname FROM pg_database").split() if n.startswith(f"{db}_restore_")]
