"""setup-pitr from the laptop, then the WAL tier streaming on the pi5 (issue 23, points 1 to 3)."""

from __future__ import annotations

import json
import stat

from kwbackup.pitr.setup import HBA_LINE, HBA_LINE_DIRECT
from tests import world


def hba(pitr) -> str:
    return (pitr.pg.data / "pg_hba.conf").read_text()


def test_setup_pitr_prepares_prod_and_starts_streaming_once(pitr):
    pitr.start_tunnel()
    done = pitr.laptop("setup-pitr")
    assert done.returncode == 0, done.stderr

    # prod: two roles without superuser, one of them REPLICATION; the hba line; WAL kept for the pi5 bounded
    roles = pitr.prod_sql(
        "SELECT rolname, rolsuper, rolreplication FROM pg_roles WHERE rolname LIKE 'kw_barman%' ORDER BY 1"
    )
    assert roles.split() == ["kw_barman|f|f", "kw_barman_stream|f|t"]
    assert hba(pitr).count(HBA_LINE) == 1
    assert pitr.prod_sql("SHOW max_slot_wal_keep_size") == "51MB"
    assert pitr.prod_sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'kw_barman'") == "t"

    # the pi5: the tier is pi's alone, the passwords only in its pgpass, never on a command line or in a log
    for path in (pitr.dir, pitr.dir / "home", pitr.dir / "pgpass"):
        st = path.stat()
        assert st.st_uid == pitr.pi.pw_uid and stat.S_IMODE(st.st_mode) in (0o700, 0o600), path
    passwords = [line.rsplit(":", 1)[1] for line in (pitr.dir / "pgpass").read_text().splitlines()]
    assert len(passwords) == 2 and all(len(p) >= 40 for p in passwords)
    seen = done.stderr + (pitr.base / "docker.log").read_text() + (pitr.pg.base / "server.log").read_text()
    seen += (pitr.dir / "log" / "barman.log").read_text()
    assert not any(p in seen for p in passwords)
    assert "SCRAM-SHA-256$" in pitr.prod_sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'kw_barman'")

    # pitr-status pings its own Healthchecks check (not HEALTHCHECKS_URL's) and sends the wal.* metrics
    sinks = world.Recorder()
    try:
        pitr.write_pi5_env(
            HC_PITR_URL=f"{sinks.url}/pitr-check",
            HEALTHCHECKS_URL=f"{sinks.url}/nightly-check",
            APPSIGNAL_FRONTEND_API_KEY="front",
            APPSIGNAL_ENDPOINT=sinks.url,
        )
        status = pitr.on_pi("pitr-status", "--json")
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert state["base_backups"] == 1 and state["status"] == "ok" and state["prod"] == "reachable", state
        assert state["from"] and state["to"] and state["gaps"] == []
        paths = sinks.paths()
        assert any(p.startswith("/pitr-check/start?") for p in paths) and any(
            p.startswith("/pitr-check?") for p in paths
        ), paths
        assert not any(p.startswith("/nightly-check") for p in paths), paths
        (metrics,) = [json.loads(r["body"]) for r in sinks.requests if r["path"].startswith("/metrics/json")]
        sent = {m["name"]: m["value"] for m in metrics}
        assert {"wal.lag_seconds", "wal.window_hours", "wal.bytes_per_day"} <= set(sent), sent
        assert sent["wal.lag_seconds"] < 60

        pitr.stop_tunnel()  # a failure: the check's /fail ping, with the one error line in its body
        failed = pitr.on_pi("pitr-status")
        assert failed.returncode == 1 and "unreachable through the tunnel" in failed.stderr
        (fail,) = [r for r in sinks.requests if r["path"].startswith("/pitr-check/fail?")]
        assert b"unreachable through the tunnel" in fail["body"]
    finally:
        sinks.close()
        pitr.write_pi5_env(HC_PITR_URL="", HEALTHCHECKS_URL="", APPSIGNAL_FRONTEND_API_KEY="")
    pitr.start_tunnel()

    # A second run changes nothing: the same passwords, one hba line, no second base backup.
    again = pitr.laptop("setup-pitr")
    assert again.returncode == 0, again.stderr
    assert "a base backup exists" in again.stderr
    assert hba(pitr).count(HBA_LINE) == 1
    assert [line.rsplit(":", 1)[1] for line in (pitr.dir / "pgpass").read_text().splitlines()] == passwords
    assert json.loads(pitr.on_pi("pitr-status", "--json").stdout)["base_backups"] == 1


def test_dry_run_changes_nothing_and_a_non_superuser_is_refused(pitr):
    pitr.start_tunnel()
    before = hba(pitr)
    dry = pitr.laptop("setup-pitr", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = [line for line in dry.stderr.splitlines() if "would" in line]
    assert lines and all("dry-run" in line for line in lines), dry.stderr
    assert HBA_LINE in dry.stderr
    assert hba(pitr) == before
    assert pitr.prod_sql("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'kw_barman%'") == "0"
    assert pitr.prod_sql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert not (pitr.dir / "pgpass").exists()

    pitr.prod_sql("CREATE ROLE app LOGIN")
    refused = pitr.laptop("setup-pitr", DB_USER="app")
    assert refused.returncode == 2, refused.stderr
    assert "not a superuser" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert pitr.prod_sql("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'kw_barman%'") == "0"


def test_direct_prints_the_hba_line_to_add_by_hand(pitr):
    """DB_EXEC=direct: PostgreSQL on prod's host, whose pg_hba.conf is the operator's to edit."""
    pitr.start_tunnel()
    first = pitr.laptop("setup-pitr", DB_EXEC="direct", DB_PORT=str(pitr.pg.port))
    assert first.returncode == 1, first.stderr
    assert HBA_LINE_DIRECT in first.stderr and HBA_LINE not in hba(pitr)
    assert first.stderr.strip().splitlines()[-1].startswith("setup-pitr: error: on the pi5:")

    with open(pitr.pg.data / "pg_hba.conf", "a") as out:  # the operator, as told
        out.write(HBA_LINE_DIRECT + "\n")
    pitr.prod_sql("SELECT pg_reload_conf()")
    second = pitr.laptop("setup-pitr", DB_EXEC="direct", DB_PORT=str(pitr.pg.port))
    assert second.returncode == 0, second.stderr
    assert HBA_LINE_DIRECT not in second.stderr
    ok = pitr.on_pi("pitr-status")
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "base backups: 1" in ok.stdout
