"""Answer encoding: protobuf message objects against kernels.wire's bytes, side
by side in one process, for the answers written as bytes (Recommend with and
without bayes_mf's std, GetSimilarItems, PredictRatings) at several lengths.

    python bench/bench_encode.py --workdir /tmp/qs    # runs quickstart there if needed

Each row: microseconds per answer built and serialized as a message, then as
bytes (`convert.serialize` of each, as the transports send them), and the
ratio. Both are checked to be the same bytes first.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from recserve.service import convert
from recserve.serving import Prediction, RecQuery

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_router import quickstart_router


def per_call(fn: Callable[[], object], rounds: int = 5, calls: int = 200) -> float:
    """Fastest of `rounds` timings of `calls` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            convert.serialize(fn())
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def row(label: str, message: Callable[[], object], encoded: Callable[[], object]) -> None:
    if convert.serialize(message()) != convert.serialize(encoded()):
        raise SystemExit(f"{label}: the bytes differ from the message's")
    a, b = per_call(message), per_call(encoded)
    print(f"{label:<38}{a:>10.1f}{b:>10.1f}{a / b:>8.1f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="var/bench-router")
    args = ap.parse_args()
    router, catalog = quickstart_router(Path(args.workdir))
    print(f"{'answer':<38}{'message':>10}{'bytes':>10}{'ratio':>9}   (us per answer)")
    for k in (10, 100, 1000):
        r = router.recommend(RecQuery(user_id="7", k=k, model="bayes_mf"))
        row(
            f"Recommend bayes_mf (std), k={k}",
            lambda r=r: convert.response("", r),
            lambda r=r: convert.response_bytes("", r),
        )
    for k in (10, 100, 1000):
        r = router.similar("5", k, "als")
        row(
            f"GetSimilarItems als, k={k}",
            lambda r=r: convert.similar_response(r),
            lambda r=r: convert.similar_bytes(r),
        )
    items = [str(i) for i in range(1, 2501)]
    for n in (100, 2500, 50_000):
        ids = (items * (n // len(items) + 1))[:n]
        p: Prediction = router.predict("7", [], ids, "bayes_mf")
        row(
            f"PredictRatings bayes_mf, {n:,} items",
            lambda p=p: convert.predictions_message(p),
            lambda p=p: convert.predictions(p),
        )
    catalog.close()


if __name__ == "__main__":
    main()
