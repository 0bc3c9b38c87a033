import os

import pytest

from kwbackup import log, run
from kwbackup.errors import Failed


class Collect(run.Tap):
    name = "collect"

    def __init__(self):
        self.data = b""

    def __call__(self, chunk):
        self.data += chunk


class Fail(run.Tap):
    name = "writer"

    def __call__(self, chunk):
        raise OSError(28, "No space left on device")


def sh(script, name):
    return run.Cmd(["sh", "-c", script], name=name)


def test_pipeline_passes_bytes_through_commands_and_taps():
    out = Collect()
    run.pipeline([sh("seq 1 100000", "seq"), run.Cmd(["gzip", "-c"]), run.Cmd(["gzip", "-dc"]), out])
    assert out.data.decode().split() == [str(i) for i in range(1, 100001)]


def test_iterable_source_feeds_the_first_command():
    out = Collect()
    run.pipeline([run.Cmd(["cat"]), out], stdin=iter([b"a", b"b", b"c"]))
    assert out.data == b"abc"


def test_upstream_failure_is_named_with_its_stderr_tail():
    with pytest.raises(run.StageFailed) as caught:
        run.pipeline(
            [
                sh("seq 1 1000; echo 'pg_dump: error: connection lost' >&2; exit 1", "pg_dump"),
                run.Cmd(["gzip", "-c"]),
                Collect(),
            ]
        )
    assert caught.value.stage == "pg_dump"
    assert "exit 1" in caught.value.line() and "connection lost" in caught.value.line()


def test_middle_failure_beats_the_sigpipe_it_causes_upstream():
    with pytest.raises(run.StageFailed) as caught:
        run.pipeline(
            [sh("yes", "producer"), sh("head -c 1000 >/dev/null; echo broken >&2; exit 3", "middle"), Collect()]
        )
    assert caught.value.stage == "middle" and "broken" in caught.value.line()


def test_failing_tap_is_blamed_not_the_commands_it_stopped():
    with pytest.raises(run.StageFailed) as caught:
        run.pipeline([sh("cat /dev/urandom", "producer"), run.Cmd(["gzip", "-c"]), Fail()])
    assert caught.value.stage == "writer" and "No space left" in caught.value.line()


def test_each_stage_exit_status_is_checked_even_when_output_looks_fine():
    with pytest.raises(run.StageFailed) as caught:
        run.pipeline([sh("echo fine", "first"), sh("cat; exit 2", "second"), Collect()])
    assert caught.value.stage == "second"


def test_missing_program_and_timeout():
    with pytest.raises(Failed, match="not found"):
        run.pipeline([run.Cmd(["no-such-program-kw"])])
    with pytest.raises(Failed, match="timed out"):
        run.pipeline([run.Cmd(["sleep", "5"])], timeout=0.5)
    with pytest.raises(Failed, match="timed out"):
        run.pipeline([run.Cmd(["sleep", "5"]), Collect()], timeout=0.5)


def test_no_descriptor_leaks():
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(Failed):
            run.pipeline([sh("cat /dev/urandom", "y"), run.Cmd(["gzip", "-c"]), Fail()])
        run.pipeline([sh("echo x", "x"), Collect()])
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_run_captures_output_and_checks_status():
    assert run.run(run.Cmd(["echo", "hi"]))[1] == b"hi\n"
    with pytest.raises(run.StageFailed, match="exit 4"):
        run.run(sh("exit 4", "four"))
    assert run.run(sh("exit 4", "four"), check=False)[0] == 4


def test_secrets_are_masked_in_displays_and_errors():
    log.add_secrets(["s3cr3t-token"])
    cmd = run.Cmd(["curl", "https://hc-ping.com/s3cr3t-token"])
    assert "s3cr3t-token" not in cmd.display() and "***" in cmd.display()
    with pytest.raises(run.StageFailed) as caught:
        run.run(sh("echo 'bad token s3cr3t-token' >&2; exit 1", "ping"))
    assert "s3cr3t-token" not in caught.value.line()


def test_run_timeout_is_a_failure_with_a_message():
    with pytest.raises(Failed, match="sleeper timed out"):
        run.run(run.Cmd(["sleep", "5"], name="sleeper"), timeout=0.3)


def test_a_holder_lets_go_when_the_block_ends_and_is_killed_when_it_fails(tmp_path):
    def holder(let_go):  # holds until its stdin closes, then lets go
        return sh(f"echo ready; cat >/dev/null; echo done > {let_go}", "holder")

    with run.holding(holder(tmp_path / "ended")) as (proc, _):
        assert proc.stdout.readline() == b"ready\n" and not (tmp_path / "ended").exists()
    assert (tmp_path / "ended").read_text() == "done\n" and proc.returncode == 0
    with pytest.raises(RuntimeError), run.holding(holder(tmp_path / "failed")) as (proc, _):
        raise RuntimeError("the restore failed")
    assert proc.returncode == -9 and not (tmp_path / "failed").exists()


def test_a_holder_that_will_not_let_go_is_stopped_after_its_grace():
    with run.holding(run.Cmd(["sleep", "30"]), grace=0.3) as (proc, _):
        pass
    assert proc.returncode == -9
