"""cli.guard: SIGHUP, SIGINT and SIGTERM unwind the script alike and exit 128 + the signal."""

import signal
import subprocess
import sys
import time

import pytest

from tests.world import ROOT

BODY = """
import sys, time
sys.path.insert(0, {lib!r})
from kwbackup import cli

def body():
    try:
        print("ready", flush=True)
        time.sleep(30)
    finally:
        time.sleep(0.3)  # a cleanup that takes a moment: a second signal must not cut it short
        open({marker!r}, "w").write("cleaned")

sys.exit(cli.guard(body))
"""


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_runs_the_cleanup_and_exits_128_plus_the_signal(tmp_path, signum):
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", BODY.format(lib=str(ROOT / "lib"), marker=str(marker))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # cron's second word, or a closed terminal's second signal
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum
    assert marker.read_text() == "cleaned"
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and signal.Signals(signum).name in errors[0]


SHIELDED = """
import sys, time
sys.path.insert(0, {lib!r})
from kwbackup import cli

def body():
    with cli.shielded():
        print("ready", flush=True)
        time.sleep(0.5)  # starting the app again: a signal now must not cut it short
        open({marker!r}, "w").write("started")
    time.sleep(30)

sys.exit(cli.guard(body))
"""


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_during_a_shielded_step_takes_effect_after_it(tmp_path, signum):
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", SHIELDED.format(lib=str(ROOT / "lib"), marker=str(marker))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    proc.communicate(timeout=30)
    assert marker.read_text() == "started" and proc.returncode == 128 + signum


DROPPED = """
import os, signal, sys, time, weakref
sys.path.insert(0, {lib!r})
from kwbackup import cli

class Thing:
    pass

def body():
    thing = Thing()
    # The signal lands while Python runs a weakref callback, where an exception can only be dropped
    # ("Exception ignored in ..."): the script must unwind all the same.
    ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), signal.{name}))
    del thing
    for _ in range(300):
        time.sleep(0.1)
    return 0

sys.exit(cli.guard(body))
"""


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM])
def test_a_signal_landing_where_python_drops_exceptions_still_interrupts(signum):
    done = subprocess.run(
        [sys.executable, "-c", DROPPED.format(lib=str(ROOT / "lib"), name=signal.Signals(signum).name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 128 + signum, done.stderr
    assert "Exception ignored" not in done.stderr
