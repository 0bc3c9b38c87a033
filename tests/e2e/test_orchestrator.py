"""bin/backup-orchestrator on the "pi5" (this machine) against prod and the nas over real sshd."""

import json
import os
import subprocess
import threading
import time

import pytest

from tests import world

NAME = "db-2024-03-10.sql.gz"


def run_orchestrator(kw, *args, **kw_args):
    return kw.run("backup-orchestrator", *args, timeout=180, **kw_args)


def finals(directory):
    """Dump and manifest files under their final names."""
    return sorted(n for n in os.listdir(directory) if n.startswith("db-")) if directory.exists() else []


def no_partial_anywhere(kw):
    for directory in (kw.pi5_dir, kw.nas_dir):
        for name in finals(directory):
            if name.endswith(".gz"):
                assert (
                    subprocess.run(
                        [str(world.BIN / "verify-backup"), str(directory / name)], capture_output=True
                    ).returncode
                    == 0
                ), f"{directory / name} is not valid"


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_pulls_verifies_pushes_and_logs_a_summary(net):
    made = net.run("backup-db")
    assert made.returncode == 0, made.stderr
    name = os.path.basename(made.stdout.strip().splitlines()[-1])
    result = run_orchestrator(net)
    assert result.returncode == 0, result.stderr
    for directory in (net.pi5_dir, net.nas_dir):
        assert finals(directory) == [name, name + ".json"]
        assert directory.stat().st_mode & 0o777 == 0o700
        assert (directory / name).stat().st_mode & 0o777 == 0o600
        assert (directory / name).read_bytes() == (net.prod_dir / name).read_bytes()
        assert json.loads((directory / (name + ".json")).read_text()) == json.loads(
            (net.prod_dir / (name + ".json")).read_text()
        )
    no_partial_anywhere(net)
    log = (net.tmp / "orchestrator.log").read_text()
    summary = [line for line in log.splitlines() if "summary:" in line]
    assert len(summary) == 1
    assert f"dump={name}" in summary[0] and "pull=" in summary[0] and "push=" in summary[0]
    assert "result=ok" in summary[0] and "time=" in summary[0] and "size=" in summary[0]


def test_it_runs_as_the_pis_unprivileged_user_with_a_key_prod_restricts_to_rrsync(net, pi):
    """As on a Pi: the installed orchestrator, run by `pi`, whose key prod accepts only as `rrsync -ro PROD_DIR`;
    what it makes is its own."""
    world.synthetic_dump(net.prod_dir, NAME)
    result = run_orchestrator(net, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "restricted by rrsync" in result.stderr
    made = [net.pi5_dir, net.pi5_dir / NAME, net.pi5_dir / (NAME + ".json"), net.tmp / "orchestrator.log"]
    assert {p.stat().st_uid for p in made} == {pi.pw_uid}
    assert finals(net.nas_dir) == [NAME, NAME + ".json"]


def test_second_run_the_same_night_transfers_nothing(net):
    world.synthetic_dump(net.prod_dir, NAME)
    assert run_orchestrator(net).returncode == 0
    before = {p: os.stat(p).st_ino for d in (net.pi5_dir, net.nas_dir) for p in (d / NAME, d / (NAME + ".json"))}
    again = run_orchestrator(net)
    assert again.returncode == 0, again.stderr
    assert "nothing to pull" in again.stderr and "every verified dump already" in again.stderr
    assert before == {p: os.stat(p).st_ino for p in before}
    assert "pushed=0" in again.stderr


def test_works_with_the_restricted_rrsync_key_which_allows_nothing_else(net, tmp_path):
    world.synthetic_dump(net.prod_dir, NAME)
    key, public = net.ssh.restricted_key(tmp_path, net.prod_dir)
    try:
        config = net.ssh.client_config(tmp_path / "pi5_ssh_config", identity={"prod": key})
        net.settings["SSH_CONFIG"] = str(config)
        result = run_orchestrator(net, "--verbose")
        assert result.returncode == 0, result.stderr
        assert "restricted by rrsync" in result.stderr
        assert finals(net.nas_dir) == [NAME, NAME + ".json"]

        only_key = [
            "-F",
            "/dev/null",
            "-i",
            str(key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={net.ssh.known_hosts}",
            "-p",
            str(net.ssh.port),
        ]
        target = f"{os.environ.get('USER', 'root')}@127.0.0.2"
        shell = subprocess.run(
            ["ssh", *only_key, target, "touch", str(tmp_path / "pwned")], capture_output=True, text=True
        )
        assert shell.returncode != 0 and not (tmp_path / "pwned").exists()
        rsh = "ssh " + " ".join(only_key)
        outside = subprocess.run(
            ["rsync", "-e", rsh, f"{target}:/etc/hostname", str(tmp_path / "stolen")], capture_output=True, text=True
        )
        assert outside.returncode != 0 and not (tmp_path / "stolen").exists()
        escape = subprocess.run(["rsync", "-e", rsh, f"{target}:../", str(tmp_path / "up")], capture_output=True)
        assert escape.returncode != 0 and not (tmp_path / "up").exists()
        (tmp_path / "evil").write_text("x")
        write = subprocess.run(["rsync", "-e", rsh, str(tmp_path / "evil"), f"{target}:/evil"], capture_output=True)
        assert write.returncode != 0 and not (net.prod_dir / "evil").exists()
        delete = subprocess.run(
            ["rsync", "-r", "--delete", "-e", rsh, str(tmp_path / "empty") + "/", f"{target}:/"], capture_output=True
        )
        assert delete.returncode != 0 and (net.prod_dir / NAME).exists()
        readable = subprocess.run(
            ["rsync", "-e", rsh, f"{target}:/{NAME}", str(tmp_path / "copy")], capture_output=True
        )
        assert readable.returncode == 0  # reading PROD_DIR is the one thing it may do
    finally:
        net.ssh.places["prod"].unauthorize(public)


def test_prod_unreachable_exits_1_and_keeps_what_the_pi5_has(net):
    world.synthetic_dump(net.pi5_dir, NAME)
    net.settings["PROD_HOST"] = "gone"
    result = run_orchestrator(net)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "prod (gone) unreachable" in errors[0]
    assert finals(net.pi5_dir) == [NAME, NAME + ".json"]
    assert "result=failed" in (net.tmp / "orchestrator.log").read_text()


def test_nas_unreachable_then_reachable_again_catches_up(net):
    world.synthetic_dump(net.prod_dir, NAME)
    net.settings["NAS_HOST"] = "gone"
    down = run_orchestrator(net)
    assert down.returncode == 1 and "nas (gone) unreachable" in down.stderr
    assert finals(net.pi5_dir) == [NAME, NAME + ".json"]
    net.settings["NAS_HOST"] = "nas"
    up = run_orchestrator(net)
    assert up.returncode == 0, up.stderr
    assert "nothing to pull" in up.stderr
    assert finals(net.nas_dir) == [NAME, NAME + ".json"]


def test_every_verified_pi5_dump_missing_on_the_nas_is_pushed(net):
    older = ["db-2024-03-08.sql.gz", "db-2024-03-09.sql.gz"]
    for name in older:
        world.synthetic_dump(net.pi5_dir, name)
    world.synthetic_dump(net.pi5_dir, "db-2024-03-07.sql.gz", manifest=False)  # unverified: not pushed
    world.synthetic_dump(net.prod_dir, NAME)
    result = run_orchestrator(net)
    assert result.returncode == 0, result.stderr
    assert [n for n in finals(net.nas_dir) if n.endswith(".gz")] == older + [NAME]
    no_partial_anywhere(net)


def damage(path, how):
    manifest = path.parent / (path.name + ".json")
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
        meta = json.loads(manifest.read_text())
        meta["bytes"] = len(data) // 2  # a consistent-looking manifest: only the content tells
        manifest.write_text(json.dumps(meta))
    elif how == "bitflip":
        data[len(data) // 3] ^= 0x04
        path.write_bytes(bytes(data))
    else:
        meta = json.loads(manifest.read_text())
        meta["sha256"] = "0" * 64
        manifest.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["truncated", "bitflip", "manifest"])
def test_a_bad_newest_prod_dump_is_never_promoted_or_pushed(net, how):
    world.synthetic_dump(net.pi5_dir, "db-2024-03-09.sql.gz")
    world.synthetic_dump(net.nas_dir, "db-2024-03-09.sql.gz")
    damage(world.synthetic_dump(net.prod_dir, NAME, rows=20000), how)
    result = run_orchestrator(net)
    assert result.returncode == 3, result.stderr
    assert NAME not in os.listdir(net.pi5_dir) and NAME not in finals(net.nas_dir)
    assert os.listdir(net.pi5_dir / ".incoming") == []
    assert finals(net.pi5_dir) == ["db-2024-03-09.sql.gz", "db-2024-03-09.sql.gz.json"]
    assert [line for line in result.stderr.splitlines() if "error:" in line][0].count("\n") == 0


def slow_link(net, tmp_path, place, rate=3_000_000):
    address = world.PLACE_ADDRESSES[place]
    config = net.ssh.client_config(tmp_path / "slow_config", proxy={place: world.relay_command(address, rate)})
    net.settings["SSH_CONFIG"] = str(config)


def test_connection_dropped_mid_pull_is_resumed_never_promoted_partial(net, tmp_path):
    world.synthetic_dump(net.prod_dir, NAME, rows=150000, random_bytes=True)  # ~9 MB at 3 MB/s
    slow_link(net, tmp_path, "prod")
    proc = net.popen("backup-orchestrator")
    partial = net.pi5_dir / ".incoming" / NAME
    wait_for(lambda: partial.exists() and partial.stat().st_size > 1_000_000)
    assert net.ssh.places["prod"].drop_sessions() > 0
    assert NAME not in os.listdir(net.pi5_dir)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "retrying, resuming what arrived" in err
    assert finals(net.nas_dir) == [NAME, NAME + ".json"]
    no_partial_anywhere(net)


def test_connection_dropped_mid_push_is_resumed(net, tmp_path):
    world.synthetic_dump(net.prod_dir, NAME, rows=150000, random_bytes=True)
    slow_link(net, tmp_path, "nas")
    proc = net.popen("backup-orchestrator")
    partial = net.nas_dir / ".incoming" / NAME
    wait_for(lambda: partial.exists() and partial.stat().st_size > 1_000_000)
    assert net.ssh.places["nas"].drop_sessions() > 0
    assert NAME not in os.listdir(net.nas_dir)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "retrying" in err
    assert finals(net.nas_dir) == [NAME, NAME + ".json"]
    no_partial_anywhere(net)


def test_a_link_that_keeps_dropping_fails_with_nothing_promoted(net, tmp_path):
    world.synthetic_dump(net.prod_dir, NAME, rows=150000, random_bytes=True)
    slow_link(net, tmp_path, "prod", rate=1_000_000)
    proc = net.popen("backup-orchestrator")
    stop = threading.Event()

    def keep_dropping():
        while not stop.is_set():
            partial = net.pi5_dir / ".incoming" / NAME
            if partial.exists() and partial.stat().st_size > 0:
                net.ssh.places["prod"].drop_sessions()
            time.sleep(0.05)

    dropper = threading.Thread(target=keep_dropping, daemon=True)
    dropper.start()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        stop.set()
        dropper.join()
    assert proc.returncode == 1, err
    assert "after 3 attempts" in err
    assert NAME not in os.listdir(net.pi5_dir) and finals(net.nas_dir) == []


def test_two_orchestrators_at_once(net, tmp_path):
    world.synthetic_dump(net.prod_dir, NAME, rows=100000, random_bytes=True)
    slow_link(net, tmp_path, "prod")
    first = net.popen("backup-orchestrator")
    wait_for(lambda: (net.pi5_dir / ".incoming" / NAME).exists())
    second = run_orchestrator(net)
    assert second.returncode == 4 and "another backup-orchestrator is running" in second.stderr
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err


def test_a_size_change_is_an_anomaly_that_pins_the_dump_before_it(net):
    world.synthetic_dump(net.pi5_dir, "db-2024-03-09.sql.gz", rows=1000)
    world.synthetic_dump(net.prod_dir, NAME, rows=5000)
    net.settings["SIZE_CHANGE_ALERT_PCT"] = "50"
    result = run_orchestrator(net)
    assert result.returncode == 0, result.stderr
    assert "anomaly:" in result.stderr and "SIZE_CHANGE_ALERT_PCT=50" in result.stderr
    assert "pinned=db-2024-03-09.sql.gz" in result.stderr and "result=ok-with-warnings" in result.stderr
    assert (net.pi5_dir / "db-2024-03-09.sql.gz.pin").exists() and (net.nas_dir / "db-2024-03-09.sql.gz.pin").exists()


def test_a_dump_under_min_dump_bytes_is_a_failed_dump(net):
    world.synthetic_dump(net.prod_dir, NAME, rows=10)
    net.settings["MIN_DUMP_BYTES"] = "100000"
    result = run_orchestrator(net)
    assert result.returncode == 1 and "MIN_DUMP_BYTES" in result.stderr
    assert finals(net.pi5_dir) == []


def test_rotation_keeps_each_places_newest_valid_dumps_and_nothing_foreign(net):
    for day in ("05", "06", "07", "08"):
        world.synthetic_dump(net.pi5_dir, f"db-2024-03-{day}.sql.gz")
        world.synthetic_dump(net.nas_dir, f"db-2024-03-{day}.sql.gz")
    for directory in (net.pi5_dir, net.nas_dir):
        (directory / "notes.txt").write_text("mine")
        world.synthetic_dump(directory, "kw_app_production-20240101-000000.sql.gz")
    world.synthetic_dump(net.prod_dir, NAME)
    net.settings.update(PI5_KEEP="3", NAS_KEEP="2")
    result = run_orchestrator(net)
    assert result.returncode == 0, result.stderr
    dumps_on = {
        d: [n for n in finals(d) if n.startswith("db-") and n.endswith(".gz")] for d in (net.pi5_dir, net.nas_dir)
    }
    assert dumps_on[net.pi5_dir] == ["db-2024-03-07.sql.gz", "db-2024-03-08.sql.gz", NAME]
    assert dumps_on[net.nas_dir] == ["db-2024-03-08.sql.gz", NAME]
    for directory in (net.pi5_dir, net.nas_dir):
        assert (directory / "notes.txt").exists()
        assert (directory / "kw_app_production-20240101-000000.sql.gz").exists()
        assert not (directory / "db-2024-03-05.sql.gz.json").exists()


def test_dry_run_changes_nothing(net):
    world.synthetic_dump(net.prod_dir, NAME)
    result = run_orchestrator(net, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"[dry-run] would pull {NAME}" in result.stderr
    assert all("[dry-run]" in line for line in result.stderr.splitlines())
    assert not net.pi5_dir.exists() and not net.nas_dir.exists()


def test_no_push_pulls_only(net):
    world.synthetic_dump(net.prod_dir, NAME)
    result = run_orchestrator(net, "--no-push")
    assert result.returncode == 0, result.stderr
    assert finals(net.pi5_dir) == [NAME, NAME + ".json"] and finals(net.nas_dir) == []


def test_runs_on_the_pi5_only(net):
    net.settings["PI5_HOST"] = "pi@pi5.local"
    result = run_orchestrator(net)
    assert result.returncode == 2 and "PI5_HOST=local" in result.stderr


def test_no_dump_on_prod(net):
    net.prod_dir.mkdir(parents=True)
    result = run_orchestrator(net)
    assert result.returncode == 1 and "no dump" in result.stderr
