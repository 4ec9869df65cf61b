"""One user's scores over a catalogue (`topk.dense_user`, what svd, bayes_mf and
a hybrid's factor components compute per request) against numpy's
`V @ q + bias`, for factor counts that are and are not multiples of 8.

The kernel works on 8 rows x 8 dimensions at a time; dimensions past the last
multiple of 8 (svd's default 100, bayes_mf's 20) are the tail. Prints
microseconds per call of both, alternating in one process, and the ratio
(kernel / numpy; < 1 is faster). A tail that costs far more than a whole
8-dimension block shows up as a d whose ratio stands out from its neighbours.

    python bench/bench_scores.py
    python bench/bench_scores.py --items 100000 --dims 20,24,100,128
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from recserve.kernels import topk


def best_of(fn, calls: int, rounds: int) -> float:
    """Microseconds per call, the best of `rounds` rounds of `calls` calls."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=2500, help="catalogue size (quickstart's)")
    ap.add_argument("--dims", default="8,16,20,24,32,50,64,100,128")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{args.items:,} items; us per call, best of {args.rounds} rounds")
    print(f"{'d':>5}{'kernel':>10}{'numpy':>10}{'ratio':>8}")
    for d in (int(x) for x in args.dims.split(",")):
        ours, theirs = one_dim(rng, args.items, d, args.calls, args.rounds)
        print(f"{d:>5}{ours:>10.1f}{theirs:>10.1f}{ours / theirs:>8.2f}", flush=True)


def one_dim(
    rng: np.random.Generator, n: int, d: int, calls: int, rounds: int
) -> tuple[float, float]:
    """(kernel, numpy) microseconds per call at d dimensions; checks the kernel."""
    users = rng.standard_normal((4, d)).astype(np.float32)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    out = np.empty(n, np.float32)
    q = users[1]

    def kernel() -> None:
        topk.dense_user(users, 1, vectors, out, None, None, bias)

    def reference() -> None:
        np.add(vectors @ q, bias, out=out)

    ours = theirs = float("inf")
    for _ in range(2):  # alternate: a noisy neighbour hits both sides
        ours = min(ours, best_of(kernel, calls, rounds))
        theirs = min(theirs, best_of(reference, calls, rounds))
    kernel()
    np.testing.assert_allclose(out, vectors.astype(np.float64) @ q + bias, rtol=1e-4, atol=1e-4)
    return ours, theirs


if __name__ == "__main__":
    main()
