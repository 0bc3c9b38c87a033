"""backup-db on a real-world schema: every table's rows counted from the dump, exactly."""

import gzip
import json
import os
import subprocess


def test_manifest_counts_every_table_of_pagila(kw, pg, pagila_db):
    kw.settings["DB_NAME"] = pagila_db
    result = kw.run("backup-db")
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip().splitlines()[-1]
    manifest = json.loads(open(path + ".json").read())
    real = pg.row_counts(pagila_db)
    partitions = [k for k in manifest["tables"] if k.startswith("public.payment_p")]
    assert len(partitions) >= 22
    assert {k: real[k] for k in manifest["tables"]} == manifest["tables"]
    assert set(real) == set(manifest["tables"])
    assert sum(manifest["tables"].values()) > 30000

    copy = pg.create_db("pagila_copy")
    try:
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", copy],
            input=gzip.decompress(open(path, "rb").read()),
            env={**os.environ, **pg.env},
            check=True,
            capture_output=True,
        )
        assert pg.row_counts(copy) == real
        query = "SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {} t"
        for table in ("customer", "payment", "staff", "film", "rental"):
            assert pg.psql(query.format(table), copy) == pg.psql(query.format(table), pagila_db), table
    finally:
        pg.drop_db(copy)
