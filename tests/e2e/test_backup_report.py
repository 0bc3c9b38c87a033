"""bin/backup-report: the history as a table and trends, and the HTML dashboard rendered by headless Chromium."""

import json
import re
import subprocess
from datetime import UTC, datetime, timedelta

import pytest


@pytest.fixture
def history(kw):
    now = datetime.now(UTC)
    lines = []
    for day in range(40, 0, -1):
        at = (now - timedelta(days=day)).replace(hour=3, minute=0, second=0)
        for script, place, offset in (("backup-db", "prod", -1), ("backup-orchestrator", "pi5", 0)):
            lines.append(
                json.dumps(
                    {
                        "time": (at + timedelta(hours=offset)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "script": script,
                        "place": place,
                        "dump": f"db-{at:%Y-%m-%d}.sql.gz",
                        "bytes": 200_000_000 + day * 1_000_000,
                        "duration": 20.0 + day % 7,
                        "result": "ok",
                        "error": None,
                    }
                )
            )
    lines.append(
        json.dumps(
            {
                "time": (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "script": "backup-orchestrator",
                "place": "pi5",
                "dump": None,
                "bytes": None,
                "duration": 3.2,
                "result": "failed",
                "error": "nas (nas) unreachable",
            }
        )
    )
    lines.append("{damaged line")
    path = kw.tmp / "history.jsonl"
    path.write_text("\n".join(lines) + "\n")
    kw.settings["HISTORY_FILE"] = str(path)
    return path


def test_lists_the_last_runs_and_the_trend(kw, history):
    result = kw.run("backup-report", "--last", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Last 5 runs:"
    assert "failed: nas (nas) unreachable" in lines[2]
    assert len([line for line in lines if re.match(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", line)]) == 5
    size_line = next(line for line in lines if line.startswith("size "))
    assert re.search(r"[▁▂▃▄▅▆▇█]{20,}", size_line) and "now 201.0 MB" in size_line
    assert any(line.startswith("duration ") for line in lines)


def test_html_dashboard_renders_in_headless_chromium(kw, history, tmp_path):
    page = tmp_path / "dashboard.html"
    result = kw.run("backup-report", "--html", str(page))
    assert result.returncode == 0, result.stderr
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr
    charts = re.findall(r'<svg class="chart".*?<polyline points="([^"]+)"', dom.stdout, re.S)
    assert len(charts) == 2 and all(len(points.split()) >= 25 for points in charts)
    assert len(re.findall(r"<tr><th>\d{4}-\d{2}-\d{2}</th>", dom.stdout)) == 7
    assert 'class="failed"' in dom.stdout
    shot = tmp_path / "dashboard.png"
    taken = subprocess.run(
        ["chromium", *flags, f"--screenshot={shot}", "--window-size=800,900", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert taken.returncode == 0, taken.stderr
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a page with charts, not a blank one


def test_no_history_yet(kw):
    kw.settings["HISTORY_FILE"] = str(kw.tmp / "none.jsonl")
    result = kw.run("backup-report")
    assert result.returncode == 1 and "no run history" in result.stderr
