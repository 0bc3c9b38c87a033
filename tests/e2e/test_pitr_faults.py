"""The WAL tier's failure paths (issue 23, point 5): each ends in a one-line error naming what to do, the right
exit status, and nothing lost. One world serves the faults that leave it whole again, so the suite stays short."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kwbackup.pitr.status import WAL_NAME
from tests import pitr_world, world

SERVER_HOME = ("home", "prod")


# --- helpers ---------------------------------------------------------------------------------------------
def until(what: str, check, timeout: float = 60, every: float = 0.2):
    """Polls `check` until it answers truthily; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)


def status(pitr) -> tuple[subprocess.CompletedProcess, dict | None]:
    done = pitr.on_pi("pitr-status", "--json")
    try:
        return done, json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return done, None


def healthy(pitr) -> dict:
    done, state = status(pitr)
    assert done.returncode == 0 and state and state["status"] == "ok" and state["gaps"] == [], done.stdout + done.stderr
    return state


def error_line(done: subprocess.CompletedProcess) -> str:
    """The script's one error line (what failed -- what to do)."""
    lines = [line for line in done.stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, done.stderr
    assert " -- " in lines[0], lines[0]
    return lines[0]


def write_wal(pitr, segments: int, rows: int = 100) -> str:
    """Rows on prod, then `segments` finished WAL segments; returns the name of the last one ("" for none)."""
    pitr.prod_sql(
        "CREATE TABLE IF NOT EXISTS faults (id bigserial PRIMARY KEY, note text); "
        f"INSERT INTO faults (note) SELECT 'row ' || n FROM generate_series(1, {rows}) n",
        "kw_app_production",
    )
    last = ""
    for _ in range(segments):
        last = pitr.prod_sql(
            "SELECT pg_walfile_name(pg_switch_wal()) FROM (SELECT pg_logical_emit_message(false, 'kw', 'x')) m"
        )
    return last


def on_pi5(pitr, segment: str, archived_only: bool = False) -> bool:
    """The pi5 holds `segment` whole: complete in streaming/, or archived in wals/."""
    home = pitr.dir.joinpath(*SERVER_HOME)
    return (home / "wals" / segment[:16] / segment).exists() or (
        not archived_only and (home / "streaming" / segment).exists()
    )


def catch_up(pitr, segment: str, timeout: float = 60) -> None:
    """pitr-cron as cron runs it (it starts receive-wal when stopped), until `segment` has reached the pi5."""
    done = pitr.on_pi("pitr-cron")
    assert done.returncode == 0, done.stderr
    until(f"WAL segment {segment} on the pi5", lambda: on_pi5(pitr, segment), timeout, 0.1)


def receivers(pitr) -> list[int]:
    """The pg_receivewal processes `pi` runs for this tier."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            uid = entry.stat().st_uid
        except OSError:
            continue
        if (
            uid == pitr.pi.pw_uid
            and argv
            and argv[0].endswith(b"pg_receivewal")
            and str(pitr.dir).encode() in b" ".join(argv)
        ):
            found.append(int(entry.name))
    return found


def receive_wal_locked(pitr) -> bool:
    """Barman's receive-wal for prod is running (it holds its lock file)."""
    return world.flock_held(pitr.dir / "locks" / ".prod-receive-wal.lock") is True


def wal_files(pitr) -> dict[str, bytes]:
    """The archived WAL segments and their bytes: not Barman's work files beside them (a `<segment>.compressed`
    exists only while it compresses one)."""
    wals = pitr.dir.joinpath(*SERVER_HOME, "wals")
    return {p.name: p.read_bytes() for p in wals.glob("*/*") if WAL_NAME.fullmatch(p.name) and p.is_file()}


def start_tunnel(pitr) -> None:
    """pitr.start_tunnel, until its socket answers: the socket a stopped tunnel left stays until ssh binds anew."""
    pitr.start_tunnel()
    path = str(pitr.dir / "tunnel" / f".s.PGSQL.{pitr.pg.port}")

    def answers() -> bool:
        with socket.socket(socket.AF_UNIX) as conn:
            try:
                conn.connect(path)
                return True
            except OSError:
                return False

    until("the tunnel's socket answering", answers, 20, 0.05)


def set_up(pitr) -> dict:
    start_tunnel(pitr)
    done = pitr.laptop("setup-pitr")
    assert done.returncode == 0, done.stderr
    return healthy(pitr)


# --- the link, prod's restarts, a killed receiver, and two checks at once ---------------------------
def link_drop_prod_restart_kill_and_lock(pitr):
    # The link dropped for a while: prod goes on, keeping WAL in the slot.
    pitr.stop_tunnel()
    missed = write_wal(pitr, segments=3)
    done, state = status(pitr)
    assert done.returncode == 1 and state["prod"] == "unreachable", done.stdout + done.stderr
    line = error_line(done)
    assert "unreachable through the tunnel" in line and "kw-backup-pitr-tunnel" in line, line
    start_tunnel(pitr)
    catch_up(pitr, missed)
    healthy(pitr)

    # Prod restarted: the stream ends; the next pitr-cron starts it again from the slot.
    pitr.pg.stop()
    pitr.pg.run_server()
    catch_up(pitr, write_wal(pitr, segments=2))
    healthy(pitr)

    # kill -9 of the receiver: the next pitr-cron starts another.
    killed = until("pg_receivewal running", lambda: receivers(pitr))
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    until("Barman's receive-wal ended with its pg_receivewal", lambda: not receive_wal_locked(pitr), 20)
    catch_up(pitr, write_wal(pitr, segments=2))
    assert not set(killed) & set(receivers(pitr))
    healthy(pitr)

    # Two checks at once: prod hangs (its postmaster stopped), so the first holds the lock while it waits.
    postmaster = int((pitr.pg.data / "postmaster.pid").read_text().split()[0])
    lock = pitr.dir / ".pitr-status.lock"
    os.kill(postmaster, signal.SIGSTOP)
    try:
        argv, env = pitr.pi_argv("pitr-status", "--json")
        first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def first_holds() -> bool:
            try:
                pid = int(lock.read_text().split()[0])
                return b"pitr-status" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                return False

        until("the first pitr-status holding its lock", first_holds, 20, 0.05)
        second = pitr.on_pi("pitr-status")
        assert second.returncode == 4, second.stderr
        assert "another pitr-status is running" in error_line(second)
    finally:
        os.kill(postmaster, signal.SIGCONT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, out + err
    assert json.loads(out.strip().splitlines()[-1])["status"] == "ok"


# --- what the files and the clock show: lag, an old base backup, another major, a gap ------------------
def on_pi_at(pitr, at: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """An installed script as `pi` with its wall clock moved to `at` UTC (world.clocked)."""
    argv, env = pitr.pi_argv(script, *args)
    split = argv.index("--") + 1
    clocked, env = world.clocked(argv[split:], env, at)
    return subprocess.run(
        [*argv[:split], *clocked], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def utc_in(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + seconds))


def lag_old_base_backup_other_major(pitr):
    # No WAL for PITR_MAX_LAG_MINUTES while prod writes: receive-wal stopped, then the minutes passed.
    pitr.write_pi5_env(PITR_MAX_LAG_MINUTES="1")
    stopped = pitr.on_pi("pitr-barman", "receive-wal", "--stop", "prod")
    assert stopped.returncode == 0, stopped.stderr
    until("receive-wal stopped", lambda: not receivers(pitr), 20)
    write_wal(pitr, segments=0)
    healthy(pitr)  # not yet: the minute has not passed
    done = on_pi_at(pitr, utc_in(150), "pitr-status", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    line = error_line(done)
    assert "no WAL has arrived from prod for" in line and "PITR_MAX_LAG_MINUTES=1" in line, line
    assert "receive-wal" in line, line
    catch_up(pitr, write_wal(pitr, segments=1))
    pitr.write_pi5_env(PITR_MAX_LAG_MINUTES="15")
    healthy(pitr)

    # The newest base backup older than PITR_BASE_BACKUP_DAYS (and a day): as its info file says so.
    (info,) = pitr.dir.joinpath(*SERVER_HOME, "meta").glob("*-backup.info")
    kept = info.read_text()
    old = time.strftime("%Y-%m-%d %H:%M:%S+00:00", time.gmtime(time.time() - 9 * 86400))
    info.write_text(
        "".join(f"end_time={old}\n" if line.startswith("end_time=") else line for line in kept.splitlines(True))
    )
    done, state = status(pitr)
    assert done.returncode == 1 and len(state["problems"]) == 1, done.stdout + done.stderr
    line = error_line(done)
    assert "is 9.0 days old (PITR_BASE_BACKUP_DAYS=7)" in line and "pitr-base-backup" in line, line
    info.write_text(kept)
    healthy(pitr)

    # The pi5 set up for another major than prod now runs (prod upgraded since setup-pitr).
    major = pitr.dir / "prod-major"
    kept = major.read_text()
    major.write_text("14\n")
    done, state = status(pitr)
    assert done.returncode == 1, done.stdout + done.stderr
    line = error_line(done)
    assert "prod runs PostgreSQL 15" in line and "set up for PostgreSQL 14" in line and "setup-pitr" in line, line
    major.write_text(kept)
    healthy(pitr)


def gap(pitr):
    # A segment removed by hand from the archive: Barman's check passes, ours names the gap.
    last = write_wal(pitr, segments=3)
    catch_up(pitr, last)
    assert pitr.on_pi("pitr-cron").returncode == 0  # the minute's cron archives them (in the background)
    until(f"{last} archived", lambda: on_pi5(pitr, last, archived_only=True), 30, 0.1)
    (info,) = pitr.dir.joinpath(*SERVER_HOME, "meta").glob("*-backup.info")
    begin = next(line[10:] for line in info.read_text().splitlines() if line.startswith("begin_wal="))
    wals = sorted(
        p for p in pitr.dir.joinpath(*SERVER_HOME, "wals").glob("*/*") if len(p.name) == 24 and begin < p.name < last
    )
    gone = wals[len(wals) // 2]
    gone.unlink()
    assert pitr.on_pi("pitr-barman", "check", "prod").returncode == 0
    done, state = status(pitr)
    assert done.returncode == 1 and state["gaps"] == [gone.name], done.stdout + done.stderr
    line = error_line(done)
    assert f"gap: {gone.name} missing" in line and "pitr-barman backup --wait prod" in line, line
    # What it says to run: a new base backup starts a chain without the gap; the older moments stay.
    done = pitr.on_pi("pitr-barman", "backup", "--wait", "prod")
    assert done.returncode == 0, done.stderr
    healthy_with_old_gap(pitr, gone.name)


def healthy_with_old_gap(pitr, gap: str) -> dict:
    done, state = status(pitr)
    assert done.returncode == 0 and state["status"] == "ok" and state["gaps"] == [gap], done.stdout + done.stderr
    return state


# --- the pi5 away longer than max_slot_wal_keep_size -----------------------------------------------------
def past_segments(pitr) -> int:
    """The segments prod's pg_wal keeps behind its insert position (recycled ones carry future names)."""
    return int(
        pitr.prod_sql(
            "SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$' "
            "AND name < pg_walfile_name(pg_current_wal_lsn())"
        )
    )


def offline_past_slot_keep_size_then_new_chain(pitr):
    catch_up(pitr, write_wal(pitr, segments=2))
    archived = wal_files(pitr)

    stopped = pitr.on_pi("pitr-barman", "receive-wal", "--stop", "prod")
    assert stopped.returncode == 0, stopped.stderr
    until("receive-wal stopped", lambda: not receivers(pitr), 20)
    pitr.stop_tunnel()
    written = 80  # segments of 1 MB: more than PITR_PROD_WAL_KEEP_GB=0.05 (51 MB)
    pitr.prod_sql(
        "DO $$BEGIN FOR i IN 1..80 LOOP PERFORM pg_logical_emit_message(false, 'kw-test', 'x'); "
        "PERFORM pg_switch_wal(); END LOOP; END$$"
    )
    pitr.prod_sql("CHECKPOINT")
    until(
        "the slot invalidated",
        lambda: pitr.prod_sql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'kw_barman'") == "lost",
        30,
    )
    # Prod's disk stays bounded: it kept no more than max_slot_wal_keep_size for the absent pi5.
    assert past_segments(pitr) <= 51 + 2 < written, past_segments(pitr)

    start_tunnel(pitr)
    done, state = status(pitr)
    assert done.returncode == 1 and state["status"] == "FAILING", done.stdout + done.stderr
    line = error_line(done)
    assert "invalidated the replication slot kw_barman" in line and "pitr-base-backup --new-chain" in line, line

    repaired = pitr.on_pi("pitr-base-backup", "--new-chain")
    assert repaired.returncode == 0, repaired.stderr
    done, state = status(pitr)
    assert done.returncode == 0 and state["status"] == "ok" and state["base_backups"] == 2, done.stdout + done.stderr
    catch_up(pitr, write_wal(pitr, segments=2))
    done, after = status(pitr)
    assert done.returncode == 0 and after["gaps"] == state["gaps"], done.stdout + done.stderr
    # Nothing the pi5 held before is gone: the old chain stays recoverable up to the loss.
    now = wal_files(pitr)
    assert {name: now.get(name) for name in archived} == archived


# --- the tunnel's key: one forward, nothing else -----------------------------------------------------------
def test_tunnel_key_allows_only_the_forward(pitr):
    host = f"{pitr.name}-prod"

    def ssh(*args: str, **kw) -> list[str]:
        return [
            "runuser", "-u", pitr.pi.pw_name, "--", "ssh", "-F", pitr.pi5_settings["SSH_CONFIG"],
            "-i", str(pitr.tunnel_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", *args,
        ]  # fmt: skip

    command = subprocess.run(ssh(host, "id"), capture_output=True, text=True, timeout=30)
    assert command.returncode != 0 and "uid=" not in command.stdout, command.stdout + command.stderr
    shell = subprocess.run(ssh("-tt", host), input="id\nexit\n", capture_output=True, text=True, timeout=30)
    assert "uid=" not in shell.stdout, shell.stdout + shell.stderr

    def forward(target: str, hello: bytes) -> subprocess.CompletedProcess:
        """What the far end answers through `ssh -W <target>` with the tunnel's key."""
        return subprocess.run(ssh("-W", target, host), input=hello, capture_output=True, timeout=30)

    ssl_request = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    allowed = forward(f"127.0.0.1:{pitr.pg.port}", ssl_request)
    assert allowed.stdout[:1] in (b"N", b"S"), allowed.stderr
    for target in (f"{pitr.prod.address}:{pitr.ssh_world.port}", f"127.0.0.1:{pitr.ssh_world.port}"):
        refused = forward(target, b"")
        assert refused.returncode == 255 and b"forwarding failed" in refused.stderr, refused.stderr
        assert b"SSH-" not in refused.stdout, refused.stdout


# --- a full PITR_DIR -------------------------------------------------------------------------------------
class SmallDiskPitrWorld(pitr_world.PitrWorld):
    """The WAL tier on a small filesystem of its own."""

    def __init__(self, *args, size: str):
        super().__init__(*args)
        self.disk = world.Tmpfs(self.dir, size)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.disk.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def small_pitr(tmp_path, ssh_world, pi, pitr_install):
    os.chown(tmp_path, pi.pw_uid, pi.pw_gid)
    ssh_world.base.chmod(0o711)
    place = SmallDiskPitrWorld(tmp_path, ssh_world, pi, pitr_install, size="256m")
    try:
        yield place.start()
    finally:
        place.stop()


def fill(path: Path) -> None:
    """Writes `path` until its filesystem has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)


def full_pitr_dir(pitr):
    catch_up(pitr, write_wal(pitr, segments=3))
    healthy(pitr)
    archived = wal_files(pitr)

    filler = pitr.dir / "filler"
    fill(filler)
    segment = write_wal(pitr, segments=3)
    for script in ("pitr-status", "pitr-cron"):
        done = pitr.on_pi(script)
        assert done.returncode == 1, done.stdout + done.stderr
        line = error_line(done)
        assert f"PITR_DIR {pitr.dir} is full" in line and "free space there" in line, line
    now = wal_files(pitr)
    assert {name: now.get(name) for name in archived} == archived

    # Space again: the stream catches up from the slot, no gap.
    filler.unlink()
    catch_up(pitr, segment)
    healthy(pitr)


# --- the tests: one world for the faults that leave it whole, one on a small disk ---------------------------
def test_link_drop_prod_restart_kill_lock_then_offline_past_keep_size(pitr):
    set_up(pitr)
    link_drop_prod_restart_kill_and_lock(pitr)
    offline_past_slot_keep_size_then_new_chain(pitr)


def test_lag_old_base_backup_other_major_full_disk_and_gap(small_pitr):
    set_up(small_pitr)
    lag_old_base_backup_other_major(small_pitr)
    full_pitr_dir(small_pitr)
    gap(small_pitr)
