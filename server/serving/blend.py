"""Hybrid blending, once for Recommend and SimilarItems.

Each component's scores over its own top candidates are min-max normalized to
[0, 1] (all equal -> 1), weighted, and summed per item id; the blend's top k
are the items with the largest sums, ties by id, so the answer does not depend
on the order components are listed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from recserve.kernels import topk


def minmax(scores: np.ndarray) -> np.ndarray:
    """Scores mapped onto [0, 1] by their min and max (all equal -> all 1)."""
    scores = np.asarray(scores, np.float64)
    lo, hi = float(scores.min()), float(scores.max())
    return (scores - lo) / (hi - lo) if hi > lo else np.ones_like(scores)


def blend(
    parts: Iterable[tuple[float, Sequence[str], np.ndarray]], k: int
) -> list[tuple[str, float]]:
    """The k best (item id, blended score) of weighted parts (weight, ids, scores)."""
    total: dict[str, float] = {}
    for weight, ids, scores in parts:
        if len(ids) == 0:
            continue
        for item_id, v in zip(ids, minmax(scores).tolist(), strict=True):
            total[item_id] = total.get(item_id, 0.0) + weight * v
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def blend_rows(
    parts: Iterable[tuple[float, np.ndarray, np.ndarray]], k: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """`blend` for parts that share one item index space of n_items (weight, item
    rows, scores): the same sums, added in the same order (a dense accumulator;
    rows are distinct within a part), and the same ties (an IdMap's rows are in
    id order), in a few array operations instead of a dict per item.
    Returns (rows int32, blended scores float64), best first."""
    total = np.zeros(n_items, np.float64)
    touched = np.zeros(n_items, bool)
    for weight, items, scores in parts:
        if len(items) == 0:
            continue
        total[items] += weight * minmax(scores)
        touched[items] = True
    rows = np.flatnonzero(touched)
    order = np.lexsort((rows, -total[rows]))[:k]
    return rows[order].astype(np.int32), total[rows[order]]


def blend_dense(
    rows: np.ndarray,
    weights: Sequence[float],
    n_cand: int,
    k: int,
    positive: np.ndarray | None = None,
    popular: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`blend_rows` of components given as dense score rows (components x
    items, float32, NaN = not eligible) whose candidates are each row's n_cand
    best entries (only those > 0 where positive[c], uint8: a `sparse_scores`
    model's reached items): selection, normalisation, sums and the top k in
    one kernel pass (kernels.topk.blend_dense). `popular` (order int32, counts
    float32, banned int32 or None) is one more part, weighted by the last of
    `weights`: the counts as a row NaN at `banned`, read from the order
    instead. Returns (rows int32, sums float64, each part's number of
    candidates: 0 when it had none, as an empty part)."""
    w = np.asarray(weights, np.float64)
    if popular is None:
        return topk.blend_dense(rows, w, n_cand, k, positive)
    order, counts, banned = popular
    return topk.blend_dense(rows, w, n_cand, k, positive, order, counts, banned)
