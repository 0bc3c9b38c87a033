"""backup-report: the run history as a table, 30-day trends, and a self-contained HTML dashboard."""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .errors import Failed
from .log import size as human_size

BARS = "▁▂▃▄▅▆▇█"
TREND_SCRIPTS = ("backup-orchestrator", "backup-db")


def history_path(settings) -> Path:
    return Path(settings["HISTORY_FILE"] or Path(settings["LOG_FILE"]).parent / "backup-history.jsonl")


def load(path: Path) -> list[dict]:
    if not path.exists():
        raise Failed(f"no run history at {path}", "it is written by backup-db, backup-orchestrator and backup-drill")
    runs = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            entry["_at"] = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            runs.append(entry)
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line never hides the others
    return sorted(runs, key=lambda r: r["_at"])


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1
    return "".join(BARS[min(len(BARS) - 1, int((v - low) / span * (len(BARS) - 1) + 0.5))] for v in values)


def daily(runs: list[dict], days: int, now: datetime) -> list[tuple[str, dict | None]]:
    """The last run with a size of each of the last `days` days (backup-orchestrator first, else backup-db)."""
    by_day: dict[str, dict] = {}
    for script in reversed(TREND_SCRIPTS):
        for run in runs:
            if run.get("script") == script and run.get("bytes") and run.get("result") == "ok":
                by_day[run["_at"].strftime("%Y-%m-%d")] = run
    start = (now - timedelta(days=days - 1)).date()
    return [(str(start + timedelta(days=i)), by_day.get(str(start + timedelta(days=i)))) for i in range(days)]


def as_text(runs: list[dict], last: int, days: int, now: datetime) -> str:
    lines = [
        f"Last {min(last, len(runs))} runs:",
        f"{'time (UTC)':17}  {'script':19}  {'place':5}  {'dump':26}  {'size':>8}  {'duration':>8}  result",
    ]
    for run in runs[-last:][::-1]:
        lines.append(
            f"{run['_at']:%Y-%m-%d %H:%M}  {run.get('script', '?'):19}  {run.get('place') or '-':5}  "
            f"{run.get('dump') or '-':26}  {human_size(run['bytes']) if run.get('bytes') else '-':>8}  "
            f"{run.get('duration', 0):>7.1f}s  {run.get('result')}" + (f": {run['error']}" if run.get("error") else "")
        )
    points = [r for _, r in daily(runs, days, now) if r]
    lines += ["", f"{days}-day trend ({len(points)} days with a backup):"]
    if points:
        sizes = [r["bytes"] for r in points]
        durations = [r.get("duration", 0) for r in points]
        lines.append(
            f"size      {sparkline(sizes)}  now {human_size(sizes[-1])} "
            f"(min {human_size(min(sizes))}, max {human_size(max(sizes))})"
        )
        lines.append(
            f"duration  {sparkline(durations)}  now {durations[-1]:.1f}s "
            f"(min {min(durations):.1f}s, max {max(durations):.1f}s)"
        )
    return "\n".join(lines)


def _chart(title: str, points: list[tuple[str, float | None]], unit) -> str:
    width, height, pad = 640, 180, 40
    values = [v for _, v in points if v is not None]
    if not values:
        return f"<figure><figcaption>{html.escape(title)}: no data</figcaption></figure>"
    low, high = min(values) * 0.95, max(values) * 1.05 or 1
    step = (width - 2 * pad) / max(1, len(points) - 1)
    coords = [
        (pad + i * step, height - pad - (v - low) / ((high - low) or 1) * (height - 2 * pad))
        for i, (_, v) in enumerate(points)
        if v is not None
    ]
    polyline = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in coords)
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>'
        f'<text x="{pad}" y="{height - 10}">{html.escape(points[0][0])}</text>'
        f'<text x="{width - pad}" y="{height - 10}" text-anchor="end">{html.escape(points[-1][0])}</text>'
        f'<text x="4" y="{pad}">{html.escape(unit(max(values)))}</text>'
        f'<text x="4" y="{height - pad}">{html.escape(unit(min(values)))}</text>'
        f'<polyline points="{polyline}"/>{dots}</svg></figure>'
    )


def as_html(runs: list[dict], days: int, now: datetime) -> str:
    series = daily(runs, days, now)
    sizes = _chart("Dump size", [(d, r["bytes"] if r else None) for d, r in series], human_size)
    durations = _chart(
        "Backup duration", [(d, r.get("duration") if r else None) for d, r in series], lambda v: f"{v:.0f}s"
    )
    rows = []
    for i in range(6, -1, -1):
        day = (now - timedelta(days=i)).strftime("%Y-%m-%d")
        cells = []
        for script in ("backup-db", "backup-orchestrator", "backup-drill"):
            that_day = [r for r in runs if r.get("script") == script and r["_at"].strftime("%Y-%m-%d") == day]
            status = that_day[-1]["result"] if that_day else "missing"
            if script == "backup-drill" and not that_day:
                status = "-"
            cells.append(f'<td class="{html.escape(status)}">{html.escape(status)}</td>')
        rows.append(f"<tr><th>{day}</th>{''.join(cells)}</tr>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kw-backup: last {days} days</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
figure {{ margin: 0 0 24px; }} figcaption {{ font-weight: 600; margin-bottom: 4px; }}
.chart polyline {{ fill: none; stroke: #2563eb; stroke-width: 2; }} .chart circle {{ fill: #2563eb; }}
.chart .axis {{ stroke: #999; }} .chart text {{ font-size: 11px; fill: #555; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 4px 12px; border: 1px solid #ddd; text-align: left; }}
td.ok {{ background: #dcfce7; }} td.failed, td.missing {{ background: #fee2e2; font-weight: 600; }}
</style></head><body>
<h1>kw-backup</h1><p>Generated {now:%Y-%m-%d %H:%M} UTC from {len(runs)} recorded runs.</p>
{sizes}
{durations}
<h2>Last 7 days</h2>
<table id="status"><tr><th>day (UTC)</th><th>backup-db</th><th>backup-orchestrator</th><th>backup-drill</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""
