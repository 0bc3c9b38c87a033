"""The WAL tier on the pi5: Barman, from its own pinned venv, with a config made from the settings.

Everything lives under PITR_DIR (0700, the backup user's):

    barman.conf, barman.d/prod.conf  written from the settings before every Barman run
    pgpass                           the two roles' passwords (0600; nowhere else)
    home/                            Barman's home: prod/base, prod/wals, prod/streaming (what the nas copies)
    locks/, log/barman.log           Barman's locks (a local filesystem) and log
    tunnel/.s.PGSQL.<PROD_PG_PORT>   the ssh tunnel's end: a unix socket only this user can open
    ssh/id_tunnel                    the tunnel's key (prod allows it one forward and nothing else)
    prod-major                       prod's PostgreSQL major, as setup-pitr found it
"""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

from .. import files
from ..errors import Failed, UsageError
from ..run import Cmd
from ..settings import Settings
from ..venv import ROOT

SERVER = "prod"  # Barman's name for the one server it backs up
SLOT = "kw_barman"
BACKUP_ROLE = "kw_barman"  # barman's conninfo: backups' start and stop, checks (no superuser)
STREAM_ROLE = "kw_barman_stream"  # REPLICATION: pg_basebackup and pg_receivewal
BARMAN = ROOT / ".venv-barman" / "bin" / "barman"
PG_LIB = Path("/usr/lib/postgresql")
OLDEST_MAJOR = 15  # pg_backup_start() and the pg_checkpoint role: what the non-superuser grants need


class Tier:
    """The WAL tier's files on this machine."""

    def __init__(self, settings: Settings, directory: str | None = None):
        self.settings = settings
        self.dir = Path(directory or settings["PITR_DIR"])
        self.conf = self.dir / "barman.conf"
        self.conf_dir = self.dir / "barman.d"
        self.pgpass = self.dir / "pgpass"
        self.home = self.dir / "home"
        self.server_home = self.home / SERVER
        self.locks = self.dir / "locks"
        self.log_file = self.dir / "log" / "barman.log"
        self.tunnel_dir = self.dir / "tunnel"
        self.socket = self.tunnel_dir / f".s.PGSQL.{settings['PROD_PG_PORT']}"
        self.key = self.dir / "ssh" / "id_tunnel"
        self.major_file = self.dir / "prod-major"

    # --- what is there --------------------------------------------------------------------------
    def check_owner(self) -> None:
        """Barman and cron run as the backup user: a file root made here would stop them, so only its owner runs."""
        if not self.dir.is_dir():
            raise UsageError(
                f"no WAL tier at PITR_DIR {self.dir}", "make install-pi5 PITR=on makes it; then run setup-pitr"
            )
        owner = self.dir.stat().st_uid
        if owner != os.geteuid():
            import pwd

            name = pwd.getpwuid(owner).pw_name
            raise UsageError(
                f"PITR_DIR {self.dir} belongs to {name}, not {getpass.getuser()}",
                f"run it as {name} (sudo -u {name} ...), as its cron lines do",
            )

    def prod_major(self) -> int | None:
        try:
            return int(self.major_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def record_prod_major(self, major: int) -> None:
        files.write_atomic(self.dir, self.major_file.name, f"{major}\n".encode(), replace=True)

    def has_passwords(self) -> bool:
        return set(self.passwords()) == {BACKUP_ROLE, STREAM_ROLE}

    def passwords(self) -> dict[str, str]:
        """The roles' passwords from pgpass (host:port:database:user:password lines)."""
        found = {}
        try:
            text = self.pgpass.read_text()
        except FileNotFoundError:
            return {}
        for line in text.splitlines():
            parts = line.split(":")
            if len(parts) == 5 and parts[3] in (BACKUP_ROLE, STREAM_ROLE):
                found[parts[3]] = parts[4]
        return found

    def write_passwords(self, passwords: dict[str, str]) -> None:
        # host is the tunnel's socket directory, as libpq matches it; `*` for the rest.
        lines = [f"{self.tunnel_dir}:*:*:{role}:{password}\n" for role, password in sorted(passwords.items())]
        files.write_atomic(self.dir, self.pgpass.name, "".join(lines).encode(), replace=True)

    def make_dirs(self) -> None:
        for directory in (self.dir, self.conf_dir, self.home, self.locks, self.log_file.parent, self.tunnel_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)

    # --- Barman ---------------------------------------------------------------------------------
    def conninfo(self, role: str, dbname: str | None = "postgres") -> str:
        parts = [
            f"host={self.tunnel_dir}",
            f"port={self.settings['PROD_PG_PORT']}",
            f"user={role}",
            *([f"dbname={dbname}"] if dbname else []),
            f"passfile={self.pgpass}",  # Barman runs its tools with a HOME of its own: no ~/.pgpass
            "connect_timeout=10",
        ]
        return " ".join(parts)

    def connect(self):
        """A connection to prod through the tunnel as the backup role (psycopg 3, autocommit)."""
        import psycopg

        return psycopg.connect(self.conninfo(BACKUP_ROLE), autocommit=True, connect_timeout=10)

    def pg_bindir(self, major: int) -> Path:
        return PG_LIB / str(major) / "bin"

    def config(self, major: int) -> tuple[str, str]:
        """barman.conf and barman.d/prod.conf for prod's major `major`."""
        s = self.settings
        main = (
            "; kw-backup: written from the settings before every run (edit the env file, not this)\n"
            "[barman]\n"
            f"barman_user = {getpass.getuser()}\n"
            f"barman_home = {self.home}\n"
            f"barman_lock_directory = {self.locks}\n"
            f"log_file = {self.log_file}\n"
            "log_level = INFO\n"
            f"configuration_files_directory = {self.conf_dir}\n"
        )
        server = (
            f"[{SERVER}]\n"
            "description = prod through the kw-backup ssh tunnel\n"
            f"conninfo = {self.conninfo(BACKUP_ROLE)} application_name=kw_barman\n"
            f"streaming_conninfo = {self.conninfo(STREAM_ROLE, None)}\n"
            "backup_method = postgres\n"
            "archiver = off\n"
            "streaming_archiver = on\n"
            f"slot_name = {SLOT}\n"
            "create_slot = manual\n"
            f"path_prefix = {self.pg_bindir(major)}\n"
            # Each segment is compressed once complete, as it moves from streaming/ to wals/; never the one
            # still being streamed (the .partial).
            "compression = gzip\n"
            "immediate_checkpoint = true\n"
            f"retention_policy = RECOVERY WINDOW OF {s['PITR_WINDOW_DAYS']} DAYS\n"
            "retention_policy_mode = auto\n"
            "wal_retention_policy = main\n"
            "minimum_redundancy = 1\n"
            f"last_backup_maximum_age = {s.int('PITR_BASE_BACKUP_DAYS') + 1} DAYS\n"
        )
        return main, server

    def write_config(self, major: int | None = None) -> None:
        major = major or self.prod_major()
        if major is None:
            raise UsageError("the WAL tier is not set up (no prod-major in PITR_DIR)", "run setup-pitr")
        main, server = self.config(major)
        self.make_dirs()
        for path, text in ((self.conf, main), (self.conf_dir / f"{SERVER}.conf", server)):
            if not path.exists() or path.read_text() != text:
                files.write_atomic(path.parent, path.name, text.encode(), replace=True)

    def barman(self, *args: str, name: str = "") -> Cmd:
        """A Barman command on this tier's config (written first)."""
        if not BARMAN.exists():
            raise UsageError(
                f"Barman is not installed ({BARMAN})",
                "on the pi5: make install-pi5 PITR=on; on a laptop (--at ... --from-nas): make venv-barman",
            )
        self.write_config()
        return Cmd([str(BARMAN), "-c", str(self.conf), *args], name=name or f"barman {args[0] if args else ''}")


def client_major(bindir: Path) -> int | None:
    """The major of the PostgreSQL client tools in `bindir` (pg_receivewal's --version), None when absent."""
    tool = bindir / "pg_receivewal"
    if not tool.exists():
        return None
    from ..run import run

    _, out, _ = run(Cmd([str(tool), "--version"], name="pg_receivewal --version"), timeout=30)
    found = re.search(rb"(\d+)(?:\.\d+)?", out)
    return int(found[1]) if found else None


def check_client(tier: Tier, major: int) -> None:
    """Recovery and streaming need the pi5's client tools of prod's very major."""
    have = client_major(tier.pg_bindir(major))
    if have != major:
        installed = sorted(p.name for p in PG_LIB.iterdir() if (p / "bin" / "pg_receivewal").exists()) or ["none"]
        raise Failed(
            f"prod runs PostgreSQL {major} but the pi5 has no PostgreSQL {major} client tools "
            f"(installed: {', '.join(installed)})",
            f"apt-get install postgresql-client-{major} on the pi5 (PGDG's apt repository for other majors)",
        )


def heartbeat(tier: Tier) -> None:
    """A transaction on prod every minute: recovery to a time stops only at a commit, so a quiet prod still has
    one a minute after any moment, and the WAL stream moves (a logical message commits nothing else)."""

    with tier.connect() as conn:
        conn.execute("SELECT pg_logical_emit_message(true, 'kw-backup', 'heartbeat')")


def new_chain(tier: Tier, wait_timeout: int = 3600) -> None:
    """A new WAL chain after prod lost the slot (the pi5 away past max_slot_wal_keep_size) or it went missing:
    receive-wal stopped, the slot made anew, streaming restarted from prod's position now, a base backup.

    Barman's cron lock is held over the slot steps, so the minute's `barman cron` does not start receive-wal
    between them (it skips a server whose lock is taken). Barman's --reset drops the old chain's last .partial
    segment; every complete segment and base backup stays, recoverable up to the loss.
    """
    import fcntl
    import time

    from ..log import log
    from ..run import run
    from .basebackup import switch_wal_archived, take_base_backup

    def slot() -> tuple | None:
        with tier.connect() as conn:
            return conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", [SLOT]).fetchone()

    def wait(what: str, done, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise Failed(f"{what} within {timeout:.0f} s", f"see {tier.log_file}; then run it again")
            time.sleep(0.5)

    def receiver_stopped() -> bool:
        with open(tier.locks / f".{SERVER}-receive-wal.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

    tier.write_config()
    with open(tier.locks / f".{SERVER}-cron.lock", "a") as cron_lock:
        fcntl.flock(cron_lock, fcntl.LOCK_EX)
        if not receiver_stopped():
            log.info("stopping Barman's receive-wal")
            run(tier.barman("receive-wal", "--stop", SERVER), timeout=60, check=False)
            wait("Barman's receive-wal did not stop", receiver_stopped)
        if slot() is not None:
            wait(f"prod's slot {SLOT} stayed in use", lambda: not (slot() or (False,))[0])
            log.info("dropping prod's replication slot %s", SLOT)
            run(tier.barman("receive-wal", "--drop-slot", SERVER), timeout=60)
        log.info("creating prod's replication slot %s", SLOT)
        run(tier.barman("receive-wal", "--create-slot", SERVER), timeout=60)
        run(tier.barman("receive-wal", "--reset", SERVER), timeout=60)
    run(tier.barman("cron"), timeout=300)
    wait(f"Barman's receive-wal did not start streaming on {SLOT}", lambda: (slot() or (False,))[0])
    log.info("streaming again; taking a base backup to start the new chain")
    switch_wal_archived(tier)
    take_base_backup(tier, wait_timeout)
