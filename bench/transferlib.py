"""What the transfer benchmarks (bench/transfer, bench/offsite) share: timing a command, fresh directories."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

BYTES_PER_ROW = 60.1  # synthetic_dump(random_bytes=True) after pigz -1, measured
# Settings the environment would override the env file with, and the tests' own variables.
SCRUBBED = (
    "KW_",
    "PG",
    "DB_",
    "PROD_",
    "PI5_",
    "NAS_",
    "OLD_PROD_",
    "SSH_CONFIG",
    "LOG_FILE",
    "MIN_DUMP_BYTES",
    "WORK_DIR",
    "SIZE_CHANGE_ALERT_PCT",
    "AGE_",
    "OFFSITE_",
    "RCLONE_",
)


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command to completion after a sync; (wall seconds, the finished process)."""
    os.sync()  # earlier runs' dirty pages are not written back on this run's time
    started = time.monotonic()
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return wall, done


def fresh(*dirs: Path) -> None:
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700, parents=True)
