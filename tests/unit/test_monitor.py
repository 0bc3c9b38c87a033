import json

from kwbackup import monitor, settings
from tests import world


def test_a_slow_run_sends_a_warning(tmp_path, monkeypatch):
    recorder = world.Recorder()
    try:
        env = {"KW_BACKUP_ENV": "", "NOTIFY_URLS": f"json://{recorder.url[7:]}/notify",
               "HISTORY_FILE": str(tmp_path / "history.jsonl")}
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
