"""The hybrid's blend of dense component rows (`topk.blend_dense`, one call per
hybrid request) against the same blend in numpy (each row's top n_cand by
argpartition, then `blend_rows`), on catalogues from quickstart's size to
a million items.

The rows are shaped like a default hybrid's: a factor model's (every item
scored), an item-kNN's (most items 0: no similarity to the history) and a
content model's (a few distinct values), NaN at 60 seen items. Prints
microseconds per call of both, alternating in one process, and the ratio
(kernel / numpy; < 1 is faster); the answers are checked equal first.

    python bench/bench_blend.py
    python bench/bench_blend.py --items 2500,250000 --k 50
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_scores import best_of

from recserve.serving.blend import blend_dense, blend_rows


def hybrid_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Three float32 component rows over n items, NaN at 60 seen items."""
    factor = rng.standard_normal(n).astype(np.float32)
    knn = np.zeros(n, np.float32)
    hit = rng.random(n) < 0.35
    knn[hit] = rng.exponential(1.0, int(hit.sum())).astype(np.float32)
    content = rng.choice([0.0, 0.0, 0.25, 0.5, 1.0], n).astype(np.float32)
    rows = np.stack([factor, knn, content])
    rows[:, rng.choice(n, min(60, n), replace=False)] = np.nan
    return rows


def numpy_blend(rows: np.ndarray, weights: np.ndarray, n_cand: int, k: int):
    """The independent reference: each row's n_cand best (ties by lower index)
    by argpartition and a sort of the survivors, then blend_rows."""
    parts = []
    for w, row in zip(weights, rows, strict=True):
        valid = np.flatnonzero(~np.isnan(row))
        vals = row[valid]
        if valid.size > n_cand:
            cut = np.partition(vals, valid.size - n_cand)[valid.size - n_cand]
            keep = vals >= cut
            valid, vals = valid[keep], vals[keep]
        order = np.lexsort((valid, -vals))[:n_cand]
        parts.append((w, valid[order], vals[order]))
    return blend_rows(parts, k, rows.shape[1])


def timed(
    rows: np.ndarray, weights: np.ndarray, n_cand: int, k: int, calls: int, rounds: int
) -> tuple[float, float]:
    """(kernel, numpy) microseconds per call, alternating so both see the same machine."""
    ours = theirs = float("inf")
    for _ in range(2):
        ours = min(ours, best_of(lambda: blend_dense(rows, weights, n_cand, k), calls, rounds))
        theirs = min(theirs, best_of(lambda: numpy_blend(rows, weights, n_cand, k), calls, rounds))
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", default="2500,25000,250000,1000000")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    weights = np.array([0.5, 0.3, 0.2])
    n_cand = max(3 * args.k, 100)  # the router's candidates per component
    print(f"3 rows, {n_cand} candidates each, k={args.k}; us per call, best of {args.rounds}")
    print(f"{'items':>10}{'kernel':>10}{'numpy':>10}{'ratio':>8}")
    for n in (int(x) for x in args.items.split(",")):
        rows = hybrid_rows(rng, n)
        got, want = (
            blend_dense(rows, weights, n_cand, args.k),
            numpy_blend(rows, weights, n_cand, args.k),
        )
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
        ours, theirs = timed(rows, weights, n_cand, args.k, max(5, 2_000_000 // n), args.rounds)
        print(f"{n:>10,}{ours:>10.1f}{theirs:>10.1f}{ours / theirs:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
