import os
import subprocess
import sys

import pytest

from kwbackup import files
from kwbackup.errors import Failed, LockHeld


def test_atomic_file_appears_complete_with_mode_0600(tmp_path):
    with files.AtomicFile(tmp_path, "db-2024-01-15.sql.gz") as out:
        out.write(b"data")
        assert not (tmp_path / "db-2024-01-15.sql.gz").exists()
        assert files.is_temp_name(out.temp.name)
        out.commit()
    path = tmp_path / "db-2024-01-15.sql.gz"
    assert path.read_bytes() == b"data"
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["db-2024-01-15.sql.gz"]


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with files.AtomicFile(tmp_path, "x") as out:
            out.write(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_never_overwrites_unless_asked(tmp_path):
    (tmp_path / "x").write_bytes(b"old")
    with pytest.raises(Failed, match="already exists"):
        files.write_atomic(tmp_path, "x", b"new")
    assert (tmp_path / "x").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x"]
    files.write_atomic(tmp_path, "x", b"new", replace=True)
    assert (tmp_path / "x").read_bytes() == b"new"


def test_private_dir_is_created_0700(tmp_path):
    path = files.ensure_private_dir(tmp_path / "a" / "b")
    assert path.stat().st_mode & 0o777 == 0o700
    (tmp_path / "open").mkdir(mode=0o755)
    assert files.ensure_private_dir(tmp_path / "open").stat().st_mode & 0o777 == 0o700


def test_stale_temps_are_removed_and_nothing_else(tmp_path):
    for name in (".db-2024-01-15.sql.gz.partial-1234abcd", "db-2024-01-14.sql.gz", ".hidden", "notes.partial-x"):
        (tmp_path / name).write_text("x")
    assert files.remove_stale_temps(tmp_path) == [".db-2024-01-15.sql.gz.partial-1234abcd"]
    assert sorted(os.listdir(tmp_path)) == [".hidden", "db-2024-01-14.sql.gz", "notes.partial-x"]


def test_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
            ),
            str(tmp_path / ".backup-db.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld) as caught:
        with files.lock(tmp_path, "backup-db"):
            pass
    assert caught.value.exit_status == 4
    holder.kill()
    holder.wait()
    with files.lock(tmp_path, "backup-db"):
        assert (tmp_path / ".backup-db.lock").read_text().strip() == str(os.getpid())


def test_own_subdir_leaves_the_shared_directory_alone(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    mine = files.own_subdir(shared, "kw-backup-0")
    assert shared.stat().st_mode & 0o7777 == 0o1777
    assert mine.stat().st_mode & 0o777 == 0o700
    assert files.own_subdir(shared, "kw-backup-0") == mine
    (shared / "planted").symlink_to(tmp_path)
    with pytest.raises(Failed, match="not a private directory"):
        files.own_subdir(shared, "planted")


def test_a_shared_directory_is_never_made_private(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(Failed, match="shared directory"):
        files.ensure_private_dir(shared)
    assert shared.stat().st_mode & 0o7777 == 0o1777
