"""The one subprocess runner.

Commands are argument lists (never shell strings), started through plumbum. A pipeline
joins commands with OS pipes and, where Python must see the bytes (row counting,
hashing, writing a file), with pump threads that pass large chunks through "taps".
Every stage's exit status is checked (pipefail semantics: the most upstream genuine
failure is reported, not the SIGPIPE it causes downstream), every stage's stderr goes to
its own temporary file, and a failure names the stage and shows its last lines.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from subprocess import DEVNULL, PIPE, TimeoutExpired

from plumbum import local
from plumbum.commands.base import shquote_list
from plumbum.commands.processes import CommandNotFound

from .errors import Failed
from .log import known_secrets, log, mask

CHUNK = 1 << 20
INSTALL_HINTS = {
    "pigz": "apt-get install pigz",
    "rsync": "apt-get install rsync",
    "ssh": "apt-get install openssh-client",
    "pg_dump": "apt-get install postgresql-client",
    "psql": "apt-get install postgresql-client",
    "age": "apt-get install age",
    "rclone": "apt-get install rclone",
}


@dataclass
class Cmd:
    """One command: its argument list, the name errors use for it, extra environment.

    `own_session`: it runs in a session of its own, so that a signal to this process group (a
    closed terminal's SIGHUP) does not reach it.
    """

    argv: list[str]
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)
    own_session: bool = False

    def __post_init__(self):
        self.argv = [str(a) for a in self.argv]
        self.name = self.name or os.path.basename(self.argv[0])

    def display(self) -> str:
        return mask(" ".join(shquote_list(self.argv)), known_secrets())


class Tap:
    """A Python stage between pipes: sees every chunk, may pass it on changed; `end()` at EOF."""

    name = "tap"

    def __call__(self, chunk: bytes) -> bytes | None:
        return chunk

    def end(self) -> None:
        pass


class ProgressTap(Tap):
    """Counts the bytes going by into a Progress (bytes, rate, ETA)."""

    name = "progress"

    def __init__(self, progress):
        self.progress = progress

    def __call__(self, chunk: bytes) -> bytes:
        self.progress.add(len(chunk))
        return chunk


class StageFailed(Failed):
    def __init__(self, stage: str, detail: str, tail: str = ""):
        self.stage = stage
        self.detail = detail
        self.tail = tail
        super().__init__(f"{stage} failed ({detail})" + (f": {tail}" if tail else ""))


def _tail(path_or_file, lines: int = 3) -> str:
    path_or_file.seek(0, os.SEEK_END)
    size = path_or_file.tell()
    path_or_file.seek(max(0, size - 4096))
    text = path_or_file.read().decode(errors="replace")
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return mask(" | ".join(kept), known_secrets())


def _describe_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def _popen(cmd: Cmd, stdin, stdout, stderr):
    try:
        program = local[cmd.argv[0]]
    except CommandNotFound as exc:
        hint = INSTALL_HINTS.get(os.path.basename(cmd.argv[0]), "install it or fix PATH")
        raise Failed(f"{cmd.argv[0]} not found on PATH", hint) from exc
    log.debug("run: %s", cmd.display())
    env = {**os.environ, **cmd.env}
    return program[cmd.argv[1:]].popen(
        stdin=stdin, stdout=stdout, stderr=stderr, env=env, close_fds=True, start_new_session=cmd.own_session
    )


def run(cmd: Cmd, input: bytes | None = None, timeout: float | None = None, check: bool = True):
    """Run one command to completion; returns (exit status, stdout bytes, stderr text)."""
    with tempfile.TemporaryFile() as err:
        proc = _popen(cmd, stdin=PIPE if input is not None else DEVNULL, stdout=PIPE, stderr=err)
        try:
            out, _ = proc.communicate(input, timeout=timeout)
        except BaseException as exc:
            _kill(proc)
            proc.wait()
            if isinstance(exc, TimeoutExpired):
                raise Failed(f"{cmd.name} timed out after {timeout:.0f}s") from exc
            raise
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        if check and proc.returncode != 0:
            err.seek(0)
            raise StageFailed(cmd.name, _describe_status(proc.returncode), _tail(err))
        return proc.returncode, out, stderr


def _kill(proc) -> None:
    try:
        proc.kill()
    except ProcessLookupError:
        pass


class _Pump(threading.Thread):
    """Moves bytes from a pipe or an iterable through taps into a pipe (or nowhere).

    It owns (and closes when done) only the pipe ends the pipeline created for it.
    """

    def __init__(self, source: int | Iterable[bytes], taps: list[Tap], dest: int | None, owned: set[int]):
        super().__init__(daemon=True)
        self.source, self.taps, self.dest, self.owned = source, taps, dest, owned
        self.error: BaseException | None = None

    def _chunks(self):
        if isinstance(self.source, int):
            while chunk := os.read(self.source, CHUNK):
                yield chunk
        else:
            yield from self.source

    def run(self) -> None:
        try:
            for chunk in self._chunks():
                for tap in self.taps:
                    chunk = tap(chunk)
                    if not chunk:
                        break
                if chunk and self.dest is not None:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self.dest, view) :]
            for tap in self.taps:
                tap.end()
        except BaseException as exc:  # noqa: BLE001 - the pipeline reports it as this stage's failure
            self.error = exc
        finally:
            self.close()

    def close(self) -> None:
        for fd in self.owned:
            try:
                os.close(fd)
            except OSError:
                pass
        self.owned = set()

    def stage_name(self) -> str:
        return next((t.name for t in self.taps), getattr(self.source, "name", "stream"))


def pipeline(
    steps: list, stdin: int | Iterable[bytes] | None = None, stdout: int | None = None, timeout: float | None = None
) -> dict[str, str]:
    """Run commands and taps joined by pipes; raise StageFailed naming the failing stage.

    `steps` is a list of Cmd and Tap; consecutive taps share one pump thread. `stdin` is a
    file descriptor or an iterable of chunks; `stdout` a file descriptor for the last
    command's output (else a trailing tap consumes it, or it is discarded). The caller's
    descriptors are never closed. Returns each command's stderr text.
    """
    groups: list[Cmd | list[Tap]] = []
    for step in steps:
        if isinstance(step, Cmd):
            groups.append(step)
        elif groups and isinstance(groups[-1], list):
            groups[-1].append(step)
        else:
            groups.append([step])

    procs: list[tuple[Cmd, object, object]] = []  # (cmd, popen, stderr file)
    pumps: list[_Pump] = []
    order: list[object] = []  # procs and pumps in pipeline order, for blame
    ours: set[int] = set()  # pipe ends created here and not yet handed to a pump

    def new_pipe() -> tuple[int, int]:
        read_end, write_end = os.pipe()
        ours.update((read_end, write_end))
        try:  # 1 MiB instead of 64 KiB: a quarter of the reads and writes (Linux; may be refused)
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass
        return read_end, write_end

    def hand_to_pump(source, taps, dest) -> None:
        owned = {fd for fd in (source, dest) if isinstance(fd, int) and fd in ours}
        ours.difference_update(owned)
        pump = _Pump(source, taps, dest, owned)
        pumps.append(pump)
        order.append(pump)

    upstream: int | Iterable[bytes] | None = stdin
    try:
        for index, group in enumerate(groups):
            last = index == len(groups) - 1
            if isinstance(group, Cmd):
                if upstream is None or isinstance(upstream, int):
                    child_in = DEVNULL if upstream is None else upstream
                else:  # an iterable source is fed to the command by a pump
                    child_in, feed = new_pipe()
                    hand_to_pump(upstream, [], feed)
                if last:
                    child_out, upstream = (DEVNULL if stdout is None else stdout), None
                else:
                    upstream, child_out = new_pipe()
                err = tempfile.TemporaryFile()
                procs.append((group, _popen(group, child_in, child_out, err), err))
                order.append(procs[-1][1])
                for fd in (child_in, child_out):  # the child has its copies now
                    if fd in ours:
                        ours.discard(fd)
                        os.close(fd)
            else:
                dest, next_upstream = (stdout, None) if last else reversed(new_pipe())
                hand_to_pump(() if upstream is None else upstream, group, dest)
                upstream = next_upstream
        for pump in pumps:
            pump.start()
        _wait_all(procs, pumps, timeout)
    except BaseException:
        for _, proc, _ in procs:
            _kill(proc)
        for pump in pumps:
            if not pump.is_alive():
                pump.close()
        for _, proc, _ in procs:
            proc.wait()
        raise
    finally:
        for fd in ours:
            os.close(fd)
    return _verdict(procs, pumps, order)


def _wait_all(procs, pumps, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    for pump in pumps:
        while pump.is_alive():
            pump.join(0.1)
            if deadline and time.monotonic() > deadline:
                raise Failed(f"pipeline timed out after {timeout:.0f}s")
        if pump.error is not None:  # nobody reads or writes this stage now: stop the others at once
            for _, proc, _ in procs:
                if proc.poll() is None:
                    proc.killed_by_pipeline = True
                    _kill(proc)
    for cmd, proc, _ in procs:
        remaining = None if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            proc.wait(remaining)
        except Exception as exc:
            raise Failed(f"{cmd.name} timed out after {timeout:.0f}s") from exc


def _verdict(procs, pumps, order) -> dict[str, str]:
    """Blame the most upstream genuine failure; a SIGPIPE or EPIPE is only its echo."""
    by_proc = {id(proc): (cmd, err) for cmd, proc, err in procs}
    failures: list[StageFailed] = []
    echoes: list[StageFailed] = []
    for stage in order:
        if isinstance(stage, _Pump):
            if stage.error is not None:
                exc = stage.error
                detail = (exc.strerror if isinstance(exc, OSError) else str(exc)) or type(exc).__name__
                failure = StageFailed(stage.stage_name(), detail)
                failure.__cause__ = exc
                (echoes if _is_epipe(exc) else failures).append(failure)
            continue
        cmd, err = by_proc[id(stage)]
        if stage.returncode != 0:
            failure = StageFailed(cmd.name, _describe_status(stage.returncode), _tail(err))
            echo = (
                stage.returncode in (-signal.SIGPIPE, 128 + signal.SIGPIPE)
                or "Broken pipe" in failure.tail
                or getattr(stage, "killed_by_pipeline", False)
            )
            (echoes if echo else failures).append(failure)
    stderr_texts = {}
    for cmd, _proc, err in procs:
        err.seek(0)
        stderr_texts[cmd.name] = err.read().decode(errors="replace")
        err.close()
    if failures or echoes:
        raise (failures or echoes)[0]
    for name, text in stderr_texts.items():
        if text.strip():
            log.debug("%s said: %s", name, mask(text.strip(), known_secrets()))
    return stderr_texts


def _is_epipe(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EPIPE


def passthrough(cmd: Cmd) -> int:
    """Run a command with this process's stdin/stdout/stderr (its output streams as it comes)."""
    proc = _popen(cmd, stdin=None, stdout=None, stderr=None)
    try:
        return proc.wait()
    except BaseException:
        _kill(proc)
        proc.wait()
        raise


@contextmanager
def holding(cmd: Cmd, grace: float = 120):
    """A command that answers on stdout, then holds what it made until its stdin closes: yields (the process,
    its stderr file). At the end its stdin is closed and it is given `grace` seconds to let go; when this block
    fails, it is killed at once (a kill -9 of this process closes that stdin too)."""
    with tempfile.TemporaryFile() as err:
        proc = _popen(cmd, stdin=PIPE, stdout=PIPE, stderr=err)
        try:
            try:
                yield proc, err
            except BaseException:
                _kill(proc)
                raise
            proc.stdin.close()
            try:
                proc.wait(grace)
            except TimeoutExpired:
                log.warning("%s did not end %.0fs after it was let go; stopped", cmd.name, grace)
                _kill(proc)
        finally:
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                pipe.close()


def background(cmd: Cmd):
    """Start a command that lives beside this process: stdin and stdout are pipes held by the caller."""
    return _popen(cmd, stdin=PIPE, stdout=PIPE, stderr=DEVNULL)
