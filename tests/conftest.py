"""Fixtures over the test world (tests/world.py): one PostgreSQL and one set of sshd places per
session, a fresh database and a fresh set of directories per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests import world

# Files whose tests make /tmp names no lock tells apart (kw-migrate.*, kw-backup-install.*) and check
# that none is left: under pytest-xdist (make test) each of them runs whole in one worker.
ONE_WORKER = {"test_migrate_database_to_new_prod.py", "test_install.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in ONE_WORKER:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


@pytest.fixture(scope="session")
def pg():
    # Not under pytest's tmp: that is private to root, and the server runs as another user.
    base = Path(tempfile.mkdtemp(prefix="kwtest-pg-"))
    server = world.Postgres(base).start()
    try:
        server.create_db("kw_template")
        server.psql(world.RAILS_SCHEMA, "kw_template")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def ssh_world(tmp_path_factory):
    places = world.SshWorld(tmp_path_factory.mktemp("ssh")).start()
    yield places
    places.stop()


@pytest.fixture
def db(pg):
    """A fresh copy of the Rails-like database, dropped after the test."""
    name = pg.create_db(f"kw_{uuid.uuid4().hex[:10]}", template="kw_template")
    yield name
    for (other,) in [(n,) for n in pg.psql(f"SELECT datname FROM pg_database WHERE datname LIKE '{name}%'").split()]:
        pg.drop_db(other)  # the database and what restores made of it


class Kw:
    """One test's kw-backup setup: directories, an env file, and a way to run the scripts."""

    def __init__(self, tmp: Path, pg: world.Postgres, db: str):
        self.tmp = tmp
        self.pg = pg
        self.prod_dir = tmp / "prod" / "backups"
        self.standin_log = tmp / "standin.log"
        self.syslog = world.Syslog(tmp / "syslog.sock")
        self.settings = {
            "DB_NAME": db, "DB_EXEC": "direct", "PROD_HOST": "local", "PROD_DIR": str(self.prod_dir),
            "PI5_HOST": "local", "PI5_DIR": str(tmp / "pi5"), "NAS_HOST": "local", "NAS_DIR": str(tmp / "nas"),
            "LOG_FILE": str(tmp / "orchestrator.log"), "WORK_DIR": str(tmp / "work"), "MIN_DUMP_BYTES": "1024",
            # The fixtures' dumps are dated 2024; freshness has its own tests, on a clock moved by faketime.
            "MAX_DUMP_AGE_HOURS": "1000000",
        }
        self.env_file = tmp / "backup.env"

    def env(self, **extra: str) -> dict[str, str]:
        world.write_env(self.env_file, self.settings)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KW_", "PG", "DB_", "PROD_", "PI5_", "NAS_"))}
        return {**base, **self.pg.env, "KW_BACKUP_ENV": str(self.env_file),
                "KW_BACKUP_SYSLOG": str(self.syslog.path), "STANDIN_LOG": str(self.standin_log),
                "PATH": f"{world.STANDINS}:{os.environ['PATH']}", **extra}

    def run(self, script: str, *args: str, env: dict | None = None, **kw):
        """Run a bin/ script with this setup's env file; `at="2024-03-10 03:00:00"` moves its clock (faketime)."""
        return world.run_script(script, *args, env=env or self.env(), **kw)

    def dumps(self, directory: Path | None = None) -> list[str]:
        directory = directory or self.prod_dir
        return sorted(os.listdir(directory)) if directory.exists() else []


@pytest.fixture
def kw(tmp_path, pg, db):
    setup = Kw(tmp_path, pg, db)
    yield setup
    setup.syslog.close()


@pytest.fixture(scope="session")
def big_db(pg):
    """A database whose dump takes a few seconds: for killing and racing backup-db mid-stream."""
    name = pg.create_db("kw_big", template="kw_template")
    pg.psql("CREATE TABLE events (id bigint PRIMARY KEY, kind text, payload text, at timestamptz);"
            "INSERT INTO events SELECT i, 'kind' || (i % 13), md5(i::text) || repeat('x', 60), now() "
            "FROM generate_series(1, 1500000) i;", name)
    return name


PAGILA = Path(__file__).resolve().parent / "fixtures" / "pagila"  # with its licence and provenance


@pytest.fixture(scope="session")
def pagila_db(pg):
    """pagila: 165 partitions, triggers, an enum, non-ASCII domains, views, bytea."""
    name = pg.create_db("pagila")
    result = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", name, "-f", str(PAGILA / "schema.sql"),
                             "-f", str(PAGILA / "data.sql")], env={**os.environ, **pg.env}, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    return name


FRESH_PROD_ADDRESS = "127.0.0.7"


@pytest.fixture(scope="session")
def fresh_prod(ssh_world, pg, tmp_path_factory):
    """A server just provisioned with `kamal setup`: Docker (the stand-in, whose `exec` reaches the test
    PostgreSQL as the accessory's container would) and PostgreSQL, nothing of kw-backup on the login's PATH."""
    base = tmp_path_factory.mktemp("fresh-prod-bin")
    (base / "docker").symlink_to(world.STANDINS / "docker")
    sshd = ssh_world.add_place("fresh-prod", FRESH_PROD_ADDRESS, f"{base}:/usr/bin:/bin",
                               {**pg.env, "STANDIN_LOG": str(base / "docker.log")})
    sshd.standin_log = base / "docker.log"
    found = ssh_world.ssh("fresh-prod", "command -v verify-backup backup-db python3 docker psql")
    assert "verify-backup" not in found.stdout and "backup-db" not in found.stdout, found.stdout
    return sshd


@pytest.fixture
def remote_prod(kw, ssh_world, fresh_prod):
    """kw with prod the fresh server over ssh (DB_EXEC=docker there), the nas over ssh, the pi5 local."""
    kw.ssh = ssh_world
    kw.fresh_prod = fresh_prod
    kw.settings.update(PROD_HOST="fresh-prod", DB_EXEC="docker", NAS_HOST="nas", PI5_HOST="local",
                       SSH_CONFIG=str(ssh_world.config))
    kw.pi5_dir = kw.tmp / "pi5"
    kw.nas_dir = kw.tmp / "nas"
    fresh_prod.standin_log.unlink(missing_ok=True)
    return kw


@pytest.fixture
def net(kw, ssh_world):
    """kw with prod and the nas reached over the real sshd places, the pi5 local (as on the Pi)."""
    kw.ssh = ssh_world
    kw.settings.update(PROD_HOST="prod", NAS_HOST="nas", PI5_HOST="local", SSH_CONFIG=str(ssh_world.config))
    kw.pi5_dir = kw.tmp / "pi5"
    kw.nas_dir = kw.tmp / "nas"
    return kw
