"""What calibrating an ANN index's search breadth buys (recall_target).

    python bench/bench_calibration.py [--users 50000 --items 150000 --events 900000]
        [--algos als,svd,bayes_mf] [--data events.csv] [--params factors=64,iterations=5]
        [--no-head]

For each inner-product model trained at its defaults on a catalogue large
enough for the `auto` index (IVF), one fit, three retrievals side by side in
the same process: the index at the configured breadth (recall_target=0, as
before calibration), the index calibrated at build (the default target 0.95;
`auto` drops an index that needs over a quarter of its lists), and exact
scoring. Prints each one's recall@10 against exact for 400 users and 200
items (SimilarItems), and its time per known-user Recommend call (one
thread, median of interleaved rounds, so machine noise hits all three alike).
`--no-head` builds IVF without norm-ranging (every item in the lists), the
index before it, to compare.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np

from recserve import index as faiss_index
from recserve.data import generate, to_dataset
from recserve.data.readers import load_dataset
from recserve.models import create
from recserve.models.registry import parse_params


def recall(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean share of b's ids (valid ones) found in the same row of a."""
    return float(np.mean([np.isin(y[y >= 0], x).mean() for x, y in zip(a, b, strict=True)]))


def per_call_us(model, users: np.ndarray) -> float:
    """Microseconds per recommend_user call over `users`."""
    t = time.perf_counter()
    for u in users:
        model.recommend_user(int(u), 10)
    return (time.perf_counter() - t) / users.size * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=150_000)
    ap.add_argument("--events", type=int, default=900_000)
    ap.add_argument("--data", help="a ratings file instead of generated data")
    ap.add_argument("--algos", default="als,svd,bayes_mf")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--params", default="", help="model parameters KEY=VALUE,... (all algos)")
    ap.add_argument("--no-head", action="store_true", help="IVF without norm-ranging")
    args = ap.parse_args()
    if args.no_head:
        faiss_index.HEAD_SHARE = 0.0
    params = parse_params(kv for kv in args.params.split(",") if kv)
    if args.data:
        ds = load_dataset(args.data)
    else:
        ds = to_dataset(generate(args.users, args.items, args.events, seed=3))
    print(f"data: {ds.n_users:,} users, {ds.n_items:,} items, {ds.interactions.nnz:,} events")
    rng = np.random.default_rng(7)
    for algo in args.algos.split(","):
        t = time.perf_counter()
        plain = create(algo, **params, recall_target=0).fit(ds)
        fit_s = time.perf_counter() - t
        if plain.item_index is None:
            print(f"{algo}: no index at {ds.n_items:,} items (auto picks exact); skipped")
            continue
        calibrated = copy.copy(plain)
        calibrated.params = {**plain.params, "recall_target": 0.95}
        t = time.perf_counter()
        calibrated._calibrate(int(plain.params.get("seed", 0)))
        cal_s = time.perf_counter() - t
        exact = copy.copy(plain)
        exact.item_index = exact.similar_index = None
        users = rng.choice(ds.n_users, 400, replace=False)
        items = rng.choice(ds.n_items, 200, replace=False)
        want_r = list(exact.recommend(users, 10)[0])
        want_s = [exact.similar_items(int(i), 10)[0] for i in items]
        rows = {"configured": plain, "calibrated": calibrated, "exact": exact}
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, model in rows.items():
                times[name].append(per_call_us(model, users[:100]))
        print(
            f"\n{algo}: fit {fit_s:.1f} s (index included), calibration {cal_s:.2f} s, "
            f"probes (items, similar; 0 = exact) {calibrated.index_probes}, "
            f"head {plain.item_index.head.size:,} items"
        )
        print(f"  {'retrieval':<12}{'recall@10':>10}{'similar@10':>12}{'us/call':>10}{'ratio':>8}")
        base = statistics.median(times["exact"])
        for name, model in rows.items():
            got_r = list(model.recommend(users, 10)[0])
            got_s = [model.similar_items(int(i), 10)[0] for i in items]
            us = statistics.median(times[name])
            print(
                f"  {name:<12}{recall(got_r, want_r):>10.3f}{recall(got_s, want_s):>12.3f}"
                f"{us:>10.0f}{us / base:>8.2f}"
            )


if __name__ == "__main__":
    main()
