"""ALS half-sweeps timed one by one, with serial and threaded BLAS.

    python bench/bench_als_passes.py                 # 4M interactions, 64 and 128 factors

On synthetic data (n/50 users, n/250 items), times one CG user pass (3 steps),
one CG item pass and the exact user pass ALS ends training with (what makes
fold-in reproduce trained users), each on 2 OpenMP threads. Each BLAS setting
runs in its own process with OPENBLAS_NUM_THREADS set before numpy loads: the
row solves call BLAS from every OpenMP thread, so a threaded BLAS
oversubscribes the cores (why ALS training runs BLAS serially).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def passes(n: int, factors: list[int]) -> None:
    """Time the three passes (runs in a child with its BLAS setting)."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from recserve.data import generate, to_dataset
    from recserve.kernels import als as alsk

    ds = to_dataset(generate(n // 50, max(2_000, n // 250), n, seed=11))
    cui = ds.interactions.tocsr().astype(np.float32)
    cui.data = (1 + 2.0 * cui.data).astype(np.float32)
    ciu = cui.T.tocsr()
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "?")
    for f in factors:
        rng = np.random.default_rng(0)
        users = (rng.standard_normal((ds.n_users, f)) * 0.1).astype(np.float32)
        items = (rng.standard_normal((ds.n_items, f)) * 0.1).astype(np.float32)
        times = []
        for indptr, indices, data, fixed, solved, steps in (
            (cui.indptr, cui.indices, cui.data, items, users, 3),
            (ciu.indptr, ciu.indices, ciu.data, users, items, 3),
            (cui.indptr, cui.indices, cui.data, items, users, 0),
        ):
            t = time.perf_counter()
            g = alsk.gram(fixed, 0.05) if steps == 0 else None
            alsk.solve_rows(indptr, indices, data, fixed, solved, 0.05, steps, G=g, n_threads=2)
            times.append(time.perf_counter() - t)
        print(
            f"{ds.nnz:>13,}{f:>8}{blas:>6}{times[0]:>10.2f}{times[1]:>10.2f}{times[2]:>10.2f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--interactions", type=int, default=4_000_000)
    ap.add_argument("--factors", default="64,128")
    ap.add_argument("--blas-threads", default="1,2")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    factors = [int(x) for x in args.factors.split(",")]
    if args.child:
        passes(args.interactions, factors)
        return
    head = f"{'interactions':>13}{'factors':>8}{'BLAS':>6}"
    print(head + f"{'CG users':>10}{'CG items':>10}{'exact':>10}")
    for threads in args.blas_threads.split(","):
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--interactions",
                str(args.interactions),
                "--factors",
                args.factors,
            ],
            env={**os.environ, "OPENBLAS_NUM_THREADS": threads},
            check=True,
        )


if __name__ == "__main__":
    main()
