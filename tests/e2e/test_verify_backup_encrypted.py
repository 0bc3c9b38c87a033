"""bin/verify-backup on an encrypted copy (.age) of a real backup-db dump: without AGE_IDENTITY_FILE (size and
sha256), with it (the content), with the wrong key, damaged, without its manifest, and --json."""

import json

import pytest

from kwbackup import crypto, dumps
from tests import world

ROWS = sum(world.RAILS_TABLE_ROWS.values())


@pytest.fixture
def dump(kw):
    made = kw.run("backup-db")
    assert made.returncode == 0, made.stderr
    return kw.prod_dir / made.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]


@pytest.fixture
def copy(kw, dump, tmp_path):
    """backup-db's dump encrypted as the pi5 does for the nas; kw.key is the identity that reads it."""
    (tmp_path / "keys").mkdir(mode=0o700)
    kw.key, public = world.age_key(tmp_path / "keys")
    nas = tmp_path / "nas"
    nas.mkdir(mode=0o700)
    crypto.encrypt(dump, dumps.read_manifest(dump), nas, [public])
    return nas / (dump.name + ".age")


def errors(result):
    """stderr's lines, each as the operator reads it."""
    return [line for line in result.stderr.splitlines() if line.strip()]


def damage(copy, how):
    data = bytearray(copy.read_bytes())
    if how == "bit flip":
        data[len(data) // 2] ^= 0x01
    elif how == "truncated":
        data = data[: len(data) * 2 // 3]
    else:  # one character of the wrapped file key in the recipient stanza: damage on disk, not another key
        body = data.index(b"\n", data.index(b"-> X25519 ")) + 1 + 5
        data[body] = ord("A") if data[body] != ord("A") else ord("B")
    copy.write_bytes(bytes(data))


def test_without_the_key_size_and_sha256_only(kw, copy):
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"OK {copy}: verified (encrypted; size and sha256 only: AGE_IDENTITY_FILE checks the content)"
    )
    assert f"{len(world.RAILS_TABLE_ROWS)} tables, {ROWS} rows" in result.stdout  # the manifest's counts


def test_with_the_key_the_content_is_checked(kw, copy):
    kw.settings["AGE_IDENTITY_FILE"] = str(kw.key)
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK {copy}: verified (encrypted; content checked)")
    assert f"{len(world.RAILS_TABLE_ROWS)} tables, {ROWS} rows" in result.stdout
    # --quick: the key is not used, and the output says so.
    quick = kw.run("verify-backup", "--quick", str(copy))
    assert quick.returncode == 0, quick.stderr
    assert quick.stdout.startswith(f"OK {copy}: verified (encrypted; size and sha256 only")


def test_the_wrong_key_exits_1_with_one_clear_line(kw, copy, tmp_path):
    kw.settings["AGE_IDENTITY_FILE"] = str(world.age_key(tmp_path / "keys", "other.txt")[0])
    before = copy.read_bytes()
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    said = [line for line in errors(result) if "AGE_IDENTITY_FILE cannot decrypt" in line]
    assert len(said) == 1 and "not one of the dump's recipients" in said[0] and copy.name in said[0]
    assert "Traceback" not in result.stderr and "filippo.io" not in result.stderr  # no age boilerplate
    assert "BAD" not in result.stderr  # a key problem is not a damaged copy
    assert copy.read_bytes() == before


@pytest.mark.parametrize(
    "how,key",
    [("bit flip", False), ("bit flip", True), ("truncated", False), ("truncated", True), ("recipient stanza", True)],
)
def test_a_damaged_copy_exits_3(kw, dump, copy, how, key):
    if key:
        kw.settings["AGE_IDENTITY_FILE"] = str(kw.key)
    damage(copy, how)
    result = kw.run("verify-backup", str(dump), str(copy))
    assert result.returncode == 3, result.stderr
    assert f"OK {dump}: verified" in result.stdout and str(copy) not in result.stdout
    assert any(line.startswith(f"verify-backup: BAD {copy}") for line in errors(result)), result.stderr
    assert "1 of 2 dumps failed verification" in errors(result)[-1] and str(copy) in errors(result)[-1]


def test_without_a_manifest(kw, copy):
    (copy.parent / (copy.name + ".json")).unlink()
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 1, result.stderr
    assert "without a manifest can only be checked with AGE_IDENTITY_FILE" in result.stderr
    assert result.stdout == ""
    # With the key it is decrypted and checked whole, and says it had no manifest to compare with.
    kw.settings["AGE_IDENTITY_FILE"] = str(kw.key)
    keyed = kw.run("verify-backup", str(copy))
    assert keyed.returncode == 0, keyed.stderr
    assert (
        keyed.stdout.startswith(f"OK {copy}: unverified (encrypted; content checked)")
        and f"{ROWS} rows" in keyed.stdout
    )


@pytest.mark.parametrize("key", [False, True])
def test_json_says_encrypted(kw, dump, copy, key):
    if key:
        kw.settings["AGE_IDENTITY_FILE"] = str(kw.key)
    result = kw.run("verify-backup", "--json", str(dump), str(copy))
    assert result.returncode == 0, result.stderr
    plain, encrypted = (json.loads(line) for line in result.stdout.splitlines())
    assert plain["encrypted"] is False and plain["path"] == str(dump)
    manifest = dumps.read_manifest(copy)
    assert encrypted["encrypted"] is True and encrypted["path"] == str(copy)
    assert (encrypted["status"], encrypted["bytes"], encrypted["sha256"]) == (
        "verified",
        copy.stat().st_size,
        manifest.sha256,
    )
    assert encrypted["tables"] == world.RAILS_TABLE_ROWS


@pytest.mark.parametrize("identity", ["missing", "garbage"])
def test_an_unusable_identity_file_is_a_configuration_error(kw, copy, tmp_path, identity):
    bad = tmp_path / "keys" / "bad.txt"
    if identity == "garbage":
        bad.write_text("not an age identity\n")
        bad.chmod(0o600)
    kw.settings["AGE_IDENTITY_FILE"] = str(bad)
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 2, result.stderr  # the contract: 2 for a usage or configuration error
    assert "AGE_IDENTITY_FILE" in result.stderr and "BAD" not in result.stderr
