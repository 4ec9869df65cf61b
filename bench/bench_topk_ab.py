"""This build's top-k kernels against another build's, side by side in one
process: `topk.blend_dense` on row shapes from 150 to 100,000 items, then the
quickstart hybrid's Recommend (known user, 10-item history) and SimilarItems
through `Router` with each build's blend. Medians of alternating rounds; the
ratio is this build / the other (< 1 is faster).

The other build is a compiled `topk` module from any revision, e.g.:

    git worktree add /tmp/old d7da384 && make -C /tmp/old build
    python bench/bench_topk_ab.py --other /tmp/old/kernels/topk.cpython-311-x86_64-linux-gnu.so

docs/performance.md "Selecting values, not pairs" has this comparison's figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_router import quickstart_router
from bench_shapes import per_call

import recserve.serving.blend as blend
from recserve.kernels import topk
from recserve.serving import RecQuery

WEIGHTS = np.array([0.15, 0.005, 0.84])


def load(path: str) -> ModuleType:
    """A compiled topk module from a file, beside the installed one."""
    spec = importlib.util.spec_from_file_location("other.topk", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--other: cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows_of(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.random((3, n), dtype=np.float32)
    if kind == "knn":  # mostly zeros: no similarity to the history
        rows = rng.random((3, n), dtype=np.float32)
        rows[1:][rng.random((2, n)) < 0.9] = 0.0
        return rows
    return rng.integers(0, 5, (3, n)).astype(np.float32)  # few distinct values


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--other", required=True, help="path of the other build's topk .so")
    ap.add_argument("--workdir", default="var/bench-router", help="quickstart folder")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    mods = {"this": topk, "other": load(args.other)}
    rng = np.random.default_rng(0)
    print(f"{'items':>8} {'rows':<7} {'n_cand':>6} {'other us':>9} {'this us':>8} {'ratio':>6}")
    for n in (150, 2_500, 30_000, 100_000):
        for kind in ("random", "knn", "few"):
            rows = rows_of(kind, n, rng)
            for n_cand in (100, 500):
                want = mods["other"].blend_dense(rows, WEIGHTS, n_cand, 10)
                got = topk.blend_dense(rows, WEIGHTS, n_cand, 10)
                for a, b in zip(want, got, strict=True):
                    np.testing.assert_array_equal(a, b)
                calls = max(100, 1_000_000 // n)
                t: dict[str, list[float]] = {"this": [], "other": []}
                for r in range(args.rounds):
                    for name in ("this", "other") if r % 2 else ("other", "this"):
                        m = mods[name]
                        t[name].append(
                            per_call(
                                lambda m=m, x=rows, c=n_cand: m.blend_dense(x, WEIGHTS, c, 10),
                                calls,
                            )
                        )
                o, s = np.median(t["other"]), np.median(t["this"])
                print(f"{n:>8,} {kind:<7} {n_cand:>6} {o:9.1f} {s:8.1f} {s / o:6.2f}", flush=True)
    router, _ = quickstart_router(Path(args.workdir))
    items = [str(i) for i in range(1, 2501)]
    users = [str(u) for u in rng.integers(1, 6000, 2000)]
    cold = [[(items[j], 1.0) for j in rng.integers(0, len(items), 10)] for _ in range(1000)]
    shapes = {
        "known": [RecQuery(user_id=u, k=10, model="hybrid") for u in users],
        "history": [
            RecQuery(user_id=f"new-{i}", history=h, k=10, model="hybrid")
            for i, h in enumerate(cold)
        ],
    }
    asked = [items[j] for j in rng.integers(0, len(items), 1000)]
    res: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name in ("this", "other") if r % 2 else ("other", "this"):
            blend.topk = mods[name]
            for shape, qs in shapes.items():
                for q in qs[:50]:
                    router.recommend(q)
                it = iter(qs * 2)
                res.setdefault((shape, name), []).append(
                    per_call(lambda it=it: router.recommend(next(it)), len(qs))
                )
            it2 = iter(asked * 2)
            res.setdefault(("similar", name), []).append(
                per_call(lambda it2=it2: router.similar(next(it2), 10, "hybrid"), len(asked))
            )
    blend.topk = topk
    print("\nquickstart hybrid through Router, us per call")
    for shape in ("known", "history", "similar"):
        o, s = np.median(res[(shape, "other")]), np.median(res[(shape, "this")])
        print(f"{shape:<8} other {o:6.1f}  this {s:6.1f}  ratio {s / o:.2f}")


if __name__ == "__main__":
    main()
