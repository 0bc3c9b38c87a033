"""Restores, drills and fresh setups from encrypted copies (the nas's, an SFTP offsite's, a file), and the wrong key.

The laptop runs the scripts; prod is a fresh server over ssh (nothing of kw-backup there:
tests/conftest.py `remote_prod`), the nas a real sshd place, the offsite an rclone SFTP remote on
the loopback sshd, the pi5 local. The key is only ever on the laptop.
"""

import glob
import json
import os
import shutil
import tempfile

import pytest

from tests import world
from tests.damage import content, databases


def prod_staging() -> set[str]:
    return world.staging_leftovers()


@pytest.fixture
def encrypted(remote_prod, pg, db, tmp_path):
    """Last night's dump on prod, the pi5 and, encrypted, on the nas and offsite; then a change a restore undoes."""
    net = remote_prod
    net.key, public = world.age_key(tmp_path)
    net.offsite_dir = tmp_path / "offsite"
    net.settings.update(
        AGE_RECIPIENTS=public,
        OFFSITE_REMOTE=f"offsite:{net.offsite_dir}",
        RCLONE_CONFIG=str(net.ssh.rclone_config(tmp_path / "rclone.conf")),
    )
    for step in ("backup-db", "backup-orchestrator"):
        done = net.run(step, timeout=180)
        assert done.returncode == 0, done.stderr
    net.age = [n for n in os.listdir(net.offsite_dir) if n.endswith(".age")][0]
    net.expected = content(pg, db)
    pg.psql("DELETE FROM orders WHERE id > 1500; UPDATE users SET name = 'changed'", db)
    net.before = content(pg, db)
    net.staging = prod_staging()
    net.laptop_tmp = tempfile.mkdtemp(prefix="kwt-")
    yield net
    shutil.rmtree(net.laptop_tmp)


def files_of(*directories):
    """Every file's bytes under the places: nothing is deleted or changed by a failed read."""
    return {str(p): p.read_bytes() for d in directories for p in d.rglob("*") if p.is_file()}


def laptop_env(net, **extra):
    return net.env(TMPDIR=net.laptop_tmp, **extra)


def test_restore_from_the_encrypted_offsite_copy(encrypted, pg, db):
    encrypted.settings["AGE_IDENTITY_FILE"] = str(encrypted.key)
    result = encrypted.run(
        "restore-production-db", "--from-offsite", "latest", "--yes", env=laptop_env(encrypted), timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert content(pg, db) == encrypted.expected
    assert f"dump: {encrypted.age} from Offsite (offsite:" in result.stderr
    assert "as the manifest says" in result.stderr  # the decrypted bytes are the ones backup-db checked
    assert prod_staging() == encrypted.staging and os.listdir(encrypted.laptop_tmp) == []
    work = encrypted.tmp / "work"
    assert not any(p.name.startswith("db-") for p in work.rglob("*")), "no plain copy left on the laptop"


def test_the_wrong_key_changes_nothing(encrypted, pg, db, tmp_path):
    other, _ = world.age_key(tmp_path, "someone-else.txt")
    encrypted.settings["AGE_IDENTITY_FILE"] = str(other)
    places = (encrypted.offsite_dir, encrypted.nas_dir, encrypted.pi5_dir, encrypted.prod_dir)
    before = files_of(*places)
    for source in (["--from-offsite", "latest"], ["--from-nas", encrypted.age]):
        result = encrypted.run("restore-production-db", *source, "--yes", env=laptop_env(encrypted), timeout=180)
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "AGE_IDENTITY_FILE cannot decrypt" in errors[0], result.stderr
        assert "not one of the dump's recipients" in errors[0]
    assert content(pg, db) == encrypted.before and databases(pg, db) == [db]
    assert files_of(*places) == before
    assert prod_staging() == encrypted.staging


def test_without_a_key_or_an_offsite_remote_it_exits_2_before_anything(encrypted, pg, db):
    result = encrypted.run("restore-production-db", "--from-offsite", "latest", "--yes", env=laptop_env(encrypted))
    assert result.returncode == 2 and "set AGE_IDENTITY_FILE" in result.stderr, result.stderr
    del encrypted.settings["OFFSITE_REMOTE"]
    for script, args in (
        ("restore-production-db", ["--from-offsite", "latest", "--yes"]),
        ("setup-fresh-production-db", ["--from-offsite", "--yes"]),
        ("backup-drill", ["--from-offsite"]),
    ):
        result = encrypted.run(script, *args, env=laptop_env(encrypted))
        assert result.returncode == 2 and "OFFSITE_REMOTE is not set" in result.stderr, (script, result.stderr)
    assert content(pg, db) == encrypted.before and prod_staging() == encrypted.staging


def test_a_damaged_offsite_copy_exits_3_and_changes_nothing(encrypted, pg, db):
    encrypted.settings["AGE_IDENTITY_FILE"] = str(encrypted.key)
    copy = encrypted.offsite_dir / encrypted.age
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    result = encrypted.run(
        "restore-production-db", "--from-offsite", encrypted.age, "--yes", env=laptop_env(encrypted), timeout=180
    )
    assert result.returncode == 3, result.stderr
    assert "damaged" in result.stderr
    assert content(pg, db) == encrypted.before and databases(pg, db) == [db]
    assert prod_staging() == encrypted.staging


def test_restore_from_the_nas_and_from_a_file_decrypts_on_the_laptop(encrypted, pg, db, tmp_path):
    encrypted.settings["AGE_IDENTITY_FILE"] = str(encrypted.key)
    result = encrypted.run(
        "restore-production-db", "--from-nas", "latest", "--yes", env=laptop_env(encrypted), timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert content(pg, db) == encrypted.expected
    pg.psql("UPDATE users SET name = 'changed again'", db)
    copied = tmp_path / "copied"
    copied.mkdir()
    for suffix in ("", ".json"):
        shutil.copyfile(encrypted.offsite_dir / (encrypted.age + suffix), copied / (encrypted.age + suffix))
    result = encrypted.run(
        "restore-production-db",
        "--from-file",
        str(copied / encrypted.age),
        "--yes",
        env=laptop_env(encrypted),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert content(pg, db) == encrypted.expected
    assert sorted(os.listdir(copied)) == [encrypted.age, encrypted.age + ".json"]  # the file is only read


def test_drill_from_the_encrypted_offsite_copy_and_with_the_wrong_key(encrypted, tmp_path):
    encrypted.settings["AGE_IDENTITY_FILE"] = str(encrypted.key)
    result = encrypted.run("backup-drill", "--from-offsite", env=laptop_env(encrypted), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "result:   ok" in result.stdout and f"rows:     {sum(world.RAILS_TABLE_ROWS.values())}" in result.stdout
    report = json.loads((encrypted.tmp / "backup-drill.log").read_text().splitlines()[-1])
    assert report["result"] == "ok" and report["dump"] == encrypted.age[: -len(".age")]

    encrypted.settings["AGE_IDENTITY_FILE"] = str(world.age_key(tmp_path, "wrong.txt")[0])
    result = encrypted.run("backup-drill", "--from", "offsite", env=laptop_env(encrypted), timeout=300)
    assert result.returncode == 1 and "AGE_IDENTITY_FILE cannot decrypt" in result.stderr, result.stderr
    report = json.loads((encrypted.tmp / "backup-drill.log").read_text().splitlines()[-1])
    # "error", not "failed": the drill could not tell whether the dump restores (exit 1, not 3)
    assert report["result"] == "error" and "AGE_IDENTITY_FILE" in report["error"]
    assert not glob.glob(f"{encrypted.tmp / 'work'}/kw-backup-*/work.*")


def test_setup_fresh_from_the_offsite_and_as_the_last_fallback(encrypted, pg, db):
    encrypted.settings.update(AGE_IDENTITY_FILE=str(encrypted.key), DB_NAME=f"{db}_fresh")
    result = encrypted.run(
        "setup-fresh-production-db", "--from-offsite", "--yes", env=laptop_env(encrypted), timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert content(pg, f"{db}_fresh") == encrypted.expected

    # Scenario B with C: the nas and the pi5 are gone too; the offsite copy is taken, saying so.
    pg.drop_db(f"{db}_fresh")
    for leftover in databases(pg, f"{db}_fresh"):
        pg.drop_db(leftover)
    encrypted.settings.update(NAS_HOST="gone", PI5_HOST="gone")
    result = encrypted.run("setup-fresh-production-db", "--yes", env=laptop_env(encrypted), timeout=180)
    assert result.returncode == 0, result.stderr
    assert "taking the pi5 instead" in result.stderr and "taking the offsite copy" in result.stderr
    assert content(pg, f"{db}_fresh") == encrypted.expected
    assert prod_staging() == encrypted.staging and os.listdir(encrypted.laptop_tmp) == []
