"""The breakpoint table's rules, without a model."""

from __future__ import annotations

import pytest

from djinn_kernel.breakpoints import BreakpointTable, parse_tokens
from djinn_kernel.errors import InvalidArgumentError


@pytest.mark.parametrize(
    "given, expected",
    [(None, None), (3, range(3, 4)), ((1, 4), range(1, 5)), ("2-5", range(2, 6)), ("7", range(7, 8)), (range(0, 2), range(0, 2))],
)
def test_parse_tokens(given, expected):
    assert parse_tokens(given) == expected


@pytest.mark.parametrize("bad", ["x", "3-", "-1", (4, 2), True, 1.5, [1, 2, 3], range(3, 3)])
def test_parse_tokens_rejects(bad):
    with pytest.raises(InvalidArgumentError):
        parse_tokens(bad)


def test_match_counts_hits_and_limits():
    table = BreakpointTable()
    a = table.add("layers.1", 1)
    b = table.add("layers.1", 1, max_hits=2)
    c = table.add("layers.1", 1, side="input", tokens=(1, 1))
    assert [bp.id for bp in table.match("layers.1", "output", 0)] == [a.id, b.id]
    assert [bp.id for bp in table.match("layers.1", "output", 1)] == [a.id, b.id]
    assert [bp.id for bp in table.match("layers.1", "output", 2)] == [a.id]
    assert table.match("layers.1", "input", 0) == []
    assert [bp.id for bp in table.match("layers.1", "input", 1)] == [c.id]
    assert table.match("layers.2", "output", 0) == []
    assert (a.hits, b.hits, c.hits) == (3, 2, 1)


def test_remove():
    table = BreakpointTable()
    ids = [table.add(f"m{i}", None).id for i in range(3)]
    assert table.remove(ids[1]) == [ids[1]]
    with pytest.raises(InvalidArgumentError, match="no breakpoint"):
        table.remove(ids[1])
    assert table.remove() == [ids[0], ids[2]] and len(table) == 0
    assert table.add("m", None).id == ids[-1] + 1, "ids are never reused"
