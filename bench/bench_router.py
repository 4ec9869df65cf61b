"""Per-request compute of every model, in process (no gRPC): `Router.recommend`
for 2,000 known users, k=10, on the quickstart setup, in microseconds per call;
then 1,000 unknown users with a 10-item history (cold), 1,000 SimilarItems,
500 known users with explanations, and the same 500 with 2 events recorded
since training (folded in on their training rows).

    python bench/bench_router.py --workdir /tmp/qs      # runs quickstart there if needed

This is the serving path's own cost, which the gRPC figures of
bench/bench_traffic.py add transport to. Before the fused neighbourhood call
and the row blend it measured itemknn 470 us and the hybrid 1,860 us on the
same setup (ALS 45 us).

    python bench/bench_router.py --workdir /tmp/qs --gap-us 500

idles that long before each call and times each call alone (thread CPU
time): back to back, a call finds the code and data of the one before in the
CPU's caches, which a server's call never does (gRPC's work, the client and
idle moments come between). With the gap these figures match the same code's
cost measured inside the server (docs/performance.md, "Why in-process
timings understate a call's cost, measured").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from recserve.config import load_config
from recserve.feedback import Event, OnlineState
from recserve.serving import Catalog, RecQuery, RequestError, Router


def quickstart_router(work: Path) -> tuple[Router, Catalog]:
    """A router over the quickstart setup in `work` (made there first if missing),
    every model loaded; in process, no gRPC."""
    if not (work / "recserve.toml").exists():
        subprocess.run(
            [sys.executable, "-m", "recserve", "quickstart", "--workdir", str(work)],
            check=True,
            capture_output=True,
        )
    cfg = load_config(work / "recserve.toml")
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(120)
    return Router(cfg, catalog, OnlineState()), catalog


def timed(calls: list[Callable[[], object]], gap_us: float = 0.0) -> float:
    """Microseconds per call: back to back (wall time), or with `gap_us` of
    idle before each call, its own thread CPU time (the call as the server
    runs it: cold)."""
    if not gap_us:
        t = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - t) / len(calls) * 1e6
    spent = 0
    for call in calls:
        time.sleep(gap_us / 1e6)
        t0 = time.thread_time_ns()
        call()
        spent += time.thread_time_ns() - t0
    return spent / len(calls) / 1e3


def per_call(router: Router, queries: list[RecQuery], gap_us: float = 0.0) -> float:
    """Microseconds per Router.recommend over `queries`, after 20 warm-up calls."""
    for q in queries[:20]:
        router.recommend(q)
    return timed([partial(router.recommend, q) for q in queries], gap_us)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="var/bench-router")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument(
        "--gap-us",
        type=float,
        default=0.0,
        help="idle before each call (cold calls; 0: back to back)",
    )
    args = ap.parse_args()
    gap = args.gap_us
    router, catalog = quickstart_router(Path(args.workdir))
    cfg = router.cfg
    users = [str(u) for u in np.random.default_rng(0).integers(1, 6000, args.calls)]
    names = [s.name for s in catalog.slots()] + sorted(cfg.hybrids)
    for name in names:
        qs = [RecQuery(user_id=u, k=10, model=name) for u in users]
        print(f"{name:<12}{per_call(router, qs, gap):8.1f} us/call", flush=True)
    # An unknown user with a 10-item inline history (fold-in), and SimilarItems.
    rng = np.random.default_rng(1)
    items = [str(i) for i in range(1, 2501)]
    cold = [
        [(items[j], 1.0) for j in rng.integers(0, len(items), 10)] for _ in range(args.calls // 2)
    ]
    for name in names:
        qs = [RecQuery(user_id=f"new-{i}", history=h, k=10, model=name) for i, h in enumerate(cold)]
        print(f"{name:<12}{per_call(router, qs, gap):8.1f} us/call cold", flush=True)
    for name in names:
        asked = [items[j] for j in rng.integers(0, len(items), args.calls // 2)]
        try:
            router.similar(asked[0], 10, name)
        except RequestError:  # no item similarity
            continue
        us = timed([partial(router.similar, item, 10, name) for item in asked], gap)
        print(f"{name:<12}{us:8.1f} us/call similar")
    # Known users again, with explanations (the history items behind each answer).
    for name in names:
        qs = [RecQuery(user_id=u, k=10, model=name, explain=True) for u in users[: args.calls // 4]]
        print(f"{name:<12}{per_call(router, qs, gap):8.1f} us/call explained", flush=True)
    # Known users with 2 events recorded since training: folded in on their training rows.
    active = users[: args.calls // 4]
    picks = rng.integers(0, len(items), (len(active), 2))
    recorded = zip(active, picks, strict=True)
    router.online.apply([Event(u, items[j], 4.0, 0) for u, row in recorded for j in row])
    for name in names:
        qs = [RecQuery(user_id=u, k=10, model=name) for u in active]
        print(f"{name:<12}{per_call(router, qs, gap):8.1f} us/call recorded", flush=True)


if __name__ == "__main__":
    main()
