import gzip
import json
import random

import pytest

from kwbackup import dumps, parallel_load
from kwbackup.errors import Failed, VerificationError

SQL = (
    b"--\n-- PostgreSQL database dump\n--\n\n\\restrict abc\n\n"
    b"-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)\n-- Dumped by pg_dump version 15.18\n\n"
    b"CREATE FUNCTION public.f() RETURNS text LANGUAGE sql AS $$\nSELECT 'COPY x FROM stdin;'\n$$;\n"
    b"COPY public.users (id, email) FROM stdin;\n1\ta@b\n2\tline\\nbreak \\\\. not an end\n3\t\\.x\n\\.\n\n"
    b'COPY public."Odd ""Name"" table" (id, "za\xc5\xbc") FROM stdin;\n1\tg\xc4\x99\xc5\x9b\n\\.\n\n'
    b"COPY public.empty (id) FROM stdin;\n\\.\n\n"
    b'COPY "we.ird".t FROM stdin;\n' + b"".join(b"%d\t%s\n" % (i, b"x" * (i % 50)) for i in range(500)) + b"\\.\n\n"
    b"SELECT pg_catalog.setval('public.users_id_seq', 3, true);\n\n"
    b"--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc\n\n"
)
TABLES = {"public.users": 3, 'public.Odd "Name" table': 1, "public.empty": 0, "we.ird.t": 500}


def scan(data: bytes, sizes) -> dumps.DumpScanner:
    scanner = dumps.DumpScanner()
    pos = 0
    for size in sizes:
        scanner(data[pos : pos + size])
        pos += size
    scanner(data[pos:])
    scanner.end()
    return scanner


def test_counts_rows_per_table_and_reads_versions():
    scanner = scan(SQL, [])
    assert scanner.tables == TABLES
    assert scanner.problem() is None
    assert scanner.version("from database") == "15.18" and scanner.version("by pg_dump") == "15.18"
    assert scanner.size == len(SQL)


def test_any_chunking_gives_the_same_counts():
    for size in (1, 2, 3, 5, 7, 64):
        assert scan(SQL, [size] * (len(SQL) // size)).tables == TABLES
    rng = random.Random(7)
    for _ in range(50):
        sizes = [rng.randint(1, 200) for _ in range(len(SQL) // 50)]
        assert scan(SQL, sizes).tables == TABLES


@pytest.mark.parametrize(
    "ending",
    [
        b"--\n-- PostgreSQL database dump complete\n--\n",
        b"-- PostgreSQL database dump complete\n",
        b"--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict Zx9\n\n",
    ],
)
def test_completion_line_as_last_meaningful_line(ending):
    assert dumps.completion_problem(b"SELECT 1;\n" + ending) is None


@pytest.mark.parametrize(
    "ending",
    [
        b"SELECT 1;\n",
        b"",
        b"-- PostgreSQL database dump complete\nSELECT 1;\n",
        b"-- PostgreSQL database dump complete\n\\unrestrict\n\\connect x\n",
    ],
)
def test_missing_completion_line(ending):
    assert dumps.completion_problem(ending) is not None


def test_truncated_inside_copy_data_is_reported():
    cut = SQL.index(b"2\tline")
    scanner = scan(SQL[:cut], [])
    assert "public.users" in scanner.problem()


def make_dump(tmp_path, data=SQL, name="db-2024-01-15.sql.gz", manifest=True):
    path = tmp_path / name
    path.write_bytes(gzip.compress(data))
    if manifest:
        import hashlib

        m = dumps.Manifest(
            name,
            path.stat().st_size,
            hashlib.sha256(path.read_bytes()).hexdigest(),
            "2024-01-15T02:00:00Z",
            "kw",
            "15.18",
            "15.18",
            TABLES,
        )
        (tmp_path / (name + ".json")).write_bytes(m.to_json())
    return path


def test_verify_good_dump_with_and_without_manifest(tmp_path):
    assert dumps.verify_file(make_dump(tmp_path)).status == "verified"
    plain = make_dump(tmp_path, name="db-2024-01-16.sql.gz", manifest=False)
    assert dumps.verify_file(plain).status == "unverified"
    sql = tmp_path / "kw_app_production-20260118-000001.sql"
    sql.write_bytes(SQL)
    assert dumps.verify_file(sql).tables == TABLES


def test_verify_truncated_gzip(tmp_path):
    path = make_dump(tmp_path, manifest=False)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(VerificationError, match="corrupt gzip"):
        dumps.verify_file(path)


def test_verify_bit_flip(tmp_path):
    path = make_dump(tmp_path, manifest=False)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError):
        dumps.verify_file(path)


def test_verify_incomplete_dump_in_an_intact_gzip(tmp_path):
    path = make_dump(tmp_path, data=SQL[: SQL.index(b"SELECT pg_catalog.setval")], manifest=False)
    with pytest.raises(VerificationError, match="completion line"):
        dumps.verify_file(path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("bytes", 1, "size"),
        ("sha256", "0" * 64, "sha256"),
        ("tables", {"public.users": 4}, "row counts"),
    ],
)
def test_verify_against_manifest(tmp_path, field, value, message):
    path = make_dump(tmp_path)
    manifest_path = tmp_path / (path.name + ".json")
    manifest = json.loads(manifest_path.read_text())
    manifest[field] = value
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(VerificationError, match=message):
        dumps.verify_file(path)


def test_unreadable_manifest_is_a_verification_failure(tmp_path):
    path = make_dump(tmp_path)
    (tmp_path / (path.name + ".json")).write_text("{not json")
    with pytest.raises(VerificationError, match="not a valid manifest"):
        dumps.verify_file(path)


def test_missing_file_is_a_failure_not_a_verification(tmp_path):
    with pytest.raises(Failed) as caught:
        dumps.verify_file(tmp_path / "db-2024-01-15.sql.gz")
    assert caught.value.exit_status == 1


def test_table_names_are_the_catalogs():
    """One reading of a COPY line's table, by pg_dump's quoting rules."""
    assert parallel_load.copy_target(b'COPY public."a ""b""" (id) FROM stdin;') == 'public.a "b"'
    assert parallel_load.copy_target(b'COPY "s.x".t (id) FROM stdin;\n') == "s.x.t"
    assert parallel_load.copy_target(b"COPY public.marker  FROM stdin;") == "public.marker"  # no columns
    assert parallel_load.copy_target(b'COPY "Zoo Keeper"."a (b)" ("x y") FROM stdin;') == "Zoo Keeper.a (b)"
    unicode = 'COPY public."Ünïcode tåble" ("ключ") FROM stdin;'.encode()
    assert parallel_load.copy_target(unicode) == "public.Ünïcode tåble"
    assert parallel_load.copy_target(b"COPY Public.T (id) FROM stdin;") == "public.t"  # folded, as the server does
    for not_copy in (b"COPY public.t TO stdout;", b"COPY public.t (id) FROM stdin", b'COPY "open (id) FROM stdin;'):
        assert parallel_load.copy_target(not_copy) is None


def test_a_partition_loaded_through_its_root_counts_as_the_partition():
    header = b"-- Data for Name: events 2025; Type: TABLE DATA; Schema: public; Owner: app"
    copy = b"COPY public.events (id, at) FROM stdin;"
    assert parallel_load.data_table(copy, header) == "public.events 2025"
    assert parallel_load.data_table(copy, None) == "public.events"
    own = b"-- Data for Name: a; b; Type: TABLE DATA; Schema: s; x; Owner: app"
    assert parallel_load.data_table(b'COPY "s; x"."a; b" (id) FROM stdin;', own) == "s; x.a; b"
    # pg_dump's comments print a line break in a name as a space: the COPY line's exact name is kept
    two_lines = b"-- Data for Name: two lines; Type: TABLE DATA; Schema: public; Owner: -"
    assert parallel_load.data_table(b'COPY public."two\nlines" (id) FROM stdin;', two_lines) == "public.two\nlines"


def test_the_scanner_names_tables_as_the_catalog_does():
    sql = (
        b"--\n-- Data for Name: marker; Type: TABLE DATA; Schema: public; Owner: app\n--\n\n"
        b"COPY public.marker  FROM stdin;\n\n\n\\.\n\n"
        b"--\n-- Data for Name: p1; Type: TABLE DATA; Schema: public; Owner: app\n--\n\n"
        b"-- load via partition root public.parent\nCOPY public.parent (id) FROM stdin;\n1\n2\n\\.\n\n"
        b'COPY "A"."b c" (id) FROM stdin;\n1\n\\.\n'
    )
    for size in (1, 7, len(sql)):  # the stream in pieces of every size: a line cut anywhere
        scanner = dumps.DumpScanner()
        for i in range(0, len(sql), size):
            scanner(sql[i : i + size])
        assert scanner.tables == {"public.marker": 2, "public.p1": 2, "A.b c": 1}


# --- manifests are validated before anything trusts them ------------------------------------------

GOOD_MANIFEST = {
    "file": "db-2024-01-15.sql.gz",
    "bytes": 10,
    "sha256": "a" * 64,
    "created_at": "2024-01-15T02:00:00Z",
    "database": "kw",
    "server_version": "15.18",
    "pg_dump_version": "15.18",
    "tables": {"public.users": 3},
    "tool_version": "1",
}


@pytest.mark.parametrize(
    "change",
    [
        {"tables": [["public.users", 3]]},
        {"tables": {"public.users": "3"}},
        {"tables": {"public.users": -1}},
        {"tables": {"public.users": True}},
        {"tables": None},
        {"bytes": "10"},
        {"bytes": -1},
        {"bytes": 1.5},
        {"bytes": False},
        {"sha256": "a" * 63},
        {"sha256": "g" * 64},
        {"sha256": None},
        {"file": 7},
        {"created_at": "yesterday"},
        {"created_at": 5},
        {"database": ["kw"]},
        {"server_version": 15},
        {"encryption": {"plain_file": "x"}},
        {"encryption": "age"},
    ],
)
def test_a_manifest_of_the_wrong_types_is_invalid_never_a_traceback(change):
    raw = {**GOOD_MANIFEST, **change}
    assert dumps.manifest_problem(raw) is not None
    with pytest.raises(VerificationError, match="not a valid manifest") as caught:
        dumps.Manifest.from_json(json.dumps(raw).encode(), "m.json")
    assert caught.value.exit_status == 3


@pytest.mark.parametrize("data", [b"[1, 2]", b'"text"', b"null", b"{not json", b"\xff\xfe"])
def test_what_is_no_json_object_is_no_manifest(data):
    with pytest.raises(VerificationError, match="not a valid manifest"):
        dumps.Manifest.from_json(data, "m.json")


def test_a_good_manifest_loads_and_unknown_keys_are_ignored():
    manifest = dumps.Manifest.from_json(json.dumps({**GOOD_MANIFEST, "later_field": 1}).encode())
    assert manifest.tables == {"public.users": 3} and dumps.manifest_problem(GOOD_MANIFEST) is None


def test_a_manifest_over_1_mib_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "db-2024-01-15.sql.gz"
    path.write_bytes(b"x")
    (tmp_path / "db-2024-01-15.sql.gz.json").write_bytes(json.dumps(GOOD_MANIFEST).encode() + b" " * (40 << 20))
    with pytest.raises(VerificationError, match="larger than 1048576 bytes"):
        dumps.read_manifest(path)


def test_row_counts_must_equal_the_manifest_even_when_it_lists_no_tables(tmp_path):
    path = make_dump(tmp_path)
    manifest = json.loads((tmp_path / (path.name + ".json")).read_text())
    (tmp_path / (path.name + ".json")).write_text(json.dumps({**manifest, "tables": {}}))
    with pytest.raises(VerificationError, match="row counts differ"):
        dumps.verify_file(path)
    assert dumps.verify_file(path, whole=False).status == "verified"  # size and sha256 alone cannot tell


# --- the scanner's memory is bounded whatever the content ------------------------------------------


def test_a_copy_line_longer_than_any_header_is_refused():
    scanner = dumps.DumpScanner()
    scanner(b"-- x\nCOPY " + b"a" * 1000)
    with pytest.raises(VerificationError, match="longer than"):
        for _ in range(3):
            scanner(b"a" * (dumps.LINE_LIMIT // 2))
    assert len(scanner.partial) <= dumps.LINE_LIMIT + 1024


def test_a_long_line_that_is_no_copy_header_is_skipped_without_being_held():
    scanner = dumps.DumpScanner()
    scanner(b"-- x\nSELECT '")
    for _ in range(20):
        scanner(b"y" * (1 << 20))
    scanner(b"';\n" + SQL)
    assert len(scanner.partial) < 64 and scanner.tables == TABLES and scanner.problem() is None


def test_the_roles_a_dump_names():
    """Owners, grantees (of ACL entries at the dump's very end), policies' and default privileges' roles."""
    lines = {
        b"ALTER TABLE public.t OWNER TO app;": {"app"},
        b'ALTER LARGE OBJECT 424242 OWNER TO "Big Owner";': {"Big Owner"},
        b"GRANT SELECT ON LARGE OBJECT 424242 TO zoo_reader;": {"zoo_reader"},
        b'GRANT ALL ON TABLE public.t TO "a ""b""", c WITH GRANT OPTION;': {'a "b"', "c"},
        b"GRANT SELECT ON TABLE public.t TO PUBLIC;": set(),
        b"REVOKE ALL ON SCHEMA public FROM PUBLIC;": set(),
        b"REVOKE USAGE ON SCHEMA s FROM old_role;": {"old_role"},
        b"CREATE POLICY p ON public.secrets FOR SELECT TO zoo_reader, r2 USING (true);": {"zoo_reader", "r2"},
        b"CREATE POLICY p ON public.secrets USING ((owner = CURRENT_USER));": set(),
        b"ALTER DEFAULT PRIVILEGES FOR ROLE deployer IN SCHEMA public GRANT SELECT ON TABLES TO reader;": {
            "deployer",
            "reader",
        },
        b"SET SESSION AUTHORIZATION 'o''brien';": {"o'brien"},
        b"ALTER TABLE ONLY public.t": set(),
    }
    for line, roles in lines.items():
        assert dumps.roles_named(line) == roles, line
    scanner = dumps.DumpScanner()
    scanner(b"\n".join(lines) + b"\n")
    assert scanner.roles == set().union(*lines.values())


@pytest.mark.parametrize("absent", ["database", "server_version", "pg_dump_version"])
def test_a_manifest_without_an_optional_version_field_loads(absent):
    raw = {k: v for k, v in GOOD_MANIFEST.items() if k != absent}
    assert dumps.manifest_problem(raw) is None
    assert getattr(dumps.Manifest.from_json(json.dumps(raw).encode()), absent) is None
