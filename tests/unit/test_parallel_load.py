"""parallel_load's stream reading: the COPY terminator search and the pieces read from a pipe."""

import os
import random
import threading

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
