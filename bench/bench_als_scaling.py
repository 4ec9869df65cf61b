"""ALS scaling curve: seconds per iteration and peak memory against data size.

    python bench/bench_als_scaling.py                          # 1M, 5M, 20M interactions
    python bench/bench_als_scaling.py --sizes 1000000,5000000 --factors 64

Each size runs in its own process (so one size's memory never counts toward
the next) on the synthetic data bench_mf.py uses (n/50 users, n/250 items,
long-tail popularity), `als` with 64 factors, 10 iterations, 3 CG steps and
2 threads. Prints the fit's seconds per iteration (fit time / iterations,
including the final exact user pass), the process's resident memory before
the fit, its peak during the fit (sampled every 10 ms from /proc), and the
bytes of the interaction matrix and the factors, so the peak can be read
against what the fit must hold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/statm."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def one(n: int, factors: int, iterations: int, threads: int) -> dict:
    """Generate n interactions, fit ALS once, and measure (runs in a child process)."""
    sys.path.insert(0, str(ROOT))
    from recserve.data import generate, to_dataset
    from recserve.models import create

    ds = to_dataset(generate(n // 50, max(2_000, n // 250), n, seed=11))
    model = create("als", factors=factors, iterations=iterations, index="exact")
    model.n_threads = threads
    before = rss_bytes()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    model.fit(ds)
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    m = ds.interactions
    return {
        "interactions": ds.nnz,
        "users": ds.n_users,
        "items": ds.n_items,
        "factors": factors,
        "s_per_iter": seconds / iterations,
        "rss_before_mb": before / 1e6,
        "peak_rss_mb": max(peak, rss_bytes()) / 1e6,
        "matrix_mb": (m.data.nbytes + m.indices.nbytes + m.indptr.nbytes) / 1e6,
        "factors_mb": (model.user_factors.nbytes + model.item_factors.nbytes) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,5000000,20000000")
    ap.add_argument("--factors", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.factors, args.iterations, args.threads)))
        return
    print(
        f"{'interactions':>13}{'users':>9}{'items':>8}{'s/iter':>8}"
        f"{'RSS before MB':>15}{'peak MB':>9}{'matrix MB':>11}{'factors MB':>12}"
    )
    for n in (int(x) for x in args.sizes.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(n),
                "--factors",
                str(args.factors),
                "--iterations",
                str(args.iterations),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['interactions']:>13,}{r['users']:>9,}{r['items']:>8,}{r['s_per_iter']:>8.2f}"
            f"{r['rss_before_mb']:>15.0f}{r['peak_rss_mb']:>9.0f}{r['matrix_mb']:>11.0f}"
            f"{r['factors_mb']:>12.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
