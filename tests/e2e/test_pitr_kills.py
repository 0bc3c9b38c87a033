"""setup-pitr, pitr-cron and pitr-base-backup killed mid-run (issue 23: every script survives SIGHUP, SIGTERM and
kill -9 at any line with nothing lost).

Each is killed at a point the test waits for, the way it happens: a closed terminal sends SIGHUP to the process
group, `kill` and systemd send SIGTERM to the script, the OOM killer sends SIGKILL to one process and a power cut
stops all of them. Then what an operator expects: exit 128 + the signal with one error line, nothing of the run
left running, a partial base backup never counted and its space reclaimed, prod with no backup in progress, and the
next run healing everything. One world serves them all, each kill leaving it as the next run heals it.

A base backup is held in progress by stopping prod's checkpointer: Barman's backup STARTED, pg_basebackup connected
and prod's walsender waiting for the backup's checkpoint, for as long as the test needs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from kwbackup.pitr.setup import HBA_LINE
from tests import world
from tests.e2e.test_pitr_faults import catch_up, healthy, start_tunnel, until, write_wal

SERVER_HOME = ("home", "prod")


# --- runs in the background, as cron or a terminal starts them ------------------------------------------
class Run:
    """A script started as the leader of its own process group (cron's job, a terminal's foreground job)."""

    def __init__(self, argv: list[str], env: dict[str, str], **kw):
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.err,  # a file: a child that outlives the script cannot keep the test waiting
            start_new_session=True,
            **kw,
        )
        self.pid = self.proc.pid

    def ended(self, timeout: float = 120) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        with self.err:
            self.err.seek(0)
            return code, self.err.read().decode(errors="replace")


def laptop_run(pitr, script: str, *args: str) -> Run:
    return Run([str(world.BIN / script), *args], pitr.laptop_env())


def pi_run(pitr, script: str, *args: str) -> Run:
    """An installed script as `pi` (its uid set directly: runuser would stand between it and the signals)."""
    argv, env = pitr.pi_argv(script, *args)
    return Run(argv[argv.index("--") + 1 :], env, user=pitr.pi.pw_uid, group=pitr.pi.pw_gid, extra_groups=[])


def interrupted(code: int, stderr: str, signum: signal.Signals) -> None:
    """Exit 128 + the signal, and one error line saying so."""
    errors = [line for line in stderr.splitlines() if "error: " in line]
    assert code == 128 + signum and len(errors) == 1, (code, stderr)
    assert f"interrupted by {signum.name}" in errors[0], errors


# --- what is where -------------------------------------------------------------------------------------
def pi5_processes(pitr, *words: str) -> list[int]:
    """`pi`'s processes of this world's pi5 (its env file, or its PITR_DIR on their command line) with one of
    `words` as an argument or a program's name (pg_basebackup; backup, for `barman ... backup`)."""
    marks = (f"KW_BACKUP_ENV={pitr.pi5.env_file}\0".encode(), str(pitr.dir).encode())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != pitr.pi.pw_uid:
                continue
            argv = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        names = {os.path.basename(arg) for arg in argv.decode(errors="replace").split("\0")}
        if any(m in argv or m in environ for m in marks) and names.intersection(words):
            found.append(int(entry.name))
    return found


def backups(pitr) -> dict[str, str]:
    """Barman's base backups: id -> status, as their backup.info files say."""
    meta = pitr.dir.joinpath(*SERVER_HOME, "meta")
    return {
        info.name.removesuffix("-backup.info"): next(
            line[7:] for line in info.read_text().splitlines() if line.startswith("status=")
        )
        for info in sorted(meta.glob("*-backup.info"))
    }


def copies(pitr) -> list[str]:
    """The base backups' directories (what they take on the disk)."""
    return sorted(p.name for p in pitr.dir.joinpath(*SERVER_HOME, "base").iterdir())


def counted(pitr) -> int:
    """The base backups pitr-status and list-backups' point-in-time section count (they agree), the tier healthy."""
    state = healthy(pitr)
    shown = pitr.laptop("list-backups", "--point-in-time", "--json", "--only", "pi5")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    (pi5,) = json.loads(shown.stdout)
    assert pi5["base_backups"] == state["base_backups"] and pi5["status"] == "ok", (pi5, state)
    return state["base_backups"]


def backup_running_on_prod(pitr) -> int:
    return int(pitr.prod_sql("SELECT count(*) FROM pg_stat_progress_basebackup"))


def prod_idle(pitr) -> None:
    """Prod has no base backup in progress: the killed one's connection ended and the server aborted it."""
    until("prod's backup of the killed run aborted", lambda: backup_running_on_prod(pitr) == 0, 60, 0.1)


def nothing_left(pitr) -> None:
    """Nothing of a killed base backup runs on the pi5: no pg_basebackup, no Barman backup or delete, no
    setup-pitr side."""
    until(
        "the killed run's processes gone from the pi5",
        lambda: not pi5_processes(pitr, "pg_basebackup", "backup", "delete", "--pi5-side"),
        60,
        0.1,
    )


# --- holding a base backup in progress -------------------------------------------------------------------
@contextmanager
def checkpoints_held(pitr):
    """Prod's checkpointer stopped: a base backup waits for its checkpoint until the block ends."""
    pid = int(pitr.prod_sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"))
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def held_at_its_checkpoint(pitr) -> bool:
    return (
        pitr.prod_sql(
            "SELECT count(*) FROM pg_stat_progress_basebackup WHERE phase = 'waiting for checkpoint to finish'"
        )
        == "1"
    )


# --- setup-pitr ------------------------------------------------------------------------------------------
def stream_verifier(pitr) -> str:
    """The replication role's SCRAM verifier on prod: each run of setup-pitr sets one of its own (a new salt)."""
    return pitr.prod_sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'kw_barman_stream'")


def logs_in(pitr, role: str, password: str, replication: bool) -> bool:
    where = f"host=127.0.0.1 port={pitr.pg.port} user={role} " + (
        "dbname=replication replication=true" if replication else "dbname=postgres"
    )
    done = subprocess.run(
        ["psql", "-X", "-At", where, "-c", "IDENTIFY_SYSTEM" if replication else "SELECT 1"],
        env={"PATH": world.SYSTEM_PATH, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"},
        capture_output=True,
        text=True,
    )
    return done.returncode == 0


def setup_pitr_killed_then_run_again(pitr):
    start_tunnel(pitr)
    with checkpoints_held(pitr):  # no run gets past its first base backup's checkpoint
        # kill -9 (the OOM killer: the script alone) once the pi5 wrote its passwords, before prod has them
        run = laptop_run(pitr, "setup-pitr")
        until("the pi5's pgpass", (pitr.dir / "pgpass").exists, 60, 0.02)
        os.kill(run.pid, signal.SIGKILL)
        assert run.ended()[0] == -signal.SIGKILL
        until("the pi5's side of the killed run ended", lambda: not pi5_processes(pitr, "--pi5-side"), 60, 0.1)

        # SIGHUP to the process group (the terminal closed) once prod's roles have this run's passwords
        before = stream_verifier(pitr)
        run = laptop_run(pitr, "setup-pitr")
        until("prod's roles with this run's passwords", lambda: stream_verifier(pitr) not in ("", before), 60, 0.05)
        os.killpg(run.pid, signal.SIGHUP)
        interrupted(*run.ended(), signal.SIGHUP)

        # SIGTERM to the script during the pi5's first base backup: the pi5's side stops with the laptop's
        run = laptop_run(pitr, "setup-pitr")
        until("the first base backup held at its checkpoint", lambda: held_at_its_checkpoint(pitr), 60, 0.1)
        assert list(backups(pitr).values()) == ["STARTED"]
        os.kill(run.pid, signal.SIGTERM)
        interrupted(*run.ended(), signal.SIGTERM)
        nothing_left(pitr)  # while prod still holds the backup: the pi5 needs nothing from it to stop
        assert backups(pitr) == {} and copies(pitr) == []
    prod_idle(pitr)

    again = pitr.laptop("setup-pitr")
    assert again.returncode == 0, again.stderr
    assert pitr.prod_sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'kw_barman'") == "t"
    passwords = dict(line.split(":")[3:] for line in (pitr.dir / "pgpass").read_text().splitlines())
    assert logs_in(pitr, "kw_barman", passwords["kw_barman"], replication=False)
    assert logs_in(pitr, "kw_barman_stream", passwords["kw_barman_stream"], replication=True)
    assert (pitr.pg.data / "pg_hba.conf").read_text().count(HBA_LINE) == 1
    assert pitr.prod_sql("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL") == "0"
    assert list(backups(pitr).values()) == ["DONE"] and len(copies(pitr)) == 1
    assert counted(pitr) == 1


# --- pitr-cron -------------------------------------------------------------------------------------------
def slot_active(pitr) -> bool:
    return pitr.prod_sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'kw_barman'") == "t"


def barman_cron_caught(pitr) -> Run:
    """A pitr-cron seen while its barman cron runs (one whose barman cron ended unseen ran as the minute's would)."""
    for _ in range(10):
        run = pi_run(pitr, "pitr-cron")
        seen = until(
            "barman cron running, or pitr-cron's end",
            lambda run=run: pi5_processes(pitr, "cron") or run.proc.poll() is not None,
            30,
            0.005,
        )
        if seen is not True:
            return run
        assert run.ended()[0] == 0
    raise AssertionError("no pitr-cron was seen running barman cron")


def pitr_cron_killed_during_barman_cron(pitr):
    segment = write_wal(pitr, segments=3)  # complete segments for Barman's archive-wal to move
    run = barman_cron_caught(pitr)
    # kill -9 of everything: pitr-cron and barman cron (its process group), and Barman's processes beside them
    os.killpg(run.pid, signal.SIGKILL)
    for pid in pi5_processes(pitr, "cron", "archive-wal", "receive-wal", "pg_receivewal"):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert run.ended()[0] == -signal.SIGKILL
    until("prod's end of the killed pg_receivewal gone", lambda: not slot_active(pitr), 30, 0.1)

    # The next minute's pitr-cron: no lock left in its way, streaming again from the slot, nothing missing.
    started = time.monotonic()
    done = pitr.on_pi("pitr-cron")
    assert done.returncode == 0 and time.monotonic() - started < 30, done.stderr
    until("streaming again", lambda: slot_active(pitr), 30, 0.1)
    catch_up(pitr, segment)
    catch_up(pitr, write_wal(pitr, segments=2))
    healthy(pitr)


# --- pitr-base-backup ------------------------------------------------------------------------------------
def base_backup_killed(pitr):
    (first,) = backups(pitr)

    # SIGTERM to the script (kill, systemd): it stops Barman and pg_basebackup, and deletes what they copied.
    with checkpoints_held(pitr):
        run = pi_run(pitr, "pitr-base-backup")
        until("the base backup held at its checkpoint", lambda: held_at_its_checkpoint(pitr), 60, 0.1)
        assert list(backups(pitr).values()) == ["DONE", "STARTED"] and counted(pitr) == 1
        os.kill(run.pid, signal.SIGTERM)
        code, err = run.ended()
        interrupted(code, err, signal.SIGTERM)
        assert "never completed (Barman's status FAILED)" in err, err
        nothing_left(pitr)
        assert backups(pitr) == {first: "DONE"} and copies(pitr) == [first]
    prod_idle(pitr)

    # kill -9 of the script alone (the OOM killer): Barman, told by the kernel, still stops pg_basebackup.
    with checkpoints_held(pitr):
        run = pi_run(pitr, "pitr-base-backup")
        until("the base backup held at its checkpoint", lambda: held_at_its_checkpoint(pitr), 60, 0.1)
        os.kill(run.pid, signal.SIGKILL)
        assert run.ended()[0] == -signal.SIGKILL
        nothing_left(pitr)
    prod_idle(pitr)
    (failed,) = (b for b in backups(pitr) if b != first)
    assert backups(pitr) == {first: "DONE", failed: "FAILED"} and counted(pitr) == 1

    # kill -9 of all its processes (a power cut), once it deleted what the last run left: a STARTED backup is left.
    with checkpoints_held(pitr):
        run = pi_run(pitr, "pitr-base-backup")
        until("the base backup held at its checkpoint", lambda: held_at_its_checkpoint(pitr), 60, 0.1)
        for pid in [*pi5_processes(pitr, "pg_basebackup", "backup"), run.pid]:
            os.kill(pid, signal.SIGKILL)
        code, err = run.ended()
        assert code == -signal.SIGKILL and f"deleting base backup {failed}, never completed" in err, err
        nothing_left(pitr)
    prod_idle(pitr)
    (started,) = (b for b in backups(pitr) if b != first)
    assert backups(pitr) == {first: "DONE", started: "STARTED"} and counted(pitr) == 1

    # The next run deletes it, saying so, and takes its own.
    done = pitr.on_pi("pitr-base-backup")
    assert done.returncode == 0, done.stderr
    assert f"deleting base backup {started}, never completed (Barman's status STARTED)" in done.stderr, done.stderr
    (second,) = (b for b in backups(pitr) if b != first)
    assert backups(pitr) == {first: "DONE", second: "DONE"} and copies(pitr) == [first, second]
    assert counted(pitr) == 2


def new_chain_hung_up_then_run_again(pitr):
    # SIGHUP to the process group (the terminal closed) during the new chain's base backup
    with checkpoints_held(pitr):
        run = pi_run(pitr, "pitr-base-backup", "--new-chain")
        until("the new chain's base backup held at its checkpoint", lambda: held_at_its_checkpoint(pitr), 60, 0.1)
        os.killpg(run.pid, signal.SIGHUP)
        interrupted(*run.ended(), signal.SIGHUP)
        nothing_left(pitr)
        assert list(backups(pitr).values()) == ["DONE", "DONE"]
    prod_idle(pitr)

    again = pitr.on_pi("pitr-base-backup", "--new-chain")
    assert again.returncode == 0, again.stderr
    assert list(backups(pitr).values()) == ["DONE", "DONE", "DONE"] and counted(pitr) == 3


def test_setup_pitr_pitr_cron_and_pitr_base_backup_killed_mid_run(pitr):
    setup_pitr_killed_then_run_again(pitr)
    pitr_cron_killed_during_barman_cron(pitr)
    base_backup_killed(pitr)
    new_chain_hung_up_then_run_again(pitr)
