"""status.from_files and chain_gaps on hand-made copies of Barman's home (issue 23.5)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kwbackup.pitr import status

MB = 1 << 20
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


def segment(n: int, timeline: int = 1, size: int = MB) -> str:
    per_log = 0x100000000 // size
    return f"{timeline:08X}{n // per_log:08X}{n % per_log:08X}"


class Home:
    """A Barman server home: base backups' infos, archived segments (xlog.db and files), streaming/."""

    def __init__(self, path: Path, size: int = MB):
        self.path, self.size = path, size
        for directory in ("meta", "wals", "streaming"):
            (path / directory).mkdir(parents=True, exist_ok=True)
        self.clock = NOW - timedelta(days=1)

    def tick(self) -> float:
        self.clock += timedelta(minutes=1)
        return self.clock.timestamp()

    def base_backup(self, backup_id: str, begin: int, ended: datetime, timeline: int = 1) -> None:
        (self.path / "meta" / f"{backup_id}-backup.info").write_text(
            f"status=DONE\nbegin_wal={segment(begin, timeline, self.size)}\nend_time={ended.isoformat()}\n"
            f"size=1000\nxlog_segment_size={self.size}\n"
        )

    def archived(self, *numbers: int, timeline: int = 1, on_disk: bool = True) -> None:
        with open(self.path / "wals" / "prod-xlog.db", "a") as db:
            for n in numbers:
                name = segment(n, timeline, self.size)
                db.write(f"{name}\t1234\t{self.tick()}\tgzip\n")
                if on_disk:
                    (self.path / "wals" / name[:16]).mkdir(exist_ok=True)
                    (self.path / "wals" / name[:16] / name).write_bytes(b"x")

    def streaming(self, n: int, partial: bool = True, timeline: int = 1) -> Path:
        path = self.path / "streaming" / (segment(n, timeline, self.size) + (".partial" if partial else ""))
        path.write_bytes(b"\0" * 16)
        when = self.tick()
        os.utime(path, (when, when))
        return path


def test_a_whole_chain_has_no_gap_and_its_window(tmp_path):
    home = Home(tmp_path)
    home.base_backup("b1", 2, NOW - timedelta(hours=20))
    home.archived(2, 3, 4)
    partial = home.streaming(5)

    state = status.from_files(tmp_path, NOW)

    assert state.gaps == [] and state.problems == []
    assert state.recoverable_from == NOW - timedelta(hours=20)
    assert state.recoverable_to == datetime.fromtimestamp(partial.stat().st_mtime, UTC)


def test_a_segment_gone_from_disk_is_a_gap_barmans_xlog_db_still_lists(tmp_path):
    home = Home(tmp_path)
    home.base_backup("b1", 2, NOW - timedelta(hours=20))
    home.archived(2, 3)
    home.archived(4, on_disk=False)
    home.archived(5, 6)
    home.archived(7, 8, on_disk=False)
    home.streaming(9)

    state = status.from_files(tmp_path, NOW)

    assert state.gaps == [segment(4), f"{segment(7)}..{segment(8)}"]
    assert state.problems == [f"the WAL chain has a gap: {segment(4)}, {segment(7)}..{segment(8)} missing"]
    assert "pitr-barman backup --wait prod" in state.hints[0]


def test_complete_segments_barmans_cron_has_not_archived_yet_count(tmp_path):
    home = Home(tmp_path)
    home.base_backup("b1", 2, NOW - timedelta(hours=20))
    home.archived(2, 3)
    home.streaming(4, partial=False)
    home.streaming(5, partial=False)
    home.streaming(6)

    assert status.from_files(tmp_path, NOW).gaps == []


def test_a_gap_before_the_newest_base_backup_cuts_the_window_without_failing(tmp_path):
    home = Home(tmp_path)
    home.base_backup("b1", 2, NOW - timedelta(hours=20))
    home.archived(2, 3, 4)
    # The pi5 away past max_slot_wal_keep_size: 5..40 lost, then a new chain from 41.
    home.base_backup("b2", 41, NOW - timedelta(hours=2))
    home.archived(41, 42)
    home.streaming(43)

    state = status.from_files(tmp_path, NOW)

    assert state.gaps == [f"{segment(5)}..{segment(40)}"]
    assert state.problems == [] and state.status == "ok"
    assert state.recoverable_from == NOW - timedelta(hours=2)


def test_a_gap_after_the_newest_base_backup_still_fails(tmp_path):
    home = Home(tmp_path)
    home.base_backup("b1", 2, NOW - timedelta(hours=20))
    home.archived(2, 4)
    home.base_backup("b2", 6, NOW - timedelta(hours=2))
    home.archived(6, 8)
    home.streaming(9)

    state = status.from_files(tmp_path, NOW)

    assert state.gaps == [segment(3), segment(5), segment(7)]
    assert state.problems == [f"the WAL chain has a gap: {segment(7)} missing"]


def test_16_mb_segments_cross_a_log_file_boundary_without_a_gap(tmp_path):
    home = Home(tmp_path, size=16 * MB)
    home.base_backup("b1", 0xFE, NOW - timedelta(hours=20))
    home.archived(0xFE, 0xFF, 0x100)
    home.streaming(0x101)

    assert segment(0x100, size=16 * MB) == "000000010000000100000000"
    assert status.from_files(tmp_path, NOW).gaps == []
    (tmp_path / "wals" / "0000000100000000" / "0000000100000000000000FF").unlink()
    assert status.from_files(tmp_path, NOW).gaps == ["0000000100000000000000FF"]


def test_a_new_timeline_carries_on_where_the_old_one_stopped(tmp_path):
    home = Home(tmp_path)
    home.base_backup("b1", 2, NOW - timedelta(hours=20))
    home.archived(2, 3)
    home.archived(4, 5, timeline=2)
    home.streaming(6, timeline=2)

    assert status.from_files(tmp_path, NOW).gaps == []


def test_no_base_backup_is_a_problem_and_no_chain_to_check(tmp_path):
    home = Home(tmp_path)
    home.archived(2, 4)

    state = status.from_files(tmp_path, NOW)

    assert state.gaps == [] and state.problems == ["no complete base backup"]


def test_chain_gaps_counts_from_the_oldest_complete_base_backup():
    backups = [
        status.BaseBackup("b0", "FAILED", segment(1), None, 0, MB),
        status.BaseBackup("b1", "DONE", segment(3), NOW, 0, MB),
    ]
    listed = [status.Wal(segment(n), 1, 0.0) for n in (3, 5)]

    assert status.chain_gaps(backups, listed, [status.Wal(segment(6) + ".partial", 1, 0.0)]) == [segment(4)]
    assert status.chain_gaps(backups[:1], listed, []) == []
