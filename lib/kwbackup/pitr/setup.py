"""setup-pitr: prepare prod for the WAL tier from the laptop (nothing installed there), then start it on the pi5.

Prod, through DB_EXEC as its superuser: a backup role with the non-superuser grants Barman
documents and a REPLICATION role, their passwords set as SCRAM verifiers that the pi5 computed
(the passwords themselves never leave the pi5's 0600 pgpass: not on a command line, not in a log,
not on the laptop); the one `host replication` line the official postgres image lacks, checked
by the server before its reload; `max_slot_wal_keep_size`, so an absent pi5 can never fill prod's
disk. The pi5: its pgpass and Barman's config, the replication slot, WAL streaming, the first
base backup. Every step looks before it changes, so a second run changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sys
import time

from .. import cli
from .. import log as logmod
from ..database import Database
from ..errors import Failed, UsageError
from ..log import log
from ..places import place
from ..run import run
from ..settings import Settings
from . import barman as barmanmod
from . import basebackup
from . import pi5 as pi5_side
from .barman import BACKUP_ROLE, OLDEST_MAJOR, SERVER, SLOT, STREAM_ROLE, Tier

HBA_COMMENT = "# kw-backup setup-pitr: the pi5's WAL stream, through its ssh tunnel (docker's network: samenet)"
HBA_LINE = f"host replication {STREAM_ROLE} samenet scram-sha-256"
HBA_LINE_DIRECT = f"host replication {STREAM_ROLE} 127.0.0.1/32 scram-sha-256"
SCRAM_ITERATIONS = 4096  # PostgreSQL's own scram_iterations default

# What Barman's postgres backup method needs, without superuser (Barman's docs, "Preliminary steps").
GRANTS = f"""
GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO {BACKUP_ROLE};
GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO {BACKUP_ROLE};
GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {BACKUP_ROLE};
GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO {BACKUP_ROLE};
GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO {BACKUP_ROLE};
GRANT pg_read_all_settings, pg_read_all_stats, pg_checkpoint TO {BACKUP_ROLE};
"""

SUPERUSER_SQL = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user;"
FACTS_SQL = """
SELECT current_setting('server_version_num'), current_setting('wal_level'),
       current_setting('max_wal_senders'), current_setting('max_replication_slots'),
       current_setting('max_slot_wal_keep_size'),
       (SELECT count(*) FROM pg_roles WHERE rolname IN ('kw_barman', 'kw_barman_stream')),
       (SELECT count(*) FROM pg_hba_file_rules
         WHERE 'replication' = ANY(database) AND (user_name = '{all}' OR 'kw_barman_stream' = ANY(user_name))
           AND type = 'host' AND error IS NULL)
"""


def scram_verifier(password: str) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5802/7677): ALTER ROLE ... PASSWORD takes it as
    is, so the password itself is never sent."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- the pi5's side (run where the WAL tier lives, as its user) --------------------------------------
def pi5_prepare(settings: Settings, major: int, dry_run: bool) -> dict:
    """Checks the client tools for prod's major; makes the passwords once (kept on later runs) and the config;
    answers with the roles' verifiers (never the passwords)."""
    tier = Tier(settings)
    tier.check_owner()
    barmanmod.check_client(tier, major)
    if dry_run:
        return {"passwords": "kept" if tier.has_passwords() else "new", "verifiers": {}}
    state = "kept" if tier.has_passwords() else "new"
    if state == "new":
        tier.make_dirs()
        tier.write_passwords({role: secrets.token_urlsafe(32) for role in (BACKUP_ROLE, STREAM_ROLE)})
    tier.record_prod_major(major)
    tier.write_config(major)
    verifiers = {role: scram_verifier(password) for role, password in tier.passwords().items()}
    return {"passwords": state, "verifiers": verifiers}


def _barman(tier: Tier, *args: str, timeout: float = 120) -> str:
    _, out, _ = run(tier.barman(*args), timeout=timeout)
    return out.decode(errors="replace")


def _connect(tier: Tier, timeout: float = 60):
    """A connection to prod through the tunnel; waits for a tunnel that is coming up."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            return tier.connect()
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline or "FATAL" in str(exc):  # the server answered: waiting will not help
                reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise Failed(
                    f"prod's PostgreSQL is unreachable through the tunnel ({tier.socket}): {reason}",
                    "start the tunnel (systemctl start kw-backup-pitr-tunnel on the pi5) and check that prod "
                    "allows its key (make authorize-pi5-tunnel on prod)",
                ) from exc
            time.sleep(1)


def _streaming(tier: Tier, timeout: float = 60) -> None:
    """Waits until prod shows Barman's receive-wal streaming on the slot."""
    deadline = time.monotonic() + timeout
    with _connect(tier) as conn:
        while True:
            active = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", [SLOT]).fetchone()
            if active and active[0]:
                return
            if time.monotonic() > deadline:
                raise Failed(
                    f"Barman's receive-wal did not start streaming within {timeout:.0f} s",
                    f"see {tier.log_file}; then run setup-pitr again",
                )
            time.sleep(1)


def pi5_start(settings: Settings, dry_run: bool) -> None:
    """The slot, streaming, and the first base backup (when there is none); then Barman's own check."""
    tier = Tier(settings)
    tier.check_owner()
    if dry_run:
        logmod.dry("would create the slot %s on prod, start streaming WAL and take the first base backup", SLOT)
        return
    with _connect(tier):
        pass
    log.info("prod reachable through the tunnel; creating the replication slot %s when missing", SLOT)
    _barman(tier, "receive-wal", "--create-slot", "--if-not-exists", SERVER)
    _barman(tier, "cron")
    _streaming(tier)
    if newest_done_backup(tier) is None:
        log.info("taking the first base backup (immediate checkpoint)")
        basebackup.switch_wal_archived(tier)
        basebackup.take_base_backup(tier, 600)
    else:
        log.info("a base backup exists (%s): none taken", newest_done_backup(tier))
    _barman(tier, "check", SERVER)
    log.info("the WAL tier streams prod's WAL into %s", tier.home)


def newest_done_backup(tier: Tier) -> str | None:
    from .status import base_backups

    done = [b for b in base_backups(tier.server_home) if b.status == "DONE"]
    return done[-1].backup_id if done else None


# --- the laptop's side -------------------------------------------------------------------------------
class Setup:
    def __init__(self, settings: Settings, dry_run: bool):
        self.settings = settings
        self.dry_run = dry_run
        self.pi5 = place(settings, "pi5")
        self.db = Database(settings, host=place(settings, "prod"))
        self.direct = settings["DB_EXEC"] == "direct"

    def run(self) -> None:
        if self.settings["PITR"] != "on":
            raise UsageError("PITR is off", "set PITR=on in the env file (here and on the pi5) first")
        facts = self.prod_facts()
        major = facts["major"]
        prepared = self.on_pi5("prepare", "--major", str(major))
        self.prepare_prod(facts, prepared)
        self.on_pi5("start")
        if self.dry_run:
            logmod.dry("nothing changed")

    def prod_facts(self) -> dict:
        if self.db.sql(SUPERUSER_SQL)[0][0] != "t":  # before the facts: pg_hba_file_rules is a superuser's
            raise UsageError(
                f"DB_USER {self.settings['DB_USER']} is not a superuser on prod",
                "setup-pitr creates roles and changes prod's settings: name the superuser in DB_USER",
            )
        version, wal_level, senders, slots, keep, roles, hba = self.db.sql(FACTS_SQL)[0]
        major = int(version) // 10000
        if major < OLDEST_MAJOR:
            raise Failed(
                f"prod runs PostgreSQL {major}; the WAL tier needs {OLDEST_MAJOR} or newer",
                "upgrade prod's PostgreSQL, or keep to the nightly dumps",
            )
        if wal_level not in ("replica", "logical"):
            raise Failed(
                f"prod's wal_level is {wal_level}: streaming WAL needs replica",
                "set wal_level=replica on prod (the postgres image's default) and restart it",
            )
        if int(senders) < 2 or int(slots) < 1:
            raise Failed(
                f"prod allows {senders} WAL senders and {slots} replication slots; the WAL tier needs 2 and 1",
                "raise max_wal_senders and max_replication_slots on prod (the image's defaults are 10) and restart",
            )
        log.info("prod: PostgreSQL %s, wal_level %s, max_slot_wal_keep_size %s", major, wal_level, keep)
        return {"major": major, "keep": keep, "roles": int(roles), "hba": int(hba) > 0}

    def on_pi5(self, step: str, *args: str) -> dict:
        """The pi5's side of a step: in this process when it is this machine, else its installed setup-pitr."""
        if self.pi5.is_local:
            if step == "prepare":
                return pi5_prepare(self.settings, int(args[1]), self.dry_run)
            pi5_start(self.settings, self.dry_run)
            return {}
        argv = ["setup-pitr", "--pi5-side", step, *args, *(["--dry-run"] if self.dry_run else [])]
        out = pi5_side.run_there(self.pi5, argv, f"setup-pitr --pi5-side {step}")
        text = out.decode(errors="replace").strip()
        return json.loads(text.splitlines()[-1]) if step == "prepare" else {}

    def prepare_prod(self, facts: dict, prepared: dict) -> None:
        keep_mb = round(float(self.settings["PITR_PROD_WAL_KEEP_GB"]) * 1024)
        if self.dry_run:
            logmod.dry(
                "would %s the roles %s and %s (passwords: %s, held only on the pi5), grant the backup functions, "
                "set max_slot_wal_keep_size to %d MB and reload",
                "update" if facts["roles"] == 2 else "create",
                BACKUP_ROLE,
                STREAM_ROLE,
                prepared["passwords"],
                keep_mb,
            )
            if not facts["hba"]:
                logmod.dry("would add to pg_hba.conf: %s", HBA_LINE_DIRECT if self.direct else HBA_LINE)
            return
        verifiers = prepared["verifiers"]
        roles_sql = (
            "DO $kw$BEGIN\n"
            f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{BACKUP_ROLE}') THEN"
            f" CREATE ROLE {BACKUP_ROLE}; END IF;\n"
            f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{STREAM_ROLE}') THEN"
            f" CREATE ROLE {STREAM_ROLE}; END IF;\n"
            "END$kw$;\n"
            f"ALTER ROLE {BACKUP_ROLE} WITH LOGIN NOSUPERUSER NOREPLICATION NOCREATEDB NOCREATEROLE"
            f" PASSWORD {_literal(verifiers[BACKUP_ROLE])};\n"
            f"ALTER ROLE {STREAM_ROLE} WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE"
            f" PASSWORD {_literal(verifiers[STREAM_ROLE])};\n"
            f"{GRANTS}"
            f"ALTER SYSTEM SET max_slot_wal_keep_size = '{keep_mb}MB';\n"
        )
        # The verifiers go on psql's stdin, never its command line.
        run(self.db.psql("postgres"), input=roles_sql.encode(), timeout=120)
        log.info("prod: roles %s and %s ready; max_slot_wal_keep_size %d MB", BACKUP_ROLE, STREAM_ROLE, keep_mb)
        if not facts["hba"]:
            if self.direct:
                print(
                    "add this line to prod's pg_hba.conf by hand, then reload PostgreSQL "
                    f"(SELECT pg_reload_conf()):\n  {HBA_LINE_DIRECT}",
                    file=sys.stderr,
                )
            else:
                self.add_hba_line()
        self.db.sql("SELECT pg_reload_conf();")

    def add_hba_line(self) -> None:
        """Appends the replication line to pg_hba.conf through SQL (lo_export writes the file as the server's own
        user), after the server has parsed the new file without an error; otherwise the old file goes back."""
        (current,) = self.db.sql(
            "SELECT translate(encode(pg_read_binary_file(current_setting('hba_file')), 'base64'), E'\\n', '');"
        )[0]
        old = base64.b64decode(current)
        new = old + (b"" if old.endswith(b"\n") or not old else b"\n") + f"{HBA_COMMENT}\n{HBA_LINE}\n".encode()
        # One transaction: a failure anywhere leaves no large object behind.
        write = (
            "BEGIN;\nSELECT lo_from_bytea(0, decode({content}, 'base64')) AS kw_hba \\gset\n"
            "SELECT lo_export(:kw_hba, current_setting('hba_file'));\nSELECT lo_unlink(:kw_hba);\nCOMMIT;\n"
        )
        errors_sql = "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL;"
        self.db.sql(write.format(content=_literal(base64.b64encode(new).decode())))
        if self.db.sql(errors_sql)[0][0] != "0":
            self.db.sql(write.format(content=_literal(current)))
            raise Failed(
                "prod's pg_hba.conf did not parse with the replication line; it is back as it was",
                f"add by hand: {HBA_LINE}",
            )
        log.info("prod: added to pg_hba.conf: %s", HBA_LINE)


def main_pi5_side(settings: Settings, step: str, major: int | None, dry_run: bool) -> int:
    cli.hang_up_when_the_caller_goes()
    if step == "prepare":
        print(json.dumps(pi5_prepare(settings, major, dry_run)), flush=True)
    else:
        pi5_start(settings, dry_run)
    return 0
