"""svd / bayes_mf fold-in kernel (sgd.ridge_user) against numpy, by history length.

A stranger's inline history, or a known user's training row plus recorded
events, is folded in per request by one ridge solve over the rated items
(the dual n x n system below f + 1 ratings, the primal (f+1) x (f+1) one from
there on). Power users make n large: this prints, for each history length and
factor count, the microseconds of the kernel and of the numpy reference
(gather, Z^T Z, Z^T t, np.linalg.solve; the same answer, checked), alternated
in this process (bench/alternate.py), and the ratio (kernel / numpy; < 1 is
faster). BLAS runs on --threads threads for both (the server limits its own).

    python bench/bench_foldin.py
    python bench/bench_foldin.py --factors 20,100 --lengths 50,500,5000 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alternate import best_of

from recserve.kernels import sgd


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


if __name__ == "__main__":
    main()
