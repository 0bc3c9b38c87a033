"""Monitoring: one context manager per run, over every configured sink, each optional and independent.

- Healthchecks (HEALTHCHECKS_URL, any of its ping URL forms): /start, then the bare URL or /fail,
  all with one `rid`, the run's log tail as the POST body: at most BODY_BYTES, ending, on a
  failure, with the error line;
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

from .errors import failure_line
from .log import known_secrets, log, mask
from .settings import Settings

SINK_TIMEOUT = 5.0
SLOW_RUN_SECONDS = 600  # the seed's "backup taking too long" alert
# Healthchecks keeps the first 10,000 bytes of a ping body (hc-ping.com, and a self-hosted one's default
# PING_BODY_LIMIT): a longer body would lose its end, where the summary and the error are.
BODY_BYTES = 10_000


class _Tail(logging.Handler):
    """The run's newest log lines, at most BODY_BYTES of them, for Healthchecks' ping body."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: deque[bytes] = deque()
        self.size = 0
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record).encode()
        self.lines.append(line)
        self.size += len(line) + 1
        while self.size > BODY_BYTES and len(self.lines) > 1:
            self.size -= len(self.lines.popleft()) + 1

    def body(self, last: logging.LogRecord | None = None) -> bytes:
        """The tail, then `last` (the error line, logged only once the run has unwound), cut to its last
        BODY_BYTES at a line start."""
        lines = [*self.lines, *([self.format(last).encode()] if last else [])]
        text = b"\n".join(lines)
        if len(text) > BODY_BYTES:
            text = text[-BODY_BYTES:]
            start = text.find(b"\n") + 1
            text = text[start:] if 0 < start < len(text) else text.decode(errors="ignore").encode()
        return text


def ping_url(base: str, suffix: str, rid: str) -> str:
    """A Healthchecks ping URL (`<uuid>`, `<ping-key>/<slug>`, either with a query such as `?create=1`)
    with /start or /fail on its path and `rid` merged into its query."""
    parts = urllib.parse.urlsplit(base)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "rid"]
    return urllib.parse.urlunsplit(
        parts._replace(path=parts.path.rstrip("/") + suffix, query=urllib.parse.urlencode([*query, ("rid", rid)]))
    )


class Monitor:
    def __init__(self, settings: Settings, script: str, place: str, healthchecks: str | None = "HEALTHCHECKS_URL"):
        """`healthchecks`: the setting with this script's Healthchecks check (pitr-status has one of its own;
        None: no check)."""
        self.settings = settings
        self.healthchecks = healthchecks
        self.gauges: dict[str, float] = {}
        self.script = script
        self.place = place
        self.rid = str(uuid.uuid4())
        self.fields: dict = {}
        self.free: dict[str, int] = {}  # place -> free bytes after the run
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

    def record_free(self, place: str, free: int) -> None:
        """A place's free space after the run: the metric backup.free_bytes, tagged with that place."""
        self.free[place] = free

    def gauge(self, name: str, value: float) -> None:
        """A metric of the script's own (wal.lag_seconds, ...), sent with the run's."""
        self.gauges[name] = value

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self._notify(f"kw-backup warning: {self.script} on {self.place}", message)

    def __exit__(self, exc_type, exc, tb) -> bool:
        duration = time.monotonic() - self.started
        ok = exc_type is None
        if ok and duration > SLOW_RUN_SECONDS:
            self.warn(
                f"slow run: {self.script} on {self.place} took {duration / 60:.0f} minutes "
                f"(more than {SLOW_RUN_SECONDS // 60})"
            )
        error = None if ok else failure_line(exc)
        # cli.guard logs the error line once the run has unwound, too late for the tail: it ends the /fail body here.
        last = (
            None
            if ok
            else logging.makeLogRecord(
                {"msg": mask(f"error: {error}", known_secrets()), "levelno": logging.ERROR, "levelname": "ERROR"}
            )
        )
        self._healthchecks("" if ok else "/fail", last)
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
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": content_type, "User-Agent": "kw-backup"}
        )
        try:
            with urllib.request.urlopen(request, timeout=SINK_TIMEOUT) as response:
                response.read()
        except Exception as exc:  # noqa: BLE001 - a sink never breaks a backup
            log.warning("monitoring: %s did not answer (%s); the run goes on", what, exc)

    def _healthchecks(self, suffix: str, last: logging.LogRecord | None = None) -> None:
        base = self.settings[self.healthchecks] if self.healthchecks else None
        if base:
            self._post(
                "Healthchecks", ping_url(base, suffix, self.rid), self.tail.body(last), "text/plain; charset=utf-8"
            )

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
        for leg, field in (
            ("backup.prod_to_pi5.duration", "pull_seconds"),
            ("backup.pi5_to_nas.duration", "push_seconds"),
            ("backup.pi5_to_offsite.duration", "offsite_seconds"),
        ):
            if self.fields.get(field):
                values[leg] = round(self.fields[field], 3)
        values.update(self.gauges)
        metrics = [{"name": n, "metricType": "gauge", "value": v, "tags": tags} for n, v in values.items()]
        metrics += [
            {
                "name": "backup.free_bytes",
                "metricType": "gauge",
                "value": free,
                "tags": {"place": place, "script": self.script},
            }
            for place, free in self.free.items()
        ]
        body = json.dumps(metrics)
        url = (
            f"{self.settings['APPSIGNAL_ENDPOINT'].rstrip('/')}/metrics/json?{urllib.parse.urlencode({'api_key': key})}"
        )
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
        entry = {
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "script": self.script,
            "place": self.place,
            "dump": self.fields.get("dump"),
            "bytes": self.fields.get("bytes"),
            "duration": round(duration, 2),
            "pull_seconds": self.fields.get("pull_seconds"),
            "push_seconds": self.fields.get("push_seconds"),
            "result": "ok" if ok else "failed",
            "warnings": self.warnings,
            "error": error,
        }
        try:
            with open(path, "a") as out:
                out.write(json.dumps(entry) + "\n")
        except OSError as exc:
            log.warning("monitoring: cannot append to the history %s (%s)", path, exc.strerror)
