"""bin/backup-orchestrator with AGE_RECIPIENTS and OFFSITE_REMOTE (issue 8), and list-backups reading the offsite.

Real age, rclone and rsync; prod and the nas over the real sshd places (`net`, the orchestrator run
as the Pi's unprivileged user), the offsite as an S3 bucket on moto's S3 server (rclone's `s3` remote),
as a local directory, or as rclone's sftp remote on the loopback sshd (without checksums: read back; and
for a link dropped mid-upload); alerts go to a real local HTTP server (world.Recorder) through Apprise's
json:// URL.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests import world

NAME = "db-2024-03-10.sql.gz"
AGE = NAME + ".age"


@pytest.fixture
def recorder():
    server = world.Recorder()
    yield server
    server.close()


@pytest.fixture
def key(tmp_path):
    """An age identity and its public key; the tests hold the identity, the pi5 only the public key."""
    return world.age_key(tmp_path)


def run(kw, script="backup-orchestrator", *args):
    return kw.run(script, *args, timeout=180)


def finals(place):
    """Dump and manifest files under their final names: in a directory, or at a remote (world.Bucket)."""
    if isinstance(place, world.Bucket):
        return [n for n in place.files() if n.startswith("db-")]
    return sorted(n for n in os.listdir(place) if n.startswith("db-")) if place.exists() else []


def with_manifests(*dumps):
    return sorted(n for d in dumps for n in (d, d + ".json"))


def summary(kw):
    lines = [line for line in (kw.tmp / "orchestrator.log").read_text().splitlines() if "summary:" in line]
    return lines[-1]


def local_offsite(kw):
    directory = kw.tmp / "offsite"  # not made beforehand: what rclone creates must be private
    kw.settings["OFFSITE_REMOTE"] = str(directory)
    return directory


def sftp_offsite(kw, **options):
    directory = kw.tmp / "sftp-offsite"
    config = kw.ssh.rclone_config(kw.tmp / "rclone.conf", **options)
    kw.settings.update(OFFSITE_REMOTE=f"offsite:{directory}", RCLONE_CONFIG=str(config))
    return directory


def s3_offsite(kw, s3):
    """OFFSITE_REMOTE a path in the test's versioned bucket on moto's S3 server; the test's view of it."""
    offsite = s3.at("kw-app")
    kw.settings.update(OFFSITE_REMOTE=offsite.remote, RCLONE_CONFIG=str(s3.config))
    return offsite


def decrypt(copy, identity):
    """The plain bytes of an encrypted copy: a file, or the bytes read from a remote."""
    path = copy if isinstance(copy, Path) else None
    return subprocess.run(
        ["age", "-d", "-i", str(identity), *([str(path)] if path else [])],
        input=None if path else copy,
        capture_output=True,
        check=True,
    ).stdout


def no_plain_dump_at(offsite):
    """Not one byte of a plain dump at a remote (.incoming/ too)."""
    for name, data in offsite.contents().items():
        assert not re.search(r"\.sql\.gz(\.json)?$", name) and data[:2] != b"\x1f\x8b", name


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def files_under(directory):
    return [os.path.join(top, name) for top, _, names in os.walk(directory) for name in names]


def no_plain_dump_in(directory):
    """Not one byte of a plain dump: no plain name, no gzip stream, anywhere under the place (.incoming too)."""
    for path in files_under(directory):
        assert not re.search(r"\.sql\.gz(\.json)?$", path), path
        with open(path, "rb") as f:
            assert f.read(2) != b"\x1f\x8b", f"{path} is a plain gzip dump"


def stamps(directory):
    """Each file's inode and mtime: a file sent again gets new ones."""
    return {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in files_under(directory)}


def contents(directory):
    return {p: open(p, "rb").read() for p in files_under(directory)}


def encrypted_copy(source, directory, public):
    """`source` encrypted by hand with age into `directory`, with the manifest the orchestrator would write."""
    target = directory / (source.name + ".age")
    subprocess.run(["age", "-r", public, "-o", str(target), str(source)], check=True)
    plain = json.loads((source.parent / (source.name + ".json")).read_text())
    data = target.read_bytes()
    (directory / (target.name + ".json")).write_text(
        json.dumps(
            {
                **plain,
                "file": target.name,
                "bytes": len(data),
                "sha256": sha256(data),
                "encryption": {
                    "method": "age",
                    "recipients": [public],
                    "plain_file": source.name,
                    "plain_bytes": plain["bytes"],
                    "plain_sha256": plain["sha256"],
                },
            }
        )
    )
    for path in (target, directory / (target.name + ".json")):
        path.chmod(0o600)
    return target


# --- encryption ------------------------------------------------------------------------------------


def test_only_encrypted_copies_leave_the_pi5_and_decrypt_to_its_bytes(net, key, tmp_path):
    identity, public = key
    spare, spare_public = world.age_key(tmp_path, "spare.txt")
    net.settings["AGE_RECIPIENTS"] = f"{public} {spare_public}"
    offsite = local_offsite(net)
    world.synthetic_dump(net.prod_dir, NAME, rows=20000, random_bytes=True)
    result = run(net)
    assert result.returncode == 0, result.stderr

    assert finals(net.pi5_dir) == with_manifests(NAME)  # the pi5 keeps its plain copy
    plain = (net.pi5_dir / NAME).read_bytes()
    assert plain == (net.prod_dir / NAME).read_bytes()
    for place in (net.nas_dir, offsite):
        assert finals(place) == with_manifests(AGE), place
        no_plain_dump_in(place)
        for top, _, names in os.walk(place):  # .incoming included
            assert os.stat(top).st_mode & 0o777 == 0o700, top
            for name in names:
                assert os.stat(os.path.join(top, name)).st_mode & 0o777 == 0o600, os.path.join(top, name)
        for who in (identity, spare):  # either recipient decrypts it, to exactly the pi5's bytes
            assert decrypt(place / AGE, who) == plain
        text = (place / (AGE + ".json")).read_text()
        assert "AGE-SECRET-KEY" not in text.upper()
        manifest = json.loads(text)
        copy = (place / AGE).read_bytes()
        assert (manifest["file"], manifest["bytes"], manifest["sha256"]) == (AGE, len(copy), sha256(copy))
        assert manifest["encryption"]["recipients"] == [public, spare_public]
        assert manifest["encryption"]["plain_sha256"] == sha256(plain)
        assert manifest["tables"] == json.loads((net.pi5_dir / (NAME + ".json")).read_text())["tables"]
    assert (net.nas_dir / AGE).read_bytes() == (offsite / AGE).read_bytes()  # encrypted once, sent twice
    assert result.stderr.count(f"encrypted {NAME}") == 1
    assert not (net.pi5_dir / ".outgoing").exists()
    assert "AGE-SECRET-KEY" not in (net.tmp / "orchestrator.log").read_text()
    assert re.search(r"offsite=ok offsite_push=[\d.]+s result=ok$", summary(net))
    # verify-backup with the key checks the copy whole: it decrypts to the dump backup-db made
    checked = net.run("verify-backup", str(offsite / AGE), env=net.env(AGE_IDENTITY_FILE=str(identity)))
    assert checked.returncode == 0, checked.stderr


def test_a_second_run_the_same_night_encrypts_and_sends_nothing(net, key, s3):
    net.settings["AGE_RECIPIENTS"] = key[1]
    offsite = s3_offsite(net, s3)
    world.synthetic_dump(net.prod_dir, NAME)
    assert run(net).returncode == 0
    before = stamps(net.nas_dir), offsite.versions()  # the bucket is versioned: a file sent again adds a version
    again = run(net)
    assert again.returncode == 0, again.stderr
    assert "the nas has every verified dump already" in again.stderr
    assert "offsite has every verified dump already" in again.stderr
    assert "encrypted" not in again.stderr
    assert (stamps(net.nas_dir), offsite.versions()) == before
    assert "pushed=0" in summary(net) and "offsite=ok" in summary(net)


# --- the offsite remote ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, rows, checked_by",
    [
        ("s3", 20000, "md5"),  # one part: S3's own md5 (the ETag)
        ("s3", 200000, "md5 (1 read back)"),  # ~12 MB in parts of 5 MiB: S3 has no md5 of it, so it is read back
        ("sftp-without-checksums", 20000, "sha256 (read back)"),  # no checksum offered: read back
    ],
    ids=["s3", "s3-multipart", "sftp-without-checksums"],
)
def test_a_remote_offsite_gets_checked_encrypted_copies(net, key, s3, kind, rows, checked_by):
    identity, public = key
    net.settings["AGE_RECIPIENTS"] = public
    offsite = s3_offsite(net, s3) if kind == "s3" else world.Directory(sftp_offsite(net, hashcheck=False))
    world.synthetic_dump(net.prod_dir, NAME, rows=rows, random_bytes=True)
    result = run(net)
    assert result.returncode == 0, result.stderr
    assert [n for n in offsite.files() if n.startswith("db-")] == with_manifests(AGE)
    no_plain_dump_at(offsite)
    copy = offsite.read(AGE)
    assert decrypt(copy, identity) == (net.pi5_dir / NAME).read_bytes()
    assert json.loads(offsite.read(AGE + ".json"))["bytes"] == len(copy)
    assert f"pushed {AGE} offsite and checked their {checked_by} in " in result.stderr, result.stderr
    assert offsite.files(".incoming") == []
    assert re.search(r"offsite=ok offsite_push=[\d.]+s result=ok$", summary(net))


def test_catch_up_pushes_every_missing_verified_dump_then_nothing(net, key, s3):
    net.settings["AGE_RECIPIENTS"] = key[1]
    offsite = s3_offsite(net, s3)
    older = ["db-2024-03-08.sql.gz", "db-2024-03-09.sql.gz"]
    for name in older:
        world.synthetic_dump(net.pi5_dir, name)
    world.synthetic_dump(net.pi5_dir, "db-2024-03-07.sql.gz", manifest=False)  # unverified: never sent
    world.synthetic_dump(net.prod_dir, NAME)
    first = run(net)
    assert first.returncode == 0, first.stderr
    expected = with_manifests(*(n + ".age" for n in [*older, NAME]))
    assert finals(offsite) == expected and finals(net.nas_dir) == expected
    for name in [*older, NAME]:
        assert decrypt(offsite.read(name + ".age"), key[0]) == (net.pi5_dir / name).read_bytes()

    before = offsite.versions()
    second = run(net)
    assert second.returncode == 0, second.stderr
    assert "offsite has every verified dump already" in second.stderr
    assert "encrypted" not in second.stderr
    assert offsite.versions() == before


@pytest.mark.parametrize("place", ["offsite", "nas"])
def test_a_dump_rotated_away_at_a_place_is_not_pushed_there_again(net, key, place):
    """A place keeping fewer dumps than the pi5: the pi5 still holds one the place has removed by its rule.
    Sending it again every night, only for rotation to delete it again, costs an upload a night, forever."""
    net.settings.update(AGE_RECIPIENTS=key[1], PI5_KEEP="3", **{f"{place.upper()}_KEEP": "1"})
    offsite = local_offsite(net)
    world.synthetic_dump(net.pi5_dir, "db-2024-03-09.sql.gz")
    world.synthetic_dump(net.prod_dir, NAME)
    first = run(net)
    assert first.returncode == 0, first.stderr
    directory = offsite if place == "offsite" else net.nas_dir
    assert finals(directory) == with_manifests(AGE)
    before = stamps(directory)
    second = run(net)
    assert second.returncode == 0, second.stderr
    assert finals(directory) == with_manifests(AGE) and stamps(directory) == before
    assert f"{'the nas' if place == 'nas' else 'offsite'} has every verified dump already" in second.stderr, (
        second.stderr
    )
    assert "encrypted" not in second.stderr, second.stderr


# --- the offsite down ------------------------------------------------------------------------------


def monitored(kw, recorder):
    kw.settings["NOTIFY_URLS"] = f"json://{recorder.url[7:]}/notify"


def notes(recorder):
    return [json.loads(r["body"]) for r in recorder.requests if r["path"].startswith("/notify")]


@pytest.mark.parametrize("how", ["unreachable", "not-in-config"])
def test_offsite_down_the_run_succeeds_alerts_and_the_next_run_catches_up(net, key, recorder, s3, s3_server, how):
    monitored(net, recorder)
    net.settings["AGE_RECIPIENTS"] = key[1]
    offsite = s3.at("kw-app")
    config = net.tmp / "rclone.conf"
    if how == "unreachable":
        s3_server.rclone_config(config, endpoint=f"http://127.0.0.9:{s3_server.port}")  # nothing listens there
    else:
        s3_server.rclone_config(config, name="elsewhere")
    net.settings.update(OFFSITE_REMOTE=offsite.remote, RCLONE_CONFIG=str(config))
    days = ["db-2024-03-06.sql.gz", "db-2024-03-07.sql.gz", "db-2024-03-08.sql.gz", "db-2024-03-09.sql.gz"]
    for name in days:
        world.synthetic_dump(net.pi5_dir, name)
    world.synthetic_dump(net.prod_dir, NAME)

    down = run(net)
    assert down.returncode == 0, down.stderr
    kept = ["db-2024-03-08.sql.gz", "db-2024-03-09.sql.gz", NAME]
    assert finals(net.pi5_dir) == with_manifests(*kept)  # the pi5 rotated as every night
    assert finals(net.nas_dir) == with_manifests(*(n + ".age" for n in kept))  # the nas fully done
    for name in kept:
        assert decrypt(net.nas_dir / (name + ".age"), key[0]) == (net.pi5_dir / name).read_bytes()
    assert finals(offsite) == []
    assert not (net.pi5_dir / ".outgoing").exists()
    line = summary(net)
    assert "offsite=failed" in line and "result=ok-with-warnings" in line, line
    assert not [x for x in down.stderr.splitlines() if "error:" in x], down.stderr
    alerts = notes(recorder)
    assert len(alerts) == 1, alerts
    assert "warning" in alerts[0]["title"].lower()
    assert "offsite copy failed" in alerts[0]["message"] and offsite.remote in alerts[0]["message"]

    s3_server.rclone_config(config)  # the offsite is back
    up = run(net)
    assert up.returncode == 0, up.stderr
    assert "nothing to pull" in up.stderr
    assert finals(offsite) == with_manifests(*(n + ".age" for n in kept))
    for name in kept:
        assert decrypt(offsite.read(name + ".age"), key[0]) == (net.pi5_dir / name).read_bytes()
    assert re.search(r"offsite=ok offsite_push=[\d.]+s result=ok$", summary(net))
    assert len(notes(recorder)) == 1  # no new alert


# --- rotation at the offsite -----------------------------------------------------------------------


def test_offsite_rotation_keeps_its_newest_and_one_dump_per_month(net, key, s3):
    net.settings.update(AGE_RECIPIENTS=key[1], OFFSITE_KEEP="2", OFFSITE_KEEP_MONTHLY="3")
    offsite = s3_offsite(net, s3)
    for day in ("2024-01-10", "2024-01-25", "2024-02-05", "2024-02-20", "2024-03-02", "2024-03-09"):
        world.synthetic_dump(net.pi5_dir, f"db-{day}.sql.gz")
    world.synthetic_dump(net.prod_dir, NAME)
    first = run(net)
    assert first.returncode == 0, first.stderr
    # the 2 newest, and the newest of each of the last 3 months
    assert finals(offsite) == with_manifests(
        *(f"db-{d}.sql.gz.age" for d in ("2024-01-25", "2024-02-20", "2024-03-09", "2024-03-10"))
    )
    assert finals(net.nas_dir) == with_manifests(
        *(f"db-{d}.sql.gz.age" for d in ("2024-03-02", "2024-03-09", "2024-03-10"))
    )
    assert finals(net.pi5_dir) == with_manifests(
        *(f"db-{d}.sql.gz" for d in ("2024-03-02", "2024-03-09", "2024-03-10"))
    )

    world.synthetic_dump(net.prod_dir, "db-2024-04-01.sql.gz")  # a new month
    second = run(net)
    assert second.returncode == 0, second.stderr
    assert finals(offsite) == with_manifests(
        *(f"db-{d}.sql.gz.age" for d in ("2024-02-20", "2024-03-10", "2024-04-01"))
    )
    assert "offsite=ok" in summary(net)


@pytest.fixture
def offsite_with_two_good_dumps(net, key):
    """OFFSITE_KEEP=2 and an offsite that holds 03-09 and 03-10, encrypted, after one run."""
    net.settings.update(AGE_RECIPIENTS=key[1], OFFSITE_KEEP="2")
    offsite = local_offsite(net)
    world.synthetic_dump(net.pi5_dir, "db-2024-03-09.sql.gz")
    world.synthetic_dump(net.prod_dir, NAME)
    assert run(net).returncode == 0
    assert finals(offsite) == with_manifests("db-2024-03-09.sql.gz.age", AGE)
    return offsite


def plant(offsite, how):
    """A "newer" db-2099 dump at the offsite that is not valid: a wrong manifest, or none."""
    good = (offsite / AGE).read_bytes()
    manifest = json.loads((offsite / (AGE + ".json")).read_text())
    target = offsite / "db-2099-01-01.sql.gz.age"
    target.write_bytes(good)
    if how == "size-mismatch":
        target.write_bytes(good[:-100])
        (offsite / (target.name + ".json")).write_text(json.dumps({**manifest, "file": target.name}))
    elif how == "unreadable-manifest":
        (offsite / (target.name + ".json")).write_text("{not json")
    elif how == "manifest-of-another-dump":  # a renamed copy: its manifest names the dump it really is
        (offsite / (target.name + ".json")).write_text(json.dumps(manifest))
    else:
        assert how == "no-manifest"


@pytest.mark.parametrize("how", ["size-mismatch", "no-manifest", "unreadable-manifest", "manifest-of-another-dump"])
def test_invalid_newer_dumps_at_the_offsite_never_push_good_ones_out(net, offsite_with_two_good_dumps, how):
    offsite = offsite_with_two_good_dumps
    plant(offsite, how)
    (offsite / "notes.txt").write_text("mine")
    (offsite / "db-2024-01-01.sql.gz.age.partial").write_text("someone else's")
    migration = world.synthetic_dump(offsite, "kw_app_production-20240101-000000.sql.gz")
    (offsite / "archive").mkdir(mode=0o700)
    world.synthetic_dump(offsite / "archive", "db-2024-01-01.sql.gz")
    foreign = {p: data for p, data in contents(offsite).items() if "db-2024-03" not in p}
    assert str(migration) in foreign and len(foreign) >= 6

    world.synthetic_dump(net.prod_dir, "db-2024-03-11.sql.gz")
    result = run(net)
    assert result.returncode == 0, result.stderr
    good = [n for n in finals(offsite) if n.startswith("db-2024-03")]
    assert good == with_manifests(AGE, "db-2024-03-11.sql.gz.age"), finals(offsite)  # the 2 newest valid ones
    assert {p: data for p, data in contents(offsite).items() if "db-2024-03" not in p} == foreign
    assert "offsite=ok" in summary(net)


def test_a_damaged_copy_at_the_offsite_is_never_replaced_and_leftovers_are_never_promoted(
    net, offsite_with_two_good_dumps, key
):
    offsite = offsite_with_two_good_dumps
    data = (offsite / AGE).read_bytes()
    (offsite / AGE).write_bytes(data[: len(data) // 2])  # cut short: its manifest no longer matches
    # what an interrupted upload left: a copy of the same size, damaged, with its manifest
    (offsite / ".incoming" / AGE).write_bytes(bytes(b ^ 0xFF for b in data))
    shutil.copy(offsite / (AGE + ".json"), offsite / ".incoming" / (AGE + ".json"))
    result = run(net)
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"offsite already holds {NAME} with other bytes" in errors[0]
    assert (offsite / AGE).read_bytes() == data[: len(data) // 2]  # byte for byte as it was
    assert finals(offsite) == with_manifests("db-2024-03-09.sql.gz.age", AGE)

    (offsite / AGE).unlink()  # the operator removes the damaged copy: the next run sends a good one
    again = run(net)
    assert again.returncode == 0, again.stderr
    assert decrypt(offsite / AGE, key[0]) == (net.pi5_dir / NAME).read_bytes()
    assert finals(offsite) == with_manifests("db-2024-03-09.sql.gz.age", AGE)
    assert os.listdir(offsite / ".incoming") == []


# --- switching encryption on -----------------------------------------------------------------------


def test_switching_encryption_on_sends_nothing_twice_and_removes_nothing_good(net, key):
    offsite = local_offsite(net)
    days = ["db-2024-03-08.sql.gz", "db-2024-03-09.sql.gz"]
    for name in days:
        world.synthetic_dump(net.pi5_dir, name)
    world.synthetic_dump(net.prod_dir, NAME)
    plain = run(net)  # encryption off: plain copies everywhere
    assert plain.returncode == 0, plain.stderr
    for place in (net.nas_dir, offsite):
        assert finals(place) == with_manifests(*days, NAME)
    # someone already encrypted the newest one by hand at both places: a plain and an .age copy count once
    for place in (net.nas_dir, offsite):
        encrypted_copy(place / NAME, place, key[1])
    before = {p: s for place in (net.nas_dir, offsite) for p, s in stamps(place).items()}

    net.settings["AGE_RECIPIENTS"] = key[1]
    world.synthetic_dump(net.prod_dir, "db-2024-03-11.sql.gz")
    result = run(net)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("encrypted ") == 1  # the new dump only
    for place in (net.nas_dir, offsite):
        # KEEP 3 distinct dumps: 03-08 goes, 03-09 stays (it would go if 03-10's two copies counted twice)
        assert finals(place) == with_manifests("db-2024-03-09.sql.gz", NAME, AGE, "db-2024-03-11.sql.gz.age"), place
        assert not (place / "db-2024-03-09.sql.gz.age").exists()
        new = "db-2024-03-11.sql.gz"
        assert decrypt(place / (new + ".age"), key[0]) == (net.pi5_dir / new).read_bytes()
        for path in files_under(place):
            if "03-08" not in path and "03-11" not in path and ".incoming" not in path:
                assert stamps(place)[path] == before[path], f"{path} was sent again"
    assert "pushed=1" in summary(net) and re.search(r"offsite=ok offsite_push=[\d.]+s result=ok$", summary(net))

    again = run(net)
    assert again.returncode == 0, again.stderr
    assert "the nas has every verified dump already" in again.stderr
    assert "offsite has every verified dump already" in again.stderr


# --- bad settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting,value",
    [
        ("AGE_RECIPIENTS", "age1notakey"),
        ("AGE_RECIPIENTS", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"),
        ("OFFSITE_REMOTE", ":sftp,host=offsite.example,pass=x:dir"),
        ("OFFSITE_REMOTE", "relative/dir"),
        ("OFFSITE_REMOTE", "--config=/etc/passwd:x"),
        ("OFFSITE_KEEP", "0"),
        ("OFFSITE_KEEP_MONTHLY", "-1"),
    ],
)
def test_a_bad_setting_exits_2_naming_it_and_touches_nothing(net, key, setting, value):
    net.settings.update(AGE_RECIPIENTS=key[1], OFFSITE_REMOTE=str(net.tmp / "offsite"))
    net.settings[setting] = value
    world.synthetic_dump(net.prod_dir, NAME)
    prod_before = contents(net.prod_dir)
    result = run(net)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and setting in errors[0], result.stderr
    for untouched in (net.pi5_dir, net.nas_dir, net.tmp / "offsite"):
        assert not untouched.exists(), untouched
    assert contents(net.prod_dir) == prod_before


@pytest.mark.parametrize(
    "setting,value,secret",
    [
        ("OFFSITE_REMOTE", ":sftp,host=offsite.example,pass=Hunter2Hunter2:dir", "Hunter2Hunter2"),
        ("AGE_RECIPIENTS", None, "AGE-SECRET-KEY-"),  # the identity pasted instead of its public key
    ],
)
def test_a_refused_setting_does_not_echo_the_secret_in_it(net, key, setting, value, secret):
    """The message says such values carry passwords: printing them to stderr (cron mail, the journal) leaks them."""
    if value is None:
        value = next(line for line in key[0].read_text().splitlines() if line.startswith("AGE-SECRET-KEY-"))
    net.settings[setting] = value
    world.synthetic_dump(net.prod_dir, NAME)
    result = run(net)
    assert result.returncode == 2 and setting in result.stderr, result.stderr
    assert secret not in result.stdout + result.stderr, result.stderr


# --- dry run ---------------------------------------------------------------------------------------


def test_dry_run_names_the_encrypted_copies_it_would_send_offsite_and_changes_nothing(net, key, s3):
    net.settings["AGE_RECIPIENTS"] = key[1]
    offsite = s3_offsite(net, s3)
    world.synthetic_dump(net.prod_dir, NAME)
    result = run(net, "backup-orchestrator", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would encrypt what it sends for 1 age recipient(s)" in result.stderr
    assert f"would push {AGE} to offsite" in result.stderr and f"would push {AGE} to nas" in result.stderr
    assert not net.pi5_dir.exists() and not net.nas_dir.exists() and not offsite.exists()


# --- list-backups ----------------------------------------------------------------------------------


LINE = re.compile(
    r"  (?P<name>\S+) {2,}\S+ {2,}\d{4}-\d{2}-\d{2} \d{2}:\d{2}  (?P<status>verified|unverified|"
    r"SIZE MISMATCH)"
)


def listed(lines):
    return [(m["name"], m["status"]) for line in lines if (m := LINE.fullmatch(line))]


@pytest.fixture
def backed_up(net, key, s3):
    """One encrypted run to an S3 offsite; plus an .age copy there that no longer matches its manifest."""
    net.settings["AGE_RECIPIENTS"] = key[1]
    offsite = s3_offsite(net, s3)
    world.synthetic_dump(net.pi5_dir, "db-2024-03-09.sql.gz")
    world.synthetic_dump(net.prod_dir, NAME)
    assert run(net).returncode == 0
    offsite.write("db-2024-03-09.sql.gz.age", offsite.read("db-2024-03-09.sql.gz.age") + b"\0" * 10)
    offsite.write("db-2024-03-01.sql.gz.age", offsite.read(AGE))  # no manifest
    return offsite


def test_list_backups_shows_the_offsite_block_with_its_encrypted_dumps(net, backed_up):
    offsite = backed_up
    result = run(net, "list-backups")
    assert result.returncode == 0, result.stderr
    found = world.listing_blocks(result.stdout)
    heading = f"Offsite ({offsite.remote}/):"
    assert heading in found, result.stdout
    assert listed(found[heading]) == [
        (AGE, "verified"),
        ("db-2024-03-09.sql.gz.age", "SIZE MISMATCH"),
        ("db-2024-03-01.sql.gz.age", "unverified"),
    ], result.stdout
    nas = next(lines for h, lines in found.items() if h.endswith(f"(nas:{net.nas_dir}/):"))
    assert listed(nas) == [(AGE, "verified"), ("db-2024-03-09.sql.gz.age", "verified")]
    assert len(found) == 4  # prod, pi5, nas, offsite

    only = run(net, "list-backups", "--only", "offsite")
    assert only.returncode == 0, only.stderr
    assert list(world.listing_blocks(only.stdout)) == [heading]

    as_json = run(net, "list-backups", "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = [row for row in json.loads(as_json.stdout) if row["place"] == "offsite"]
    manifest = json.loads(offsite.read(AGE + ".json"))
    assert rows[0] == {
        "place": "offsite",
        "host": "offsite",
        "dir": offsite.remote.split(":", 1)[1],
        "name": AGE,
        "bytes": len(offsite.read(AGE)),
        "created_at": manifest["created_at"],
        "sha256": manifest["sha256"],
        "status": "verified",
        "pinned": False,
    }
    assert [r["name"] for r in rows] == [AGE, "db-2024-03-09.sql.gz.age", "db-2024-03-01.sql.gz.age"]

    only_json = run(net, "list-backups", "--json", "--only", "offsite")
    assert {row["place"] for row in json.loads(only_json.stdout)} == {"offsite"}


def test_list_backups_a_local_directory_offsite(net, key):
    net.settings["AGE_RECIPIENTS"] = key[1]
    offsite = local_offsite(net)
    world.synthetic_dump(net.prod_dir, NAME)
    assert run(net).returncode == 0
    result = run(net, "list-backups", "--only", "offsite", "nas")
    assert result.returncode == 0, result.stderr
    found = world.listing_blocks(result.stdout)
    assert listed(found[f"Offsite ({offsite}/):"]) == [(AGE, "verified")], result.stdout


def test_list_backups_with_the_offsite_unreachable_lists_the_others_and_exits_1(net, backed_up, s3_server):
    net.settings["RCLONE_CONFIG"] = str(
        s3_server.rclone_config(net.tmp / "rclone.conf", endpoint=f"http://127.0.0.9:{s3_server.port}")
    )
    result = run(net, "list-backups")
    assert result.returncode == 1, result.stdout + result.stderr
    found = world.listing_blocks(result.stdout)
    offsite = found[f"Offsite ({backed_up.remote}/):"]
    assert len(offsite) == 1 and offsite[0].startswith("  unreachable: "), offsite
    nas = next(lines for h, lines in found.items() if h.endswith(f"(nas:{net.nas_dir}/):"))
    assert listed(nas) == [(AGE, "verified"), ("db-2024-03-09.sql.gz.age", "verified")]
    assert len(found) == 4
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "offsite" in errors[0], result.stderr


def test_list_backups_only_offsite_without_a_remote_is_a_usage_error(net):
    result = run(net, "list-backups", "--only", "offsite")
    assert result.returncode == 2 and "OFFSITE_REMOTE" in result.stderr


def test_a_full_pi5_disk_while_encrypting_fails_cleanly(kw, key):
    """The pi5 holds its dump but has no room for the encrypted copy: one clear error, nothing partial anywhere."""
    world.synthetic_dump(kw.prod_dir, NAME, rows=12000, random_bytes=True)  # ~700 kB that does not compress
    dump_bytes = (kw.prod_dir / NAME).stat().st_size
    pi5 = kw.tmp / "pi5"
    pi5.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={dump_bytes * 3 // 2},mode=0700", "tmpfs", str(pi5)], check=True
    )
    try:
        kw.settings["AGE_RECIPIENTS"] = key[1]
        offsite = local_offsite(kw)
        result = run(kw)
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "encrypting" in errors[0] and "no space left" in errors[0], result.stderr
        assert "free space in PI5_DIR" in errors[0]
        assert finals(pi5) == with_manifests(NAME)  # the pulled dump stays, verified
        assert (pi5 / NAME).read_bytes() == (kw.prod_dir / NAME).read_bytes()
        assert not (pi5 / ".outgoing").exists() or os.listdir(pi5 / ".outgoing") == []
        assert finals(kw.tmp / "nas") == [] and finals(offsite) == []
        assert "result=failed" in summary(kw)
    finally:
        subprocess.run(["umount", str(pi5)], check=True)


class SlowLink:
    """A real TCP relay to the offsite sshd at `rate` bytes/s each way, whose connections can be cut (rclone's
    sftp backend speaks ssh itself, so an ssh ProxyCommand cannot slow it down)."""

    def __init__(self, target: tuple[str, int], rate: int):
        self.target, self.rate = target, rate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source, sink):
        started, moved = time.monotonic(), 0
        try:
            while data := source.recv(16384):
                sink.sendall(data)
                moved += len(data)
                time.sleep(max(0.0, moved / self.rate - (time.monotonic() - started)))
        except OSError:
            pass
        for end in (source, sink):
            end.close()

    def cut(self) -> int:
        """Close every connection open now: a dropped link mid-upload."""
        cut, self.open = self.open, []
        for end in cut:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()
        return len(cut)

    def close(self):
        self.server.close()
        self.cut()


def test_a_link_dropped_mid_upload_leaves_nothing_partial_offsite(net, key):
    world.synthetic_dump(net.prod_dir, NAME, rows=150000, random_bytes=True)  # ~9 MB at 3 MB/s
    sshd = net.ssh.places["offsite"]
    link = SlowLink((sshd.address, net.ssh.port), 3_000_000)
    directory = net.tmp / "sftp-offsite"
    config = net.ssh.rclone_config(net.tmp / "rclone.conf", address="127.0.0.1", port=link.port)
    net.settings.update(OFFSITE_REMOTE=f"offsite:{directory}", RCLONE_CONFIG=str(config))
    try:
        proc = net.popen("backup-orchestrator")
        partial = directory / ".incoming" / NAME
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 1_000_000):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.01)
        assert link.cut() > 0
        assert NAME not in os.listdir(directory)  # never a partial file under its final name
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err  # rclone's retries got it there, or the offsite leg only warned
        if finals(directory):
            assert "offsite=ok" in summary(net), err
        else:
            assert "offsite=failed" in summary(net), err
        again = run(net)
        assert again.returncode == 0, again.stderr
        assert finals(directory) == with_manifests(NAME)
        assert (directory / NAME).read_bytes() == (net.pi5_dir / NAME).read_bytes()
        assert files_under(directory / ".incoming") == []
    finally:
        link.close()
