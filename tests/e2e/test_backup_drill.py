"""bin/backup-drill: a dump restores row for row on a scratch server, which is cleaned up whatever happens."""

import glob
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests import world
from tests.damage import rewrite, with_sql_error


def clusters():
    return glob.glob("/tmp/kw-drill-cluster-*")


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
    before = clusters()
    net.settings["DRILL_SQL"] = ("SELECT max(created_at) > now() - interval '1 day' FROM orders; "
                                 "SELECT count(*) = 300 FROM users")
    result = net.run("backup-drill", "--report", str(net.tmp / "report.json"), timeout=300)
    assert result.returncode == 0, result.stderr
    for line in ("source:   CM3588 NAS", f"dump:     {on_the_nas.name}", "tables:   5", "rows:     2343",
                 "result:   ok"):
        assert line in result.stdout
    logged = json.loads((net.tmp / "drill.log").read_text().splitlines()[-1])
    assert logged == json.loads((net.tmp / "report.json").read_text())
    assert {"source", "dump", "bytes", "download_seconds", "restore_seconds", "tables", "rows",
            "result"} <= set(logged)
    assert logged["result"] == "ok" and all(c["passed"] for c in logged["checks"]) and len(logged["checks"]) == 2
    assert clusters() == before


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
    before = clusters()
    local = net.run("backup-drill", timeout=300)
    assert local.returncode == 3 and "no_such_function" in local.stderr
    assert clusters() == before
    url = f"postgresql://postgres@/postgres?host={pg.sockets}&port={pg.port}"
    remote = net.run("backup-drill", "--database-url", url, timeout=300)
    assert remote.returncode == 3 and not throwaways(pg)


def test_a_drill_sql_check_that_is_not_true_exits_3(on_the_nas, net):
    net.settings["DRILL_SQL"] = "SELECT count(*) = 1 FROM users"
    result = net.run("backup-drill", timeout=300)
    assert result.returncode == 3 and "not true" in result.stderr


def test_the_temporary_cluster_goes_away_when_the_drill_is_killed(kw, pg, big_db):
    kw.settings.update(DB_NAME=big_db, DRILL_LOG=str(kw.tmp / "drill.log"))
    made = kw.run("backup-db", timeout=300)
    assert made.returncode == 0, made.stderr
    before = set(clusters())
    proc = subprocess.Popen([str(world.BIN / "backup-drill"), "--from", "prod"], env=kw.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(os.path.exists(os.path.join(c, "data", "postmaster.pid")) for c in set(clusters()) - before):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert set(clusters()) == before
    assert "interrupted" in (kw.tmp / "drill.log").read_text()


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
    result = subprocess.run(["make", "-s", "drill", f"DRILL_ARGS=--from prod --report {tmp_path / 'r.json'}"],
                            cwd=world.ROOT, env=kw.env(), capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "result:   ok" in result.stdout and json.loads((tmp_path / "r.json").read_text())["result"] == "ok"
