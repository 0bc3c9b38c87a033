"""offsite.Offsite, a destination like the nas, through the real rclone: a local-directory remote and an SFTP remote
on the loopback sshd (with and without checksums), foreign and hostile names at the remote, damage after upload,
leftovers of failed runs, pins, an oversized manifest, and a remote that is down."""

import os
import time

import pytest

from kwbackup import crypto, dumps, names
from kwbackup.destinations import Parcel
from kwbackup.errors import Failed, VerificationError
from kwbackup.offsite import Offsite
from kwbackup.places import Entry
from kwbackup.retention import NO_CALENDAR
from kwbackup.run import StageFailed, run
from tests import world

# Oldest first; the last is an encrypted copy, as the orchestrator sends when AGE_RECIPIENTS is set.
PLAIN = ["db-2024-04-28.sql.gz", "db-2024-04-29.sql.gz", "db-2024-04-30-031500.sql.gz"]
ENCRYPTED = "db-2024-05-01.sql.gz.age"
DUMPS = [*PLAIN, ENCRYPTED]
# Names a remote may hold that are not ours: listing ignores them, rotation never touches them.
FOREIGN = ["notes.txt", "db-2024-01-01.sql.gz; rm -rf x", "db-2024-04-28.sql.gz.bak", "db-2024-04-28.sql.gz.json.old",
           "db-2024-02-30.sql.gz", "-rf", ".hidden", "db-2024-01-02.sql.gz.json", "DB-2024-01-03.SQL.GZ"]


@pytest.fixture
def pi5(tmp_path):
    """The pi5's outgoing files: plain dumps with manifests, and one encrypted copy with its manifest."""
    directory = tmp_path / "pi5"
    for name in PLAIN:
        world.synthetic_dump(directory, name, rows=1500)
    plain = world.synthetic_dump(tmp_path / "plain", names.plain_name(ENCRYPTED), rows=1500)
    _, public = world.age_key(tmp_path)
    crypto.encrypt(plain, dumps.read_manifest(plain), directory, [public])
    return directory


def sources(pi5, dump_names):
    return [pi5 / n for name in dump_names for n in (name, name + names.MANIFEST_SUFFIX)]


def parcels(pi5, dump_names):
    return [Parcel(pi5, Entry(name, (pi5 / name).stat().st_size)) for name in dump_names]


def local(tmp_path):
    target = tmp_path / "offsite" / "kw-app"  # not there yet: the first upload makes it
    return Offsite(str(target), 3, NO_CALENDAR), target


def sftp(tmp_path, ssh_world, hashcheck=True):
    # The sshd runs as this user on this machine: the remote path is this directory, seen over SFTP.
    target = tmp_path / "sftp" / "kw-app"
    config = ssh_world.rclone_config(tmp_path / "rclone.conf", hashcheck=hashcheck)
    return Offsite("offsite:" + str(target), 3, NO_CALENDAR, str(config)), target


@pytest.fixture(params=["local", "sftp"])
def remote(request, tmp_path, ssh_world):
    return local(tmp_path) if request.param == "local" else sftp(tmp_path, ssh_world)


def send(offsite, pi5, dump_names):
    """Send, check and promote, as destinations.push does; the checksum used."""
    offsite.send(parcels(pi5, dump_names))
    checked = offsite.check(parcels(pi5, dump_names))
    offsite.promote(dump_names)
    return checked


def files_at(target):
    return sorted(p.name for p in target.iterdir() if p.is_file())


def test_a_remote_path_never_written_to_lists_empty(remote):
    offsite, target = remote
    assert not target.exists()
    assert offsite.listing() == [] and offsite.leftovers == []


def test_upload_check_promote_and_listing(remote, pi5):
    offsite, target = remote
    offsite.send(parcels(pi5, DUMPS))
    # Uploaded, not yet promoted: only .incoming/ holds them, and listing offers no dump.
    assert sorted(os.listdir(target)) == [".incoming"]
    assert sorted(os.listdir(target / ".incoming")) == sorted(p.name for p in sources(pi5, DUMPS))
    assert offsite.listing() == [] and sorted(offsite.leftovers) == sorted(p.name for p in sources(pi5, DUMPS))

    checked = offsite.check(parcels(pi5, DUMPS))
    # sha256 on a local directory (rclone computes any hash); over SFTP what the server's shell offers.
    assert checked == ("sha256" if offsite.remote.startswith("/") else "sha1")
    offsite.promote(DUMPS)
    assert os.listdir(target / ".incoming") == []
    assert files_at(target) == sorted(p.name for p in sources(pi5, DUMPS))
    for path in sources(pi5, DUMPS):
        assert (target / path.name).read_bytes() == path.read_bytes()

    listed = offsite.listing()
    assert [e.name for e in listed] == DUMPS[::-1]  # newest first
    for entry in listed:
        manifest = dumps.read_manifest(pi5 / entry.name)
        assert entry.status == "verified"
        assert (entry.size, entry.sha256) == ((pi5 / entry.name).stat().st_size, manifest.sha256)
        assert entry.plain_sha256 == manifest.plain().sha256
        assert abs(entry.mtime - (pi5 / entry.name).stat().st_mtime) < 2  # rclone keeps the pi5's time
    assert listed[0].manifest["encryption"]["plain_file"] == names.plain_name(ENCRYPTED)
    assert offsite.leftovers == []


def test_read_streams_the_bytes_and_exists_answers(remote, pi5):
    offsite, _ = remote
    send(offsite, pi5, DUMPS[-2:])
    for name in (DUMPS[-1], DUMPS[-1] + ".json", DUMPS[-2]):
        code, out, _ = run(offsite.read(name), timeout=60)
        assert code == 0 and out == (pi5 / name).read_bytes()
    assert offsite.exists(DUMPS[-1]) and offsite.exists(DUMPS[-1] + ".json")
    assert not offsite.exists(DUMPS[0])
    with pytest.raises(StageFailed):
        run(offsite.read(DUMPS[0]), timeout=60)


def test_foreign_and_hostile_names_are_ignored_and_never_removed(remote, pi5):
    offsite, target = remote
    send(offsite, pi5, DUMPS)
    for name in FOREIGN:
        (target / name).write_text(f"not ours: {name}\n")
    (target / "sub").mkdir()
    (target / "sub" / PLAIN[0]).write_text("a dump's name one level down is not a dump here\n")
    outside = target.parent / "x"  # what "../x" would reach
    outside.write_text("outside the remote path\n")

    assert [e.name for e in offsite.listing()] == DUMPS[::-1]
    offsite.remove(DUMPS)
    offsite.remove(["../x", "../kw-app/../x"])  # a hostile name never reaches outside the remote path
    assert offsite.listing() == []
    assert files_at(target) == sorted(FOREIGN)
    assert all((target / name).read_text() == f"not ours: {name}\n" for name in FOREIGN)
    assert (target / "sub" / PLAIN[0]).exists() and outside.read_text() == "outside the remote path\n"


def test_remove_deletes_exactly_the_named_dumps_and_their_manifests(remote, pi5):
    offsite, target = remote
    send(offsite, pi5, DUMPS)
    offsite.remove([PLAIN[1], ENCRYPTED])
    assert files_at(target) == sorted(p.name for p in sources(pi5, [PLAIN[0], PLAIN[2]]))
    assert [e.name for e in offsite.listing()] == [PLAIN[2], PLAIN[0]]
    offsite.remove([])  # nothing to rotate: nothing happens
    assert [e.name for e in offsite.listing()] == [PLAIN[2], PLAIN[0]]


@pytest.mark.parametrize("altered", ["dump", "manifest"])
def test_check_uploaded_catches_a_copy_altered_after_upload(remote, pi5, altered):
    offsite, target = remote
    batch = parcels(pi5, [ENCRYPTED])
    offsite.send(batch)
    copy = target / ".incoming" / (ENCRYPTED if altered == "dump" else ENCRYPTED + ".json")
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size and (to a second) the same time: only a checksum tells
    copy.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=f"the uploaded {copy.name} has") as caught:
        offsite.check(batch)
    assert caught.value.exit_status == 3
    assert offsite.listing() == []  # nothing was promoted
    # The next run uploads it whole again, whatever is in .incoming/.
    offsite.send(batch)
    offsite.check(batch)


def test_sftp_without_checksums_reads_back_and_still_catches_an_altered_copy(tmp_path, ssh_world, pi5):
    offsite, target = sftp(tmp_path, ssh_world, hashcheck=False)
    assert "read back" in send(offsite, pi5, PLAIN[:1])
    assert [(e.name, e.status) for e in offsite.listing()] == [(PLAIN[0], "verified")]

    batch = parcels(pi5, [ENCRYPTED])
    offsite.send(batch)
    copy = target / ".incoming" / ENCRYPTED
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=f"the uploaded {ENCRYPTED} has sha256"):
        offsite.check(batch)


def test_leftovers_of_a_failed_run_are_cleared_after_a_good_push(remote, pi5):
    offsite, target = remote
    offsite.send(parcels(pi5, PLAIN[:1]))  # a run that died after uploading one dump
    assert offsite.listing() == [] and sorted(offsite.leftovers) == sorted(p.name for p in sources(pi5, PLAIN[:1]))
    send(offsite, pi5, PLAIN[1:2])
    offsite.finish()
    assert list((target / ".incoming").iterdir()) == []
    assert [e.name for e in offsite.listing()] == PLAIN[1:2]


def test_promotion_never_replaces_a_dump_already_there(remote, pi5):
    offsite, target = remote
    offsite.send(parcels(pi5, PLAIN[:1]))
    target.joinpath(PLAIN[0]).write_bytes(b"someone else's bytes")
    offsite.promote(PLAIN[:1])
    assert (target / PLAIN[0]).read_bytes() == b"someone else's bytes"


def test_pins_are_listed_and_released(remote, pi5):
    offsite, target = remote
    send(offsite, pi5, DUMPS)
    offsite.pin({PLAIN[0]: b'{"pinned_at": "2024-05-01T03:00:00Z", "reason": "users: 2500 -> 250"}\n'})
    assert [e.name for e in offsite.listing() if e.pinned] == [PLAIN[0]]
    assert "users: 2500 -> 250" in (target / (PLAIN[0] + ".pin")).read_text()
    offsite.unpin([PLAIN[0]])
    assert not any(e.pinned for e in offsite.listing()) and not (target / (PLAIN[0] + ".pin")).exists()


def test_a_manifest_over_the_limit_is_invalid_and_never_fetched(remote, pi5):
    offsite, target = remote
    send(offsite, pi5, PLAIN[:1])
    manifest = target / (PLAIN[0] + ".json")
    manifest.write_bytes(manifest.read_bytes() + b" " * dumps.MAX_MANIFEST_BYTES)
    assert [(e.name, e.status) for e in offsite.listing()] == [(PLAIN[0], "SIZE MISMATCH")]


@pytest.mark.parametrize("how", ["nothing listens", "no such remote in the config"])
def test_an_unreachable_remote_fails_soon_saying_so(tmp_path, ssh_world, how):
    config = ssh_world.rclone_config(tmp_path / "rclone.conf", address="127.0.0.9")
    remote = "offsite:" + str(tmp_path / "sftp") if how == "nothing listens" else "elsewhere:" + str(tmp_path)
    started = time.monotonic()
    with pytest.raises(Failed, match="unreachable") as caught:
        Offsite(remote, 3, NO_CALENDAR, str(config)).listing()
    assert time.monotonic() - started < 90
    assert caught.value.exit_status == 1 and remote in caught.value.line()
    assert "rclone" in caught.value.hint
