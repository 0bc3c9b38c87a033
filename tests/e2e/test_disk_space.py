"""Free space: a warning and an alert before a place is full (MIN_FREE_DUMPS), never a changed exit status.

Each place that runs short sits on a small tmpfs of its own.
"""

import json
import re

import pytest

from tests import world


@pytest.fixture
def recorder():
    server = world.Recorder()
    yield server
    server.close()


@pytest.fixture
def small_disks():
    mounted = []

    def disk(path, size):
        mounted.append(world.Tmpfs(path, size))
        return path

    yield disk
    for each in reversed(mounted):
        each.close()


def monitored(kw, recorder):
    kw.settings.update(
        NOTIFY_URLS=f"json://{recorder.url[7:]}/notify",
        APPSIGNAL_FRONTEND_API_KEY="front",
        APPSIGNAL_ENDPOINT=f"{recorder.url}/appsignal",
    )


def notes(recorder):
    return [json.loads(r["body"]) for r in recorder.requests if r["path"].startswith("/notify")]


def free_metrics(recorder):
    bodies = [json.loads(r["body"]) for r in recorder.requests if r["path"].startswith("/appsignal/metrics")]
    return {m["tags"]["place"]: m["value"] for body in bodies for m in body if m["name"] == "backup.free_bytes"}


def test_backup_db_warns_when_prod_has_room_for_fewer_than_min_free_dumps(kw, recorder, small_disks):
    monitored(kw, recorder)
    small_disks(kw.prod_dir, "96k")  # room for this ~30 kB dump, not for two more
    result = kw.run("backup-db")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "low disk space on prod" in line]
    assert len(warning) == 1 and "MIN_FREE_DUMPS=2" in warning[0]
    assert any("low disk space on prod" in n["message"] and "warning" in n["title"] for n in notes(recorder))
    assert 0 < free_metrics(recorder)["prod"] < 96 * 1024

    kw.settings["MIN_FREE_DUMPS"] = "0.5"
    calm = kw.run("backup-db")
    assert calm.returncode == 0 and "low disk space" not in calm.stderr


def test_the_orchestrator_warns_for_the_pi5_and_the_nas_and_sends_their_free_space(net, recorder, small_disks):
    monitored(net, recorder)
    world.synthetic_dump(net.prod_dir, "db-2024-03-10.sql.gz", rows=3000, random_bytes=True)  # ~200 kB
    small_disks(net.nas_dir, "512k")
    result = net.run("backup-orchestrator")
    assert result.returncode == 0, result.stderr
    assert "low disk space on nas" in result.stderr and "low disk space on pi5" not in result.stderr
    assert "result=ok-with-warnings" in result.stderr
    assert any("low disk space on nas" in n["message"] for n in notes(recorder))
    free = free_metrics(recorder)
    assert set(free) == {"pi5", "nas"} and free["nas"] < 512 * 1024 < free["pi5"]


def test_list_backups_ends_each_place_with_its_free_space(net, small_disks):
    net.settings.update(PI5_HOST="pi5")
    small_disks(net.nas_dir, "1m")
    world.synthetic_dump(net.nas_dir, "db-2024-03-10.sql.gz")
    result = net.run("list-backups")
    assert result.returncode == 0, result.stderr
    for heading, lines in world.listing_blocks(result.stdout).items():
        assert lines[-1].startswith("  free: "), (heading, lines)
    nas = next(lines for heading, lines in world.listing_blocks(result.stdout).items() if heading.startswith("CM3588"))
    assert re.fullmatch(r"  free: 1(\.\d)?MB", nas[-1]), nas  # the 1 MiB tmpfs, less the dump
