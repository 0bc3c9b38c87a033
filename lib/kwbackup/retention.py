"""Which dumps a place keeps: its KEEP newest valid dumps.

Only valid dumps count toward KEEP; only nightly `db-*` dumps are ever removed, and only
those older than the KEEP-th newest valid one, so the newest valid dump is never removed,
and invalid or planted "newer" files can never push good dumps out.
"""

from __future__ import annotations

from .names import DumpName


def to_remove(dumps: list[tuple[DumpName, bool]], keep: int) -> list[DumpName]:
    """Given (dump, valid) pairs, the dumps rotation removes, oldest last."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    ordered = sorted(dumps, key=lambda pair: pair[0].sort_key, reverse=True)
    valid = [d for d, ok in ordered if ok]
    if len(valid) <= keep:
        return []
    cutoff = valid[keep - 1].sort_key
    return [d for d, _ in ordered if d.nightly and d.sort_key < cutoff]
