"""bin/backup-drill: a dump restores row for row on a scratch server, which is private and cleaned up whatever
happens (a failure, a signal, kill -9: then by the next drill), refuses a dump newer than its server, and
reports a scratch server it cannot use in one line."""

import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests import world
from tests.conftest import backup_db_dump
from tests.damage import forge_manifest, rewrite, spoil, with_sql_error

STARTED = r"started a private temporary PostgreSQL in (\S+)"


def clusters_left(output: str) -> list[Path]:
    """The run directories of the temporary clusters a drill says it started that are still there. Only these tell
    what a test's drill left: other tests' and suites' drills share /tmp, and their sweeps remove killed drills'."""
    started = [Path(d) for d in re.findall(STARTED, output)]
    assert started, output
    return [d for d in started if d.exists()]


def throwaways(pg):
    return [n for n in pg.psql("SELECT datname FROM pg_database").split() if n.startswith("kw_drill_")]


@pytest.fixture
def on_the_nas(net, pg, db):
    """A real dump of the test database, on the nas (reached over ssh)."""
    made = net.run("backup-db")
    assert made.returncode == 0, made.stderr
    path = made.stdout.strip().splitlines()[-1]
    net.nas_dir.mkdir(mode=0o700)
    for suffix in ("", ".json"):
        shutil.copy(path + suffix, net.nas_dir / (os.path.basename(path) + suffix))
    net.settings["DRILL_LOG"] = str(net.tmp / "drill.log")
    return net.nas_dir / os.path.basename(path)


def test_a_nas_dump_restores_row_for_row_on_a_temporary_cluster(on_the_nas, net):
    net.settings["DRILL_SQL"] = (
        "SELECT max(created_at) > now() - interval '1 day' FROM orders; SELECT count(*) = 300 FROM users"
    )
    result = net.run("backup-drill", "--report", str(net.tmp / "report.json"), timeout=300)
    assert result.returncode == 0, result.stderr
    for line in (
        "source:   CM3588 NAS",
        f"dump:     {on_the_nas.name}",
        "tables:   5",
        "rows:     2343",
        "result:   ok",
    ):
        assert line in result.stdout
    logged = json.loads((net.tmp / "drill.log").read_text().splitlines()[-1])
    assert logged == json.loads((net.tmp / "report.json").read_text())
    assert {"source", "dump", "bytes", "download_seconds", "restore_seconds", "tables", "rows", "result"} <= set(logged)
    assert logged["result"] == "ok" and all(c["passed"] for c in logged["checks"]) and len(logged["checks"]) == 2
    assert not clusters_left(result.stderr)


def test_on_a_scratch_server_by_url_the_throwaway_database_is_dropped(on_the_nas, net, pg):
    url = f"postgresql://postgres@/postgres?host={pg.sockets}&port={pg.port}"
    result = net.run("backup-drill", "--database-url", url, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "started a temporary PostgreSQL" not in result.stderr and not throwaways(pg)


def test_a_tampered_manifest_exits_3(on_the_nas, net):
    manifest_path = on_the_nas.parent / (on_the_nas.name + ".json")
    manifest = json.loads(manifest_path.read_text())
    manifest["tables"]["public.orders"] = 1999
    manifest_path.write_text(json.dumps(manifest))
    result = net.run("backup-drill", timeout=300)
    assert result.returncode == 3 and "public.orders" in result.stderr
    assert json.loads((net.tmp / "drill.log").read_text().splitlines()[-1])["result"] == "failed"


def test_a_dump_that_fails_to_restore_exits_3_and_the_scratch_is_cleaned(on_the_nas, net, pg):
    rewrite(on_the_nas, with_sql_error)  # intact as a file (its manifest agrees), fails to restore
    local = net.run("backup-drill", timeout=300)
    assert local.returncode == 3 and "no_such_function" in local.stderr
    assert not clusters_left(local.stderr)
    url = f"postgresql://postgres@/postgres?host={pg.sockets}&port={pg.port}"
    remote = net.run("backup-drill", "--database-url", url, timeout=300)
    assert remote.returncode == 3 and not throwaways(pg)


def test_a_drill_sql_check_that_is_not_true_exits_3_reporting_what_it_measured(on_the_nas, net):
    net.settings["DRILL_SQL"] = "SELECT count(*) = 1 FROM users, pg_sleep(1)"
    result = net.run("backup-drill", timeout=300)
    assert result.returncode == 3 and "not true" in result.stderr
    report = last_report(net)
    assert report["result"] == "failed" and report["restore_seconds"] >= 1 and report["download_seconds"] > 0
    assert report["tables"] == 5 and report["rows"] == 2343  # counted before the check failed
    assert f"restore:  {report['restore_seconds']:.1f}s" in result.stdout and "result:   failed" in result.stdout


@pytest.mark.parametrize("how", ["junk", "flip"])  # seen in the listing (its size), or only once read whole
def test_latest_with_a_bad_newest_dump_exits_3_naming_a_verified_copy_never_drilling_an_older_one(on_the_nas, net, how):
    world.synthetic_dump(net.nas_dir, "db-2024-01-01.sql.gz", rows=10)  # older and verified: not taken by itself
    spoil(on_the_nas, how)
    result = net.run("backup-drill", timeout=300)
    assert result.returncode == 3, result.stderr
    line = one_error_line(result.stderr)
    name = on_the_nas.name
    assert name in line and "db-2024-01-01" not in result.stderr
    if how == "junk":
        assert f"{name} on nas failed verification: its size" in line  # backup-db's own copy on prod is intact
    assert line.endswith(f"-- a verified copy of {name} is on prod: backup-drill --from prod --dump {name}")
    assert last_report(net)["result"] == "failed"


def test_from_a_file_and_hostile_names(kw, pg, db, tmp_path):
    made = kw.run("backup-db")
    copy = tmp_path / "any name.sql.gz"
    shutil.copy(made.stdout.strip().splitlines()[-1], copy)
    result = kw.run("backup-drill", "--from-file", str(copy), timeout=300)
    assert result.returncode == 0, result.stderr
    # DRILL_LOG's default: backup-drill.log beside LOG_FILE
    assert json.loads((kw.tmp / "backup-drill.log").read_text())["result"] == "ok"
    hostile = kw.run("backup-drill", "--dump", "../../etc/passwd")
    assert hostile.returncode == 2


def test_make_drill_runs_the_drill(kw, pg, db, tmp_path):
    made = kw.run("backup-db")
    assert made.returncode == 0, made.stderr
    result = subprocess.run(
        ["make", "-s", "drill", f"DRILL_ARGS=--from prod --report {tmp_path / 'r.json'}"],
        cwd=world.ROOT,
        env=kw.env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "result:   ok" in result.stdout and json.loads((tmp_path / "r.json").read_text())["result"] == "ok"


# --- a private drill, cleaned up whatever happens ---------------------------------------------------


class Running:
    """A drill in the background, its stderr read as it comes."""

    def __init__(self, kw, *args: str):
        self.proc = subprocess.Popen(
            [str(world.BIN / "backup-drill"), *args],
            env=kw.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            assert self.proc.poll() is None, f"the drill ended before {pattern!r}: {''.join(self.lines)}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout}s: {''.join(self.lines)}"
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def postmaster(data: Path) -> int:
    return int((data / "postmaster.pid").read_text().split()[0])


def last_report(kw) -> dict:
    return json.loads(Path(kw.settings["DRILL_LOG"]).read_text().splitlines()[-1])


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def big_dump(tmp_path_factory, pg, big_db):
    """A dump whose restore takes seconds: for stopping drills mid-restore."""
    return str(backup_db_dump(tmp_path_factory, pg, big_db))


@pytest.fixture
def small_dump(kw):
    """A real dump of the test database, on this machine; drill reports in kw.tmp/drill.log."""
    made = kw.run("backup-db")
    assert made.returncode == 0, made.stderr
    kw.settings["DRILL_LOG"] = str(kw.tmp / "drill.log")
    return made.stdout.strip().splitlines()[-1]


def test_a_live_drills_cluster_is_spared_by_another_drills_sweep(kw, small_dump):
    kw.settings["DRILL_SQL"] = "SELECT true FROM pg_sleep(600)"  # live until stopped below, however slow the second
    first = Running(kw, "--from-file", small_dump)
    base = Path(first.wait_for(STARTED).group(1))
    first.wait_for("restoring")
    pid = postmaster(base / "data")
    second = kw.run("backup-drill", "--from-file", small_dump, env=kw.env(DRILL_SQL="SELECT true"), timeout=300)
    assert second.returncode == 0, second.stderr
    # Its sweep may remove what other tests' killed drills left (they share /tmp), never this one.
    assert f"removed {base}," not in second.stderr and base.exists() and alive(pid)
    first.proc.terminate()
    assert first.finish() == 128 + signal.SIGTERM, "".join(first.lines)
    assert not base.exists()


def test_the_temporary_cluster_is_private(kw, small_dump):
    assert os.geteuid() == 0, "this test connects as other local users: it runs as root"
    kw.settings["DRILL_SQL"] = (
        "SELECT current_setting('listen_addresses') = ''; "
        "SELECT bool_and(auth_method = 'scram-sha-256') FROM pg_hba_file_rules; "
        "SELECT true FROM pg_sleep(3)"
    )
    drill = Running(kw, "--from-file", small_dump)
    base = Path(drill.wait_for(STARTED).group(1))
    owner = pwd.getpwuid(base.stat().st_uid).pw_name
    assert owner == "postgres"  # the server's unprivileged user, not root
    socket_file = base / ".s.PGSQL.5432"
    assert stat.S_ISSOCK(socket_file.stat().st_mode)  # the socket directory is the cluster directory
    for path in (base, base / "data", socket_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    attempt = ["psql", "-X", "-w", "-h", str(base), "-p", "5432", "-U", "postgres", "-d", "postgres", "-c", "SELECT 1"]
    clean = {"PATH": os.environ["PATH"]}
    other = subprocess.run(["runuser", "-u", "nobody", "--", *attempt], env=clean, capture_output=True, text=True)
    assert other.returncode != 0 and "Permission denied" in other.stderr, other.stderr
    # Even the server's own user and root, who can reach the socket, need the password only the drill knows.
    for user in ("postgres", "root"):
        tried = subprocess.run(["runuser", "-u", user, "--", *attempt], env=clean, capture_output=True, text=True)
        assert tried.returncode != 0 and "no password supplied" in tried.stderr, (user, tried.stderr)
    assert drill.finish() == 0, drill.stderr
    assert [c["passed"] for c in last_report(kw)["checks"]] == [True, True, True]  # no TCP, scram everywhere
    assert not base.exists()


@pytest.mark.parametrize("server", ["cluster", "container"])
def test_a_drill_killed_with_sigkill_leaves_a_server_the_next_drill_removes(kw, big_dump, small_dump, server):
    if server == "container":
        kw.settings["DRILL_DOCKER_IMAGE"] = "postgres:15"
    killed = Running(kw, "--from-file", big_dump)
    left = Path(killed.wait_for(r"(?:started a private temporary PostgreSQL in|its run directory is) (\S+)").group(1))
    killed.wait_for("restoring")
    if server == "container":
        name = (left / "container").read_text().strip()
        data = Path(f"/tmp/kw-standin-docker-{name}/data")
    else:
        data = left / "data"
    pid = postmaster(data)
    killed.proc.kill()
    killed.finish()
    assert alive(pid)
    kw.settings.pop("DRILL_DOCKER_IMAGE", None)
    result = kw.run("backup-drill", "--from-file", small_dump, timeout=300)
    assert result.returncode == 0, result.stderr
    # The next drill removes it; under pytest-xdist another worker's drill may have been the next one.
    ours = f"removed {left}, left by a drill that was killed" in result.stderr
    assert ours or not left.exists()
    assert not left.exists() and not data.exists() and not alive(pid)
    if server == "container" and ours:
        assert ["docker", "rm", "-f", name] in world.standin_calls(kw.standin_log)


@pytest.mark.parametrize("name", ["SIGHUP", "SIGINT", "SIGTERM"])
def test_a_drill_stopped_by_a_signal_removes_its_cluster_and_exits_128_plus_it(kw, big_dump, small_dump, name):
    signum = getattr(signal, name)
    drill = Running(kw, "--from-file", big_dump)
    base = Path(drill.wait_for(STARTED).group(1))
    drill.wait_for("restoring")
    pid = postmaster(base / "data")
    drill.proc.send_signal(signum)
    assert drill.finish() == 128 + signum, drill.stderr
    assert not base.exists() and not alive(pid)
    report = last_report(kw)
    assert report["result"] == "error" and report["error"] == f"interrupted by {name}"


def test_drill_pg_bindir_gives_every_program_of_the_cluster_and_the_load(kw, small_dump):
    bindir = Path(tempfile.mkdtemp(prefix="kwtest-bindir-"))  # in /tmp: the server's user runs these
    try:
        bindir.chmod(0o755)
        for tool in ("initdb", "pg_ctl", "postgres", "psql"):
            (bindir / tool).symlink_to(world.PG_BIN / tool)
        kw.settings["DRILL_PG_BINDIR"] = str(bindir)
        result = kw.run("backup-drill", "--verbose", "--from-file", small_dump, timeout=300)
        assert result.returncode == 0, result.stderr
        ran = [line.split("run: ", 1)[1] for line in result.stderr.splitlines() if "run: " in line]
        for tool in ("initdb", "pg_ctl", "psql"):  # psql: also in the parallel load's session (JSON)
            assert any(f"{bindir}/{tool} " in command or f'{bindir}/{tool}"' in command for command in ran), tool
        (bindir / "initdb").unlink()
        missing = kw.run("backup-drill", "--from-file", small_dump, timeout=300)
        assert missing.returncode == 2 and f"DRILL_PG_BINDIR={bindir} has no initdb" in missing.stderr
    finally:
        shutil.rmtree(bindir)


def claim_postgresql_17(path) -> None:
    """The dump's header and manifest say pg_dump 17 made it, from a PostgreSQL 17 server."""
    rewrite(
        path,
        lambda sql: re.sub(rb"^(-- Dumped (?:from database|by pg_dump) version )\S+", rb"\g<1>17.2", sql, flags=re.M),
    )
    manifest_path = Path(f"{path}.json")
    manifest = json.loads(manifest_path.read_text())
    manifest.update(pg_dump_version="17.2", server_version="17.2")
    manifest_path.write_text(json.dumps(manifest))
    forge_manifest(path)


def test_a_dump_from_a_newer_postgresql_is_refused_before_anything_is_created(kw, pg, small_dump):
    claim_postgresql_17(small_dump)
    local = kw.run("backup-drill", "--verbose", "--from-file", small_dump, timeout=300)
    assert local.returncode == 1, local.stderr
    line = one_error_line(local.stderr)
    for named in (
        "pg_dump 17.2",
        "PostgreSQL 15.",
        "DRILL_PG_BINDIR=/usr/lib/postgresql/17/bin",
        "DRILL_DOCKER_IMAGE=postgres:17",
    ):
        assert named in line, named
    assert not [run for run in local.stderr.splitlines() if "run: " in run and ("initdb" in run or "pg_ctl" in run)]
    assert last_report(kw)["result"] == "error" and "17.2" in last_report(kw)["error"]
    url = f"postgresql://postgres@/postgres?host={pg.sockets}&port={pg.port}"
    remote = kw.run("backup-drill", "--database-url", url, "--from-file", small_dump, timeout=300)
    assert remote.returncode == 1, remote.stderr
    assert "newer than the scratch server of --database-url (PostgreSQL 15." in one_error_line(remote.stderr)
    assert "throwaway" not in remote.stderr and not throwaways(pg)


@pytest.mark.parametrize("server", ["unreachable", "refusing"])
def test_a_scratch_server_it_cannot_use_is_one_line_exit_1_and_a_drill_log_line(kw, pg, small_dump, server):
    kw.settings["DRILL_DATABASE_URL"] = {
        "unreachable": f"postgresql://postgres@127.0.0.1:{world.free_port()}/postgres",
        "refusing": f"postgresql://no_such_role@/postgres?host={pg.sockets}&port={pg.port}",
    }[server]
    result = kw.run("backup-drill", "--from-file", small_dump, timeout=300)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert "the scratch server of DRILL_DATABASE_URL" in line
    assert ("Connection refused" if server == "unreachable" else 'role "no_such_role" does not exist') in line
    report = last_report(kw)
    assert report["result"] == "error" and report["error"] in line


def test_a_scratch_server_that_goes_away_mid_restore_is_exit_1_not_a_bad_dump(kw, big_dump, small_dump):
    scratch = world.Postgres(Path(tempfile.mkdtemp(prefix="kwtest-scratch-"))).start()
    try:
        kw.settings["DRILL_DATABASE_URL"] = (
            f"postgresql://postgres@/postgres?host={scratch.sockets}&port={scratch.port}"
        )
        drill = Running(kw, "--from-file", big_dump)
        drill.wait_for("restoring")
        time.sleep(0.5)
        scratch.stop()
        assert drill.finish() == 1, drill.stderr
        assert "the scratch server of DRILL_DATABASE_URL went away during the restore" in one_error_line(drill.stderr)
        assert last_report(kw)["result"] == "error"
    finally:
        scratch.stop()
        shutil.rmtree(scratch.base, ignore_errors=True)


# --- DRILL_DOCKER_IMAGE, through the docker stand-in --------------------------------------------------


def container_runs(kw) -> list[list[str]]:
    return [call for call in world.standin_calls(kw.standin_log) if call[1] == "run"]


def test_a_drill_on_a_throwaway_container_bound_to_127_0_0_1(kw, small_dump):
    kw.settings["DRILL_DOCKER_IMAGE"] = "postgres:15"
    result = kw.run("backup-drill", "--from-file", small_dump, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "server:   the drill's container of postgres:15 (PostgreSQL 15." in result.stdout
    assert "result:   ok" in result.stdout and "temporary PostgreSQL" not in result.stderr
    (started,) = container_runs(kw)
    name = started[started.index("--name") + 1]
    assert started[:4] == ["docker", "run", "--rm", "-d"] and started[-1] == "postgres:15"
    assert re.fullmatch(r"127\.0\.0\.1:\d+:5432", started[started.index("-p") + 1])
    # the password reaches docker through its environment (`-e NAME`), never as NAME=VALUE on its command line
    assert started[started.index("-e") + 1] == "POSTGRES_PASSWORD" and not any("=" in arg for arg in started)
    assert world.standin_calls(kw.standin_log)[-1] == ["docker", "rm", "-f", name]
    assert not Path(f"/tmp/kw-standin-docker-{name}").exists()


def test_a_dump_newer_than_the_images_tag_starts_no_container(kw, small_dump):
    kw.settings["DRILL_DOCKER_IMAGE"] = "postgres:15"
    claim_postgresql_17(small_dump)
    result = kw.run("backup-drill", "--from-file", small_dump, timeout=300)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert "pg_dump 17.2, newer than DRILL_DOCKER_IMAGE postgres:15 (PostgreSQL 15)" in line
    assert "DRILL_DOCKER_IMAGE=postgres:17" in line and not container_runs(kw)
    assert last_report(kw)["result"] == "error"


@pytest.mark.parametrize("damage", ["no such image", "broken"])
def test_a_drill_on_a_container_removes_it_after_a_failure(kw, small_dump, damage):
    kw.settings["DRILL_DOCKER_IMAGE"] = "postgres:16" if damage == "no such image" else "postgres:15"
    if damage == "broken":
        rewrite(small_dump, with_sql_error)
    result = kw.run("backup-drill", "--from-file", small_dump, timeout=300)
    assert result.returncode == (3 if damage == "broken" else 1), result.stderr
    assert {
        "no such image": "docker run failed (exit 125): Unable to find image 'postgres:16'",
        "broken": "no_such_function",
    }[damage] in one_error_line(result.stderr)
    (started,) = container_runs(kw)
    name = started[started.index("--name") + 1]
    assert world.standin_calls(kw.standin_log)[-1] == ["docker", "rm", "-f", name]
    assert not Path(f"/tmp/kw-standin-docker-{name}").exists()
    assert last_report(kw)["result"] == ("failed" if damage == "broken" else "error")
