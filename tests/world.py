"""The test world: a real PostgreSQL (the newest installed), real sshd places on loopback, stand-ins for docker/kamal.

Every later test builds on these pieces:
- `Postgres`: initdb/pg_ctl in a temporary directory (as an unprivileged OS user when the
  tests run as root), with a Rails-like template database;
- `Sshd`: one sshd per place on 127.0.0.2 (prod), .3 (pi5), .4 (nas), .5 (old-prod), each
  with its own host key, config, PidFile and authorized_keys, stopped by PID; and .7
  (fresh-prod, tests/conftest.py): a freshly provisioned prod, whose logins find only the
  docker stand-in and the system's tools (PostgreSQL's client among them), nothing of kw-backup;
- `Install`: what `make install-prod` / `make install-pi5` put into a DESTDIR: the only kw-backup
  that prod's and the pi5's logins find (their PATH has its /usr/local/bin, KW_BACKUP_ENV its env file);
- `SshWorld`: the client key, known_hosts and the ssh config file scripts get as SSH_CONFIG, and the
  places' TMPDIR, this session's own;
- `Pi`: the pi5 as deployed: the unprivileged `pi` runs the installed orchestrator with its own
  copies of keys and configs, and its key for prod works only as `rrsync -ro PROD_DIR`;
- `S3`: moto's S3 server on loopback, for rclone's `s3` remote (the offsite tier);
- `Syslog`: a datagram socket that records what the scripts send to syslog;
- `run_script`: runs a bin/ script as a user would, with a given env file.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin"
STANDINS = Path(__file__).resolve().parent / "standins"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # a fresh Debian's tools; not /usr/local/bin, which is this machine's


def newest_pg_bin() -> Path:
    """The newest installed PostgreSQL's programs: 15 on Debian 12, 16 on Ubuntu 24.04 (the `postgresql` package).

    None installed: the pattern itself, so the first use names what is missing.
    """
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parent.parent.name.isdigit()]
    return max(found, key=lambda b: int(b.parent.name), default=Path("/usr/lib/postgresql/*/bin"))


PG_BIN = newest_pg_bin()
# "offsite" is an SFTP server for rclone's sftp remote (tests/world.rclone_config), not a kw-backup place.
PLACE_ADDRESSES = {
    "prod": "127.0.0.2",
    "pi5": "127.0.0.3",
    "nas": "127.0.0.4",
    "old-prod": "127.0.0.5",
    "offsite": "127.0.0.6",
}
SSH_PORT = 2222  # replaced by the running SshWorld's own free port (a bench or another run may hold 2222)
PLACES_TMP: Path | None = None  # the running SshWorld's places' TMPDIR

RAILS_SCHEMA = """
CREATE TABLE schema_migrations (version character varying PRIMARY KEY);
CREATE TABLE ar_internal_metadata (key character varying PRIMARY KEY, value character varying,
    created_at timestamp(6) NOT NULL, updated_at timestamp(6) NOT NULL);
CREATE TABLE users (id bigserial PRIMARY KEY, email character varying NOT NULL, name text,
    created_at timestamp(6) NOT NULL, updated_at timestamp(6) NOT NULL);
CREATE UNIQUE INDEX index_users_on_email ON users (email);
CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL REFERENCES users(id),
    total numeric(12,2) NOT NULL, details jsonb NOT NULL DEFAULT '{}', note text,
    created_at timestamp(6) NOT NULL, updated_at timestamp(6) NOT NULL);
CREATE INDEX index_orders_on_user_id ON orders (user_id);
CREATE INDEX index_orders_on_created_at ON orders (created_at);
CREATE SEQUENCE invoice_number_seq START 1000;
CREATE TABLE "Odd ""Name"" table" (id int PRIMARY KEY, "zażółć" text);
INSERT INTO schema_migrations SELECT to_char(timestamp '2024-01-01' + i * interval '1 day', 'YYYYMMDDHH24MISS')
    FROM generate_series(1, 40) i;
INSERT INTO ar_internal_metadata VALUES ('environment', 'production', now(), now());
INSERT INTO users (email, name, created_at, updated_at)
    SELECT 'user' || i || '@example.com', 'User ' || i || E' with a tab\\tand a newline\\n', now(), now()
    FROM generate_series(1, 300) i;
INSERT INTO orders (user_id, total, details, note, created_at, updated_at)
    SELECT 1 + i % 300, i * 1.5, jsonb_build_object('items', i % 7, 'tags', jsonb_build_array('a', 'b')),
           CASE WHEN i % 5 = 0 THEN E'line one\\nline two \\\\. backslash' END,
           now() - i * interval '1 minute', now()
    FROM generate_series(1, 2000) i;
INSERT INTO "Odd ""Name"" table" VALUES (1, 'gęś'), (2, E'\\\\.');
SELECT nextval('invoice_number_seq') FROM generate_series(1, 5);
"""
RAILS_TABLE_ROWS = {
    "public.schema_migrations": 40,
    "public.ar_internal_metadata": 1,
    "public.users": 300,
    "public.orders": 2000,
    'public.Odd "Name" table': 2,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def staging_leftovers() -> set[str]:
    """What runs left in the places' TMPDIR (this session's own: SshWorld): our scripts' `kw-*` names (a restore's
    staging directory, a migration's compressed copy, an install's tree), but a staging directory a live run holds."""
    assert PLACES_TMP, "no sshd places in this session"
    return {str(path) for path in PLACES_TMP.glob("kw-*") if not _held(path)}


def _held(directory: Path) -> bool:
    """Whether a live run holds `directory`'s .lock (a restore's staging directory while it runs)."""
    try:
        held = flock_held(directory / ".lock")
    except NotADirectoryError:
        return False
    return not directory.exists() if held is None else held  # removed meanwhile: not left behind


def flock_held(path: Path) -> bool | None:
    """Whether a live process holds an flock on `path` (a file or a directory); None when it does not exist.
    Only opened, never created: a root-owned lock file would stop what runs as pi."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def service_user() -> str | None:
    """The unprivileged OS user that runs servers when the tests run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "kwtest"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    made = subprocess.run(["useradd", "--system", "--no-create-home", "kwtest"])
    if made.returncode not in (0, 9):  # 9: another test worker made it meanwhile
        raise RuntimeError(f"useradd kwtest failed with exit {made.returncode}")
    return "kwtest"


class HeldTransaction:
    """A psql session that runs `sql` in a transaction it keeps open, holding its locks, until ended."""

    def __init__(self, pg, dbname: str, sql: str):
        self.proc = subprocess.Popen(
            ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", dbname],
            env={**os.environ, **pg.env},
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.proc.stdin.write(f"BEGIN; {sql}; SELECT 'held';\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "held"

    def end(self, how: str, check: bool = True) -> None:
        """COMMIT or ROLLBACK; with `check`, psql must end well."""
        self.proc.stdin.write(f"{how};\n")
        self.proc.stdin.close()
        code = self.proc.wait(30)
        assert code == 0 or not check, code


class Postgres:
    """A PostgreSQL server of the tests' own (PG_BIN), on a free port and a private socket directory."""

    def __init__(self, base: Path, initdb_args: tuple[str, ...] = ()):
        self.base = base
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.port = free_port()
        self.user = service_user()
        self.initdb_args = initdb_args

    def _as_server_user(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, user=self.user, check=True, capture_output=True, text=True, **kw)

    def start(self) -> Postgres:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self.user:
            shutil.chown(self.base, self.user)
            shutil.chown(self.sockets, self.user)
        self.base.chmod(0o755)
        self._as_server_user(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                *self.initdb_args,
            ]
        )
        conf = (
            f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.sockets}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 50\n"
        )
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(conf)
        self.run_server()
        return self

    def run_server(self) -> None:
        """pg_ctl start on the initialised data directory; returns once it accepts connections."""
        pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log")]
        self._as_server_user([*pg_ctl, "-w", "-t", "60", "start"])

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    @property
    def env(self) -> dict[str, str]:
        """libpq variables that point pg_dump and psql at this server."""
        return {"PGHOST": str(self.sockets), "PGPORT": str(self.port), "PGUSER": "postgres"}

    def psql(self, sql: str, db: str = "postgres", check: bool = True) -> str:
        out = subprocess.run(
            ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
        )
        if check and out.returncode:
            raise AssertionError(f"psql failed: {out.stderr}")
        return out.stdout.strip()

    def create_db(self, name: str, template: str = "template0") -> str:
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_db(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def row_counts(self, db: str) -> dict[str, int]:
        """Every table's own rows (FROM ONLY), keyed `schema.table` unquoted, as manifests key and count them."""
        listing = self.psql(
            "SELECT n.nspname || '.' || c.relname || chr(9) || format('%I.%I', n.nspname, c.relname) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%'",
            db,
        )
        counts = {}
        for line in filter(None, listing.splitlines()):
            key, quoted = line.split("\t")
            counts[key] = int(self.psql(f"SELECT count(*) FROM ONLY {quoted}", db))
        return counts


class Sshd:
    """A real sshd on one loopback address with its own host key, config and authorized_keys.

    Its logins get `path` as PATH (default: the system's tools, nothing of kw-backup), `env`, and as
    KW_BACKUP_ENV the place's settings: `install`'s env file, or an empty one of its own.
    """

    def __init__(
        self,
        base: Path,
        name: str,
        address: str,
        port: int,
        path: str | None = None,
        env: dict[str, str] | None = None,
        install: Install | None = None,
    ):
        self.base = base
        self.port = port
        self.name = name
        self.address = address
        self.install = install
        self.path = f"{install.bin}:{SYSTEM_PATH}" if install else path or SYSTEM_PATH
        self.env = env or {}
        self.pidfile = base / "sshd.pid"
        self.authorized_keys = base / "authorized_keys"
        self.host_key = base / "host_ed25519"
        self.env_file = install.env_file if install else base / "backup.env"  # /etc/kw-backup/backup.env

    def start(self) -> Sshd:
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # sshd's privilege-separation directory; an unprivileged sshd needs none
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True)
        self.authorized_keys.touch(mode=0o600)
        if not self.install:  # an install writes its own, from .env.example
            self.env_file.touch(mode=0o600)
        config = self.base / "sshd_config"
        config.write_text(
            f"ListenAddress {self.address}:{self.port}\nHostKey {self.host_key}\nPidFile {self.pidfile}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            "PermitUserEnvironment no\nLogLevel ERROR\nMaxStartups 100\nMaxSessions 50\n"
            f"Subsystem sftp internal-sftp -u 077\n"  # as README advises for an sftp offsite: private files
            # SHLVL=1: bash, a login's shell, then skips the ~/.bashrc it runs for ssh commands (here root's runs
            # pyenv init, 0.15 s a command, and puts pyenv and /usr/local/bin before PATH: not a fresh server's).
            f"SetEnv KW_TEST_PLACE={self.name} PATH={self.path} SHLVL=1 "
            f"KW_BACKUP_ENV={self.env_file} KW_BACKUP_SYSLOG={self.base / 'no-syslog'}"
            + "".join(f" {k}={v}" for k, v in self.env.items())
            + "\n"
        )
        subprocess.run(["/usr/sbin/sshd", "-f", str(config), "-E", str(self.base / "sshd.log")], check=True)
        for _ in range(100):
            if self.pidfile.exists() and self._accepting():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"sshd for {self.name} did not start: {(self.base / 'sshd.log').read_text()}")

    def _accepting(self) -> bool:
        try:
            with socket.create_connection((self.address, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def pid(self) -> int:
        return int(self.pidfile.read_text().split()[0])

    def stop(self) -> None:
        if self.pidfile.exists():
            try:
                os.kill(self.pid(), signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.pidfile.unlink(missing_ok=True)

    def authorize(self, public_key: str, options: str = "") -> None:
        with open(self.authorized_keys, "a") as f:
            f.write(f"{options + ' ' if options else ''}{public_key.strip()}\n")

    def unauthorize(self, public_key: str) -> None:
        key = public_key.strip()
        lines = self.authorized_keys.read_text().splitlines()
        self.authorized_keys.write_text("".join(f"{line}\n" for line in lines if not line.endswith(key)))

    def drop_sessions(self) -> int:
        """Kill the sshd processes serving open connections (not the listener): a dropped link."""
        children = subprocess.run(["pgrep", "-P", str(self.pid())], capture_output=True, text=True).stdout.split()
        for pid in children:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(children)


class Install:
    """`make install-<role>` into a DESTDIR of its own, done once (`make`), as on a machine that has nothing of
    kw-backup before. Its venv is made with /usr/bin/python3: the backup user must be able to run it (a python
    under root's home, pyenv's, is not its to run)."""

    def __init__(self, dest: Path, role: str, user: str = "root", pitr: bool = False):
        self.dest, self.role, self.user, self.pitr = dest, role, user, pitr
        self.bin = dest / "usr/local/bin"  # the scripts' links, as a login's PATH finds them
        self.env_file = dest / "etc/kw-backup/backup.env"
        self.output: str | None = None  # what the first install printed

    def make(self) -> Install:
        if self.output is None:
            done = subprocess.run(
                [
                    "make",
                    "-s",
                    f"install-{self.role}",
                    f"DESTDIR={self.dest}",
                    f"BACKUP_USER={self.user}",
                    "PYTHON=/usr/bin/python3",
                    *(["PITR=on"] if self.pitr else []),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                stdin=subprocess.DEVNULL,
            )
            if done.returncode:
                raise RuntimeError(f"make install-{self.role} failed: {done.stdout}{done.stderr}")
            self.output = done.stdout
        return self


def unprivileged_user(name: str) -> pwd.struct_passwd:
    """An OS user with a home, made once on this machine when missing (the Pi's `pi`, as on Raspberry Pi OS),
    that can log in over ssh with a key: sshd refuses a locked account (useradd's `!`), so a locked one gets
    `*`, no password at all."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        made = subprocess.run(["useradd", "--create-home", "--user-group", name])
        if made.returncode not in (0, 9):  # 9: another test worker made it meanwhile
            raise RuntimeError(f"useradd {name} failed with exit {made.returncode}") from None
    status = subprocess.run(["passwd", "--status", name], capture_output=True, text=True, check=True).stdout
    if status.split()[1] == "L":
        subprocess.run(["usermod", "--password", "*", name], check=True)
    return pwd.getpwnam(name)


class SshWorld:
    """sshd places plus the client side: a key, known_hosts and an ssh config with one alias per place."""

    def __init__(self, base: Path, installs: dict[str, Install] | None = None):
        """`installs`: the places (prod, pi5) whose logins find kw-backup as installed there."""
        self.base = base
        self.key = base / "client" / "id_ed25519"
        self.known_hosts = base / "client" / "known_hosts"
        self.config = base / "client" / "ssh_config"
        # Every place's logins get it as TMPDIR: what this session's runs make there, no other session or
        # pytest-xdist worker sees (our scripts make their temporary names on a place in its TMPDIR, else /tmp).
        self.tmp = base / "tmp"
        self.port = free_port()
        installs = installs or {}
        self.places = {
            name: Sshd(base / name, name, addr, self.port, env={"TMPDIR": str(self.tmp)}, install=installs.get(name))
            for name, addr in PLACE_ADDRESSES.items()
        }

    def start(self) -> SshWorld:
        global SSH_PORT, PLACES_TMP
        SSH_PORT, PLACES_TMP = self.port, self.tmp
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tmp.mkdir()
        self.tmp.chmod(0o1777)  # as /tmp: any place's user may make its files there
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        for sshd in self.places.values():
            sshd.start().authorize(self.key.with_suffix(".pub").read_text())
        self._write_client_files()
        return self

    def add_place(self, name: str, address: str, path: str, env: dict[str, str]) -> Sshd:
        """Another sshd place (an alias `name` in the ssh config) whose logins get this PATH and environment."""
        sshd = Sshd(self.base / name, name, address, self.port, path, {"TMPDIR": str(self.tmp), **env})
        sshd.start().authorize(self.key.with_suffix(".pub").read_text())
        self.places[name] = sshd
        self._write_client_files()
        return sshd

    def _write_client_files(self) -> None:
        known, aliases = [], []
        user = pwd.getpwuid(os.geteuid()).pw_name
        for name, sshd in self.places.items():
            host_pub = sshd.host_key.with_suffix(".pub").read_text().split()
            known.append(f"[{sshd.address}]:{self.port} {host_pub[0]} {host_pub[1]}")
            aliases.append(f"Host {name}\n  HostName {sshd.address}\n")
        self.known_hosts.write_text("\n".join(known) + "\n")
        aliases.append("Host gone\n  HostName 127.0.0.9\n")  # nothing listens there: an unreachable place
        self.config.write_text(
            "\n".join(aliases)
            + (
                f"\nHost *\n  Port {self.port}\n  User {user}\n  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {self.known_hosts}\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n"
            )
        )

    def stop(self) -> None:
        for sshd in self.places.values():
            sshd.stop()

    def client_config(
        self, path: Path, identity: dict[str, Path] | None = None, proxy: dict[str, str] | None = None
    ) -> Path:
        """A copy of the ssh config with other keys or a ProxyCommand for some places."""
        text = ""
        for name, sshd in self.places.items():
            text += f"Host {name}\n  HostName {sshd.address}\n"
            if identity and name in identity:
                text += f"  IdentityFile {identity[name]}\n"
            if proxy and name in proxy:
                text += f"  ProxyCommand {proxy[name]}\n"
        text += "Host gone\n  HostName 127.0.0.9\n"
        text += "Host *" + self.config.read_text().split("Host *", 1)[1]
        path.write_text(text)
        return path

    def restricted_key(self, tmp: Path, prod_dir: Path, owner: str | None = None) -> tuple[Path, str]:
        """A new key that prod accepts only as `rrsync -ro <prod_dir>`, as make authorize-pi5 adds it;
        made by `owner` (an OS user, as the Pi's `pi` makes its own) when given."""
        key = tmp / "id_prod_backup"
        as_owner = ["runuser", "-u", owner, "--"] if owner else []
        subprocess.run([*as_owner, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        public = key.with_suffix(".pub").read_text()
        self.places["prod"].authorize(public, f'restrict,command="rrsync -ro {prod_dir}"')
        return key, public

    def rclone_config(
        self,
        path: Path,
        name: str = "offsite",
        hashcheck: bool = True,
        address: str | None = None,
        port: int | None = None,
    ) -> Path:
        """An rclone config with an sftp remote `name` on the offsite sshd (or another address), checking its host key.

        hashcheck=False: a remote that offers no checksums (a storage box without a shell). With another
        address and port (a relay), the offsite's host key is known there too.
        """
        known_hosts = self.known_hosts
        if port:
            known_hosts = path.with_suffix(".known_hosts")
            host_key = self.places["offsite"].host_key.with_suffix(".pub").read_text().split()
            known_hosts.write_text(self.known_hosts.read_text() + f"[{address}]:{port} {host_key[0]} {host_key[1]}\n")
        user = pwd.getpwuid(os.geteuid()).pw_name
        path.write_text(
            f"[{name}]\ntype = sftp\nhost = {address or self.places['offsite'].address}\n"
            f"port = {port or self.port}\nuser = {user}\nkey_file = {self.key}\n"
            f"known_hosts_file = {known_hosts}\n" + ("" if hashcheck else "disable_hashcheck = true\n")
        )
        path.chmod(0o600)
        return path

    def ssh(self, place: str, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-F", str(self.config), "-o", "BatchMode=yes", place, *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )


class Syslog:
    """Records what scripts send to syslog (KW_BACKUP_SYSLOG points them here)."""

    def __init__(self, path: Path):
        self.path = path
        self.messages: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.messages.append(data.decode(errors="replace"))

    def close(self) -> None:
        self.sock.close()


def write_env(path: Path, settings: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={json.dumps(str(v))}\n" for k, v in settings.items()))
    path.chmod(0o600)
    return path


def run_script(
    name: str, *args: str, env: dict[str, str], timeout: float = 120, at: str | None = None, **kw
) -> subprocess.CompletedProcess:
    """Run bin/<name> as a user would: a plain process, its own environment, no terminal.

    `at` ("2024-03-10 03:00:00", UTC) runs it with the machine's clock there, ticking on (clocked()).
    """
    argv, env = clocked([str(BIN / name), *args], env, at)
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
    )


def clocked(argv: list[str], env: dict[str, str], at: str | None) -> tuple[list[str], dict[str, str]]:
    """A command run with its wall clock (and its children's) moved to `at` UTC, ticking on: no test hook in the code.

    Debian's datefudge preloads a library that moves only the wall clock; waits and timeouts (CLOCK_MONOTONIC)
    stay real. libfaketime 0.9.10 moves those too, and Python 3.11's sleeps and thread waits then hang or fail
    with EINVAL.
    """
    if at is None:
        return argv, env
    return ["datefudge", f"{at} UTC", *argv], env


def standin_calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


PYTHON = sys.executable


RELAY = Path(__file__).resolve().parent / "relay.py"


def relay_command(address: str, bytes_per_second: int) -> str:
    """A ProxyCommand that slows a place's link down (see tests/relay.py); the system's python, which `pi` runs too."""
    return f"/usr/bin/python3 {RELAY} {address} {SSH_PORT} {bytes_per_second}"


class Pi:
    """The pi5 as deployed: the unprivileged backup user runs what make install-pi5 installed, as cron would.

    It reads only what is its own: each run gets copies of the ssh and rclone files its settings name (keys
    and known_hosts of root's are not its to read), an env file of its own, and PI5_DIR, the logs and local
    places owned by it. `prod_key`, when set, is its key for prod, which prod accepts only as
    `rrsync -ro PROD_DIR` (as make authorize-pi5 adds it): offered first to prod in every ssh config it gets.
    """

    def __init__(self, user: pwd.struct_passwd, install: Install, home: Path):
        self.user, self.install, self.home = user, install, home
        self.prod_key: Path | None = None
        home.mkdir(mode=0o700, exist_ok=True)
        self.own(home)

    def own(self, *paths: Path) -> None:
        """Make what exists of `paths` (and everything under them) the Pi's."""
        for path in paths:
            if not path.exists():
                continue
            for entry in [path, *(path.rglob("*") if path.is_dir() else [])]:
                os.chown(entry, self.user.pw_uid, self.user.pw_gid, follow_symlinks=False)

    def _copies(self, text: str, directory: Path, options: str) -> str:
        """`text` with each file named by one of `options` (ssh's `Option path`, rclone's `option = path`)
        replaced by the Pi's own copy in `directory`."""

        def copy(match: re.Match) -> str:
            source = Path(match[2])
            target = directory / f"{len(list(directory.iterdir()))}-{source.name}"
            shutil.copyfile(source, target)
            target.chmod(0o600)
            self.own(target)
            return match[1] + str(target)

        return re.sub(rf"^(\s*(?:{options})\s*=?\s*)(/\S+)$", copy, text, flags=re.M | re.I)

    def settings(self, settings: dict[str, str], name: str = "copies") -> dict[str, str]:
        """`settings` with SSH_CONFIG and RCLONE_CONFIG replaced by the Pi's copies in its directory `name` (made
        anew each time: tests rewrite their configs between runs)."""
        directory = self.home / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700)
        self.own(directory)
        mine = dict(settings)
        for setting, options in (
            ("SSH_CONFIG", "IdentityFile|UserKnownHostsFile"),
            ("RCLONE_CONFIG", "key_file|known_hosts_file"),
        ):
            if not settings.get(setting):
                continue
            text = Path(settings[setting]).read_text()
            if setting == "SSH_CONFIG":
                if self.prod_key:
                    text = f"Host prod\n  IdentityFile {self.prod_key}\n\n" + text
                if str(RELAY) in text:  # the checkout may be where the Pi cannot read (under root's home)
                    shutil.copyfile(RELAY, directory / RELAY.name)
                    text = text.replace(str(RELAY), str(directory / RELAY.name))
            path = directory / f"{setting.lower()}"
            path.write_text(self._copies(text, directory, options))
            path.chmod(0o600)
            self.own(*directory.iterdir())
            mine[setting] = str(path)
        return mine

    def command(
        self, script: str, args: tuple[str, ...], settings: dict[str, str], env: dict[str, str], at: str | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """The installed `script` run as the Pi with `settings` (its env file) and `env` (less root's PATH and
        home): an argument list and an environment for subprocess."""
        mine = self.settings(settings)
        env_file = write_env(self.home / "backup.env", mine)
        local = [mine.get(k) for k in ("PI5_DIR", "LOG_FILE", "HISTORY_FILE", "DRILL_LOG", "WORK_DIR")]
        local += [
            mine.get("NAS_DIR") if mine.get("NAS_HOST") == "local" else None,
            mine.get("OFFSITE_REMOTE") if mine.get("OFFSITE_REMOTE", "").startswith("/") else None,
        ]
        self.own(env_file, *(Path(p) for p in local if p))
        argv, env = clocked([str(self.install.bin / script), *args], env, at)
        # Its copies of SSH_CONFIG and RCLONE_CONFIG are in its env file: none of root's from the environment.
        env = {
            **{k: v for k, v in env.items() if k not in ("SSH_CONFIG", "RCLONE_CONFIG")},
            "PATH": f"{self.install.bin}:{SYSTEM_PATH}",
            "HOME": self.user.pw_dir,
            "USER": self.user.pw_name,
            "LOGNAME": self.user.pw_name,
            "KW_BACKUP_ENV": str(env_file),
        }
        return ["runuser", "-u", self.user.pw_name, "--", *argv], env


class S3:
    """moto's S3 server (moto_server, a real HTTP server of the S3 API) on 127.0.0.1, for rclone's `s3` remote.

    Buckets are versioned: moto answers an unversioned multipart upload with `X-Amz-Version-Id: null`, which
    rclone then fails to HEAD. `reset` empties it (moto keeps everything in memory).
    """

    ACCESS_KEY, SECRET_KEY = "kwtest", "kwtest-secret"  # moto takes any; only ever in rclone's config file

    def __init__(self, log: Path):
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"moto_server did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=10)

    def rclone_config(self, path: Path, name: str = "offsite", endpoint: str | None = None) -> Path:
        """An rclone config with an `s3` remote `name` on this server (or `endpoint`): parts of 5 MiB above
        5 MiB (rclone's default cutoff is 200 MiB), so a dump of ~12 MB goes up as a multipart upload."""
        path.write_text(
            f"[{name}]\ntype = s3\nprovider = Other\nenv_auth = false\n"
            f"access_key_id = {self.ACCESS_KEY}\nsecret_access_key = {self.SECRET_KEY}\n"
            f"endpoint = {endpoint or self.url}\nregion = us-east-1\n"
            "upload_cutoff = 5M\nchunk_size = 5M\n"
        )
        path.chmod(0o600)
        return path

    def bucket(self, config: Path, name: str = "offsite") -> Bucket:
        """A new versioned bucket, seen through `config`'s remote `name`."""
        bucket = Bucket(config, f"{name}:kw-{os.urandom(4).hex()}")
        bucket.rclone("mkdir", bucket.remote)
        bucket.rclone("backend", "versioning", bucket.remote, "Enabled")
        return bucket


class Directory:
    """A test's view of a local-directory remote; the same calls as `Bucket`."""

    def __init__(self, path: Path):
        self.path = path
        self.remote = str(path)

    @property
    def parent(self) -> Directory:
        return Directory(self.path.parent)

    def exists(self) -> bool:
        return self.path.exists()

    def files(self, sub: str = "") -> list[str]:
        where = self.path / sub
        return sorted(p.name for p in where.iterdir() if p.is_file()) if where.is_dir() else []

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        (self.path / name).write_bytes(data)

    def contents(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.path)): p.read_bytes() for p in self.path.rglob("*") if p.is_file()}


class Bucket:
    """A test's view of a path at an rclone remote (an S3 bucket): its files, their bytes and every stored version,
    read with rclone, as an operator would look."""

    def __init__(self, config: Path, remote: str):
        self.config, self.remote = config, remote

    def rclone(self, *args: str, input: bytes | None = None) -> bytes:
        # Debian's rclone 1.60 cannot use AWS_CA_BUNDLE (LoadCustomCABundleError): never pass it on.
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        done = subprocess.run(
            ["rclone", "--config", str(self.config), *args], input=input, capture_output=True, env=env, timeout=120
        )
        if done.returncode:
            raise AssertionError(f"rclone {' '.join(args)}: {done.stderr.decode(errors='replace')}")
        return done.stdout

    def at(self, sub: str) -> Bucket:
        return Bucket(self.config, f"{self.remote}/{sub}")

    @property
    def parent(self) -> Bucket:
        return Bucket(self.config, self.remote.rsplit("/", 1)[0])

    def exists(self) -> bool:
        return bool(self._listing())

    def _listing(self, *flags: str) -> list[dict]:
        return json.loads(self.rclone("lsjson", "-R", "--files-only", *flags, self.remote))

    def files(self, sub: str = "") -> list[str]:
        return sorted(
            i["Path"]
            for i in json.loads(self.rclone("lsjson", "--files-only", f"{self.remote}/{sub}" if sub else self.remote))
        )

    def read(self, name: str) -> bytes:
        return self.rclone("cat", f"{self.remote}/{name}")

    def write(self, name: str, data: bytes) -> None:
        self.rclone("rcat", f"{self.remote}/{name}", input=data)

    def contents(self) -> dict[str, bytes]:
        return {i["Path"]: self.read(i["Path"]) for i in self._listing()}

    def versions(self) -> list[tuple[str, int]]:
        """Every stored version of every file: a file sent again adds one."""
        return sorted((i["Path"], i["Size"]) for i in self._listing("--s3-versions"))


def listing_blocks(output: str) -> dict[str, list[str]]:
    """list-backups' text output as {heading: [lines under it]}."""
    found, heading = {}, None
    for line in output.splitlines():
        if not line.strip():
            continue
        if line.startswith("  "):
            assert heading is not None, f"a line before any heading: {line!r}"
            found[heading].append(line)
        else:
            assert line.endswith(":"), f"not a heading: {line!r}"
            heading = line
            found[heading] = []
    return found


def age_key(directory: Path, name: str = "age-key.txt") -> tuple[Path, str]:
    """A new age identity file (0600) and its public key."""
    path = directory / name
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    path.chmod(0o600)
    return path, subprocess.run(
        ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def synthetic_dump(
    directory: Path, name: str, rows: int = 1000, random_bytes: bool = False, manifest: bool = True
) -> Path:
    """A valid dump with its manifest, quickly: pg_dump's shape, one table of `rows` rows."""
    import hashlib
    import random

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    rng = random.Random(name)
    body = os.urandom(rows * 48).hex() if random_bytes else "x" * (rows * 96)
    lines = "".join(f"{i}\t{body[i * 96 : (i + 1) * 96]}\n" for i in range(rows))
    sql = (
        "--\n-- PostgreSQL database dump\n--\n\n\\restrict k\n\n-- Dumped from database version 15.18\n"
        "-- Dumped by pg_dump version 15.18\n\nCREATE TABLE public.t (id int, v text);\n\n"
        f"COPY public.t (id, v) FROM stdin;\n{lines}\\.\n\n"
        f"-- {rng.random()}\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict k\n\n"
    ).encode()
    path = directory / name
    with open(path, "wb") as out:
        # -n: no time in the gzip header (pigz stamps a pipe's with the clock), so the same name made for two
        # places has the same bytes even when a second ticks between them.
        subprocess.run(["pigz", "-1", "-n", "-c"], input=sql, stdout=out, check=True)
    path.chmod(0o600)
    if manifest:
        data = path.read_bytes()
        (directory / (name + ".json")).write_text(
            json.dumps(
                {
                    "file": name,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "created_at": "2024-01-01T02:00:00Z",
                    "database": "kw_app_production",
                    "server_version": "15.18",
                    "pg_dump_version": "15.18",
                    "tables": {"public.t": rows},
                    "tool_version": "test",
                },
                indent=2,
            )
        )
        (directory / (name + ".json")).chmod(0o600)
    return path


class Recorder:
    """A real local HTTP server that records every request (the stand-in for Healthchecks, AppSignal, Slack).

    `mode` "ok" answers 200; "hang" answers only after `hang_seconds` (a slow sink).
    """

    def __init__(self, mode: str = "ok", hang_seconds: float = 30.0):
        import http.server

        self.requests: list[dict] = []
        self.mode, self.hang_seconds = mode, hang_seconds
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                if recorder.mode == "hang":
                    time.sleep(recorder.hang_seconds)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Tmpfs:
    """A small filesystem of its own at `path` (a full or nearly full disk); unmounted by close()."""

    def __init__(self, path: Path, size: str, mode: str = "0700"):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)
