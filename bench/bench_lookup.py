"""Id lookups: `IdMap.index` / `IdMap.get` (kernels.wire's binary search over
the map's fixed-width rows, what every request's user, history, exclusions and
candidates go through) against a Python dict of the same ids, side by side in
one process.

    python bench/bench_lookup.py

Each row: a map of n ids (numeric strings, as most logs have, and 20-byte
ones), microseconds per call for 1, 10 and 100 ids and the ratio to the dict.
The keys of each call are new str objects decoded from bytes, as a request's
ids are; `--same-keys` reuses one list instead (all in cache).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from recserve.data.dataset import IdMap


def best_of(fn: Callable[[int], object], calls: int, rounds: int = 5) -> float:
    """Fastest of `rounds` timings of fn(0..calls-1), in microseconds per call."""
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for c in range(calls):
            fn(c)
        best = min(best, time.perf_counter() - t)
    return best / calls * 1e6


def timings(m: IdMap, d: dict[str, int], batches: list[list[str]]) -> tuple[float, float]:
    """(IdMap, dict) microseconds per call over `batches` (one key each: get())."""
    calls = len(batches)
    if len(batches[0]) == 1:
        ours = best_of(lambda c: m.get(batches[c][0]), calls)
        return ours, best_of(lambda c: d.get(batches[c][0], -1), calls)
    ours = best_of(lambda c: m.index(batches[c]), calls)
    return ours, best_of(lambda c: np.array([d.get(k, -1) for k in batches[c]]), calls)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calls", type=int, default=2000, help="calls per timing")
    ap.add_argument("--same-keys", action="store_true", help="one key list for every call")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'ids':>10} {'width':>5} {'keys':>5} {'IdMap us':>9} {'dict us':>8} {'ratio':>6}")
    for n, wide in ((2_500, False), (100_000, False), (1_000_000, False), (100_000, True)):
        ids = [f"{i:020d}" if wide else str(i) for i in range(1, n + 1)]
        m = IdMap.from_ids(ids)
        d = {s: i for i, s in enumerate(m.ids(range(n)))}
        for count in (1, 10, 100):
            # Bytes per call, decoded per call: fresh str objects as a request's.
            raw = [[ids[j].encode() for j in rng.integers(0, n, count)] for _ in range(args.calls)]
            batches = [[b.decode() for b in r] for r in raw]
            if args.same_keys:
                batches = [batches[0]] * args.calls
            want = np.array([[d.get(k, -1) for k in b] for b in batches[:50]])
            got = np.array([m.index(b) for b in batches[:50]])
            assert np.array_equal(got, want), "IdMap and the dict disagree"
            ours, ref = timings(m, d, batches)
            width = m.rows.shape[1]
            print(f"{n:>10,} {width:>5} {count:>5} {ours:>9.2f} {ref:>8.2f} {ours / ref:>6.2f}")


if __name__ == "__main__":
    main()
