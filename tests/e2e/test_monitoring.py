"""Monitoring sinks against a real local HTTP server: the exact pings, and a dead sink never breaks a run."""

import json
import time
from urllib.parse import parse_qs, urlparse

import pytest

from tests import world


@pytest.fixture
def recorder():
    server = world.Recorder()
    yield server
    server.close()


def monitored(kw, url):
    kw.settings.update(
        HEALTHCHECKS_URL=f"{url}/hc/abc-123",
        APPSIGNAL_PUSH_API_KEY="push-key",
        APPSIGNAL_CHECKIN_IDENTIFIER="kw-backup-nightly",
        APPSIGNAL_FRONTEND_API_KEY="front-key",
        APPSIGNAL_ENDPOINT=f"{url}/appsignal",
        NOTIFY_URLS=f"json://{url[7:]}/notify",
        HISTORY_FILE=str(kw.tmp / "history.jsonl"),
    )


def query(path):
    return {k: v[0] for k, v in parse_qs(urlparse(path).query).items()}


def test_a_successful_backup_pings_start_and_success_with_one_rid(kw, recorder):
    monitored(kw, recorder.url)
    result = kw.run("backup-db")
    assert result.returncode == 0, result.stderr
    paths = recorder.paths()
    hc = [p for p in paths if p.startswith("/hc/")]
    assert [urlparse(p).path for p in hc] == ["/hc/abc-123/start", "/hc/abc-123"]
    assert len({query(p)["rid"] for p in hc}) == 1
    success_body = next(r["body"] for r in recorder.requests if urlparse(r["path"]).path == "/hc/abc-123")
    assert b"wrote db-" in success_body
    checkins = [query(p) for p in paths if p.startswith("/appsignal/check_ins/cron")]
    assert checkins == [
        {"api_key": "push-key", "identifier": "kw-backup-nightly", "kind": "start"},
        {"api_key": "push-key", "identifier": "kw-backup-nightly"},
    ]
    metrics = json.loads(next(r["body"] for r in recorder.requests if r["path"].startswith("/appsignal/metrics/json")))
    names = {m["name"]: m for m in metrics}
    assert names["backup.success"]["value"] == 1 and names["backup.size"]["value"] > 1000
    assert names["backup.duration"]["metricType"] == "gauge" and names["backup.duration"]["tags"]["place"] == "prod"
    assert not [p for p in paths if p.startswith("/notify")]
    history = [json.loads(line) for line in (kw.tmp / "history.jsonl").read_text().splitlines()]
    assert history[-1]["script"] == "backup-db" and history[-1]["result"] == "ok" and history[-1]["bytes"] > 1000
    assert "push-key" not in result.stderr


def test_a_failed_run_pings_fail_sends_no_finish_and_notifies(kw, recorder):
    monitored(kw, recorder.url)
    kw.settings["DB_NAME"] = "no_such_database"
    result = kw.run("backup-db")
    assert result.returncode == 1
    paths = recorder.paths()
    assert [urlparse(p).path for p in paths if p.startswith("/hc/")] == ["/hc/abc-123/start", "/hc/abc-123/fail"]
    checkins = [query(p) for p in paths if p.startswith("/appsignal/check_ins/cron")]
    assert checkins == [{"api_key": "push-key", "identifier": "kw-backup-nightly", "kind": "start"}]
    metrics = json.loads(next(r["body"] for r in recorder.requests if r["path"].startswith("/appsignal/metrics/json")))
    assert {m["name"]: m["value"] for m in metrics}["backup.success"] == 0
    note = json.loads(next(r["body"] for r in recorder.requests if r["path"].startswith("/notify")))
    assert "FAILED" in note["title"] and "no_such_database" in note["message"]
    history = json.loads((kw.tmp / "history.jsonl").read_text().splitlines()[-1])
    assert history["result"] == "failed" and "no_such_database" in history["error"]
    assert fail_body(recorder).splitlines()[-1].endswith(error_line(result))


def fail_body(recorder) -> str:
    return next(r["body"] for r in recorder.requests if urlparse(r["path"]).path.endswith("/fail")).decode()


def error_line(result) -> str:
    """The line the script printed last: `<script>: error: <what failed> -- <what to do>`."""
    line = result.stderr.strip().splitlines()[-1]
    assert ": error: " in line and " -- " in line, line
    return "ERROR error: " + line.split(": error: ", 1)[1]


def test_the_fail_body_ends_with_the_summary_and_the_error_line_orchestrator_and_drill(kw, recorder):
    """The error line is logged once the run has unwound, after the ping: the body must carry it all the same."""
    monitored(kw, recorder.url)
    kw.settings["PROD_DIR"] = str(kw.tmp / "no-such-dir")  # prod fails: nothing to pull
    orchestrator = kw.run("backup-orchestrator")
    assert orchestrator.returncode == 1
    summary, error = fail_body(recorder).splitlines()[-2:]
    assert "INFO summary: " in summary and summary.endswith("result=failed (Failed)")
    assert error.endswith(error_line(orchestrator)) and "prod (local) unreachable" in error
    recorder.requests.clear()
    drill = kw.run("backup-drill", "--from", "pi5")  # nothing on the pi5 to drill
    assert drill.returncode == 1
    assert fail_body(recorder).splitlines()[-1].endswith(error_line(drill)) and "no dump on pi5" in drill.stderr


def test_an_anomaly_warning_is_notified(net, recorder):
    monitored(net, recorder.url)
    world.synthetic_dump(net.pi5_dir, "db-2024-03-09.sql.gz", rows=1000)
    world.synthetic_dump(net.prod_dir, "db-2024-03-10.sql.gz", rows=5000)
    result = net.run("backup-orchestrator")
    assert result.returncode == 0, result.stderr
    note = json.loads(next(r["body"] for r in recorder.requests if r["path"].startswith("/notify")))
    assert "warning" in note["title"] and "anomaly" in note["message"] and "SIZE_CHANGE_ALERT_PCT" in note["message"]
    metrics = json.loads(next(r["body"] for r in recorder.requests if r["path"].startswith("/appsignal/metrics/json")))
    names = {m["name"] for m in metrics}
    assert {"backup.prod_to_pi5.duration", "backup.pi5_to_nas.duration", "backup.size"} <= names


def test_a_sink_that_refuses_connections_does_not_break_the_backup(kw):
    kw.settings.update(HEALTHCHECKS_URL="http://127.0.0.1:9/hc", NOTIFY_URLS="json://127.0.0.1:9/x")
    result = kw.run("backup-db")
    assert result.returncode == 0, result.stderr
    assert "monitoring: Healthchecks did not answer" in result.stderr


def test_a_hanging_sink_costs_only_its_timeout(kw):
    slow = world.Recorder(mode="hang", hang_seconds=60)
    try:
        kw.settings.update(HEALTHCHECKS_URL=f"{slow.url}/hc")
        started = time.monotonic()
        result = kw.run("backup-db", timeout=120)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 25  # two pings, 5 s each at most
        assert "did not answer" in result.stderr
    finally:
        slow.close()
