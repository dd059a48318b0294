"""`service.nested`: shapes, flattening and conversion of nested lists without recursion, so a list
nested far deeper than Python's recursion limit costs its size, never a RecursionError."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from service import nested


def deep(depth: int, leaf: Any = 0.5) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.5, []),
        ([], [0]),
        ([[], []], [2, 0]),
        ([1, 2, 3], [3]),
        ([[1, 2], [3, 4], [5, 6]], [3, 2]),
        ([[[1], [2]], [[3], [4]]], [2, 2, 1]),
        ([[1, 2], [3]], None),  # ragged
        ([1, [2]], None),  # a scalar beside a list
        ([[1], 2], None),
        ([[[1]], [[1, 2]]], None),  # ragged below the first level
        ([[], [1]], None),
        ("text", []),
    ],
)
def test_shape(value: Any, expected: list[int] | None) -> None:
    assert nested.shape(value) == expected


def test_shape_takes_exactly_max_depth_levels_and_refuses_one_more() -> None:
    assert nested.shape(deep(5), max_depth=5) == [1] * 5
    with pytest.raises(nested.TooDeepError):
        nested.shape(deep(6), max_depth=5)
    assert nested.shape([[1.0], deep(40)]) is None  # ragged at level 2, before any depth


@pytest.mark.parametrize("depth", [900, sys.getrecursionlimit() * 3])
def test_far_deeper_than_the_recursion_limit(depth: int) -> None:
    value = deep(depth)
    with pytest.raises(nested.TooDeepError):
        nested.shape(value)
    assert nested.shape(value, max_depth=depth) == [1] * depth
    assert nested.flatten(value) == [0.5]
    converted = nested.convert(value, int)
    assert nested.flatten(converted) == [0]
    assert nested.shape(converted, max_depth=depth) == [1] * depth


def test_flatten_is_row_major() -> None:
    assert nested.flatten([[1, 2], [3, [4, 5]], [], 6]) == [1, 2, 3, 4, 5, 6]
    assert nested.flatten(7) == [7]
    assert nested.flatten([]) == []


def test_convert_keeps_the_nesting_and_order() -> None:
    value = [[1, 2], [3, [4, 5]], [], 6]
    assert nested.convert(value, float) == [[1.0, 2.0], [3.0, [4.0, 5.0]], [], 6.0]
    assert nested.convert(value, str) == [["1", "2"], ["3", ["4", "5"]], [], "6"]
    assert nested.convert(2, float) == 2.0
    assert nested.convert([], int) == []
