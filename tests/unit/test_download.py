"""download.work_dir: a run's private directory in WORK_DIR, and what a killed run leaves there."""

import signal
import subprocess
import sys
from pathlib import Path

from kwbackup import download

LIB = Path(__file__).resolve().parents[2] / "lib"
HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from kwbackup import download, rundir
with download.work_dir(sys.argv[2]) as work:
    inner = work / "kw-recover-run-x"  # a recovery's run directory inside it, as --from-nas makes one
    inner.mkdir()
    (inner / rundir.BINDIR_FILE).write_text("/usr/lib/postgresql/15/bin\\n")
    print(work, flush=True)
    time.sleep(60)
"""


def holder(base: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(LIB), str(base)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_a_work_directory_goes_at_the_end_and_a_killed_runs_with_the_next_run(tmp_path):
    with download.work_dir(str(tmp_path)) as work:
        (work / "db-2024-01-15.sql.gz").write_bytes(b"x")
        assert work.stat().st_mode & 0o777 == 0o700
    assert not work.exists()
    alive, alive_work = holder(tmp_path)
    killed, killed_work = holder(tmp_path)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed_work.exists()
    with download.work_dir(str(tmp_path)) as work:
        assert sorted(work.parent.iterdir()) == sorted([alive_work, work])  # the live run's stays
    alive.kill()
    alive.wait()
