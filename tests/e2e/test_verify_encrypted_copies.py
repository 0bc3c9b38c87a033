"""bin/verify-backup on encrypted copies (.age) made by the orchestrator: without the key, with it, the wrong one."""

import json
import os

import pytest

from tests import world


@pytest.fixture
def copy(kw, tmp_path):
    """backup-db's dump encrypted by the orchestrator on its way to the nas: the nas's .age and its manifest."""
    kw.key, public = world.age_key(tmp_path)
    kw.settings["AGE_RECIPIENTS"] = public
    for step in ("backup-db", "backup-orchestrator"):
        done = kw.run(step)
        assert done.returncode == 0, done.stderr
    return next(kw.tmp / "nas" / n for n in os.listdir(kw.tmp / "nas") if n.endswith(".age"))


def test_without_the_key_size_and_sha256(kw, copy):
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK {copy}: verified (encrypted; size and sha256 only")


def test_with_the_key_the_content_too(kw, copy):
    kw.settings["AGE_IDENTITY_FILE"] = str(kw.key)
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 0, result.stderr
    rows = sum(world.RAILS_TABLE_ROWS.values())
    assert (
        result.stdout.startswith(f"OK {copy}: verified (encrypted; content checked)")
        and f"{rows} rows" in result.stdout
    )
    quick = kw.run("verify-backup", "--quick", "--json", str(copy))
    assert quick.returncode == 0, quick.stderr
    report = json.loads(quick.stdout)
    assert report["encrypted"] is True and report["status"] == "verified" and report["bytes"] == copy.stat().st_size


def test_the_wrong_key_exits_1_with_one_line(kw, copy, tmp_path):
    kw.settings["AGE_IDENTITY_FILE"] = str(world.age_key(tmp_path, "other.txt")[0])
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 1, result.stderr
    assert "AGE_IDENTITY_FILE cannot decrypt" in result.stderr
    assert copy.exists()


@pytest.mark.parametrize("key", [False, True])
def test_a_damaged_copy_exits_3(kw, copy, key):
    if key:
        kw.settings["AGE_IDENTITY_FILE"] = str(kw.key)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 3, result.stderr
    assert f"BAD {copy}" in result.stderr


def test_without_its_manifest_only_the_key_can_check_it(kw, copy):
    (copy.parent / (copy.name + ".json")).unlink()
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 1 and "only be checked with AGE_IDENTITY_FILE" in result.stderr, result.stderr
    kw.settings["AGE_IDENTITY_FILE"] = str(kw.key)
    result = kw.run("verify-backup", str(copy))
    assert result.returncode == 0, result.stderr
    assert ": unverified (encrypted; content checked)" in result.stdout
