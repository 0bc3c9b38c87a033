"""make demo, as a new user runs it on a fresh machine: the whole flow, and nothing left running."""

import os
import re
import subprocess

from tests import world


def test_make_demo_shows_the_whole_flow_and_leaves_nothing_running(tmp_path):
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
    # The run directories in /tmp of the demo's server and its drill's, by name: other tests' and suites' drills
    # make theirs beside them.
    settings = (tmp_path / "demo" / "backup.env").read_text()
    runs = re.findall(r"^DB_HOST=(\S+)$", settings, re.M)
    runs += re.findall(r"started a private temporary PostgreSQL in (\S+)", result.stderr)
    assert len(runs) == 2, result.stderr
    left = [d for d in runs if os.path.exists(d)]
    assert not left, f"left behind: {left}"
    running = [d for d in runs if subprocess.run(["pgrep", "-f", d], capture_output=True).returncode == 0]
    assert not running, f"still running from a drill that is gone: {running}"
