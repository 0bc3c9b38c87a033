from types import SimpleNamespace

from kwbackup import restore


def test_the_load_is_expected_to_grow_to_the_database_it_replaces():
    dump = SimpleNamespace(manifest=SimpleNamespace(bytes=1_000))
    assert restore.expected_size(dump, SimpleNamespace(exists=True, size=900_000)) == 900_000


def test_without_a_database_to_replace_the_estimate_comes_from_the_dump():
    new = SimpleNamespace(exists=False, size=0)
    assert restore.expected_size(SimpleNamespace(manifest=SimpleNamespace(bytes=1_000)), new) == 6_000
    assert restore.expected_size(SimpleNamespace(manifest=None), new) == 0
