"""Logging: stderr for people, syslog (tag kw-backup) or a log file for cron, each with its level.

Also the progress reporter: a live line on a terminal, a plain line every ~10 s otherwise.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

import humanize

from .parallel_load import PREFIX as LOADER_PREFIX

log = logging.getLogger("kw-backup")
SYSLOG_TAG = "kw-backup"
# Tests point this at their own datagram socket; production uses the system's.
SYSLOG_ADDRESS = os.environ.get("KW_BACKUP_SYSLOG", "/dev/log")


class _Masking(logging.Filter):
    """Replaces every known secret in a record's final text with ***."""

    def __init__(self):
        super().__init__()
        self.secrets: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = mask(record.getMessage(), self.secrets)
            record.args = None
        return True


_masking = _Masking()


def mask(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def add_secrets(values) -> None:
    _masking.secrets.extend(v for v in values if v and v not in _masking.secrets)


def known_secrets() -> list[str]:
    return list(_masking.secrets)


class _QuietSysLogHandler(logging.handlers.SysLogHandler):
    def handleError(self, record) -> None:
        """A syslog that went away must not bury stderr in tracebacks; stderr still has the line."""


def setup(script: str, verbose: bool = False, quiet: bool = False, syslog: bool = False, log_file: str | None = None):
    """stderr at INFO (DEBUG with --verbose, WARNING with --quiet); syslog or file at INFO."""
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    log.filters = [_masking]
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    stderr.setFormatter(logging.Formatter(f"{script}: %(message)s"))
    log.addHandler(stderr)
    if syslog:
        try:
            handler = _QuietSysLogHandler(address=SYSLOG_ADDRESS, facility="user")
            handler.socket.getpeername()  # Python 3.11 does not fail when nothing listens there
        except OSError as exc:
            log.debug("syslog unavailable at %s (%s); logging to stderr only", SYSLOG_ADDRESS, exc)
        else:
            handler.ident = f"{SYSLOG_TAG}[{os.getpid()}]: "
            handler.setLevel(logging.INFO)
            handler.setFormatter(logging.Formatter(f"{script}: %(levelname)s %(message)s"))
            log.addHandler(handler)
    if log_file:
        try:
            handler = logging.FileHandler(log_file)
        except OSError as exc:
            log.warning("cannot write log file %s (%s); logging to stderr only", log_file, exc.strerror)
        else:
            handler.setLevel(logging.INFO)
            handler.setFormatter(logging.Formatter(f"%(asctime)s {script}[%(process)d] %(levelname)s %(message)s"))
            log.addHandler(handler)
    return log


def dry(message: str, *args) -> None:
    """Every dry-run line says so."""
    log.info("[dry-run] " + message, *args)


def size(n: int) -> str:
    return humanize.naturalsize(n, binary=False, format="%.1f")


class Progress:
    """Bytes, rate and (when the total is known) ETA of a long stream.

    On a terminal it redraws one line; in logs it writes a line every `interval` seconds. An
    `estimated` total is shown as "about" and dropped, ETA with it, once the stream has passed it.
    """

    def __init__(
        self,
        what: str,
        total: int | None = None,
        interval: float = 10.0,
        stream=None,
        estimated: bool = False,
        clock=time.monotonic,
    ):
        self.what = what
        self.total = total
        self.estimated = estimated
        self.interval = interval
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.clock = clock
        self.start = self.last = clock()

    def add(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= (0.5 if self.tty else self.interval):
            self.last = now
            self._show(now)

    def text(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        parts = [f"{self.what}: {size(self.done)}"]
        total = self.total
        if self.estimated and total and self.done > total:
            total = None  # the estimate was short: say only what is known
        if total:
            about = "about " if self.estimated else ""
            parts[0] += f" of {about}{size(total)} ({100 * self.done / total:.0f}%)"
        parts.append(f"{size(rate)}/s")
        if total and rate > 0:
            parts.append(f"ETA {humanize.naturaldelta(max(total - self.done, 0) / rate)}")
        return ", ".join(parts)

    def _show(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.text(now).ljust(70))
            self.stream.flush()
        else:
            log.info(self.text(now))

    def finish(self) -> None:
        if self.tty and self.done:
            self.stream.write("\r" + self.text(time.monotonic()).ljust(70) + "\n")
            self.stream.flush()


def loader_notes(stderr: str, failed: bool) -> None:
    """parallel_load.py's own lines in a load's stderr: what ran in one session (a warning), its summary. When
    the load failed, its last line is the failure, which the caller's error line says: not said twice."""
    notes = [line[len(LOADER_PREFIX) :] for line in stderr.splitlines() if line.startswith(LOADER_PREFIX)]
    for text in notes[:-1] if failed else notes:
        (log.warning if "one session" in text else log.info)("parallel load: %s", text)
