import json
import re
from contextlib import nullcontext
from urllib.parse import parse_qs, urlsplit

import pytest

from kwbackup import log, monitor, settings
from kwbackup.errors import Failed
from tests import world

# Every ping URL form Healthchecks documents, as paths on the recorder (hc-ping.com's, or a self-hosted /ping/).
HC_FORMS = {
    "uuid": "/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278",
    "ping key and slug": "/fqOOd6-F4MMNuCEnzTU01w/db-backups",
    "auto-provisioning": "/fqOOd6-F4MMNuCEnzTU01w/db-backups?create=1",
    "self-hosted uuid": "/ping/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278",
}


@pytest.fixture
def recorder():
    server = world.Recorder()
    yield server
    server.close()


def load(tmp_path, monkeypatch, **env):
    monkeypatch.setattr(settings, "SYSTEM_ENV_FILE", tmp_path / "none")
    monkeypatch.setattr(settings, "ROOT", tmp_path)
    return settings.load(environ={"KW_BACKUP_ENV": "", "HISTORY_FILE": str(tmp_path / "history.jsonl"), **env})


@pytest.mark.parametrize("fails", [False, True], ids=["ok", "failed"])
@pytest.mark.parametrize("form", HC_FORMS)
def test_every_healthchecks_url_form_gets_the_suffix_on_its_path_and_rid_in_its_query(
    tmp_path, monkeypatch, recorder, form, fails
):
    url = recorder.url + HC_FORMS[form]
    with pytest.raises(Failed) if fails else nullcontext():
        with monitor.Monitor(load(tmp_path, monkeypatch, HEALTHCHECKS_URL=url), "backup-db", "prod"):
            if fails:
                raise Failed("pg_dump failed", "check DB_NAME")
    sent = [urlsplit(r["path"]) for r in recorder.requests]
    path = urlsplit(url).path
    assert [s.path for s in sent] == [f"{path}/start", f"{path}/fail" if fails else path]
    queries = [parse_qs(s.query) for s in sent]
    assert len({q["rid"][0] for q in queries}) == 1 and all(len(q["rid"]) == 1 for q in queries)
    assert all(q.get("create") == (["1"] if "create=1" in url else None) for q in queries)


def test_a_ping_body_is_at_most_10000_bytes_and_keeps_the_end(tmp_path, monkeypatch, recorder):
    log.setup("backup-db", quiet=True)
    with (
        pytest.raises(Failed),
        monitor.Monitor(load(tmp_path, monkeypatch, HEALTHCHECKS_URL=recorder.url), "backup-db", "prod"),
    ):
        for i in range(400):
            log.log.info("line %d zażółć %s", i, "x" * 60)  # 80-odd bytes, some of two bytes each
        raise Failed('pg_dump failed: database "kw" does not exist', "check DB_NAME")
    body = recorder.requests[-1]["body"]
    assert 9000 < len(body) <= monitor.BODY_BYTES
    lines = body.decode().splitlines()  # whole characters, whole lines
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|ERROR) ", line) for line in lines)
    assert lines[-2].endswith("line 399 zażółć " + "x" * 60)
    assert lines[-1].endswith('ERROR error: pg_dump failed: database "kw" does not exist -- check DB_NAME')


def test_a_slow_run_sends_a_warning(tmp_path, monkeypatch):
    recorder = world.Recorder()
    try:
        env = {
            "KW_BACKUP_ENV": "",
            "NOTIFY_URLS": f"json://{recorder.url[7:]}/notify",
            "HISTORY_FILE": str(tmp_path / "history.jsonl"),
        }
        monkeypatch.setattr(settings, "SYSTEM_ENV_FILE", tmp_path / "none")
        monkeypatch.setattr(settings, "ROOT", tmp_path)
        monkeypatch.setattr(monitor, "SLOW_RUN_SECONDS", 0)  # every run is "too long"
        with monitor.Monitor(settings.load(environ=env), "backup-orchestrator", "pi5"):
            pass
        note = json.loads(recorder.requests[0]["body"])
        assert "warning" in note["title"] and "slow run" in note["message"]
        assert json.loads((tmp_path / "history.jsonl").read_text())["warnings"][0].startswith("slow run")
    finally:
        recorder.close()
