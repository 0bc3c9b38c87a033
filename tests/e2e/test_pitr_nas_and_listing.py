"""The WAL tier on the nas and in list-backups (issue 23, points 4 and 6): the orchestrator, run by `pi` as cron
runs it on the pi5, copies Barman's home to NAS_DIR/wal/ and checks it; list-backups shows a "Point in time"
section per place. Real parts: prod's PostgreSQL streaming to the pinned Barman through the tunnel, rsync, sshd,
and Barman reading the nas's copy."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests import pitr_world, world

DUMP = "db-2024-01-15.sql.gz"
BARMAN_FILES = ("base", "meta", "wals")


# --- the world ------------------------------------------------------------------------------------------
@pytest.fixture
def tier(pitr):
    """The WAL tier streaming with one base backup and some WAL archived; prod's dumps and the pi5's and nas's
    directories local, the Pi's (the orchestrator runs as pi)."""
    pitr.start_tunnel()
    done = pitr.laptop("setup-pitr")
    assert done.returncode == 0, done.stderr
    pitr.prod_sql("CREATE TABLE orders (id int, note text)", "kw_app_production")
    write_some_wal(pitr)
    pitr.prod_dir = pitr.base / "prod-dumps"
    pitr.pi5_dir = pitr.base / "pi5-dumps"
    pitr.nas_dir = pitr.base / "nas"
    world.synthetic_dump(pitr.prod_dir, DUMP, rows=100, random_bytes=True)
    pitr.pi_own(pitr.prod_dir)
    pitr.write_pi5_env(
        PROD_HOST="local",
        PROD_DIR=str(pitr.prod_dir),
        PI5_HOST="local",
        PI5_DIR=str(pitr.pi5_dir),
        NAS_HOST="local",
        NAS_DIR=str(pitr.nas_dir),
        MIN_DUMP_BYTES="1024",
        MAX_DUMP_AGE_HOURS="1000000",  # the dump is dated 2024
    )
    pitr.server_home = pitr.dir / "home" / "prod"
    return pitr


def write_some_wal(pitr) -> None:
    """Rows on prod, and their WAL archived on the pi5 (1 MB segments: a few of them)."""
    pitr.prod_sql("INSERT INTO orders SELECT i, md5(i::text) FROM generate_series(1, 20000) i", "kw_app_production")
    switched = pitr.on_pi("pitr-barman", "switch-wal", "--force", "--archive", "prod")
    assert switched.returncode == 0, switched.stdout + switched.stderr


def orchestrate(pitr) -> subprocess.CompletedProcess:
    return pitr.on_pi("backup-orchestrator")


def barman_files(home: Path) -> dict[str, bytes]:
    """Every file of Barman's under base/, meta/ and wals/ (the xlog.db apart), by path."""
    found = {}
    for top in BARMAN_FILES:
        for path in sorted((home / top).rglob("*")):
            if path.is_file() and path.name != "prod-xlog.db":
                found[str(path.relative_to(home))] = path.read_bytes()
    return found


def assert_same_copy(pitr, nas_home: Path) -> None:
    """The nas holds every base backup and WAL file of the pi5's, byte for byte, and nothing else; 0600/0700."""
    pi5, nas = barman_files(pitr.server_home), barman_files(nas_home)
    assert sorted(nas) == sorted(pi5), (sorted(set(pi5) - set(nas))[:5], sorted(set(nas) - set(pi5))[:5])
    different = [path for path in pi5 if pi5[path] != nas[path]]
    assert not different, different[:5]
    assert any(p.startswith("base/") for p in nas) and any(p.startswith("wals/") for p in nas), sorted(nas)[:5]
    pi5_xlog = (pitr.server_home / "wals" / "prod-xlog.db").read_text().splitlines()
    nas_xlog = (nas_home / "wals" / "prod-xlog.db").read_text().splitlines()
    assert nas_xlog == pi5_xlog, (nas_xlog, pi5_xlog)
    for path in [nas_home.parent, *nas_home.parent.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert not (nas_home / "streaming").exists()


def snapshot_of(directory: Path) -> dict[str, tuple[int, int]]:
    """Each file's inode and mtime: a file sent again (rsync writes a new one and renames it) changes both."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


def barman_on_copy(pitr, barman_home: Path, *args: str) -> subprocess.CompletedProcess:
    """The pinned Barman with a config whose barman_home is the nas's copy (the server's as on the pi5)."""
    work = pitr.base / "barman-on-nas"
    (work / "barman.d").mkdir(parents=True, exist_ok=True)
    (work / "barman.conf").write_text(
        f"[barman]\nbarman_user = root\nbarman_home = {barman_home}\nbarman_lock_directory = {work}\n"
        f"log_file = {work / 'barman.log'}\nconfiguration_files_directory = {work / 'barman.d'}\n"
    )
    shutil.copyfile(pitr.dir / "barman.d" / "prod.conf", work / "barman.d" / "prod.conf")
    barman = pitr.install.dest / "opt" / "kw-backup" / ".venv-barman" / "bin" / "barman"
    return subprocess.run(
        [str(barman), "-c", str(work / "barman.conf"), *args], capture_output=True, text=True, timeout=120
    )


def last_copy_line(pitr) -> str:
    lines = (pitr.home / "backup-orchestrator.log").read_text().splitlines()
    return next((line for line in reversed(lines) if "copied the WAL tier to the nas" in line), "")


def stamp(text: str | None) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- the copy -------------------------------------------------------------------------------------------
def test_the_nas_holds_a_checked_copy_barman_can_read_and_follows_retention(tier):
    nas_home = tier.nas_dir / "wal" / "prod"
    before = tier.laptop(
        "list-backups", "--point-in-time", "--only", "nas", NAS_HOST="local", NAS_DIR=str(tier.nas_dir)
    )
    assert before.returncode == 1 and "problem: no copy of the WAL tier here yet" in before.stdout, before.stdout

    first = orchestrate(tier)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tier.nas_dir / DUMP).is_file() and (tier.nas_dir / (DUMP + ".json")).is_file()
    assert_same_copy(tier, nas_home)
    assert "copied the WAL tier to the nas: 1 base backup(s)" in last_copy_line(tier)

    # Nothing new on the pi5: nothing is sent again.
    (backup_id,) = [p.name.removesuffix("-backup.info") for p in (nas_home / "meta").iterdir()]
    unchanged = snapshot_of(tier.nas_dir / "wal")
    again = orchestrate(tier)
    assert again.returncode == 0, again.stdout + again.stderr
    assert snapshot_of(tier.nas_dir / "wal") == unchanged
    assert ", 0 file(s) sent (0 Bytes), 0 removed" in last_copy_line(tier), last_copy_line(tier)

    # Barman reads the copy as its own home: the base backup is there, DONE, with every WAL it needs (last: it
    # may rewrite a backup.info it reads).
    listed = barman_on_copy(tier, tier.nas_dir / "wal", "list-backups", "prod")
    assert listed.returncode == 0 and backup_id in listed.stdout, listed.stdout + listed.stderr
    checked = barman_on_copy(tier, tier.nas_dir / "wal", "check-backup", "prod", backup_id)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    shown = barman_on_copy(tier, tier.nas_dir / "wal", "show-backup", "prod", backup_id)
    assert "DONE" in shown.stdout, shown.stdout + shown.stderr

    # Retention on the pi5: a second base backup, the first deleted with the WAL only it needed.
    write_some_wal(tier)
    backed = tier.on_pi("pitr-barman", "backup", "--wait", "prod")
    assert backed.returncode == 0, backed.stdout + backed.stderr
    deleted = tier.on_pi("pitr-barman", "delete", "prod", backup_id)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    gone = set(barman_files(nas_home)) - set(barman_files(tier.server_home))
    assert any(p.startswith("base/") for p in gone) and any(p.startswith("wals/") for p in gone), sorted(gone)
    third = orchestrate(tier)
    assert third.returncode == 0, third.stdout + third.stderr
    assert_same_copy(tier, nas_home)
    assert (
        not (nas_home / "base" / backup_id).exists() and not (nas_home / "meta" / f"{backup_id}-backup.info").exists()
    )

    # list-backups from the laptop: the pi5's section (over ssh) as pitr-status sees it, the nas's beside it.
    pitr_status = tier.on_pi("pitr-status", "--json")
    assert pitr_status.returncode == 0, pitr_status.stdout + pitr_status.stderr
    expected = json.loads(pitr_status.stdout)
    shown = tier.laptop("list-backups", "--point-in-time", "--json", NAS_HOST="local", NAS_DIR=str(tier.nas_dir))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    pi5, nas = json.loads(shown.stdout)
    keys = {"place", "from", "to", "lag_seconds", "base_backups", "bytes", "status"}
    assert set(pi5) == keys and set(nas) == keys, (pi5, nas)
    assert (pi5["place"], nas["place"]) == ("pi5", "nas")
    assert (pi5["from"], pi5["base_backups"], pi5["status"]) == (expected["from"], 1, "ok"), (pi5, expected)
    # pg_receivewal may write between the two reads: the same moment and size, give or take.
    assert abs((stamp(pi5["to"]) - stamp(expected["to"])).total_seconds()) < 60, (pi5, expected)
    assert abs(pi5["bytes"] - expected["bytes"]) <= 2 << 20, (pi5, expected)
    assert (nas["from"], nas["base_backups"], nas["status"]) == (pi5["from"], 1, "ok"), nas
    assert stamp(nas["to"]) <= stamp(pi5["to"]) and 0 < nas["bytes"] < pi5["bytes"], (nas, pi5)
    assert nas["lag_seconds"] >= 0 and pi5["lag_seconds"] >= 0


# --- over ssh, and a link that drops ------------------------------------------------------------------------
@pytest.fixture
def remote_nas(tier):
    """The nas over ssh: an sshd place of its own, reached by the Pi with a key of its own through a slow relay
    (a transfer long enough to drop) that a file `cut` refuses, as a dead link would."""
    name = f"{tier.name}-nas"
    sshd = tier.ssh_world.add_place(name, next(pitr_world.ADDRESSES), world.SYSTEM_PATH, {})
    key = tier.home / "id_nas"
    subprocess.run(
        ["runuser", "-u", tier.pi.pw_name, "--", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True,
    )
    sshd.authorize(key.with_suffix(".pub").read_text())
    relay = tier.home / "relay.py"
    shutil.copyfile(world.RELAY, relay)
    known = tier.home / "known_hosts"
    shutil.copyfile(tier.ssh_world.known_hosts, known)  # with this place's host key
    tier.cut = tier.base / "cut"
    base_config = Path(tier.pi5_settings["SSH_CONFIG"]).read_text()

    def link(slow: bool) -> None:
        proxy = (
            f"  ProxyCommand /bin/sh -c 'test ! -e {tier.cut} && exec /usr/bin/python3 {relay} "
            f"{sshd.address} {tier.ssh_world.port} 2000000'\n"
            if slow
            else ""
        )
        Path(tier.pi5_settings["SSH_CONFIG"]).write_text(
            base_config + f"Host {name}\n  HostName {sshd.address}\n  Port {tier.ssh_world.port}\n  User root\n"
            f"  IdentityFile {key}\n  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n"
            f"  IdentitiesOnly yes\n  LogLevel ERROR\n" + proxy
        )
        tier.pi_own(tier.home)

    link(slow=True)
    tier.link = link
    tier.nas_sshd = sshd
    tier.nas_name = name
    tier.write_pi5_env(NAS_HOST=name)
    yield tier
    sshd.stop()


def test_a_nas_over_ssh_dropped_mid_copy_fails_the_wal_copy_not_the_dumps_and_list_backups_shows_it(remote_nas):
    pitr = remote_nas
    nas_home = pitr.nas_dir / "wal" / "prod"
    argv, env = pitr.pi_argv("backup-orchestrator")
    run = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any((nas_home / "base").glob("*/data/*")) and run.poll() is None:
            assert time.monotonic() < deadline, "the WAL copy never began"
            time.sleep(0.02)
        pitr.cut.touch()
        pitr.nas_sshd.drop_sessions()
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            run.wait(30)
    assert run.returncode == 1, out + err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "copying the WAL tier to the nas failed after 3 attempts" in errors[-1], err
    # The dumps' push came first and stands; the half copy never looks like a complete base backup.
    assert (pitr.nas_dir / DUMP).is_file() and (pitr.nas_dir / (DUMP + ".json")).is_file()
    assert not list(nas_home.glob("meta/*")), list(nas_home.glob("meta/*"))

    # The link back: the next run copies what the nas lacks.
    pitr.cut.unlink()
    pitr.link(slow=False)
    again = orchestrate(pitr)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_copy(pitr, nas_home)

    # list-backups from the laptop, every place over ssh: the dumps, then the Point in time sections.
    laptop = dict(
        PROD_DIR=str(pitr.prod_dir),
        PI5_DIR=str(pitr.pi5_dir),
        NAS_HOST=pitr.nas_name,
        NAS_DIR=str(pitr.nas_dir),
        MAX_DUMP_AGE_HOURS="1000000",
    )
    shown = pitr.laptop("list-backups", **laptop)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    blocks = world.listing_blocks(shown.stdout)
    headings = list(blocks)
    assert headings[-2:] == [
        f"Point in time, Raspberry Pi 5 ({pitr.name}-pi5:{pitr.dir}/):",
        f"Point in time, CM3588 NAS ({pitr.nas_name}:{pitr.nas_dir}/wal/):",
    ], shown.stdout
    assert any(h.startswith("CM3588 NAS") for h in headings[:-2])  # the dumps' blocks come first
    for heading in headings[-2:]:
        lines = blocks[heading]
        assert lines[0].startswith("  recoverable from 20") and " UTC to 20" in lines[0], lines
        assert lines[2].startswith("  base backups: 1 (newest ") and lines[-1] == "  status: ok", lines
    assert blocks[headings[-2]][1].startswith("  lag: ") and blocks[headings[-1]][1].startswith("  newest WAL's age: ")

    as_json = pitr.laptop("list-backups", "--json", **laptop)  # the dumps' array, as it always was
    assert as_json.returncode == 0 and {row["place"] for row in json.loads(as_json.stdout)} == {"prod", "pi5", "nas"}
    assert all("name" in row for row in json.loads(as_json.stdout))

    gone = pitr.laptop("list-backups", "--point-in-time", "--json", **{**laptop, "NAS_HOST": "gone"})
    assert gone.returncode == 1, gone.stdout + gone.stderr
    pi5, nas = json.loads(gone.stdout)
    assert pi5["status"] == "ok" and nas == dict.fromkeys(pi5) | {"place": "nas", "status": "unreachable"}
    text = pitr.laptop("list-backups", "--point-in-time", **{**laptop, "NAS_HOST": "gone"})
    assert text.returncode == 1
    nas_block = world.listing_blocks(text.stdout)[f"Point in time, CM3588 NAS (gone:{pitr.nas_dir}/wal/):"]
    assert len(nas_block) == 1 and nas_block[0].startswith("  unreachable: "), nas_block
    assert "nas's WAL tier unreachable" in text.stderr.splitlines()[-1], text.stderr
