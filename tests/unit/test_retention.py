from kwbackup import names, retention


def plan(entries, keep):
    pairs = [(names.parse(n), ok) for n, ok in entries]
    return [d.name for d in retention.to_remove(pairs, keep)]


def test_keeps_the_newest_valid_dumps():
    entries = [(f"db-2024-01-{d:02d}.sql.gz", True) for d in range(1, 6)]
    assert plan(entries, 2) == ["db-2024-01-03.sql.gz", "db-2024-01-02.sql.gz", "db-2024-01-01.sql.gz"]
    assert plan(entries, 5) == [] and plan(entries, 9) == []


def test_invalid_dumps_do_not_count_and_never_push_good_ones_out():
    entries = [("db-2024-01-01.sql.gz", True), ("db-2024-01-02.sql.gz", True),
               ("db-2024-01-03.sql.gz", False), ("db-2024-01-04.sql.gz", False), ("db-2024-01-05.sql.gz", False)]
    assert plan(entries, 2) == []
    assert plan(entries, 1) == ["db-2024-01-01.sql.gz"]


def test_newest_valid_dump_is_never_removed_even_with_keep_1():
    entries = [("db-2024-01-01.sql.gz", True), ("db-2024-01-02.sql.gz", False)]
    assert plan(entries, 1) == []


def test_only_nightly_dumps_are_removed():
    entries = [("kw_app_production-20200101-000000.sql", True), ("db-2024-01-01.sql.gz", True),
               ("db-2024-01-02.sql.gz", True), ("db-2024-01-03.sql.gz", True)]
    assert plan(entries, 1) == ["db-2024-01-02.sql.gz", "db-2024-01-01.sql.gz"]


def test_timed_dump_of_the_same_day_is_newer():
    entries = [("db-2024-01-02.sql.gz", True), ("db-2024-01-02-000000.sql.gz", True)]
    assert plan(entries, 1) == ["db-2024-01-02.sql.gz"]
