"""crypto: age encryption of a dump with a manifest in clear, decryption, and the errors an operator can act on."""

import json
import os
import subprocess

import pytest

from kwbackup import crypto, dumps, settings
from kwbackup.errors import Failed, UsageError, VerificationError
from tests import world

NAME = "db-2024-03-10.sql.gz"


@pytest.fixture
def dump(tmp_path):
    source = tmp_path / "pi5"
    source.mkdir(mode=0o700)
    return world.synthetic_dump(source, NAME, rows=5000)


@pytest.fixture
def keys(tmp_path):
    return [world.age_key(tmp_path, f"key{n}.txt") for n in (1, 2)]


def encrypt(dump, keys, tmp_path):
    out = tmp_path / "outgoing"
    out.mkdir(mode=0o700, exist_ok=True)
    return out, crypto.encrypt(dump, dumps.read_manifest(dump), out, [public for _, public in keys])


def test_the_copy_and_its_manifest(dump, keys, tmp_path):
    out, manifest = encrypt(dump, keys, tmp_path)
    copy = out / (NAME + ".age")
    assert sorted(os.listdir(out)) == [NAME + ".age", NAME + ".age.json"]
    assert all((out / n).stat().st_mode & 0o777 == 0o600 for n in os.listdir(out))
    written = json.loads((out / (NAME + ".age.json")).read_text())
    plain = dumps.read_manifest(dump)
    assert (written["file"], written["bytes"]) == (NAME + ".age", copy.stat().st_size)
    assert written["sha256"] == dumps.verify_file(copy, whole=False).sha256 == manifest.sha256
    assert written["encryption"] == {
        "method": "age",
        "recipients": [public for _, public in keys],
        "plain_file": NAME,
        "plain_bytes": plain.bytes,
        "plain_sha256": plain.sha256,
    }
    assert written["tables"] == plain.tables
    assert "AGE-SECRET-KEY" not in (out / (NAME + ".age.json")).read_text()
    for identity, _ in keys:  # every recipient can read it, with age alone
        decrypted = subprocess.run(["age", "-d", "-i", str(identity), str(copy)], capture_output=True, check=True)
        assert decrypted.stdout == dump.read_bytes()


def test_a_source_changed_since_its_manifest_is_not_encrypted(dump, keys, tmp_path):
    data = bytearray(dump.read_bytes())
    data[100] ^= 0x01
    dump.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="no longer matches its manifest"):
        encrypt(dump, keys, tmp_path)
    assert os.listdir(tmp_path / "outgoing") == []  # nothing under a final name, no temporary file


def test_decrypt_file_gives_the_dump_and_its_plain_manifest(dump, keys, tmp_path):
    out, _ = encrypt(dump, keys, tmp_path)
    target = tmp_path / "work"
    target.mkdir()
    path = crypto.decrypt_file(out / (NAME + ".age"), str(keys[1][0]), target)
    assert path == target / NAME and path.read_bytes() == dump.read_bytes()
    assert dumps.read_manifest(path) == dumps.read_manifest(dump)
    assert dumps.verify_file(path).status == "verified"


def test_the_wrong_key_and_a_broken_key_file(dump, keys, tmp_path):
    out, _ = encrypt(dump, keys[:1], tmp_path)
    (tmp_path / "work").mkdir()
    with pytest.raises(Failed) as wrong:
        crypto.decrypt_file(out / (NAME + ".age"), str(keys[1][0]), tmp_path / "work")
    assert wrong.value.exit_status == 1 and "not one of the dump's recipients" in wrong.value.line()
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("not a key\n")
    with pytest.raises(UsageError, match="not a usable age identity"):
        crypto.decrypt_file(out / (NAME + ".age"), str(garbage), tmp_path / "work")
    assert os.listdir(tmp_path / "work") == []


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "not age"])
def test_a_damaged_copy_is_a_verification_error(dump, keys, tmp_path, damage):
    out, _ = encrypt(dump, keys, tmp_path)
    copy = out / (NAME + ".age")
    data = bytearray(copy.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "bit flip":
        data[len(data) // 2] ^= 0x40
    else:
        data = bytearray(b"plain text, not age\n")
    copy.write_bytes(bytes(data))
    (tmp_path / "work").mkdir()
    with pytest.raises(VerificationError) as caught:
        crypto.decrypt_file(copy, str(keys[0][0]), tmp_path / "work")
    assert caught.value.exit_status == 3 and "damaged or incomplete" in caught.value.line()
    assert os.listdir(tmp_path / "work") == []
    with pytest.raises(VerificationError):  # without the key: its size or sha256 against the manifest
        crypto.verify(copy, None)


def test_verify_with_and_without_the_key(dump, keys, tmp_path):
    out, _ = encrypt(dump, keys, tmp_path)
    copy = out / (NAME + ".age")
    quick = crypto.verify(copy, None)
    whole = crypto.verify(copy, str(keys[0][0]))
    assert quick.status == whole.status == "verified"
    assert whole.tables == dumps.read_manifest(dump).tables
    # A copy that decrypts, but to other bytes than its manifest's plain dump, is caught with the key.
    manifest = json.loads((out / (NAME + ".age.json")).read_text())
    manifest["encryption"]["plain_sha256"] = "0" * 64
    (out / (NAME + ".age.json")).write_text(json.dumps(manifest))
    assert crypto.verify(copy, None).status == "verified"
    with pytest.raises(VerificationError, match="sha256 differs"):
        crypto.verify(copy, str(keys[0][0]))
    (out / (NAME + ".age.json")).unlink()
    with pytest.raises(Failed, match="without a manifest"):
        crypto.verify(copy, None)


def test_identity_setting(tmp_path, keys, caplog):
    unset = settings.load(environ={}, env_file=str(world.write_env(tmp_path / "a.env", {})))
    with pytest.raises(UsageError, match="set AGE_IDENTITY_FILE"):
        crypto.identity(unset, NAME + ".age")
    missing = settings.load(environ={"AGE_IDENTITY_FILE": str(tmp_path / "nope.txt")}, env_file=str(tmp_path / "a.env"))
    with pytest.raises(UsageError, match="No such file"):
        crypto.identity(missing, NAME + ".age")
    loose = keys[0][0]
    loose.chmod(0o644)
    given = settings.load(environ={"AGE_IDENTITY_FILE": str(loose)}, env_file=str(tmp_path / "a.env"))
    assert crypto.identity(given, NAME + ".age") == str(loose)
    assert "can be read by others" in caplog.text
