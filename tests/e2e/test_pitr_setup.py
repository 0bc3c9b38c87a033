"""setup-pitr from the laptop, then the WAL tier streaming on the pi5 (issue 23)."""

from __future__ import annotations

import json


def test_setup_pitr_prepares_prod_and_starts_streaming(pitr):
    pitr.start_tunnel()
    done = pitr.laptop("setup-pitr")
    assert done.returncode == 0, done.stderr
    status = pitr.on_pi("pitr-status", "--json")

    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["base_backups"] == 1 and state["status"] == "ok", state
