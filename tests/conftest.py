"""Fixtures over the test world (tests/world.py): one PostgreSQL, one set of sshd places, one install of
each role and one S3 server per session, a fresh database and a fresh set of directories per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests import pitr_world, world

# The Pi's unprivileged user works in each test's directory, so as root the session's temporary directories sit
# under a root of this session's own that other users may traverse: pytest keeps /tmp/pytest-of-root 0700, and
# makes it so again whenever any session starts (another engineer's too). The roots of the last sessions that
# ended are kept, as pytest keeps its own.
TEMPROOT_PREFIX = "kwtest-tmp-"
if os.geteuid() == 0 and "PYTEST_DEBUG_TEMPROOT" not in os.environ:

    def _ended(root: Path) -> bool:
        for lock in root.glob("pytest-of-*/pytest-*/.lock"):
            try:
                os.kill(int(lock.read_text()), 0)
                return False
            except (ValueError, ProcessLookupError):
                continue
        return time.time() - root.stat().st_mtime > 60  # one that has just begun has no lock yet

    for _old in sorted(Path(tempfile.gettempdir()).glob(TEMPROOT_PREFIX + "*"), key=os.path.getmtime)[:-3]:
        if _ended(_old):
            shutil.rmtree(_old, ignore_errors=True)
    os.environ["PYTEST_DEBUG_TEMPROOT"] = tempfile.mkdtemp(prefix=TEMPROOT_PREFIX)
    os.chmod(os.environ["PYTEST_DEBUG_TEMPROOT"], 0o711)


@pytest.fixture(scope="session")
def pi(tmp_path_factory):
    """The Pi's backup user, unprivileged (made once on this machine), able to reach each test's directory."""
    user = world.unprivileged_user("pi")
    # pytest-N (under pytest-xdist a worker's popen-gwN in it) and pytest-of-root, 0700 as pytest makes them: up
    # to the root of this session's own, where there is one.
    base = tmp_path_factory.getbasetemp()
    root = Path(os.environ.get("PYTEST_DEBUG_TEMPROOT", "")).resolve()
    base.chmod(0o711)
    for directory in base.parents:
        if directory == root or root not in directory.parents:
            break
        directory.chmod(0o711)
    return user


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
    """The sshd places; prod's and the pi5's logins find kw-backup only as `make install-*` put it into a DESTDIR of
    each (installed when a test first asks for prod_install or pi5_install: until then, nothing)."""
    installs = Path(tempfile.mkdtemp(prefix="kw-installs-"))
    installs.chmod(0o755)  # the Pi's user runs its install
    places = world.SshWorld(
        tmp_path_factory.mktemp("ssh"),
        {"prod": world.Install(installs / "prod", "prod"), "pi5": world.Install(installs / "pi5", "pi5", "pi")},
    ).start()
    yield places
    places.stop()
    shutil.rmtree(installs)


@pytest.fixture(scope="session")
def prod_install(ssh_world) -> world.Install:
    """make install-prod, once per session: what prod's logins find."""
    return ssh_world.places["prod"].install.make()


@pytest.fixture(scope="session")
def pi5_install(ssh_world, pi) -> world.Install:
    """make install-pi5 BACKUP_USER=pi, once per session: what the pi5's logins find, and what the Pi runs. pi may
    log in there: sshd reads authorized_keys as the user logging in."""
    ssh_world.base.chmod(0o711)
    ssh_world.places["pi5"].authorized_keys.chmod(0o644)
    return ssh_world.places["pi5"].install.make()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = world.S3(tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, tmp_path):
    """A versioned bucket of this test's own on moto's S3 server, through an rclone config (`bucket.config`) whose
    remote `offsite` reaches it; the server is emptied afterwards."""
    bucket = s3_server.bucket(s3_server.rclone_config(tmp_path / "rclone-s3.conf"))
    yield bucket
    s3_server.reset()


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
            "DB_NAME": db,
            "DB_EXEC": "direct",
            "PROD_HOST": "local",
            "PROD_DIR": str(self.prod_dir),
            "PI5_HOST": "local",
            "PI5_DIR": str(tmp / "pi5"),
            "NAS_HOST": "local",
            "NAS_DIR": str(tmp / "nas"),
            "LOG_FILE": str(tmp / "orchestrator.log"),
            "WORK_DIR": str(tmp / "work"),
            "MIN_DUMP_BYTES": "1024",
            # The fixtures' dumps are dated 2024; freshness has its own tests, on a clock moved by faketime.
            "MAX_DUMP_AGE_HOURS": "1000000",
        }
        self.env_file = tmp / "backup.env"
        self.pi: world.Pi | None = None  # set (net): the orchestrator runs as the Pi's unprivileged user

    def env(self, **extra: str) -> dict[str, str]:
        world.write_env(self.env_file, self.settings)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KW_", "PG", "DB_", "PROD_", "PI5_", "NAS_"))}
        return {
            **base,
            **self.pg.env,
            "KW_BACKUP_ENV": str(self.env_file),
            "KW_BACKUP_SYSLOG": str(self.syslog.path),
            "STANDIN_LOG": str(self.standin_log),
            "PATH": f"{world.STANDINS}:{os.environ['PATH']}",
            **extra,
        }

    def command(
        self, script: str, *args: str, env: dict | None = None, at: str | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """bin/<script> with this setup's env file, or with `pi` the installed orchestrator as the Pi runs it."""
        env = env or self.env()
        if self.pi and script == "backup-orchestrator":
            return self.pi.command(script, args, self.settings, env, at)
        return world.clocked([str(world.BIN / script), *args], env, at)

    def run(self, script: str, *args: str, env: dict | None = None, at: str | None = None, timeout: float = 120, **kw):
        """Run a script (see command); `at="2024-03-10 03:00:00"` moves its clock (datefudge)."""
        argv, env = self.command(script, *args, env=env, at=at)
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
        )

    def popen(self, script: str, *args: str) -> subprocess.Popen:
        """A script started in the background (see command), its output piped."""
        argv, env = self.command(script, *args)
        return subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )

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
    pg.psql(
        "CREATE TABLE events (id bigint PRIMARY KEY, kind text, payload text, at timestamptz);"
        "INSERT INTO events SELECT i, 'kind' || (i % 13), md5(i::text) || repeat('x', 60), now() "
        "FROM generate_series(1, 1500000) i;",
        name,
    )
    return name


FIXTURES = Path(__file__).resolve().parent / "fixtures"
PAGILA = FIXTURES / "pagila"  # with its licence and provenance


def load_sql(pg: world.Postgres, name: str, *files: Path) -> str:
    """A new database `name` of `pg`, loaded from SQL files by psql."""
    pg.create_db(name)
    result = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", name, *(a for f in files for a in ("-f", str(f)))],
        env={**os.environ, **pg.env},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return name


@pytest.fixture(scope="session")
def pagila_db(pg):
    """pagila: 165 partitions, triggers, an enum, non-ASCII domains, views, bytea."""
    return load_sql(pg, "pagila", PAGILA / "schema.sql", PAGILA / "data.sql")


@pytest.fixture(scope="session")
def zoo_db(pg):
    """The schema zoo (issue 22): what pg_dump writes that pagila and Rails have not: inheritance, tables without
    columns, large objects with comments and grants, NOT VALID constraints, RLS, names needing quotes, ..."""
    pg.psql("DO $$ BEGIN CREATE ROLE zoo_reader; EXCEPTION WHEN duplicate_object THEN NULL; END $$")  # the server's
    return load_sql(pg, "zoo", FIXTURES / "zoo" / "schema.sql")


def backup_db_dump(tmp_path_factory, pg: world.Postgres, db: str) -> Path:
    """backup-db's dump of `db` (with its manifest), in a directory of its own: for a module's tests to share."""
    setup = Kw(tmp_path_factory.mktemp(f"{db}-dump"), pg, db)
    made = setup.run("backup-db", timeout=300)
    setup.syslog.close()
    assert made.returncode == 0, made.stderr
    return Path(made.stdout.strip().splitlines()[-1])


FRESH_PROD_ADDRESS = "127.0.0.7"


@pytest.fixture(scope="session")
def fresh_prod(ssh_world, pg, tmp_path_factory):
    """A server just provisioned with `kamal setup`: Docker (the stand-in, whose `exec` reaches the test
    PostgreSQL as the accessory's container would) and PostgreSQL, nothing of kw-backup on the login's PATH."""
    base = tmp_path_factory.mktemp("fresh-prod-bin")
    (base / "docker").symlink_to(world.STANDINS / "docker")
    sshd = ssh_world.add_place(
        "fresh-prod", FRESH_PROD_ADDRESS, f"{base}:/usr/bin:/bin", {**pg.env, "STANDIN_LOG": str(base / "docker.log")}
    )
    sshd.standin_log = base / "docker.log"
    found = ssh_world.ssh("fresh-prod", "command -v verify-backup backup-db python3 docker psql")
    assert "verify-backup" not in found.stdout and "backup-db" not in found.stdout, found.stdout
    return sshd


@pytest.fixture
def remote_prod(kw, ssh_world, fresh_prod):
    """kw with prod the fresh server over ssh (DB_EXEC=docker there), the nas over ssh, the pi5 local."""
    kw.ssh = ssh_world
    kw.fresh_prod = fresh_prod
    kw.settings.update(
        PROD_HOST="fresh-prod", DB_EXEC="docker", NAS_HOST="nas", PI5_HOST="local", SSH_CONFIG=str(ssh_world.config)
    )
    kw.pi5_dir = kw.tmp / "pi5"
    kw.nas_dir = kw.tmp / "nas"
    fresh_prod.standin_log.unlink(missing_ok=True)
    return kw


@pytest.fixture
def net(kw, ssh_world, pi, pi5_install):
    """kw with prod and the nas reached over the real sshd places, the pi5 local, as on the Pi: the orchestrator is
    the installed one, run by the unprivileged `pi` in this test's directory (its own), with its key for prod
    restricted to `rrsync -ro PROD_DIR`."""
    kw.ssh = ssh_world
    kw.settings.update(PROD_HOST="prod", NAS_HOST="nas", PI5_HOST="local", SSH_CONFIG=str(ssh_world.config))
    kw.pi5_dir = kw.tmp / "pi5"
    kw.nas_dir = kw.tmp / "nas"
    os.chown(kw.tmp, pi.pw_uid, pi.pw_gid)
    kw.pi = world.Pi(pi, pi5_install, kw.tmp / "pi-home")
    kw.pi.prod_key, public = ssh_world.restricted_key(kw.pi.home, kw.prod_dir)
    kw.pi.own(kw.pi.home)
    yield kw
    ssh_world.places["prod"].unauthorize(public)


@pytest.fixture(scope="session")
def pitr_install(pi) -> world.Install:
    """make install-pi5 PITR=on BACKUP_USER=pi, once per session: Barman's pinned venv beside kw-backup's."""
    base = Path(tempfile.mkdtemp(prefix="kw-pitr-install-"))
    base.chmod(0o755)  # the Pi's user runs it
    yield world.Install(base / "pi5", "pi5", "pi", pitr=True).make()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pitr(tmp_path, ssh_world, pi, pitr_install):
    """The WAL tier's world (tests/pitr_world.py), stopped afterwards with everything it started."""
    os.chown(tmp_path, pi.pw_uid, pi.pw_gid)
    ssh_world.base.chmod(0o711)  # the pi5 place's env file is the Pi's to read
    place = pitr_world.PitrWorld(tmp_path, ssh_world, pi, pitr_install)
    try:
        yield place.start()
    finally:
        place.stop()
