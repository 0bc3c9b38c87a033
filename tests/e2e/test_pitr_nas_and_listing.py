"""The WAL tier on the nas and in list-backups (issue 23, points 4 and 6): the orchestrator, run by `pi` as cron
runs it on the pi5, copies Barman's home to NAS_DIR/wal/ and checks it; list-backups shows a "Point in time"
section per place. Real parts: prod's PostgreSQL streaming to the pinned Barman through the tunnel, rsync, sshd,
and Barman reading the nas's copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kwbackup import listing, settings
from kwbackup.pitr import nas as pitr_nas
from kwbackup.pitr import status
from kwbackup.places import Place
from kwbackup.run import run
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
    """Rows on prod, and their WAL archived on the pi5 (1 MB segments: a few of them) as barman cron would."""
    pitr.prod_sql("INSERT INTO orders SELECT i, md5(i::text) FROM generate_series(1, 20000) i", "kw_app_production")
    streaming = pitr.dir / "home" / "prod" / "streaming"
    deadline = time.monotonic() + 30
    while not [p for p in streaming.iterdir() if not p.name.endswith(".partial")]:
        assert time.monotonic() < deadline, "no complete WAL segment arrived"
        time.sleep(0.1)
    archived = pitr.on_pi("pitr-barman", "archive-wal", "prod")
    assert archived.returncode == 0, archived.stdout + archived.stderr


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


def summary_line(pitr) -> str:
    lines = (pitr.home / "backup-orchestrator.log").read_text().splitlines()
    return [line for line in lines if "summary: " in line][-1]


def stamp(text: str | None) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- the copy -------------------------------------------------------------------------------------------
def barman_home(base: Path, backups: dict[str, int], segments: range) -> Path:
    """A Barman home as streaming leaves it: DONE base backups (id: first segment), gzip'd WAL listed in the
    xlog.db, the segment being streamed."""
    home = base / "home" / "prod"
    for backup_id, first in backups.items():
        (home / "base" / backup_id / "data" / "global").mkdir(parents=True)
        (home / "base" / backup_id / "data" / "global" / "pg_control").write_bytes(os.urandom(8192))
        (home / "base" / backup_id / "data" / "PG_VERSION").write_text("15\n")
        (home / "meta").mkdir(exist_ok=True)
        (home / "meta" / f"{backup_id}-backup.info").write_text(
            f"begin_wal=0000000100000000000000{first:02X}\nend_time=2024-01-{first:02d} 03:00:00+00:00\n"
            "size=8195\nstatus=DONE\nxlog_segment_size=1048576\n"
        )
    lines = []
    for segno in segments:
        name = f"0000000100000000000000{segno:02X}"
        (home / "wals" / name[:16]).mkdir(parents=True, exist_ok=True)
        (home / "wals" / name[:16] / name).write_bytes(os.urandom(2000))
        lines.append(f"{name}\t2000\t{1704078000 + segno * 3600}.5\tgzip\tNone\n")
    (home / "wals" / "prod-xlog.db").write_text("".join(lines))
    (home / "streaming").mkdir()
    partial = home / "streaming" / f"0000000100000000000000{segments.stop:02X}.partial"
    partial.write_bytes(b"\0" * 4096)
    os.utime(partial, (1704078000 + segments.stop * 3600,) * 2)
    return home


def test_a_file_retention_removes_under_the_copy_starts_it_over_and_a_place_reads_as_from_files(tmp_path, monkeypatch):
    """No PITR world: Barman's files as it leaves them, rsync for real, the nas local."""
    pitr_dir = Path(tempfile.mkdtemp(prefix="kwp-"))
    try:
        home = barman_home(pitr_dir, {"20240101T030000": 1, "20240103T030000": 3}, range(1, 6))
        config = settings.load(
            {
                "PITR": "on",
                "PITR_DIR": str(pitr_dir),
                "PI5_HOST": "local",
                "NAS_HOST": "local",
                "NAS_DIR": str(tmp_path / "nas"),
            },
            environ={"KW_BACKUP_ENV": ""},
        )
        taken = pitr_nas.snapshot

        def retention_meanwhile(server_home: Path) -> pitr_nas.Snapshot:
            found = taken(server_home)
            if not hasattr(retention_meanwhile, "done"):  # once: the older base backup and its WAL go
                retention_meanwhile.done = True
                shutil.rmtree(server_home / "base" / "20240101T030000")
                (server_home / "meta" / "20240101T030000-backup.info").unlink()
                for segno in (1, 2):
                    (server_home / "wals" / "0000000100000000" / f"00000001000000000000000{segno}").unlink()
                xlog = server_home / "wals" / "prod-xlog.db"
                xlog.write_text("".join(xlog.read_text().splitlines(keepends=True)[2:]))
            return found

        monkeypatch.setattr(pitr_nas, "snapshot", retention_meanwhile)
        nas = Place("nas", "local", str(tmp_path / "nas"), None)
        copied = pitr_nas.copy_to_nas(config, nas)
        assert copied.base_backups == 1, copied
        nas_home = tmp_path / "nas" / "wal" / "prod"
        assert barman_files(nas_home) == barman_files(home)
        assert (nas_home / "wals" / "prod-xlog.db").read_text() == (home / "wals" / "prod-xlog.db").read_text()

        # Read by the stock-tools script (here, locally) and judged as from_files judges the files themselves.
        now = datetime(2024, 1, 2, 8, tzinfo=UTC)
        for files_there in (home, nas_home):
            _, out, _ = run(nas.script(pitr_nas.READ_SCRIPT, str(files_there), name="read"))
            assert pitr_nas.parse(out.decode(), now).as_json() == status.from_files(files_there, now).as_json()
        pi5, on_nas = (pitr_nas.read_section(config, where, now) for where in pitr_nas.tier_places(config))
        assert (pi5.as_json()["from"], pi5.as_json()["to"], pi5.as_json()["base_backups"]) == (
            "2024-01-03T03:00:00Z",
            "2024-01-01T09:00:00Z",  # the segment being streamed, last written then
            1,
        ), pi5.as_json()
        # A day without WAL: too long for the pi5 (PITR_MAX_LAG_MINUTES), not for the nas's nightly copy.
        assert pi5.state.lag_seconds == 23 * 3600 and pi5.status == "FAILING", pi5.state
        assert pi5.state.problems == ["no WAL has arrived for 1380 minutes (PITR_MAX_LAG_MINUTES=15)"]
        assert on_nas.status == "ok" and on_nas.state.lag_seconds == 24 * 3600 - 0.5, on_nas.state
    finally:
        shutil.rmtree(pitr_dir, ignore_errors=True)


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
    assert " wal=failed wal_copy=" in summary_line(pitr)
    # The dumps' push came first and stands; the half copy never looks like a complete base backup.
    assert (pitr.nas_dir / DUMP).is_file() and (pitr.nas_dir / (DUMP + ".json")).is_file()
    assert not list(nas_home.glob("meta/*")), list(nas_home.glob("meta/*"))

    # The link back: the next run copies what the nas lacks.
    pitr.cut.unlink()
    pitr.link(slow=False)
    again = orchestrate(pitr)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_copy(pitr, nas_home)
    assert re.search(r" wal=ok wal_copy=[\d.]+s ", summary_line(pitr)) and "result=ok" in summary_line(pitr)

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

    as_json = pitr.laptop("list-backups", "--json", **laptop)  # the dumps' objects, then one per WAL tier
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    rows = json.loads(as_json.stdout)
    dumps, wal_tiers = rows[:-2], rows[-2:]
    assert {row["place"] for row in dumps} == {"prod", "pi5", "nas"}
    assert all(list(row) == list(listing.JSON_KEYS) for row in dumps), dumps
    assert [row["place"] for row in wal_tiers] == ["pi5", "nas"], wal_tiers
    assert all(
        list(row) == ["place", "from", "to", "lag_seconds", "base_backups", "bytes", "status"] for row in wal_tiers
    )
    assert all(row["status"] == "ok" and row["base_backups"] == 1 for row in wal_tiers), wal_tiers

    gone = pitr.laptop("list-backups", "--point-in-time", "--json", **{**laptop, "NAS_HOST": "gone"})
    assert gone.returncode == 1, gone.stdout + gone.stderr
    pi5, nas = json.loads(gone.stdout)
    assert pi5["status"] == "ok" and nas == dict.fromkeys(pi5) | {"place": "nas", "status": "unreachable"}
    text = pitr.laptop("list-backups", "--point-in-time", **{**laptop, "NAS_HOST": "gone"})
    assert text.returncode == 1
    nas_block = world.listing_blocks(text.stdout)[f"Point in time, CM3588 NAS (gone:{pitr.nas_dir}/wal/):"]
    assert len(nas_block) == 1 and nas_block[0].startswith("  unreachable: "), nas_block
    assert "nas's WAL tier unreachable" in text.stderr.splitlines()[-1], text.stderr
