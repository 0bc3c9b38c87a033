"""The test world: a real PostgreSQL (the newest installed), real sshd places on loopback, stand-ins for docker/kamal.

Every later test builds on these pieces:
- `Postgres`: initdb/pg_ctl in a temporary directory (as an unprivileged OS user when the
  tests run as root), with a Rails-like template database;
- `Sshd`: one sshd per place on 127.0.0.2 (prod), .3 (pi5), .4 (nas), .5 (old-prod), each
  with its own host key, config, PidFile and authorized_keys, stopped by PID; and .7
  (fresh-prod, tests/conftest.py): a freshly provisioned prod, whose logins find only the
  docker stand-in and the system's tools (PostgreSQL's client among them), nothing of kw-backup;
- `SshWorld`: the client key, known_hosts and the ssh config file scripts get as SSH_CONFIG;
- `Syslog`: a datagram socket that records what the scripts send to syslog;
- `run_script`: runs a bin/ script as a user would, with a given env file.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import pwd
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
INSTALLED = Path(__file__).resolve().parent / "installed"  # links to bin/, as make install puts them on PATH


def newest_pg_bin() -> Path:
    """The newest installed PostgreSQL's programs: 15 on Debian 12, 16 on Ubuntu 24.04 (the `postgresql` package).

    None installed: the pattern itself, so the first use names what is missing.
    """
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parent.parent.name.isdigit()]
    return max(found, key=lambda b: int(b.parent.name), default=Path("/usr/lib/postgresql/*/bin"))


PG_BIN = newest_pg_bin()
# "offsite" is an SFTP server for rclone's sftp remote (tests/world.rclone_config), not a kw-backup place.
PLACE_ADDRESSES = {"prod": "127.0.0.2", "pi5": "127.0.0.3", "nas": "127.0.0.4", "old-prod": "127.0.0.5",
                   "offsite": "127.0.0.6"}
SSH_PORT = 2222  # replaced by the running SshWorld's own free port (a bench or another run may hold 2222)

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
    "public.schema_migrations": 40, "public.ar_internal_metadata": 1, "public.users": 300,
    "public.orders": 2000, 'public.Odd "Name" table': 2,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def staging_leftovers(pattern: str = "kw-restore.*", lock: str = ".lock") -> set[str]:
    """Run directories in /tmp that no live run holds (restores lock their `.lock`, drills the directory
    itself: lock=""): what a run left behind. Another test's or suite's run in progress holds its lock,
    so it never counts."""
    left = set()
    for path in glob.glob(f"/tmp/{pattern}"):
        try:
            fd = os.open(os.path.join(path, lock), os.O_RDONLY)
        except FileNotFoundError:
            left.add(path)
            continue
        except OSError:
            continue  # removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            left.add(path)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    return left


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


class Postgres:
    """A PostgreSQL server of the tests' own (PG_BIN), on a free port and a private socket directory."""

    def __init__(self, base: Path):
        self.base = base
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.port = free_port()
        self.user = service_user()

    def _as_server_user(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, user=self.user, check=True, capture_output=True, text=True, **kw)

    def start(self) -> Postgres:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self.user:
            shutil.chown(self.base, self.user)
            shutil.chown(self.sockets, self.user)
        self.base.chmod(0o755)
        self._as_server_user([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                              "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        conf = (f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.sockets}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 50\n")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(conf)
        self._as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"),
                              "-w", "-t", "60", "start"])
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    @property
    def env(self) -> dict[str, str]:
        """libpq variables that point pg_dump and psql at this server."""
        return {"PGHOST": str(self.sockets), "PGPORT": str(self.port), "PGUSER": "postgres"}

    def psql(self, sql: str, db: str = "postgres", check: bool = True) -> str:
        out = subprocess.run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql],
                             env={**os.environ, **self.env}, capture_output=True, text=True)
        if check and out.returncode:
            raise AssertionError(f"psql failed: {out.stderr}")
        return out.stdout.strip()

    def create_db(self, name: str, template: str = "template0") -> str:
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_db(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def row_counts(self, db: str) -> dict[str, int]:
        """Rows of every table, keyed `schema.table` unquoted, as manifests key them."""
        listing = self.psql("SELECT n.nspname || '.' || c.relname || chr(9) || format('%I.%I', n.nspname, c.relname) "
                            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
                            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                            "AND n.nspname NOT LIKE 'pg_toast%'", db)
        counts = {}
        for line in filter(None, listing.splitlines()):
            key, quoted = line.split("\t")
            counts[key] = int(self.psql(f"SELECT count(*) FROM {quoted}", db))
        return counts


class Sshd:
    """A real sshd on one loopback address with its own host key, config and authorized_keys.

    Its logins get `path` as PATH (default: kw-backup's scripts installed first) and `env`.
    """

    def __init__(self, base: Path, name: str, address: str, port: int, path: str | None = None,
                 env: dict[str, str] | None = None):
        self.base = base
        self.port = port
        self.name = name
        self.address = address
        self.path = path or f"{INSTALLED}:/usr/local/bin:/usr/bin:/bin"
        self.env = env or {}
        self.pidfile = base / "sshd.pid"
        self.authorized_keys = base / "authorized_keys"
        self.host_key = base / "host_ed25519"
        self.env_file = base / "backup.env"  # the place's "installed" settings (/etc/kw-backup/backup.env)

    def start(self) -> Sshd:
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # sshd's privilege-separation directory; an unprivileged sshd needs none
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True)
        self.authorized_keys.touch(mode=0o600)
        self.env_file.touch(mode=0o600)
        config = self.base / "sshd_config"
        config.write_text(
            f"ListenAddress {self.address}:{self.port}\nHostKey {self.host_key}\nPidFile {self.pidfile}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            "PermitUserEnvironment no\nLogLevel ERROR\nMaxStartups 100\nMaxSessions 50\n"
            f"Subsystem sftp internal-sftp -u 077\n"  # as README advises for an sftp offsite: private files
            f"SetEnv KW_TEST_PLACE={self.name} PATH={self.path} "
            f"KW_BACKUP_ENV={self.env_file} KW_BACKUP_SYSLOG={self.base / 'no-syslog'}"
            + "".join(f" {k}={v}" for k, v in self.env.items()) + "\n"
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


class SshWorld:
    """sshd places plus the client side: a key, known_hosts and an ssh config with one alias per place."""

    def __init__(self, base: Path):
        self.base = base
        self.key = base / "client" / "id_ed25519"
        self.known_hosts = base / "client" / "known_hosts"
        self.config = base / "client" / "ssh_config"
        self.port = free_port()
        self.places = {name: Sshd(base / name, name, addr, self.port) for name, addr in PLACE_ADDRESSES.items()}

    def start(self) -> SshWorld:
        global SSH_PORT
        SSH_PORT = self.port
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        for sshd in self.places.values():
            sshd.start().authorize(self.key.with_suffix(".pub").read_text())
        self._write_client_files()
        return self

    def add_place(self, name: str, address: str, path: str, env: dict[str, str]) -> Sshd:
        """Another sshd place (an alias `name` in the ssh config) whose logins get this PATH and environment."""
        sshd = Sshd(self.base / name, name, address, self.port, path, env)
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
        self.config.write_text("\n".join(aliases) + (
            f"\nHost *\n  Port {self.port}\n  User {user}\n  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n"
        ))

    def stop(self) -> None:
        for sshd in self.places.values():
            sshd.stop()

    def client_config(self, path: Path, identity: dict[str, Path] | None = None,
                      proxy: dict[str, str] | None = None) -> Path:
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

    def restricted_key(self, tmp: Path, prod_dir: Path) -> tuple[Path, str]:
        """A new key that prod accepts only as `rrsync -ro <prod_dir>`, as make authorize-pi5 adds it."""
        key = tmp / "id_prod_backup"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        public = key.with_suffix(".pub").read_text()
        self.places["prod"].authorize(public, f'restrict,command="rrsync -ro {prod_dir}"')
        return key, public

    def rclone_config(self, path: Path, name: str = "offsite", hashcheck: bool = True, address: str | None = None,
                      port: int | None = None) -> Path:
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
        path.write_text(f"[{name}]\ntype = sftp\nhost = {address or self.places['offsite'].address}\n"
                        f"port = {port or self.port}\nuser = {user}\nkey_file = {self.key}\n"
                        f"known_hosts_file = {known_hosts}\n"
                        + ("" if hashcheck else "disable_hashcheck = true\n"))
        path.chmod(0o600)
        return path

    def ssh(self, place: str, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-F", str(self.config), "-o", "BatchMode=yes", place, *argv],
                              capture_output=True, text=True, timeout=30)


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


def run_script(name: str, *args: str, env: dict[str, str], timeout: float = 120, at: str | None = None,
               **kw) -> subprocess.CompletedProcess:
    """Run bin/<name> as a user would: a plain process, its own environment, no terminal.

    `at` ("2024-03-10 03:00:00", UTC) runs it with the machine's clock there, ticking on (clocked()).
    """
    argv, env = clocked([str(BIN / name), *args], env, at)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          **kw)


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


def relay_command(address: str, bytes_per_second: int) -> str:
    """A ProxyCommand that slows a place's link down (see tests/relay.py)."""
    return f"{sys.executable} {Path(__file__).resolve().parent / 'relay.py'} {address} {SSH_PORT} {bytes_per_second}"


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
    return path, subprocess.run(["age-keygen", "-y", str(path)], check=True, capture_output=True,
                                text=True).stdout.strip()


def synthetic_dump(directory: Path, name: str, rows: int = 1000, random_bytes: bool = False,
                   manifest: bool = True) -> Path:
    """A valid dump with its manifest, quickly: pg_dump's shape, one table of `rows` rows."""
    import hashlib
    import random

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    rng = random.Random(name)
    body = (os.urandom(rows * 48).hex() if random_bytes else "x" * (rows * 96))
    lines = "".join(f"{i}\t{body[i * 96:(i + 1) * 96]}\n" for i in range(rows))
    sql = ("--\n-- PostgreSQL database dump\n--\n\n\\restrict k\n\n-- Dumped from database version 15.18\n"
           "-- Dumped by pg_dump version 15.18\n\nCREATE TABLE public.t (id int, v text);\n\n"
           f"COPY public.t (id, v) FROM stdin;\n{lines}\\.\n\n"
           f"-- {rng.random()}\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict k\n\n").encode()
    path = directory / name
    with open(path, "wb") as out:
        subprocess.run(["pigz", "-1", "-c"], input=sql, stdout=out, check=True)
    path.chmod(0o600)
    if manifest:
        data = path.read_bytes()
        (directory / (name + ".json")).write_text(json.dumps({
            "file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "created_at": "2024-01-01T02:00:00Z", "database": "kw_app_production", "server_version": "15.18",
            "pg_dump_version": "15.18", "tables": {"public.t": rows}, "tool_version": "test"}, indent=2))
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
