"""parallel_load's stream reading (the COPY terminator search, the pieces read from a pipe), and where each
entry type pg_dump writes loads: its section, and in the post-data the kind of unit it makes."""

import os
import random
import threading

import pytest

from kwbackup import parallel_load


def test_the_terminator_search_finds_what_a_four_byte_search_finds():
    """memchr over backslashes, then the four-byte search where they are common: the same answer."""
    rng = random.Random(3)
    alphabet = [b"\n", b"\\", b".", b"N", b"a"]
    for _ in range(3000):
        buf = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        for pos in range(len(buf) + 1):
            assert parallel_load.find_terminator(buf, pos) == buf.find(b"\n\\.\n", pos), (buf, pos)


def test_the_terminator_is_found_past_many_nulls():
    rows = b"1\t\\N\t\\N\t\\N\n" * 10_000
    buf = rows + b"\\.\nCREATE INDEX ...\n"
    assert parallel_load.find_terminator(buf, 0) == len(rows) - 1
    assert parallel_load.find_terminator(rows, 0) == -1


def test_a_trickling_pipe_is_read_in_pieces_of_a_quarter_mib_with_every_byte():
    data = os.urandom(3 << 20)
    read_end, write_end = os.pipe()

    def trickle():
        with os.fdopen(write_end, "wb", buffering=0) as out:
            for at in range(0, len(data), 4096):
                out.write(data[at : at + 4096])

    writer = threading.Thread(target=trickle)
    writer.start()
    try:
        pieces = list(parallel_load.chunks_of(read_end))
    finally:
        writer.join()
        os.close(read_end)
    assert b"".join(pieces) == data
    assert all(len(p) >= parallel_load.CHUNK // 4 for p in pieces[:-1])
    assert all(len(p) <= parallel_load.CHUNK for p in pieces)


def sections(*types):
    """The section of each entry of a dump whose entries have these types, in this order."""
    section, found = parallel_load.PRE_DATA, []
    for type_ in types:
        section = parallel_load.section_of(type_.encode(), section)
        found.append(section)
    return found


PRE, DATA, POST = parallel_load.PRE_DATA, parallel_load.DATA, parallel_load.POST_DATA


def test_large_objects_comments_and_grants_stay_in_pg_dumps_sections():
    """pg_dump 15 and 16: a large object (BLOB) and its comment are pre-data, then the tables' rows; its grant
    comes with the other ACLs after the post-data. (The BLOB entries once took the data with them, their
    comment the post-data, and the rows after it loaded in one session.)"""
    assert sections("TABLE", "DEFAULT", "BLOB", "COMMENT", "SECURITY LABEL", "BLOB", "TABLE DATA") == [PRE] * 6 + [DATA]
    after = sections("TABLE", "TABLE DATA", "SEQUENCE SET", "BLOBS", "CONSTRAINT", "ACL", "MATERIALIZED VIEW DATA")
    assert after == [PRE] + [DATA] * 3 + [POST] * 3


def test_pg_dump_17_and_18_entries_in_the_data_stay_there():
    """pg_dump 17 writes large objects' metadata as data, their comments beside it; pg_dump 18 a table's statistics
    in the data, an index's after the ACLs."""
    assert sections(
        "TABLE", "BLOB METADATA", "COMMENT", "SECURITY LABEL", "TABLE DATA", "BLOBS", "STATISTICS DATA", "INDEX"
    ) == [PRE] + [DATA] * 6 + [POST]
    assert (
        sections("TABLE", "INDEX", "ACL", "MATERIALIZED VIEW DATA", "STATISTICS DATA", "EVENT TRIGGER", "COMMENT")
        == [PRE] + [POST] * 6
    )


def test_a_dump_without_data_or_post_data_keeps_its_order():
    assert sections("SCHEMA", "COMMENT", "FUNCTION", "ACL", "DEFAULT ACL") == [PRE, PRE, PRE, POST, POST]
    assert sections("TABLE", "NEW KIND", "TABLE DATA", "NEW KIND", "TABLE DATA") == [PRE, PRE, DATA, POST, POST]


def placed(type_, sql):
    return parallel_load.placement(type_.encode(), sql.encode())


def test_indexes_and_their_tables_own_constraints_build_beside_each_other():
    """Names as pg_dump quotes them; the ALTERs pg_dump adds to an index's or constraint's entry (CLUSTER,
    REPLICA IDENTITY) stay with it."""
    feeding = 'CREATE INDEX "Feeding index" ON "Zoo Keeper"."Feeding ""Times""" USING btree ("When");\n'
    assert placed("INDEX", feeding) == ("index", 'Zoo Keeper.Feeding "Times"')
    clustered = (
        "CREATE INDEX items_body ON extra.items USING btree (body);\n\nALTER TABLE extra.items CLUSTER ON items_body;\n"
    )
    assert placed("INDEX", clustered) == ("index", "extra.items")
    on_a_partitioned_table = "CREATE UNIQUE INDEX e_pkey ON ONLY public.events USING btree (id);\n"
    assert placed("INDEX", on_a_partitioned_table) == ("index", "public.events")
    pkey = "ALTER TABLE ONLY public.items\n    ADD CONSTRAINT items_pkey PRIMARY KEY (id);\n"
    identity = "\nALTER TABLE ONLY public.items REPLICA IDENTITY USING INDEX items_pkey;\n"
    assert placed("CONSTRAINT", pkey) == placed("CONSTRAINT", pkey + identity) == ("constraint", "public.items")
    exclusion = 'ALTER TABLE ONLY "a.b".c\n    ADD CONSTRAINT c_excl EXCLUDE USING gist (during WITH &&);\n'
    assert placed("CONSTRAINT", exclusion) == ("constraint", "a.b.c")
    attach = "ALTER INDEX public.e_pkey ATTACH PARTITION public.e_2026_pkey;\n"
    assert placed("INDEX ATTACH", attach) == ("attach", None)


def test_constraints_that_check_rows_beyond_one_table_come_after_the_data():
    """NOT VALID or not: a foreign key locks both its tables; a CHECK on a table recurses into its children (no
    ONLY), a domain's reaches every column of it, pg_dump 18's NOT NULL ... NOT VALID recurses: each alone."""
    fk = "ALTER TABLE ONLY public.pets\n    ADD CONSTRAINT pets_owner_fk FOREIGN KEY (owner_id) REFERENCES "
    assert placed("FK CONSTRAINT", fk + "public.owners(id) NOT VALID;\n") == ("late", ("public.pets", "public.owners"))
    recursing = "ALTER TABLE public.events\n    ADD CONSTRAINT e_fk FOREIGN KEY (a) REFERENCES public.owners(id);\n"
    assert placed("FK CONSTRAINT", recursing) == ("late", None)
    for type_, sql in [
        ("CHECK CONSTRAINT", "ALTER DOMAIN public.positive_int\n    ADD CONSTRAINT p CHECK ((VALUE > 0)) NOT VALID;\n"),
        ("CHECK CONSTRAINT", "ALTER TABLE public.readings\n    ADD CONSTRAINT r CHECK ((reading > 0)) NOT VALID;\n"),
        ("CHECK CONSTRAINT", "ALTER FOREIGN TABLE extra.remote\n    ADD CONSTRAINT r CHECK ((id > 0)) NOT VALID;\n"),
        ("CHECK CONSTRAINT", "ALTER TABLE extra.chk\n    ADD CONSTRAINT chk_row_ok CHECK (extra.chk_ok(chk.*));\n"),
        ("CONSTRAINT", "ALTER TABLE public.t\n    ADD CONSTRAINT t_v_not_null NOT NULL v NOT VALID;\n"),
        ("CONSTRAINT", "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_pkey PRIMARY KEY USING INDEX t_id;\n"),
    ]:
        assert placed(type_, sql) == ("late", None), sql


@pytest.mark.parametrize("type_", sorted(t.decode() for t in parallel_load.LATER_TYPES))
def test_every_other_post_data_type_loads_at_the_end_in_order(type_):
    """TRIGGER, RULE, POLICY, EVENT TRIGGER, MATERIALIZED VIEW DATA, PUBLICATION, ACL, COMMENT, ..."""
    assert placed(type_, "GRANT SELECT ON LARGE OBJECT 424242 TO zoo_reader;\n") == ("later", None)


@pytest.mark.parametrize(
    "type_, sql, why",
    [
        ("INDEX", "CREATE INDEX a ON t (v);\n", "an index statement it cannot read"),
        (
            "INDEX",
            "CREATE INDEX a ON public.t USING btree (v);\nCREATE INDEX b ON public.t USING btree (w);\n",
            "an index statement it cannot read",
        ),
        (
            "CONSTRAINT",
            "ALTER TABLE ONLY public.t ADD CONSTRAINT t_pkey PRIMARY KEY (id);\n",
            "a constraint it cannot read",
        ),
        ("CHECK CONSTRAINT", "ALTER TABLE t ADD CHECK (v > 0);\n", "a constraint it cannot read"),
        ("TRIGGER", "\\connect other\nCREATE TRIGGER ...\n", "a psql meta-command"),
        ("TABLE", "CREATE TABLE public.late (id int);\n", "an entry of type TABLE"),
        ("SEQUENCE SET", "SELECT pg_catalog.setval('public.s', 3, true);\n", "an entry of type SEQUENCE SET"),
    ],
)
def test_what_pg_dump_does_not_write_in_the_post_data_is_not_placed(type_, sql, why):
    assert placed(type_, sql) == (None, why)
