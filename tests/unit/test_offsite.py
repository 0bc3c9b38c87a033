"""offsite.Offsite, a destination like the nas, through the real rclone: a local-directory remote, an S3 remote on
moto's S3 server (md5 for single-part copies; multipart ones read back) and an SFTP remote on the loopback sshd
without checksums (read back), foreign and hostile names at the remote, damage after upload, leftovers of failed
runs, pins, an oversized manifest, and a remote that is down."""

import time

import certifi
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
FOREIGN = [
    "notes.txt",
    "db-2024-01-01.sql.gz; rm -rf x",
    "db-2024-04-28.sql.gz.bak",
    "db-2024-04-28.sql.gz.json.old",
    "db-2024-02-30.sql.gz",
    "-rf",
    ".hidden",
    "db-2024-01-02.sql.gz.json",
    "DB-2024-01-03.SQL.GZ",
]


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
    target = world.Directory(tmp_path / "offsite" / "kw-app")  # not there yet: the first upload makes it
    return Offsite(target.remote, 3, NO_CALENDAR), target


def s3_remote(s3):
    target = s3.at("kw-app")
    return Offsite(target.remote, 3, NO_CALENDAR, str(s3.config)), target


def sftp(tmp_path, ssh_world, hashcheck=True):
    # The sshd runs as this user on this machine: the remote path is this directory, seen over SFTP.
    target = tmp_path / "sftp" / "kw-app"
    config = ssh_world.rclone_config(tmp_path / "rclone.conf", hashcheck=hashcheck)
    return Offsite("offsite:" + str(target), 3, NO_CALENDAR, str(config)), target


@pytest.fixture(params=["local", "s3"])
def remote(request, tmp_path):
    """(Offsite, the test's view of its remote path: world.Directory or world.Bucket)."""
    return local(tmp_path) if request.param == "local" else s3_remote(request.getfixturevalue("s3"))


def send(offsite, pi5, dump_names):
    """Send, check and promote, as destinations.push does; the checksum used."""
    offsite.send(parcels(pi5, dump_names))
    checked = offsite.check(parcels(pi5, dump_names))
    offsite.promote(dump_names)
    return checked


def test_a_remote_path_never_written_to_lists_empty(remote):
    offsite, target = remote
    assert not target.exists()
    assert offsite.listing() == [] and offsite.leftovers == []


def test_upload_check_promote_and_listing(remote, pi5):
    offsite, target = remote
    offsite.send(parcels(pi5, DUMPS))
    # Uploaded, not yet promoted: only .incoming/ holds them, and listing offers no dump.
    assert target.files() == []
    assert target.files(".incoming") == sorted(p.name for p in sources(pi5, DUMPS))
    assert offsite.listing() == [] and sorted(offsite.leftovers) == sorted(p.name for p in sources(pi5, DUMPS))

    checked = offsite.check(parcels(pi5, DUMPS))
    # sha256 on a local directory (rclone computes any hash); S3's md5 of a single-part upload (its ETag).
    assert checked == ("sha256" if offsite.remote.startswith("/") else "md5")
    offsite.promote(DUMPS)
    assert target.files(".incoming") == []
    assert target.files() == sorted(p.name for p in sources(pi5, DUMPS))
    for path in sources(pi5, DUMPS):
        assert target.read(path.name) == path.read_bytes()

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
    if offsite.remote.startswith("/"):
        with pytest.raises(StageFailed):
            run(offsite.read(DUMPS[0]), timeout=60)
    else:  # S3 has no directories: rclone cat of a missing key reads nothing, so callers ask exists() first
        assert run(offsite.read(DUMPS[0]), timeout=60)[1] == b""


def test_foreign_and_hostile_names_are_ignored_and_never_removed(remote, pi5):
    offsite, target = remote
    send(offsite, pi5, DUMPS)
    for name in FOREIGN:
        target.write(name, f"not ours: {name}\n".encode())
    target.write(f"sub/{PLAIN[0]}", b"a dump's name one level down is not a dump here\n")
    target.parent.write("x", b"outside the remote path\n")  # what "../x" would reach

    assert [e.name for e in offsite.listing()] == DUMPS[::-1]
    offsite.remove(DUMPS)
    offsite.remove(["../x", "../kw-app/../x"])  # a hostile name never reaches outside the remote path
    assert offsite.listing() == []
    assert target.files() == sorted(FOREIGN)
    assert all(target.read(name) == f"not ours: {name}\n".encode() for name in FOREIGN)
    assert target.files("sub") == [PLAIN[0]] and target.parent.read("x") == b"outside the remote path\n"


def test_remove_deletes_exactly_the_named_dumps_and_their_manifests(remote, pi5):
    offsite, target = remote
    send(offsite, pi5, DUMPS)
    offsite.remove([PLAIN[1], ENCRYPTED])
    assert target.files() == sorted(p.name for p in sources(pi5, [PLAIN[0], PLAIN[2]]))
    assert [e.name for e in offsite.listing()] == [PLAIN[2], PLAIN[0]]
    offsite.remove([])  # nothing to rotate: nothing happens
    assert [e.name for e in offsite.listing()] == [PLAIN[2], PLAIN[0]]


@pytest.mark.parametrize("altered", ["dump", "manifest"])
def test_check_uploaded_catches_a_copy_altered_after_upload(remote, pi5, altered):
    offsite, target = remote
    batch = parcels(pi5, [ENCRYPTED])
    offsite.send(batch)
    copy = ".incoming/" + (ENCRYPTED if altered == "dump" else ENCRYPTED + ".json")
    data = bytearray(target.read(copy))
    data[len(data) // 2] ^= 0x01  # same size and (to a second) the same time: only a checksum tells
    target.write(copy, bytes(data))
    with pytest.raises(VerificationError, match=f"the uploaded {copy.split('/')[1]} has") as caught:
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
    assert target.files(".incoming") == []
    assert [e.name for e in offsite.listing()] == PLAIN[1:2]


def test_promotion_never_replaces_a_dump_already_there(remote, pi5):
    offsite, target = remote
    offsite.send(parcels(pi5, PLAIN[:1]))
    target.write(PLAIN[0], b"someone else's bytes")
    offsite.promote(PLAIN[:1])
    assert target.read(PLAIN[0]) == b"someone else's bytes"


def test_pins_are_listed_and_released(remote, pi5):
    offsite, target = remote
    send(offsite, pi5, DUMPS)
    offsite.pin({PLAIN[0]: b'{"pinned_at": "2024-05-01T03:00:00Z", "reason": "users: 2500 -> 250"}\n'})
    assert [e.name for e in offsite.listing() if e.pinned] == [PLAIN[0]]
    assert b"users: 2500 -> 250" in target.read(PLAIN[0] + ".pin")
    offsite.unpin([PLAIN[0]])
    assert not any(e.pinned for e in offsite.listing()) and PLAIN[0] + ".pin" not in target.files()


def test_a_manifest_over_the_limit_is_invalid_and_never_fetched(remote, pi5):
    offsite, target = remote
    send(offsite, pi5, PLAIN[:1])
    manifest = PLAIN[0] + ".json"
    target.write(manifest, target.read(manifest) + b" " * dumps.MAX_MANIFEST_BYTES)
    assert [(e.name, e.status) for e in offsite.listing()] == [(PLAIN[0], "SIZE MISMATCH")]


@pytest.mark.parametrize("how", ["nothing listens", "no such remote in the config"])
def test_an_unreachable_remote_fails_soon_saying_so(tmp_path, s3_server, how):
    config = s3_server.rclone_config(tmp_path / "rclone.conf", endpoint=f"http://127.0.0.9:{s3_server.port}")
    remote = "offsite:kw-app/kw-app" if how == "nothing listens" else "elsewhere:kw-app"
    started = time.monotonic()
    with pytest.raises(Failed, match="unreachable") as caught:
        Offsite(remote, 3, NO_CALENDAR, str(config)).listing()
    assert time.monotonic() - started < 90
    assert caught.value.exit_status == 1 and remote in caught.value.line()
    assert "rclone" in caught.value.hint


# --- S3 --------------------------------------------------------------------------------------------


def test_s3_offers_md5_and_a_multipart_copy_which_has_none_there_is_read_back(s3, pi5):
    """rclone would record its own md5 of a multipart upload as metadata, which proves nothing about the stored
    bytes; uploaded without it, such a copy has no checksum at the remote and is read back, and a damaged one is
    caught. A dump over 5 MiB goes up in parts (the tests' upload_cutoff)."""
    offsite, target = s3_remote(s3)
    assert offsite._hash_kind() == ("md5", False)
    big = world.synthetic_dump(pi5, "db-2024-05-02.sql.gz", rows=200_000, random_bytes=True)
    assert big.stat().st_size > 2 * 5 * 2**20
    batch = parcels(pi5, [big.name])
    offsite.send(batch)
    hashes = target.rclone("hashsum", "md5", f"{target.remote}/.incoming").decode()
    assert f"{' ' * 32}  {big.name}\n" in hashes  # the remote has no md5 of it
    assert offsite.check(batch) == "md5 (1 read back)"
    offsite.promote([big.name])
    assert target.read(big.name) == big.read_bytes()

    offsite.send(batch)
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write(f".incoming/{big.name}", bytes(data))  # streamed up in parts, as a failed upload might
    with pytest.raises(VerificationError, match=f"the uploaded {big.name} has md5"):
        offsite.check(batch)


def test_an_exported_aws_ca_bundle_does_not_break_the_s3_remote(s3, pi5, monkeypatch):
    """Debian 12's rclone 1.60 fails every S3 call when AWS_CA_BUNDLE is exported (LoadCustomCABundleError): the
    offsite passes the bundle as rclone's --ca-cert instead."""
    monkeypatch.setenv("AWS_CA_BUNDLE", certifi.where())
    offsite, _ = s3_remote(s3)
    send(offsite, pi5, PLAIN[:1])
    assert [e.name for e in offsite.listing()] == PLAIN[:1]
