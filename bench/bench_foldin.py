"""Fold-in kernels on long histories: svd / bayes_mf (sgd.ridge_user) against
numpy by history length; bpr (sgd.bpr_fold_in) by the share of the catalogue.

A stranger's inline history, or a known user's training row plus recorded
events, is folded in per request by one ridge solve over the rated items
(the dual n x n system below f + 1 ratings, the primal (f+1) x (f+1) one from
there on). Power users make n large: this prints, for each history length and
factor count, the microseconds of the kernel and of the numpy reference
(gather, Z^T Z, Z^T t, np.linalg.solve; the same answer, checked), alternated
in this process (bench/alternate.py), and the ratio (kernel / numpy; < 1 is
faster). BLAS runs on --threads threads for both (the server limits its own).

Then bpr's fold-in of histories covering a growing share of a --bpr-items
catalogue (64 factors, 50 passes: bpr's defaults): bpr_fold_in, which past
half the catalogue draws negatives from the other items at once, against the
training kernel on the same frozen row (bpr_epochs, redrawing a negative
while it is a positive: the fold-in before), alternated; ratio fold-in /
training kernel.

Last, when ../shared/data holds ml-100k: bpr's fold-in passes against
quality. bpr (defaults) fitted on a random 80/20 split; each user with >= 150
training items is folded in from their training row with 50 passes (no
bound), the default fold_in_max_steps (20,000 steps) and 3 passes: recall@10
on their held-out items, and milliseconds per fold-in.

    python bench/bench_foldin.py
    python bench/bench_foldin.py --factors 20,100 --lengths 50,500,5000 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alternate import best_of

from recserve.kernels import sgd

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def numpy_ridge(q, bi, mu, items, ratings, reg):
    """The reference: primal or dual ridge solve as ridge_user defines it."""
    z = np.hstack([np.ones((len(items), 1)), q[items].astype(np.float64)])
    t = ratings - mu - bi[items]
    shift = reg * max(len(items), 1)
    if 0 < len(items) < z.shape[1]:
        a = np.linalg.solve(z @ z.T + shift * np.eye(len(items)), t)
        return z.T @ a
    return np.linalg.solve(z.T @ z + shift * np.eye(z.shape[1]), z.T @ t)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", default="20,64,100", help="factor counts (svd's default 100)")
    ap.add_argument("--lengths", default="10,50,200,1000,5000,20000", help="history lengths")
    ap.add_argument("--items", type=int, default=30_000, help="catalogue size")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads for both sides")
    ap.add_argument("--repeat", type=int, default=20, help="alternated rounds (best kept)")
    ap.add_argument("--bpr-items", type=int, default=2_500, help="bpr part's catalogue")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    if max(lengths) > args.items:
        ap.error(f"--lengths: {max(lengths)} exceeds --items {args.items}")
    print(f"{'factors':>8}{'ratings':>9}{'kernel us':>11}{'numpy us':>10}{'ratio':>7}")
    with threadpool_limits(args.threads):
        for f in (int(x) for x in args.factors.split(",")):
            q = (rng.standard_normal((args.items, f)) * 0.3).astype(np.float32)
            bi = (rng.standard_normal(args.items) * 0.2).astype(np.float32)
            for n in lengths:
                items = rng.choice(args.items, n, replace=False).astype(np.int32)
                ratings = rng.integers(1, 6, n).astype(np.float64)
                (ours, got), (ref, want) = best_of(
                    args.repeat,
                    lambda: sgd.ridge_user(q, bi, 3.5, items, ratings, 0.02),  # noqa: B023
                    lambda: numpy_ridge(q, bi, 3.5, items, ratings, 0.02),  # noqa: B023
                )
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
                print(f"{f:>8}{n:>9}{ours * 1e6:>11.0f}{ref * 1e6:>10.0f}{ours / ref:>7.2f}")
        bpr_dense(rng, args.bpr_items, max(3, args.repeat // 5))
        if (ML100K / "u.data.xz").exists() or (ML100K / "u.data").exists():
            bpr_passes_recall()
        else:
            print(f"\n{ML100K} not present: the bpr recall part skipped")


def bpr_passes_recall() -> None:
    """Recall@10 of ml-100k users folded in by bpr with 50 passes, the default
    step bound and 3 passes (random 80/20 split, users with >= 150 items)."""
    from recserve.data import load_dataset
    from recserve.evaluation import split_random
    from recserve.models import create

    split = split_random(load_dataset(ML100K), 0.2, seed=0)
    train, test = split.train.interactions, split.test
    model = create("bpr").fit(split.train)
    users = [u for u in range(train.shape[0]) if train[u].nnz >= 150 and test[u].nnz >= 5]
    n = np.mean([train[u].nnz for u in users])
    print(f"\nbpr fold-in passes, ml-100k 80/20, {len(users)} users with >= 150 items ({n:.0f})")
    print(f"{'passes':<28}{'recall@10':>10}{'ms':>8}")
    q, bias = model.Q, model.bias
    e = model.params["fold_in_epochs"]
    for label, bound in (("50 (no bound)", 0), ("fold_in_max_steps=20000", 20_000), ("3", None)):
        model.params["fold_in_max_steps"] = bound if bound is not None else 3
        if bound is None:
            model.params["fold_in_epochs"] = 3
        hits, spent = [], 0.0
        for u in users:
            row = model.history_matrix([train[u].indices])
            t = time.perf_counter()
            p = model.fold_in(row)[0]
            spent += time.perf_counter() - t
            s = q @ p + bias
            s[train[u].indices] = -np.inf
            top = np.argpartition(-s, 10)[:10]
            hits.append(len(set(top.tolist()) & set(test[u].indices.tolist())) / 10)
        print(f"{label:<28}{np.mean(hits):>10.4f}{spent / len(users) * 1e3:>8.2f}")
        model.params["fold_in_epochs"] = e


def bpr_dense(rng: np.random.Generator, n_items: int, repeat: int) -> None:
    """bpr_fold_in vs bpr_epochs on one frozen row, by the row's share of the items."""
    q = (rng.standard_normal((n_items, 64)) * 0.1).astype(np.float32)
    b = np.zeros(n_items, np.float32)
    indptr = np.zeros(2, np.int64)
    print(f"\nbpr fold-in, {n_items:,} items, 64 factors, 50 passes")
    print(f"{'positives':>10}{'share':>7}{'fold-in ms':>12}{'redraw ms':>11}{'ratio':>7}")
    for share in (0.1, 0.5, 0.6, 0.9, 0.99, (n_items - 1) / n_items):
        n = round(share * n_items)
        items = np.sort(rng.choice(n_items, n, replace=False)).astype(np.int32)
        indptr[1] = n

        def redraw(items=items):
            p = np.zeros((1, 64), np.float32)
            sgd.bpr_epochs(indptr, items, p, q, b, 0.025, 0.015, 1, 50, 1, False)
            return p[0]

        (ours, _), (ref, _) = best_of(
            repeat, lambda items=items: sgd.bpr_fold_in(items, q, b, 0.025, 0.015, 1, 50), redraw
        )
        print(f"{n:>10,}{share:>7.3f}{ours * 1e3:>12.1f}{ref * 1e3:>11.1f}{ours / ref:>7.2f}")


if __name__ == "__main__":
    main()
