import io
import logging
import socket

from kwbackup import log


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_shows_bytes_rate_and_eta():
    clock = iter([0.0, 1.0, 2.0, 3.0])
    out = Tty()
    progress = log.Progress("downloading db-2024-01-15.sql.gz", total=4_000_000, stream=out, clock=lambda: next(clock))
    progress.add(1_000_000)
    progress.add(1_000_000)
    text = out.getvalue()
    assert text.startswith("\r") and "2.0 MB of 4.0 MB (50%)" in text and "/s" in text and "ETA" in text


def test_an_estimated_total_is_about_and_dropped_once_passed():
    clock = iter([0.0, 1.0, 2.0, 3.0])
    out = Tty()
    progress = log.Progress(
        "restoring into kw_restore_1", total=3_000_000, stream=out, estimated=True, clock=lambda: next(clock)
    )
    progress.add(1_000_000)
    assert "1.0 MB of about 3.0 MB (33%)" in out.getvalue() and "ETA" in out.getvalue()
    progress.add(3_000_000)
    last = out.getvalue().rsplit("\r", 1)[1]
    assert last.startswith("restoring into kw_restore_1: 4.0 MB, ") and "of" not in last and "ETA" not in last


def test_progress_in_logs_is_a_line_every_interval(monkeypatch):
    """Its own handler on the logger alone: what other tests in this process did to logging does not count."""
    clock = iter([0.0, 5.0, 11.0, 12.0])
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    monkeypatch.setattr(log.log, "propagate", False)
    monkeypatch.setattr(log.log, "handlers", [handler])
    monkeypatch.setattr(log.log, "disabled", False)
    previous = log.log.level
    log.log.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the logger's cache of levels
    try:
        progress = log.Progress("dumping kw", interval=10, stream=io.StringIO(), clock=lambda: next(clock))
        progress.add(10)
        progress.add(10)
        progress.add(10)
    finally:
        log.log.setLevel(previous)
    assert said == ["dumping kw: 20 Bytes, 1 Bytes/s"]


def test_stderr_and_syslog_levels_and_masking(tmp_path, monkeypatch, capsys):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log.sock"))
    sock.settimeout(2)
    monkeypatch.setattr(log, "SYSLOG_ADDRESS", str(tmp_path / "log.sock"))
    log.setup("backup-db", quiet=True, syslog=True)
    log.add_secrets(["tok3n"])
    log.log.info("pinging https://hc/tok3n")
    log.log.warning("size changed")
    first, second = sock.recv(4096).decode(), sock.recv(4096).decode()
    assert first.startswith("<14>kw-backup[") and "pinging https://hc/***" in first and "tok3n" not in first
    assert second.startswith("<12>kw-backup[") and "WARNING size changed" in second
    err = capsys.readouterr().err
    assert err == "backup-db: size changed\n"
    log.setup("backup-db", verbose=True)
    log.log.debug("detail tok3n")
    assert capsys.readouterr().err == "backup-db: detail ***\n"
    sock.close()


def test_dry_run_lines_say_so(capsys):
    log.setup("backup-db")
    log.dry("would remove %s", "db-2024-01-01.sql.gz")
    assert capsys.readouterr().err == "backup-db: [dry-run] would remove db-2024-01-01.sql.gz\n"


def test_missing_syslog_falls_back_to_stderr_quietly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(log, "SYSLOG_ADDRESS", str(tmp_path / "no-such-socket"))
    log.setup("backup-db", syslog=True)
    log.log.info("still here")
    assert capsys.readouterr().err == "backup-db: still here\n"
