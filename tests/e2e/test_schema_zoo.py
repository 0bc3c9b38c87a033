"""Every dump that verifies restores, on any schema (issue 22): a zoo of what pg_dump writes that a Rails
schema never has (tests/fixtures/zoo/schema.sql) through backup-db, verify-backup, restore-production-db in
one session and in parallel (on a prod without kw-backup, docker), and the drill; each restored database
equal to a `gunzip | psql -1` load of the same dump."""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from kwbackup import dumps
from tests.conftest import backup_db_dump
from tests.e2e.test_parallel_load import same_database

# Large objects: their contents, comments and grants (not in a schema-only dump).
LARGE_OBJECTS = (
    "SELECT string_agg(format('%s %s %s %s', m.oid, md5(lo_get(m.oid)), obj_description(m.oid, 'pg_largeobject'), "
    "m.lomacl), ',' ORDER BY m.oid) FROM pg_largeobject_metadata m"
)
SEQUENCES = "SELECT string_agg(format('%s %s', sequencename, last_value), ',' ORDER BY 1) FROM pg_sequences"


@pytest.fixture(scope="module")
def zoo_dump(tmp_path_factory, pg, zoo_db):
    return backup_db_dump(tmp_path_factory, pg, zoo_db)


@pytest.fixture(scope="module")
def one_psql_session(pg, zoo_dump):
    """The reference: the dump loaded by `gunzip | psql -1`."""
    name = pg.create_db(f"zoo_psql_{uuid.uuid4().hex[:6]}")
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d", name],
        input=gzip.decompress(zoo_dump.read_bytes()),
        env={**os.environ, **pg.env},
        check=True,
        capture_output=True,
    )
    yield name
    pg.drop_db(name)


def test_the_manifest_names_every_table_as_the_catalog_does_and_counts_its_own_rows(pg, zoo_db, zoo_dump):
    tables = json.loads(Path(f"{zoo_dump}.json").read_text())["tables"]
    assert tables == pg.row_counts(zoo_db)
    assert tables["public.marker"] == 3 and tables["public.Empty Marker"] == 0  # tables without columns
    assert tables["public.animals"] == 2 and tables["public.birds"] == 3  # a parent's own rows, not its children's
    assert tables['Zoo Keeper.Feeding "Times"'] == 2 and tables["dotted.schema.a.b"] == 4
    assert tables["public.Ünïcode tåble"] == 2 and tables["public.events other"] > 0


def test_verify_backup_calls_it_verified(kw, zoo_dump):
    result = kw.run("verify-backup", str(zoo_dump))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_restore_production_db_restores_it_as_one_psql_session_does(remote_prod, pg, zoo_dump, one_psql_session, jobs):
    kw = remote_prod
    kw.prod_dir.mkdir(mode=0o700, parents=True)
    for suffix in ("", ".json"):
        shutil.copy(f"{zoo_dump}{suffix}", kw.prod_dir / (zoo_dump.name + suffix))
    kw.settings.update(DB_NAME=f"zoo_j{jobs}_{uuid.uuid4().hex[:6]}", RESTORE_JOBS=jobs)
    try:
        result = kw.run("restore-production-db", "--local", "latest", "--yes", timeout=300)
        assert result.returncode == 0, result.stderr
        assert "as the manifest says" in result.stderr
        assert ("parallel load: loaded with 2 sessions" in result.stderr) == (jobs == "2")
        assert "one session" not in result.stderr
        restored = kw.settings["DB_NAME"]
        same_database(pg, one_psql_session, restored)
        for query in (LARGE_OBJECTS, SEQUENCES):
            assert pg.psql(query, restored) == pg.psql(query, one_psql_session)
        assert pg.row_counts(restored) == pg.row_counts(one_psql_session)
    finally:
        pg.drop_db(kw.settings["DB_NAME"])


def test_the_drill_restores_it_in_parallel_and_counts_each_tables_own_rows(kw, zoo_dump):
    kw.settings.update(RESTORE_JOBS="2", DRILL_LOG=str(kw.tmp / "drill.log"))
    result = kw.run("backup-drill", "--from-file", str(zoo_dump), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "result:   ok" in result.stdout
    assert "parallel load: loaded with 2 sessions" in result.stderr and "one session" not in result.stderr
    report = json.loads((kw.tmp / "drill.log").read_text().splitlines()[-1])
    manifest = json.loads(Path(f"{zoo_dump}.json").read_text())
    assert report["tables"] == len(manifest["tables"]) and report["rows"] == sum(manifest["tables"].values())


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_dump_loading_partitions_through_their_root_restores_counted_as_its_manifest_says(
    remote_prod, pg, zoo_db, jobs
):
    """pg_dump --load-via-partition-root (a dump made by hand): each partition's rows are a COPY into the
    root. The manifest counts them as the partition's own (its TABLE DATA entry names it); the COPY tags name
    the root: the restore's check counts the partitions' own rows and agrees."""
    kw = remote_prod
    kw.prod_dir.mkdir(mode=0o700, parents=True)
    sql = subprocess.run(
        ["pg_dump", "--no-password", "--load-via-partition-root", zoo_db],
        env={**os.environ, **pg.env},
        capture_output=True,
        check=True,
    ).stdout
    assert b"-- load via partition root public.events" in sql
    path = kw.prod_dir / "db-2026-01-01.sql.gz"
    path.write_bytes(gzip.compress(sql))
    scanner = dumps.DumpScanner()
    scanner(sql)
    assert scanner.tables == pg.row_counts(zoo_db) and "public.events" not in scanner.tables
    data = path.read_bytes()
    manifest = dumps.Manifest(
        file=path.name,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at="2026-01-01T02:00:00Z",
        database=zoo_db,
        server_version=scanner.version("from database"),
        pg_dump_version=scanner.version("by pg_dump"),
        tables=scanner.tables,
    )
    Path(f"{path}.json").write_bytes(manifest.to_json())
    kw.settings.update(DB_NAME=f"zoo_root_j{jobs}_{uuid.uuid4().hex[:6]}", RESTORE_JOBS=jobs)
    try:
        result = kw.run("restore-production-db", "--local", "latest", "--yes", timeout=300)
        assert result.returncode == 0, result.stderr
        assert "as the manifest says" in result.stderr
        assert pg.row_counts(kw.settings["DB_NAME"]) == pg.row_counts(zoo_db)
    finally:
        pg.drop_db(kw.settings["DB_NAME"])
