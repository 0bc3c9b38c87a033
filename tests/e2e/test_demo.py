"""make demo, as a new user runs it on a fresh machine: the whole flow, and nothing left running."""

import glob
import re
import subprocess

from tests import world


def test_make_demo_shows_the_whole_flow_and_leaves_nothing_running(tmp_path):
    before = set(glob.glob("/tmp/kw-drill-run-*"))  # the demo's drill makes one, which must go
    result = subprocess.run(
        ["make", "-s", "demo", f"DEMO_DIR={tmp_path / 'demo'}"],
        cwd=world.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in (
        "$ backup-db",
        "$ backup-orchestrator",
        "$ list-backups",
        "$ restore-production-db --local latest",
        "$ backup-drill",
        "orders now: 100",
        "orders after the restore: 5000 (the change is gone)",
        "result:   ok",
    ):
        assert step in out, step
    assert out.count("  verified") >= 4  # the dump listed verified on prod, pi5, nas and offsite
    assert out.count(".sql.gz.age  ") == 2 and "$ backup-drill --from offsite" in out  # age and rclone are here
    # Another suite's or worker's live drill holds its directory: only unheld ones are the demo's leftovers.
    left = world.staging_leftovers("kw-drill-run-*", lock="") - before
    assert not left, f"left behind: {left}"
    held = set(glob.glob("/tmp/kw-drill-run-*")) - world.staging_leftovers("kw-drill-run-*", lock="")
    commands = subprocess.run(["pgrep", "-a", "-f", "kw-drill-run-"], capture_output=True, text=True).stdout
    running = {m for m in re.findall(r"/tmp/kw-drill-run-[^/\s]+", commands) if m not in held}
    assert not running, f"still running from a drill that is gone: {running}"
