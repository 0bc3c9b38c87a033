"""What every script shares: the common flags, settings and logging, and exit statuses."""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

from . import log as logmod
from . import settings as settingsmod
from .errors import KwError, failure_line


def parser(doc: str) -> argparse.ArgumentParser:
    """argparse with the script's docstring as description and the flags every script has."""
    first, _, rest = (doc or "").strip().partition("\n")
    p = argparse.ArgumentParser(
        description=first, epilog=rest.strip() or None, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--env-file",
        metavar="PATH",
        help="settings file (default: $KW_BACKUP_ENV, .env beside bin/, /etc/kw-backup/backup.env)",
    )
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="show debug detail, commands included")
    loud.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    return p


def script_name() -> str:
    return os.path.basename(sys.argv[0]) or "kw-backup"


def load(
    args: argparse.Namespace, overrides: dict | None = None, syslog: bool = False, log_file: bool = False
) -> settingsmod.Settings:
    """Settings (flags > environment > env file) validated, then logging set up from them."""
    script = script_name()
    logmod.setup(script, args.verbose, args.quiet)
    flags = {k: str(v) for k, v in (overrides or {}).items() if v is not None}
    settings = settingsmod.load(flags, args.env_file)
    logmod.add_secrets(settings.secrets())
    logmod.add_secrets([os.environ.get("PGPASSWORD", "")])
    logmod.setup(script, args.verbose, args.quiet, syslog=syslog, log_file=settings["LOG_FILE"] if log_file else None)
    return settings


def hide(*values: str | None) -> None:
    """Values from flags that must never show in logs (a URL with a password)."""
    logmod.add_secrets([v for v in values if v])


class Interrupted(KeyboardInterrupt):
    """SIGHUP, SIGINT or SIGTERM: unwinds the script like Ctrl-C, so every `finally` cleans up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)


def _on_signal(signum, frame) -> None:
    # Only the first one unwinds: a second (a closed terminal sends SIGHUP to all, cron a TERM then a
    # KILL) must not cut the cleanup short.
    for other in STOP_SIGNALS:
        signal.signal(other, _late_signal)
    raise Interrupted(signum)


def _redeliver(unraisable) -> None:
    """sys.unraisablehook: an Interrupted raised where Python can only drop it (the signal landed in a weakref
    callback or a __del__) is sent again, so the script still unwinds. From another thread, a moment later: sent
    now, its handler would run in this hook, where it would be dropped again."""
    if isinstance(unraisable.exc_value, Interrupted):
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_signal)
        threading.Timer(0.01, os.kill, (os.getpid(), unraisable.exc_value.signum)).start()
        return
    sys.__unraisablehook__(unraisable)


def _late_signal(signum, frame) -> None:
    logmod.log.warning("%s received while cleaning up; finishing the cleanup first", signal.Signals(signum).name)


@contextmanager
def shielded():
    """For a step that must run to its end (starting a stopped app again): a stop signal received meanwhile
    takes effect after it, as if it came then."""
    received: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received and callable(previous[received[0]]):
            previous[received[0]](received[0], None)


def guard(body: Callable[[], int | None]) -> int:
    """Run a script's body; a failure becomes one line on stderr (and the logs) and its exit status.

    SIGHUP, SIGINT and SIGTERM are alike: the body unwinds (temporary files, a half-made database,
    a stopped app: each `finally` puts back what it changed), then exit 128 + the signal.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    sys.unraisablehook = _redeliver
    try:
        return body() or 0
    except KwError as exc:
        _error(exc.line())
        return exc.exit_status
    except OSError as exc:  # a file operation outside the checked paths: still one clear line
        _error(failure_line(exc))
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        _error(f"interrupted by {signal.Signals(signum).name}; cleaned up, nothing was left under a final name")
        return 128 + signum


def _error(line: str) -> None:
    if logmod.log.handlers:
        logmod.log.error("error: %s", line)
    else:
        sys.stderr.write(f"{script_name()}: error: {line}\n")


def hang_up_when_the_caller_goes() -> None:
    """SIGHUP to this process once whoever reads its stderr is gone. Run over ssh by another machine's script (the
    pi5's side of setup-pitr, pitr-recover), a dropped link or an interrupted caller sends no SIGHUP without a
    terminal, but sshd closes this side's stderr, whose end then reports an error to poll; this process then
    stops and cleans up as on any SIGHUP (exit 129) rather than go on working for nobody."""

    def watch() -> None:
        poller = select.poll()
        poller.register(sys.stderr.fileno(), 0)  # POLLERR and POLLHUP come whatever the mask
        poller.poll()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())  # nobody reads it: the cleanup's lines go
        signal.pthread_kill(threading.main_thread().ident, signal.SIGHUP)

    threading.Thread(target=watch, daemon=True, name="caller watch").start()
