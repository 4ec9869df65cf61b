"""Does one process scale over cores? Recommend calls from 1 thread vs 2 threads.

    python bench/bench_threads.py [--items 200000]

Kernels release the GIL, so threads overlap inside them; the Python around
them (id mapping, argument checks) does not. Prints calls/s with 1 and 2
threads and the speed-up, for the model call alone and for the full serving
path (recserve.serving.Router), on ALS (exact scoring) and item-kNN.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
from threadpoolctl import threadpool_limits

from recserve.config import ServerConfig
from recserve.data import generate, to_dataset
from recserve.feedback import OnlineState
from recserve.models import create
from recserve.serving import Catalog, RecQuery, Router


def rate(fn, calls: int, threads: int) -> float:
    per = calls // threads
    barrier = threading.Barrier(threads + 1)

    def work(seed: int) -> None:
        barrier.wait()
        for i in range(per):
            fn(seed * per + i)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return per * threads / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--calls", type=int, default=4000)
    args = ap.parse_args()
    # As `recserve serve` does: one BLAS/OpenMP thread per request, the requests
    # themselves spread over the cores.
    threadpool_limits(limits=1)
    n = args.items
    ds = to_dataset(generate(n, n, 25 * n, seed=1))
    print(f"{'what':<34}{'1 thread /s':>12}{'2 threads /s':>14}{'speed-up':>10}")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for algo, params in (
            ("als", {"factors": 64, "iterations": 3, "index": "exact"}),
            ("itemknn", {"k": 100}),
        ):
            model = create(algo, **params).fit(ds)
            model.n_threads = 1
            model.save(tmp, algo)
            users = np.random.default_rng(0).integers(0, ds.n_users, args.calls)

            def call(i, m=model, users=users):
                m.recommend([int(users[i])], k=10)

            one, two = rate(call, args.calls, 1), rate(call, args.calls, 2)
            print(f"{algo + ' model.recommend':<34}{one:>12,.0f}{two:>14,.0f}{two / one:>10.2f}")
        cat = Catalog(tmp, kernel_threads=1)
        cat.start()
        cat.wait()
        router = Router(ServerConfig(models=tmp), cat, OnlineState())
        ids = ds.users.ids(np.random.default_rng(0).integers(0, ds.n_users, args.calls))
        for algo in ("als", "itemknn"):

            def serve(i, a=algo):
                router.recommend(RecQuery(user_id=ids[i], k=10, model=a))

            one, two = rate(serve, args.calls, 1), rate(serve, args.calls, 2)
            print(f"{algo + ' Router.recommend':<34}{one:>12,.0f}{two:>14,.0f}{two / one:>10.2f}")
        cat.close()


if __name__ == "__main__":
    main()
