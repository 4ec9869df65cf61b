"""Timing helper the benches share: sides of a comparison run alternately."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_of(repeat: int, *sides: Callable[[], Any]) -> list[tuple[float, Any]]:
    """(min seconds, last result) of each function over `repeat` rounds.

    Within a round the functions run one after the other, so a slow phase of
    a shared VM hits every side instead of whichever happened to run then.
    """
    best: list[float] = [float("inf")] * len(sides)
    out: list[Any] = [None] * len(sides)
    for _ in range(max(repeat, 1)):
        for side, fn in enumerate(sides):
            t = time.perf_counter()
            out[side] = fn()
            best[side] = min(best[side], time.perf_counter() - t)
    return list(zip(best, out, strict=True))
