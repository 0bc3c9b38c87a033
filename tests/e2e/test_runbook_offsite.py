"""Runbook C of docs/runbooks.md (the Pi and the nas lost together), run as written, from the offsite copy alone."""

import json
import os
import re
import shutil
import subprocess

from tests import world

ITEM = "kw-backup age identity"


def runbook_c() -> str:
    """The shell block after docs/runbooks.md's runbook-C marker, exactly as an operator would paste it."""
    runbooks = (world.ROOT / "docs" / "runbooks.md").read_text()
    block = re.search(r"<!-- runbook-C:.*?-->\n```sh\n(.*?)```", runbooks, re.S)
    assert block, "docs/runbooks.md lost its runbook C block"
    return block.group(1)


def test_runbook_c_restores_production_from_the_offsite_copy_alone(kw, pg, db, ssh_world, tmp_path):
    identity, public = world.age_key(tmp_path, "vault-note.txt")  # what Bitwarden holds
    offsite_dir = tmp_path / "offsite"
    kw.settings.update(
        AGE_RECIPIENTS=public,
        RCLONE_CONFIG=str(ssh_world.rclone_config(tmp_path / "rclone.conf")),
        OFFSITE_REMOTE=f"offsite:{offsite_dir}",
    )
    for step in ("backup-db", "backup-orchestrator"):
        result = kw.run(step)
        assert result.returncode == 0, result.stderr
    assert sorted(n for n in os.listdir(offsite_dir) if n.startswith("db-"))[0].endswith(".sql.gz.age")
    pg.psql("DELETE FROM orders WHERE id > 100; UPDATE users SET name = 'damaged'", db)

    # The Pi and the nas are gone: their directories, and their hosts unreachable.
    shutil.rmtree(kw.tmp / "pi5")
    shutil.rmtree(kw.tmp / "nas")
    kw.settings.update(PI5_HOST="gone", NAS_HOST="gone", SSH_CONFIG=str(ssh_world.config))
    scratch = tmp_path / "laptop-tmp"
    scratch.mkdir()
    env = kw.env(STANDIN_BW_ITEM=ITEM, STANDIN_BW_NOTES=str(identity), TMPDIR=str(scratch))
    env.pop("AGE_IDENTITY_FILE", None)

    # restore-production-db asks for the database name on a terminal: answer it through a pty.
    controller, terminal = os.openpty()
    try:
        os.write(controller, f"{db}\n".encode())
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", runbook_c()],
            cwd=world.ROOT,
            env=env,
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 0, result.stdout + result.stderr

    assert pg.row_counts(db) == world.RAILS_TABLE_ROWS
    assert pg.psql("SELECT count(*) FROM users WHERE name = 'damaged'", db) == "0"
    assert re.search(r"db-\S+\.sql\.gz\.age\s+\S+\s+\S+ \S+\s+verified", result.stdout), result.stdout
    assert "result:   ok" in result.stdout
    assert os.listdir(scratch) == [], "the key file (and every temporary file) is removed"
    calls = world.standin_calls(kw.standin_log)
    assert ["bw", "unlock", "--raw"] in calls and ["bw", "get", "notes", ITEM] in calls
    assert ["kamal", "app", "stop", "-d", "production"] in calls  # --stop-app, and started again:
    assert ["kamal", "app", "start", "-d", "production"] in calls
    drill = [json.loads(line) for line in (kw.tmp / "backup-drill.log").read_text().splitlines()]
    assert drill[-1]["result"] == "ok" and drill[-1]["source"].startswith("Offsite (offsite:")
