"""What leaving out a component the blend does as well without costs and saves.

`tune --hybrid` leaves out a component whose leaving out the validation shows
(paired z >= 2) to lose less than 0.5% of the metric, for known users and new
users' histories alike (tuning.PRUNE_TOLERANCE). Per log, on evaluate's random
split (seed 0): the components (default parameters) are published on the
whole log (as `tune` reads them) and fitted on the training part;
`tune_hybrid` runs twice, with
pruning and with every component kept (`--keep-components`), each learning
its weights and priors on its own validation split of the training part. Then
for the test users, Recall@20 of each hybrid's served answers (weights and
user_prior: tuning.hybrid_user_answers, the router's blend), which components
were dropped, and the in-process cost of a known user's Recommend through the
router (best of 5 rounds of 300 users, both hybrids in one run).

    python bench/bench_hybrid_prune.py
    python bench/bench_hybrid_prune.py --components als,itemknn,content,bpr

The logs: bench_density.py's (ml-100k when ../shared/data has it, synthetic
ones) and `quickstart` (the embedded default data). content needs item
features: a log without them leaves it out of both hybrids.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from bench_density import logs

from recserve.cli import DEFAULT_DATA
from recserve.config import Hybrid, ServerConfig
from recserve.data import Dataset, generate, to_dataset
from recserve.feedback import OnlineState
from recserve.models import create
from recserve.serving import Catalog, RecQuery, Router
from recserve.tuning import hybrid_user_answers, splits, tune_hybrid

K = 20


def _recall(recs: np.ndarray, truth: list[set[int]]) -> float:
    got = [
        len(t & set(r[r >= 0].tolist())) / min(K, len(t)) for r, t in zip(recs, truth, strict=True)
    ]
    return float(np.mean(got))


def _cost(root: Path, hybrids: dict[str, Hybrid], ds: Dataset) -> dict[str, float]:
    """Microseconds per known user's Recommend (k=10) through the router, per
    hybrid: best of 5 rounds of 300 users, the hybrids alternating."""
    cfg = ServerConfig(models=str(root), hybrids=hybrids)
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(300)
    try:
        router = Router(cfg, catalog, OnlineState())
        rng = np.random.default_rng(0)
        users = ds.users.ids(rng.choice(ds.n_users, min(300, ds.n_users), replace=False))
        best = dict.fromkeys(hybrids, float("inf"))
        for _ in range(5):
            for name in hybrids:
                queries = [RecQuery(user_id=u, k=10, model=name) for u in users]
                t = time.perf_counter()
                for q in queries:
                    router.recommend(q)
                best[name] = min(best[name], (time.perf_counter() - t) / len(queries) * 1e6)
        return best
    finally:
        catalog.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--components", default="als,itemknn,content", help="the hybrid")
    ap.add_argument("--trials", type=int, default=20, help="weight search trials")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    d = DEFAULT_DATA
    quick = to_dataset(
        generate(d["users"], d["items"], d["interactions"], seed=d["seed"]), name="quickstart"
    )
    every = {"quickstart": quick, **logs()}
    print(
        f"Recall@{K} of known users (test split), every component kept / pruned; "
        "what was dropped; us per known user's call, kept / pruned"
    )
    ratios = []
    for name, ds in every.items():
        comps = [c for c in args.components.split(",") if c]
        if ds.item_features is None:
            comps = [c for c in comps if c != "content"]
        outer, _ = splits(ds, "random", 0.2, 0, 1)
        root = Path(tempfile.mkdtemp(prefix="bench-hybrid-prune-"))
        fitted = {}
        for c in comps:
            create(c).fit(ds).save(root, c, dataset=ds)
            fitted[c] = create(c).fit(outer.train)
        t = time.perf_counter()
        kept = tune_hybrid(
            ds, comps, name="kept", models_dir=root, trials=args.trials, prune=False, progress=False
        )
        took = time.perf_counter() - t
        pruned = tune_hybrid(ds, comps, name="pruned", models_dir=root, trials=args.trials)
        test = outer.test.tocsr()
        test.data = (test.data > 0).astype(np.float32)
        test.eliminate_zeros()
        users = np.flatnonzero(np.diff(test.indptr) > 0)
        truth = [set(test.indices[test.indptr[u] : test.indptr[u + 1]].tolist()) for u in users]
        recall = {}
        for label, out in (("kept", kept), ("pruned", pruned)):
            names = sorted(out["weights"])  # as served: hybrids.json's order
            (recs,) = hybrid_user_answers(
                [fitted[c] for c in names],
                [out["weights"][c] for c in names],
                users,
                K,
                [out["user_prior"]],
            )
            recall[label] = _recall(recs, truth)
        hybrids = {
            n: Hybrid(n, o["weights"], o["history_prior"], o["user_prior"])
            for n, o in (("kept", kept), ("pruned", pruned))
        }
        cost = _cost(root, hybrids, ds)
        ratios.append(cost["pruned"] / cost["kept"])
        dropped = ", ".join(pruned["dropped"]) or "none"
        print(
            f"{name:14} {'+'.join(comps):20} {recall['kept']:.4f} / {recall['pruned']:.4f}  "
            f"dropped: {dropped:10} "
            f"{cost['kept']:6.1f} / {cost['pruned']:6.1f} us (x{ratios[-1]:.2f}; "
            f"tune {took:.0f} s)",
            flush=True,
        )
    print(f"cost ratio pruned / kept: median {np.median(ratios):.2f}")


if __name__ == "__main__":
    main()
