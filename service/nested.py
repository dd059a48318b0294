"""Nested JSON lists (latents, VQ codes) walked without recursion.

A request's `latents` is any JSON value; a recursive walk of it raises RecursionError (a 500) a few
hundred levels down, well inside what the JSON parser accepts. Every helper here walks level by level
with explicit lists, so its cost is the number of elements and its stack use is constant; `shape`
refuses a value nested deeper than `max_depth` before looking at its elements any further.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MAX_DEPTH = 32  # far above any model's latent rank + 1 (the zoo's deepest is 4)


class TooDeepError(ValueError):
    """A nested list deeper than the limit."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"nested more than {max_depth} lists deep")
        self.max_depth = max_depth


def shape(value: Any, max_depth: int = MAX_DEPTH) -> list[int] | None:
    """The shape of a rectangular nested list ([] for a scalar, [0] for []), or None if it is ragged
    (sibling lists of different lengths, or lists beside scalars). Raises TooDeepError past
    `max_depth` levels of lists."""
    dims: list[int] = []
    level = [value]
    while True:
        lists = [isinstance(item, list) for item in level]
        if not any(lists):
            return dims
        if not all(lists):
            return None
        length = len(level[0])
        if any(len(item) != length for item in level):
            return None
        if len(dims) == max_depth:
            raise TooDeepError(max_depth)
        dims.append(length)
        level = [element for item in level for element in item]
        if not level:  # an empty list: nothing below to look at
            return dims


def flatten(value: Any) -> list[Any]:
    """The scalars of a nested list in row-major order (a scalar: [value])."""
    out: list[Any] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def convert(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """The same nesting of lists with `leaf` applied to every scalar (e.g. `float`, `int`)."""
    if not isinstance(value, list):
        return leaf(value)
    root: list[Any] = []
    stack: list[tuple[list[Any], list[Any]]] = [(value, root)]
    while stack:
        source, target = stack.pop()
        for item in source:
            if isinstance(item, list):
                child: list[Any] = []
                target.append(child)
                stack.append((item, child))
            else:
                target.append(leaf(item))
    return root
