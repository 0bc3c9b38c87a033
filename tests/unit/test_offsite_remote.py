"""offsite.Offsite against real rclone remotes: a local directory, and SFTP on the loopback sshd (with and
without checksums), and one that is down."""

import time

import pytest

from kwbackup import names
from kwbackup.errors import Failed, VerificationError
from kwbackup.offsite import Offsite
from kwbackup.retention import NO_CALENDAR
from kwbackup.run import run
from tests import world

NAMES = ["db-2024-03-09.sql.gz", "db-2024-03-10.sql.gz"]
FOREIGN = ["notes.txt", "db-2024-01-01.sql.gz; rm -rf x", "db-2099-01-01.sql.gz.bak", "-rf"]


@pytest.fixture(params=["local", "sftp", "sftp-without-checksums"])
def remote(request, tmp_path, ssh_world):
    target = tmp_path / "remote" / "kw-app"  # not there yet: the first upload makes it
    if request.param == "local":
        return Offsite(str(target), 1, NO_CALENDAR), target, "sha256"
    config = ssh_world.rclone_config(tmp_path / "rclone.conf", hashcheck=request.param == "sftp")
    checksum = "sha1" if request.param == "sftp" else "sha256 (read back)"  # sftp offers md5 and sha1
    return Offsite(f"offsite:{target}", 1, NO_CALENDAR, str(config)), target, checksum


@pytest.fixture
def pi5(tmp_path):
    directory = tmp_path / "pi5"
    directory.mkdir(mode=0o700)
    for name in NAMES:
        world.synthetic_dump(directory, name, rows=2000)
    return directory


def send(offsite, pi5, dumps):
    sources = [pi5 / n for name in dumps for n in (name, name + names.MANIFEST_SUFFIX)]
    offsite.upload(sources)
    checked = offsite.check_uploaded(sources)
    offsite.promote(dumps)
    return checked


def test_upload_check_promote_list_remove(remote, pi5):
    offsite, target, checksum = remote
    assert offsite.listing() == []  # a path nothing was ever written to is an empty remote
    assert send(offsite, pi5, NAMES) == checksum
    listed = offsite.listing()
    assert [e.name for e in listed] == NAMES[::-1] and all(e.status == "verified" for e in listed)
    assert sorted(p.name for p in (target / ".incoming").iterdir()) == []
    for name in NAMES:
        assert (target / name).read_bytes() == (pi5 / name).read_bytes()
    _, out, _ = run(offsite.read(NAMES[0]))
    assert out == (pi5 / NAMES[0]).read_bytes() and offsite.exists(NAMES[0] + ".json")
    assert not offsite.exists("db-2020-01-01.sql.gz")

    for name in FOREIGN:
        (target / name).write_text("not ours")
    assert [e.name for e in offsite.listing()] == NAMES[::-1]  # foreign names are not dumps
    offsite.remove([NAMES[0]])
    assert sorted(p.name for p in target.iterdir() if p.is_file()) == sorted(FOREIGN + [NAMES[1], NAMES[1] + ".json"])


def test_checksums_catch_a_copy_changed_after_upload(remote, pi5):
    offsite, target, _ = remote
    sources = [pi5 / NAMES[1], pi5 / (NAMES[1] + ".json")]
    offsite.upload(sources)
    copy = target / ".incoming" / NAMES[1]
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=f"the uploaded {NAMES[1]} has"):
        offsite.check_uploaded(sources)
    # The damaged copy waits in .incoming/ under the same size and time; the next upload replaces it whole.
    offsite.listing()
    assert NAMES[1] in offsite.leftovers
    offsite.upload(sources)
    offsite.check_uploaded(sources)
    offsite.promote([NAMES[1]])
    offsite.clear_incoming([NAMES[1]])
    assert (target / NAMES[1]).read_bytes() == (pi5 / NAMES[1]).read_bytes()


def test_leftovers_of_a_failed_run_are_cleared_after_a_good_push(tmp_path, pi5):
    target = tmp_path / "remote"
    offsite = Offsite(str(target), 1, NO_CALENDAR)
    offsite.upload([pi5 / NAMES[0]])  # a run that died after uploading one dump
    assert offsite.listing() == [] and offsite.leftovers == [NAMES[0]]
    send(offsite, pi5, NAMES[1:])
    offsite.clear_incoming(NAMES[1:])
    assert list((target / ".incoming").iterdir()) == []
    assert [e.name for e in offsite.listing()] == NAMES[1:]


@pytest.mark.parametrize("how", ["nothing listens", "no such remote"])
def test_a_remote_that_is_down_fails_clearly_and_soon(tmp_path, ssh_world, how):
    config = ssh_world.rclone_config(tmp_path / "rclone.conf", address="127.0.0.9")
    remote = "offsite:/x" if how == "nothing listens" else "missing:/x"
    started = time.monotonic()
    with pytest.raises(Failed, match=r"offsite \(.*\) unreachable"):
        Offsite(remote, 1, NO_CALENDAR, str(config)).listing()
    assert time.monotonic() - started < 90
