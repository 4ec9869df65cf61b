"""The `min_events` gate `recserve tune` learns, on the eight logs of
bench_density.py: for each algorithm, the gate learned on the validation split
(tuning.learn_min_events, defaults otherwise), the validation users it gates,
and test Recall@20 on evaluate's random split without and with it (the test
never saw the choice).

    python bench/bench_min_events.py --algos als,userknn,bpr,itemknn

The table behind docs/algorithms.md, "Users with few events".
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_density import K, logs

from recserve.evaluation import evaluate
from recserve.models import create
from recserve.tuning import learn_min_events, splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--algos", default="als,userknn,bpr,itemknn")
    ap.add_argument("--metric", default=f"recall@{K}", help="what the gate is learned on")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    metric = args.metric
    k = int(metric.partition("@")[2] or K)
    print(f"gate learned on validation {metric}; test {metric} without -> with it")
    for name, ds in logs().items():
        outer, inner = splits(ds, "random", 0.2, 0, 1)
        pop = evaluate(create("popularity"), ds, "random", [k], split=outer)["metrics"][metric]
        for algo in args.algos.split(","):
            t = time.perf_counter()
            gate = learn_min_events(algo, {}, inner, metric, k, None)
            took = time.perf_counter() - t
            plain = evaluate(create(algo), ds, "random", [k], split=outer)["metrics"][metric]
            n = gate["min_events"]
            gated = plain
            if n:
                model = create(algo, min_events=n)
                gated = evaluate(model, ds, "random", [k], split=outer)["metrics"][metric]
            print(
                f"{name:14} {algo:8} min_events {n:3d}  gates {gate['gated']:5d} of "
                f"{gate['users']:5d} validation users  test {plain:.4f} -> {gated:.4f} "
                f"({gated / plain:.2f}x; popularity {pop:.4f})  learned in {took:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
