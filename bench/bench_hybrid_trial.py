"""One trial of `recserve tune --hybrid`: re-ranking every validation user's
candidates for a set of weights (`tuning.Candidates.blend`), against the same
blend over dense users x items rows (np.add.at into a zeroed matrix, a stable
argsort of each row: how trials were computed before 2026-12-04).

Candidates are shaped like a default hybrid's: three components, 100 each per
user (some users with fewer), scores in [0, 1]. Both answers are checked equal
first; then seconds per trial of both, alternating in one process, and the
ratio (candidates / dense; < 1 is faster). A trial's cost was the whole search:
on 100,000 users x 30,000 items, 30 trials took 15 minutes.

    python bench/bench_hybrid_trial.py
    python bench/bench_hybrid_trial.py --users 100000 --items 30000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

from recserve.tuning import Candidates


def dense_blend(c: Candidates, weights: list[float], k: int) -> np.ndarray:
    """The reference: each user's weighted sums in a dense row, untouched items
    -inf, then a stable argsort (ties by smaller item index)."""
    n_users = c.relevant.shape[0]
    out = np.full((n_users, k), -1, np.int64)
    for lo in range(0, n_users, 512):
        hi = min(lo + 512, n_users)
        total = np.zeros((hi - lo, c.n_items))
        touched = np.zeros((hi - lo, c.n_items), bool)
        rows = np.arange(hi - lo)[:, None]
        for w, items, s in zip(weights, c.items, c.scores, strict=True):
            if w <= 0:
                continue
            it = items[lo:hi]
            ok = it >= 0
            r = np.broadcast_to(rows, it.shape)[ok]
            np.add.at(total, (r, it[ok]), w * s[lo:hi][ok])
            touched[r, it[ok]] = True
        total[~touched] = -np.inf
        order = np.argsort(-total, axis=1, kind="stable")[:, :k]
        got = np.take_along_axis(total, order, axis=1)
        out[lo:hi] = np.where(np.isfinite(got), order, -1)
    return out


def candidates(rng: np.random.Generator, users: int, items: int, n: int = 100) -> Candidates:
    """Three components' top n per user: popular-skewed item draws, sorted scores."""
    p = 1.0 / np.arange(1, items + 1) ** 0.8
    p /= p.sum()
    its, scs = [], []
    for _ in range(3):
        it = np.empty((users, n), np.int64)
        for u in range(users):
            it[u] = rng.choice(items, n, replace=False, p=p)
        it[rng.random((users, n)) < 0.05] = -1
        s = np.sort(rng.random((users, n)), axis=1)[:, ::-1].copy()
        s[it < 0] = 0.0
        its.append(it)
        scs.append(s)
    return Candidates(["als", "itemknn", "content"], its, scs, sp.csr_matrix((users, items)), items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", default="1700,30000,100000", help="catalogue sizes")
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    weights = [0.5, 0.47, 0.03]
    print(f"{'items':>8} {'users':>8} {'candidates s':>13} {'dense s':>9} {'ratio':>6}")
    for items in (int(x) for x in args.items.split(",")):
        c = candidates(rng, args.users, items)
        np.testing.assert_array_equal(c.blend(weights, args.k), dense_blend(c, weights, args.k))
        ours = theirs = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            c.blend(weights, args.k)
            ours = min(ours, time.perf_counter() - t)
            t = time.perf_counter()
            dense_blend(c, weights, args.k)
            theirs = min(theirs, time.perf_counter() - t)
        print(f"{items:>8,} {args.users:>8,} {ours:>13.3f} {theirs:>9.3f} {ours / theirs:>6.2f}")


if __name__ == "__main__":
    main()
