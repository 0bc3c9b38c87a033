"""crypto with the real age binary: the encrypted copy and its manifest, decryption, verification, the identity
setting, and the error (and exit status) each way of failing gives the operator."""

import hashlib
import json
import logging
import os
import subprocess

import pytest

from kwbackup import crypto, dumps, settings
from kwbackup.errors import Failed, UsageError, VerificationError
from kwbackup.log import log
from tests import world

NAME = "db-2024-05-01.sql.gz"
AGE = NAME + ".age"
ROWS = 3000


@pytest.fixture
def source(tmp_path):
    """The pi5's plain dump with its manifest."""
    return world.synthetic_dump(tmp_path / "pi5", NAME, rows=ROWS)


@pytest.fixture
def keys(tmp_path):
    """Two identities (the operator's and the spare), each (identity file, public key)."""
    (tmp_path / "keys").mkdir(mode=0o700)
    return [world.age_key(tmp_path / "keys", f"key{n}.txt") for n in (1, 2)]


@pytest.fixture
def work(tmp_path):
    directory = tmp_path / "work"
    directory.mkdir(mode=0o700)
    return directory


def load(tmp_path, **values):
    """Settings from `values` alone: no environment, an empty env file (never a stray .env or /etc one)."""
    env_file = tmp_path / "empty.env"
    env_file.touch()
    return settings.load(overrides=values, env_file=str(env_file), environ={})


def encrypt(source, publics, tmp_path):
    """`source` encrypted into tmp_path/outgoing, as the orchestrator does for the nas and offsite."""
    out = tmp_path / "outgoing"
    out.mkdir(mode=0o700, exist_ok=True)
    crypto.encrypt(source, dumps.read_manifest(source), out, publics)
    return out / AGE


def edit_manifest(copy, change):
    path = copy.parent / (copy.name + ".json")
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def describe(path):
    """Rewrite path's manifest for its bytes as they are now: a dump its manifest agrees with, whatever is inside."""
    data = path.read_bytes()
    manifest = dumps.read_manifest(path)
    manifest.bytes, manifest.sha256 = len(data), hashlib.sha256(data).hexdigest()
    (path.parent / (path.name + ".json")).write_bytes(manifest.to_json())


# --- encrypting --------------------------------------------------------------------------------------


def test_the_copy_and_its_manifest_for_two_recipients(source, keys, tmp_path):
    publics = crypto.recipients(load(tmp_path, AGE_RECIPIENTS=" ".join(public for _, public in keys)))
    copy = encrypt(source, publics, tmp_path)
    assert sorted(os.listdir(copy.parent)) == [AGE, AGE + ".json"]  # no temporary file left beside them
    assert all((copy.parent / n).stat().st_mode & 0o777 == 0o600 for n in os.listdir(copy.parent))
    assert copy.read_bytes().startswith(b"age-encryption.org/v1\n")

    text = (copy.parent / (AGE + ".json")).read_text()
    written, plain = json.loads(text), dumps.read_manifest(source)
    data = copy.read_bytes()
    assert (written["file"], written["bytes"]) == (AGE, len(data))
    assert written["sha256"] == dumps.verify_file(copy, whole=False).sha256
    assert written["encryption"] == {
        "method": "age",
        "recipients": [public for _, public in keys],
        "plain_file": NAME,
        "plain_bytes": source.stat().st_size,
        "plain_sha256": plain.sha256,
    }
    assert all(key.startswith("age1") for key in written["encryption"]["recipients"])
    # Everything else about the dump is carried over: list-backups shows it without the key.
    assert (written["tables"], written["database"], written["created_at"]) == (
        plain.tables,
        plain.database,
        plain.created_at,
    )
    assert "AGE-SECRET-KEY" not in text.upper()
    assert dumps.read_manifest(copy).plain() == plain

    for identity, _ in keys:  # either recipient reads it with age alone, as in a disaster
        decrypted = subprocess.run(
            ["age", "--decrypt", "-i", str(identity), str(copy)], capture_output=True, check=True
        )
        assert decrypted.stdout == source.read_bytes()


@pytest.mark.parametrize("change", ["bit flip", "appended", "truncated"])
def test_a_source_altered_after_its_manifest_is_not_encrypted(source, keys, tmp_path, change):
    data = bytearray(source.read_bytes())
    if change == "bit flip":  # same size: only the sha256 tells
        data[len(data) // 2] ^= 0x01
    elif change == "appended":
        data += b"\0" * 10
    else:
        data = data[:-10]
    source.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="no longer matches its manifest") as caught:
        encrypt(source, [keys[0][1]], tmp_path)
    assert caught.value.exit_status == 3
    assert os.listdir(tmp_path / "outgoing") == []  # no .age under its final name, no manifest, no temporary file


def test_a_bad_recipient_fails_and_leaves_nothing(source, tmp_path):
    with pytest.raises(Failed, match=f"encrypting {NAME} failed") as caught:
        encrypt(source, ["age1notakey"], tmp_path)
    assert caught.value.exit_status == 1
    assert os.listdir(tmp_path / "outgoing") == []


# --- decrypting --------------------------------------------------------------------------------------


def test_decrypt_file_gives_the_identical_dump_with_its_plain_manifest(source, keys, tmp_path, work):
    copy = encrypt(source, [public for _, public in keys], tmp_path)
    path = crypto.decrypt_file(copy, str(keys[1][0]), work)  # the spare key works as well
    assert path == work / NAME
    assert path.read_bytes() == source.read_bytes()
    assert sorted(os.listdir(work)) == [NAME, NAME + ".json"]
    assert all((work / n).stat().st_mode & 0o777 == 0o600 for n in os.listdir(work))
    assert dumps.read_manifest(path) == dumps.read_manifest(source)
    assert dumps.verify_file(path).status == "verified"


def test_decrypt_file_without_a_manifest_gives_the_dump_alone(source, keys, tmp_path, work):
    copy = encrypt(source, [keys[0][1]], tmp_path)
    (copy.parent / (AGE + ".json")).unlink()
    path = crypto.decrypt_file(copy, str(keys[0][0]), work)
    assert os.listdir(work) == [NAME] and path.read_bytes() == source.read_bytes()


def test_the_wrong_key_is_failed_saying_it_is_not_a_recipient(source, keys, tmp_path, work):
    copy = encrypt(source, [keys[0][1]], tmp_path)
    before = copy.read_bytes()
    with pytest.raises(Failed) as caught:
        crypto.decrypt_file(copy, str(keys[1][0]), work)
    assert type(caught.value) is Failed and caught.value.exit_status == 1  # the operator's to fix, not damage
    assert "AGE_IDENTITY_FILE cannot decrypt" in caught.value.line()
    assert "not one of the dump's recipients" in caught.value.line()
    assert "\n" not in caught.value.line() and "filippo.io" not in caught.value.line()  # age's boilerplate left out
    assert os.listdir(work) == [] and copy.read_bytes() == before
    with pytest.raises(Failed, match="not one of the dump's recipients") as verifying:
        crypto.verify(copy, str(keys[1][0]))
    assert type(verifying.value) is Failed


@pytest.mark.parametrize("content", ["garbage", "a public key", "empty"])
def test_an_unusable_identity_file_is_a_usage_error(source, keys, tmp_path, work, content):
    copy = encrypt(source, [keys[0][1]], tmp_path)
    bad = tmp_path / "keys" / "bad.txt"
    bad.write_text({"garbage": "not a key at all\n", "a public key": keys[0][1] + "\n", "empty": ""}[content])
    bad.chmod(0o600)
    with pytest.raises(UsageError, match="not a usable age identity") as caught:
        crypto.decrypt_file(copy, str(bad), work)
    assert caught.value.exit_status == 2
    assert os.listdir(work) == []
    with pytest.raises(UsageError):
        crypto.verify(copy, str(bad))


DAMAGE = [
    "truncated in the payload",
    "truncated in the header",
    "truncated to nothing",
    "bit flip in the payload",
    "bit flip in the last byte",
    "bit flip in the header MAC",
    "recipient stanza changed",
]


def damage(copy, how):
    data = bytearray(copy.read_bytes())
    header_end = data.index(b"\n---") + 1
    if how == "truncated in the payload":
        data = data[: len(data) // 2]
    elif how == "truncated in the header":
        data = data[: header_end - 10]
    elif how == "truncated to nothing":
        data = bytearray()
    elif how == "bit flip in the payload":
        data[len(data) // 2] ^= 0x01
    elif how == "bit flip in the last byte":
        data[-1] ^= 0x01
    elif how == "bit flip in the header MAC":
        data[header_end + 8] ^= 0x01
    else:  # one base64 character of the wrapped file key, still valid base64: a change on disk, not a new key
        body = data.index(b"\n", data.index(b"-> X25519 ")) + 1 + 5
        data[body] = ord("A") if data[body] != ord("A") else ord("B")
    copy.write_bytes(bytes(data))


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_copy_is_a_verification_error(source, keys, tmp_path, work, how):
    copy = encrypt(source, [keys[0][1]], tmp_path)
    damage(copy, how)
    with pytest.raises(VerificationError, match="damaged or incomplete") as caught:
        crypto.decrypt_file(copy, str(keys[0][0]), work)
    assert caught.value.exit_status == 3
    assert os.listdir(work) == []  # nothing partial under the plain name
    with pytest.raises(VerificationError):
        crypto.verify(copy, str(keys[0][0]))
    with pytest.raises(VerificationError):  # without the key: size or sha256 against the manifest
        crypto.verify(copy, None)


def test_a_copy_that_decrypts_to_other_bytes_gets_no_plain_manifest(source, keys, tmp_path, work):
    copy = encrypt(source, [keys[0][1]], tmp_path)
    edit_manifest(copy, lambda m: m["encryption"].update(plain_sha256="0" * 64))
    with pytest.raises(VerificationError, match="decrypts to other bytes") as caught:
        crypto.decrypt_file(copy, str(keys[0][0]), work)
    assert caught.value.exit_status == 3
    # Whatever was decrypted never gets a manifest that would make it "verified" (callers remove the directory).
    assert NAME + ".json" not in os.listdir(work)


# --- verifying ---------------------------------------------------------------------------------------


def test_verify_without_the_key_with_it_and_quick(source, keys, tmp_path):
    copy = encrypt(source, [keys[0][1]], tmp_path)
    manifest = dumps.read_manifest(copy)
    without = crypto.verify(copy, None)
    assert (without.status, without.size, without.sha256) == ("verified", copy.stat().st_size, manifest.sha256)
    assert without.tables == {"public.t": ROWS}  # the manifest's: nothing was decrypted
    whole = crypto.verify(copy, str(keys[0][0]))
    assert (whole.status, whole.size, whole.sha256, whole.tables) == (
        "verified",
        copy.stat().st_size,
        manifest.sha256,
        {"public.t": ROWS},
    )
    # quick never decrypts: even a key that cannot read the copy passes it.
    assert crypto.verify(copy, str(keys[1][0]), quick=True).status == "verified"

    # A copy that decrypts fine but to other bytes than its manifest's plain dump: only the key sees it.
    edit_manifest(copy, lambda m: m["encryption"].update(plain_sha256="0" * 64))
    assert crypto.verify(copy, None).status == "verified"
    assert crypto.verify(copy, str(keys[0][0]), quick=True).status == "verified"
    with pytest.raises(VerificationError, match="sha256 differs"):
        crypto.verify(copy, str(keys[0][0]))


def test_verify_an_encrypted_copy_without_a_manifest(source, keys, tmp_path):
    copy = encrypt(source, [keys[0][1]], tmp_path)
    (copy.parent / (AGE + ".json")).unlink()
    with pytest.raises(Failed, match="without a manifest can only be checked with AGE_IDENTITY_FILE") as caught:
        crypto.verify(copy, None)
    assert caught.value.exit_status == 1
    with pytest.raises(Failed, match="without a manifest"):
        crypto.verify(copy, str(keys[0][0]), quick=True)
    checked = crypto.verify(copy, str(keys[0][0]))
    assert checked.status == "unverified" and checked.tables == {"public.t": ROWS}


@pytest.mark.parametrize("inside", ["an incomplete dump", "a corrupt gzip stream", "other row counts"])
def test_verify_with_the_key_checks_the_content(keys, tmp_path, inside):
    """A copy whose manifests all agree with its bytes, but whose dump is bad: the key is what finds it."""
    source = world.synthetic_dump(tmp_path / "pi5", NAME, rows=ROWS)
    if inside == "an incomplete dump":
        sql = subprocess.run(["pigz", "-dc", str(source)], capture_output=True, check=True).stdout
        cut = sql[: sql.index(b"-- PostgreSQL database dump complete")]
        source.write_bytes(subprocess.run(["pigz", "-1", "-c"], input=cut, capture_output=True, check=True).stdout)
    elif inside == "a corrupt gzip stream":
        data = bytearray(source.read_bytes())
        data[len(data) // 2] ^= 0xFF
        source.write_bytes(bytes(data))
    else:
        edit_manifest(source, lambda m: m["tables"].update({"public.t": ROWS + 1}))
    describe(source)
    copy = encrypt(source, [keys[0][1]], tmp_path)
    assert crypto.verify(copy, None).status == "verified"  # size and sha256 alone cannot see inside
    expected = {
        "an incomplete dump": "incomplete dump",
        "a corrupt gzip stream": "corrupt gzip stream",
        "other row counts": "row counts differ",
    }[inside]
    with pytest.raises(VerificationError, match=expected) as caught:
        crypto.verify(copy, str(keys[0][0]))
    assert caught.value.exit_status == 3


# --- the identity setting ----------------------------------------------------------------------------


@pytest.fixture
def warnings():
    """What kw-backup's logger warns (it may not propagate to pytest's caplog once a script set it up)."""

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler = Keep()
    log.addHandler(handler)
    yield handler.lines
    log.removeHandler(handler)


def test_identity_unset_or_missing_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=f"{AGE} is encrypted: set AGE_IDENTITY_FILE") as caught:
        crypto.identity(load(tmp_path), AGE)
    assert caught.value.exit_status == 2 and "bw get" in caught.value.hint
    with pytest.raises(UsageError, match="No such file") as missing:
        crypto.identity(load(tmp_path, AGE_IDENTITY_FILE=str(tmp_path / "nope.txt")), AGE)
    assert missing.value.exit_status == 2


def test_identity_a_private_key_is_used_quietly(keys, tmp_path, warnings):
    assert crypto.identity(load(tmp_path, AGE_IDENTITY_FILE=str(keys[0][0])), AGE) == str(keys[0][0])
    assert warnings == []


def test_identity_readable_by_others_still_works_but_warns(source, keys, tmp_path, work, warnings):
    identity_file = keys[0][0]
    identity_file.chmod(0o644)
    given = crypto.identity(load(tmp_path, AGE_IDENTITY_FILE=str(identity_file)), AGE)
    assert given == str(identity_file)
    assert any("can be read by others" in line and "644" in line and "chmod 600" in line for line in warnings)
    copy = encrypt(source, [keys[0][1]], tmp_path)
    assert crypto.decrypt_file(copy, given, work).read_bytes() == source.read_bytes()
