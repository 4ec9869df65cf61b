"""Every model's cost per call shape, in process (no gRPC), on the quickstart
setup: `Router.recommend` and `Router.similar` in microseconds per call.

The tuned path is a known user with nothing else asked; this sweep times the
other shapes a client may send (a larger k, exclusions, include_seen, explain,
candidates, an unknown user's inline history of 10 or 200 items, a known
user's history on top of training, an unknown user with none, SimilarItems),
so that a shape that costs 10-100x the tuned one shows up. Single runs move
with the machine: compare rows within one run.

    python bench/bench_shapes.py --workdir /tmp/qs    # runs quickstart there if needed
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from recserve.serving import RecQuery, RequestError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_router import quickstart_router


def per_call(fn: Callable[[], object], n: int) -> float:
    """Microseconds per call of fn, after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default="var/bench-router")
    ap.add_argument("--calls", type=int, default=60, help="calls per model and shape")
    args = ap.parse_args()
    router, catalog = quickstart_router(Path(args.workdir))
    cfg = router.cfg
    some = next(s for s in catalog.slots() if s.model is not None).model
    users, items = some.users.ids(range(len(some.users))), some.items.ids(range(len(some.items)))
    rng = np.random.default_rng(2)

    def user() -> str:
        return users[int(rng.integers(len(users)))]

    def pick(n: int) -> list[str]:
        return [items[int(j)] for j in rng.integers(0, len(items), n)]

    def hist(n: int) -> list[tuple[str, float]]:
        return [(i, 4.0) for i in pick(n)]

    shapes: dict[str, Callable[[str], RecQuery]] = {
        "k10": lambda m: RecQuery(user_id=user(), k=10, model=m),
        "k100": lambda m: RecQuery(user_id=user(), k=100, model=m),
        "excl100": lambda m: RecQuery(user_id=user(), k=10, model=m, exclude=pick(100)),
        "seen": lambda m: RecQuery(user_id=user(), k=10, model=m, include_seen=True),
        "explain": lambda m: RecQuery(user_id=user(), k=10, model=m, explain=True),
        "cand50": lambda m: RecQuery(user_id=user(), k=10, model=m, candidates=pick(50)),
        "cold10": lambda m: RecQuery(user_id="bench-new-user", k=10, model=m, history=hist(10)),
        "cold200": lambda m: RecQuery(user_id="bench-new-user", k=10, model=m, history=hist(200)),
        "known+10": lambda m: RecQuery(user_id=user(), k=10, model=m, history=hist(10)),
        "nobody": lambda m: RecQuery(user_id="bench-nobody", k=10, model=m),
    }
    names = [s.name for s in catalog.slots()] + sorted(cfg.hybrids)
    cols = [*shapes, "similar10", "similar100"]
    print(f"{'us/call':<12}" + "".join(f"{c:>11}" for c in cols))
    for name in names:
        row = []
        for make in shapes.values():
            try:
                row.append(
                    per_call(lambda make=make, name=name: router.recommend(make(name)), args.calls)
                )
            except RequestError:
                row.append(float("nan"))
        for k in (10, 100):
            try:
                row.append(
                    per_call(lambda k=k, name=name: router.similar(pick(1)[0], k, name), args.calls)
                )
            except RequestError:  # no item similarity
                row.append(float("nan"))
        print(f"{name:<12}" + "".join(f"{v:>11.0f}" for v in row), flush=True)
    catalog.close()


if __name__ == "__main__":
    main()
