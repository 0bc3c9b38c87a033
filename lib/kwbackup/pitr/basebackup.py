"""The WAL tier's base backups, taken so that no interrupt or kill leaves one running, or half-made and counted.

A base backup is `barman backup --wait` in a session of its own. An interrupt of the run that takes it (SIGHUP,
SIGINT, SIGTERM), and its death (kill -9: PR_SET_PDEATHSIG), reach Barman as a SIGTERM, never a SIGKILL: Barman
passes it on to pg_basebackup, whose closed connection makes prod abort the backup, and marks the backup FAILED.
Killed outright, Barman would leave pg_basebackup copying on, orphaned. The run then deletes the backup it made
(FAILED); one killed with it (a power cut: STARTED, its Barman gone) is deleted by the next run. Only Barman's DONE
counts (status.py), and a partial copy is as large as what it copied.
"""

from __future__ import annotations

import fcntl
import subprocess
import tempfile
import time

from ..errors import Failed, KwError, LockHeld
from ..log import known_secrets, log, mask
from ..run import StageFailed, run
from .barman import SERVER, Tier
from .status import BaseBackup, base_backups

STOP_SECONDS = 60  # what Barman gets, after a SIGTERM, to stop pg_basebackup and mark its backup FAILED


def switch_wal_archived(tier: Tier, timeout: float = 120) -> None:
    """A WAL segment closed and archived, which Barman wants before the first base backup of a chain: what
    `barman switch-wal --force --archive` does, without its wait for prod's next WAL record. Barman archives the
    newest complete segment only once the next has begun, which a quiet prod puts off for up to 15 s (its
    bgwriter's next record); a committed logical message right after the switch begins it."""
    message = "SELECT pg_logical_emit_message(true, 'kw-backup', 'switch')"
    with tier.connect() as conn:
        conn.execute(message)  # something to switch, even on an idle prod
        (closed,) = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        conn.execute(message)
    deadline = time.monotonic() + timeout
    while not (tier.server_home / "wals" / closed[:16] / closed).exists():
        if time.monotonic() > deadline:
            raise Failed(f"WAL segment {closed} was not archived within {timeout:.0f} s", f"see {tier.log_file}")
        run(tier.barman("archive-wal", SERVER), timeout=120, check=False)  # the minute's may hold its lock


def leftovers(tier: Tier) -> list[BaseBackup]:
    """The base backups that failed or killed runs left: FAILED, or STARTED by a Barman that is gone (Barman holds
    its backup lock throughout a backup). LockHeld while a Barman backup or delete runs."""
    tier.make_dirs()
    with open(tier.locks / f".{SERVER}-backup.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while listing: no backup starts meanwhile
        except BlockingIOError:
            lock.seek(0)
            raise LockHeld(
                f"a base backup of {SERVER} is running (Barman pid {lock.read().strip() or 'unknown'})",
                f"wait for it to end (pitr-barman list-backups {SERVER} shows it), then run this again",
            ) from None
        return [b for b in base_backups(tier.server_home) if b.status in ("FAILED", "STARTED")]


def delete_leftovers(tier: Tier) -> None:
    """Deletes what `leftovers` finds, saying so."""
    for backup in leftovers(tier):
        log.warning("deleting base backup %s, never completed (Barman's status %s)", backup.backup_id, backup.status)
        run(tier.barman("delete", SERVER, backup.backup_id), timeout=600)


def take_base_backup(tier: Tier, wait_timeout: int) -> None:
    """`barman backup --wait`, once what failed or killed runs left is deleted; LockHeld when one is running."""
    tier.write_config()
    delete_leftovers(tier)
    cmd = tier.barman("backup", "--wait", "--wait-timeout", str(wait_timeout), SERVER)
    log.debug("run: %s", cmd.display())
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", *cmd.argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _delete_own_leftover(tier)
            raise
        if code:
            _delete_own_leftover(tier)
            out.seek(0)
            said = [line.strip() for line in out.read().decode(errors="replace").splitlines() if line.strip()]
            raise StageFailed(cmd.name, f"exit {code}", mask(" | ".join(said[-3:]), known_secrets()))


def _delete_own_leftover(tier: Tier) -> None:
    try:
        delete_leftovers(tier)
    except KwError as exc:
        log.warning("the failed base backup is left: %s; the next pitr-base-backup deletes it", exc.line())
