"""bin/verify-backup on real dumps made by backup-db, and on damaged copies of them."""

import json
import shutil

import pytest


@pytest.fixture
def dump(kw):
    result = kw.run("backup-db")
    assert result.returncode == 0, result.stderr
    return kw.prod_dir / result.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]


def copy(dump, tmp_path, name=None):
    target = tmp_path / (name or dump.name)
    shutil.copy(dump, target)
    if (dump.parent / (dump.name + ".json")).exists() and name is None:
        shutil.copy(dump.parent / (dump.name + ".json"), tmp_path / (dump.name + ".json"))
    return target


def test_good_dump_exits_0(kw, dump):
    result = kw.run("verify-backup", str(dump))
    assert result.returncode == 0
    assert result.stdout.startswith(f"OK {dump}: verified")


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "manifest", "tables", "garbage"])
def test_damaged_copies_exit_3_naming_them(kw, dump, tmp_path, damage):
    (tmp_path / "bad").mkdir()
    bad = copy(dump, tmp_path / "bad")
    data = bytearray(bad.read_bytes())
    manifest_path = bad.parent / (bad.name + ".json")
    if damage == "truncate":
        bad.write_bytes(bytes(data[: len(data) * 2 // 3]))
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x01
        bad.write_bytes(bytes(data))
    elif damage == "manifest":
        manifest = json.loads(manifest_path.read_text())
        manifest["sha256"] = "f" * 64
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "tables":
        manifest = json.loads(manifest_path.read_text())
        manifest["tables"]["public.users"] += 1
        manifest_path.write_text(json.dumps(manifest))
    else:
        bad.write_bytes(b"not a gzip file at all" * 100)
    result = kw.run("verify-backup", str(dump), str(bad))
    assert result.returncode == 3, result.stderr
    assert f"OK {dump}" in result.stdout
    assert str(bad) in result.stderr.splitlines()[-1] and "1 of 2 dumps failed verification" in result.stderr


def test_dump_without_manifest_is_unverified_but_checked(kw, dump, tmp_path):
    plain = copy(dump, tmp_path, name="db-2024-01-01.sql.gz")
    result = kw.run("verify-backup", str(plain))
    assert result.returncode == 0 and ": unverified," in result.stdout


def test_plain_sql_migration_dump(kw, dump, tmp_path):
    import gzip

    sql = tmp_path / "kw_app_production-20260118-000001.sql"
    sql.write_bytes(gzip.decompress(dump.read_bytes()))
    assert kw.run("verify-backup", str(sql)).returncode == 0
    sql.write_bytes(sql.read_bytes()[:-300])
    result = kw.run("verify-backup", str(sql))
    assert result.returncode == 3 and "completion line" in result.stderr


def test_missing_file_exits_1(kw, tmp_path):
    result = kw.run("verify-backup", str(tmp_path / "db-2024-01-01.sql.gz"))
    assert result.returncode == 1 and "no such dump" in result.stderr


def test_usage(kw):
    assert kw.run("verify-backup").returncode == 2
    assert kw.run("verify-backup", "--help").returncode == 0
