"""Ways the restore tests damage dumps and look at databases, shared by the restore, setup-fresh,
migration and drill tests."""

import gzip
import hashlib
import json
from pathlib import Path


def forge_manifest(path) -> None:
    """Make the manifest agree with a changed file, so only the content itself can tell."""
    path = Path(path)
    data = path.read_bytes()
    manifest_path = Path(f"{path}.json")
    manifest = json.loads(manifest_path.read_text())
    manifest.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(manifest))


def spoil(path, how: str) -> None:
    """Damage a dump behind its manifest's back: "junk" appended (its size differs: the listing shows it), or
    one byte flipped, "flip" (the same size: only a check of its content or sha256 finds it)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    if how == "junk":
        data += b"junk"
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def with_sql_error(sql: bytes) -> bytes:
    """The SQL with a failing statement just before the users' data."""
    return sql.replace(b"\nCOPY public.users ", b"\nSELECT no_such_function();\nCOPY public.users ", 1)


def rewrite(path, change) -> None:
    """Change a gzipped dump's SQL and forge its manifest to match."""
    path = Path(path)
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))
    forge_manifest(path)


def content(pg, dbname) -> tuple:
    return pg.row_counts(dbname), pg.psql(
        "SELECT md5(string_agg(concat_ws(',', u.email, u.name, o.total, o.details), "
        "',' ORDER BY o.id)) FROM orders o JOIN users u ON u.id = o.user_id",
        dbname,
    )


def databases(pg, db) -> list[str]:
    return sorted(n for n in pg.psql("SELECT datname FROM pg_database").split() if n.startswith(db))
