"""Retrieval over item factors: exact scoring (numpy + the Cython top-k kernel) next to
FAISS flat, HNSW and IVF, on synthetic factors shaped like trained ones.

    python bench/bench_index.py --items 100000,1000000 --dim 64

For each catalogue size and method: build seconds, index bytes, single-query
latency p50/p99 (one thread, as the service runs a request), single-query p50
with every core (what an OpenMP team costs one query), batch throughput (all
cores), and recall@10 against exact, every query excluding ~50 "seen" items.
The exact row is the reference the ratios are taken against; where ANN starts
to pay (its p50 below exact's at >= 0.98 recall) sets the `auto` default in
server/models/embedding.py.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from recserve.index import ItemIndex, SearchConfig
from recserve.kernels import topk


def synthetic_factors(n_items: int, dim: int, n_queries: int, seed: int = 0):
    """Clustered directions, long-tail norms (popular items larger), 1% zero vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    c = rng.integers(0, 64, n_items)
    y = centres[c] + 0.7 * rng.standard_normal((n_items, dim)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    y *= rng.lognormal(-1.0, 0.6, n_items).astype(np.float32)[:, None]
    y[rng.choice(n_items, n_items // 100, replace=False)] = 0.0
    u = centres[rng.integers(0, 64, n_queries)] + rng.standard_normal((n_queries, dim))
    popularity = np.linalg.norm(y, axis=1) + 1e-3
    p = popularity / popularity.sum()
    seen = [rng.choice(n_items, 50, replace=False, p=p) for _ in range(n_queries)]
    return y.astype(np.float32), u.astype(np.float32), seen


def csr(lists):
    ptr = np.zeros(len(lists) + 1, np.int64)
    np.cumsum([len(x) for x in lists], out=ptr[1:])
    return ptr, np.concatenate(lists).astype(np.int32)


def exact_topk(y, q, k, excl, n_threads):
    scores = np.ascontiguousarray(q @ y.T, dtype=np.float32)
    return topk.topk_dense(scores, k, excl[0], excl[1], None, None, n_threads)


def single_latency(search, queries, seen, single=True):
    lat = []
    for r in range(min(300, queries.shape[0])):
        excl = csr(seen[r : r + 1])
        t = time.perf_counter()
        search(queries[r : r + 1], excl, single=single)
        lat.append(time.perf_counter() - t)
    return lat


def measure(name, search, queries, seen, want, k=10):
    lat = single_latency(search, queries, seen)
    lat_all = single_latency(search, queries, seen, single=False)
    t = time.perf_counter()
    got, _ = search(queries, csr(seen), single=False)
    batch_qps = queries.shape[0] / (time.perf_counter() - t)
    recall = np.mean([len(set(g[g >= 0]) & set(w)) / k for g, w in zip(got, want, strict=True)])
    p50 = np.percentile(lat, 50) * 1e3
    return p50, np.percentile(lat, 99) * 1e3, np.percentile(lat_all, 50) * 1e3, batch_qps, recall


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", default="100000,1000000", help="comma-separated catalogue sizes")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--methods", default="exact,flat,hnsw,ivf")
    args = ap.parse_args()
    k = 10
    print(
        f"{'items':>9} {'method':<7}{'build s':>9}{'index MB':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'p50 all-thr':>12}"
        f"{'batch q/s':>11}{'recall@10':>11}{'p50/exact':>11}{'q/s /exact':>11}"
    )
    for n in [int(x) for x in args.items.split(",")]:
        y, q, seen = synthetic_factors(n, args.dim, args.queries)
        want, _ = exact_topk(y, q, k, csr(seen), 0)
        ref = None
        for method in args.methods.split(","):
            if method == "exact":
                build, size = 0.0, 0

                def search(qq, excl, single, y=y):
                    return exact_topk(y, qq, k, excl, 1 if single else 0)
            else:
                t = time.perf_counter()
                index = ItemIndex.build(y, method)
                build = time.perf_counter() - t
                size = faiss.serialize_index(index.index).nbytes
                one, every = SearchConfig(), SearchConfig(single_threads=0)

                def search(qq, excl, single, index=index, one=one, every=every):
                    return index.search(qq, k, excl, None, one if single else every)

            p50, p99, p50_all, qps, recall = measure(method, search, q, seen, want, k)
            if method == "exact":
                ref = (p50, qps)
            r50 = p50 / ref[0] if ref else float("nan")
            rq = qps / ref[1] if ref else float("nan")
            print(
                f"{n:>9,} {method:<7}{build:>9.1f}{size / 1e6:>10.1f}{p50:>9.2f}{p99:>9.2f}"
                f"{p50_all:>12.2f}"
                f"{qps:>11,.0f}{recall:>11.4f}{r50:>11.2f}{rq:>11.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
