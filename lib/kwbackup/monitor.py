"""Monitoring: one context manager per run, over every configured sink, each optional and independent.

- Healthchecks (HEALTHCHECKS_URL): /start, then the bare URL or /fail, all with one `rid`, the
  run's log tail (<= 100 kB) as the POST body;
- AppSignal cron check-in (APPSIGNAL_PUSH_API_KEY, APPSIGNAL_CHECKIN_IDENTIFIER): kind=start at
  the start, the finish only on success (AppSignal alerts when it is missing);
- AppSignal metrics (APPSIGNAL_FRONTEND_API_KEY): backup.duration, backup.success, backup.size and
  each leg's duration, tagged with the place;
- Apprise (NOTIFY_URLS): failures and warnings;
- the run history: one JSON line per run in HISTORY_FILE.
A sink that is down or slow costs at most SINK_TIMEOUT seconds and a warning, never the run.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from .errors import KwError
from .log import log
from .settings import Settings

SINK_TIMEOUT = 5.0
SLOW_RUN_SECONDS = 600  # the seed's "backup taking too long" alert
TAIL_BYTES = 100 * 1024


class _Tail(logging.Handler):
    """The run's log lines, the newest 100 kB, for Healthchecks' ping body."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque()
        self.size = 0
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.lines.append(line)
        self.size += len(line) + 1
        while self.size > TAIL_BYTES and self.lines:
            self.size -= len(self.lines.popleft()) + 1

    def text(self) -> str:
        return "\n".join(self.lines)


class Monitor:
    def __init__(self, settings: Settings, script: str, place: str):
        self.settings = settings
        self.script = script
        self.place = place
        self.rid = str(uuid.uuid4())
        self.fields: dict = {}
        self.warnings: list[str] = []
        self.tail = _Tail()

    # --- the run --------------------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        self.started = time.monotonic()
        log.addHandler(self.tail)
        self._healthchecks("/start")
        self._checkin(start=True)
        return self

    def record(self, **fields) -> None:
        """dump, bytes, and durations (pull_seconds, push_seconds, offsite_seconds) for metrics and history."""
        self.fields.update({k: v for k, v in fields.items() if v is not None})

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self._notify(f"kw-backup warning: {self.script} on {self.place}", message)

    def __exit__(self, exc_type, exc, tb) -> bool:
        duration = time.monotonic() - self.started
        ok = exc_type is None
        if ok and duration > SLOW_RUN_SECONDS:
            self.warn(f"slow run: {self.script} on {self.place} took {duration / 60:.0f} minutes "
                      f"(more than {SLOW_RUN_SECONDS // 60})")
        error = None if ok else (exc.line() if isinstance(exc, KwError) else f"{exc_type.__name__}: {exc}")
        self._healthchecks("" if ok else "/fail")
        if ok:
            self._checkin(start=False)
        self._metrics(duration, ok)
        if not ok:
            self._notify(f"kw-backup FAILED: {self.script} on {self.place}", error or "failed")
        self._history(duration, ok, error)
        log.removeHandler(self.tail)
        return False  # the real error goes on, always

    # --- sinks ----------------------------------------------------------------------------------
    def _post(self, what: str, url: str, body: bytes, content_type: str) -> None:
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type,
                                                                                 "User-Agent": "kw-backup"})
        try:
            with urllib.request.urlopen(request, timeout=SINK_TIMEOUT) as response:
                response.read()
        except Exception as exc:  # noqa: BLE001 - a sink never breaks a backup
            log.warning("monitoring: %s did not answer (%s); the run goes on", what, exc)

    def _healthchecks(self, suffix: str) -> None:
        base = self.settings["HEALTHCHECKS_URL"]
        if base:
            url = f"{base.rstrip('/')}{suffix}?{urllib.parse.urlencode({'rid': self.rid})}"
            self._post("Healthchecks", url, self.tail.text().encode(), "text/plain; charset=utf-8")

    def _checkin(self, start: bool) -> None:
        key, identifier = self.settings["APPSIGNAL_PUSH_API_KEY"], self.settings["APPSIGNAL_CHECKIN_IDENTIFIER"]
        if key and identifier:
            query = {"api_key": key, "identifier": identifier, **({"kind": "start"} if start else {})}
            url = f"{self.settings['APPSIGNAL_ENDPOINT'].rstrip('/')}/check_ins/cron?{urllib.parse.urlencode(query)}"
            self._post("AppSignal check-in", url, b"", "application/json")

    def _metrics(self, duration: float, ok: bool) -> None:
        key = self.settings["APPSIGNAL_FRONTEND_API_KEY"]
        if not key:
            return
        tags = {"place": self.place, "script": self.script}
        values = {"backup.duration": round(duration, 3), "backup.success": 1 if ok else 0}
        if self.fields.get("bytes"):
            values["backup.size"] = self.fields["bytes"]
        if self.fields.get("age_hours") is not None:
            values["backup.age_hours"] = self.fields["age_hours"]
        for leg, field in (("backup.prod_to_pi5.duration", "pull_seconds"),
                           ("backup.pi5_to_nas.duration", "push_seconds"),
                           ("backup.pi5_to_offsite.duration", "offsite_seconds")):
            if self.fields.get(field):
                values[leg] = round(self.fields[field], 3)
        body = json.dumps([{"name": n, "metricType": "gauge", "value": v, "tags": tags} for n, v in values.items()])
        url = f"{self.settings['APPSIGNAL_ENDPOINT'].rstrip('/')}/metrics/json?" \
              f"{urllib.parse.urlencode({'api_key': key})}"
        self._post("AppSignal metrics", url, body.encode(), "application/json")

    def _notify(self, title: str, body: str) -> None:
        urls = (self.settings["NOTIFY_URLS"] or "").split()
        if not urls:
            return
        try:
            import apprise  # only when notifications are configured: it is a large import

            notifier = apprise.Apprise()
            for url in urls:
                notifier.add(url)
            if not notifier.notify(title=title, body=body):
                log.warning("monitoring: a notification could not be sent")
        except Exception as exc:  # noqa: BLE001 - a sink never breaks a backup
            log.warning("monitoring: notifications failed (%s)", exc)

    def _history(self, duration: float, ok: bool, error: str | None) -> None:
        path = Path(self.settings["HISTORY_FILE"] or Path(self.settings["LOG_FILE"]).parent / "backup-history.jsonl")
        entry = {"time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "script": self.script,
                 "place": self.place, "dump": self.fields.get("dump"), "bytes": self.fields.get("bytes"),
                 "duration": round(duration, 2), "pull_seconds": self.fields.get("pull_seconds"),
                 "push_seconds": self.fields.get("push_seconds"), "result": "ok" if ok else "failed",
                 "warnings": self.warnings, "error": error}
        try:
            with open(path, "a") as out:
                out.write(json.dumps(entry) + "\n")
        except OSError as exc:
            log.warning("monitoring: cannot append to the history %s (%s)", path, exc.strerror)
