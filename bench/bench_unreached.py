"""Served quality where a neighbourhood model's evidence reaches few items: this
checkout's router against another revision's (--base), side by side in one
process on the same loaded models.

Each set is split (random 20% of every user's events held out); itemknn,
userknn, rp3beta, EASE (up to 6,000 items), ALS and popularity are fitted on
the rest, and a hybrid blends ALS 0.15 and itemknn 0.85 (the weights
`recserve tune --hybrid` learned on the quickstart data). Every user with a
held-out event is asked Recommend k=10 (known user, seen items filtered)
through both routers. Printed per model: the share of users whose answer had
an item scored 0 or less (the cases the rule touches), the share whose answer
changed, Recall@10 / NDCG@10 of the served answers, base and this checkout,
and the in-process microseconds per call of the touched and the other users
(each user's two calls back to back, which first alternating by user).

    python bench/bench_unreached.py                   # base 608d291, three sets
    python bench/bench_unreached.py --sets sparse --base HEAD~1

The base's `server/serving/router.py` is read with `git show` and imported
beside this checkout's; everything else (models, kernels) is shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recserve.config import Hybrid, ServerConfig
from recserve.data import generate, load_dataset, to_dataset
from recserve.evaluation import make_split
from recserve.feedback import OnlineState
from recserve.models import create
from recserve.serving import Catalog, RecQuery, Router

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
K = 10
FIT = {"als": {}, "itemknn": {}, "userknn": {}, "rp3beta": {}, "ease": {}, "popularity": {}}


def base_router_class(base: str) -> type:
    """Router of revision `base`, imported from its source."""
    src = subprocess.run(
        ["git", "show", f"{base}:server/serving/router.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "router_base.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("recserve.serving.router_base", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.Router


def dataset(name: str):
    if name == "ml-100k":
        if not ML100K.exists():
            return None
        return load_dataset(str(ML100K))
    if name == "longtail":  # docs/algorithms.md's tuning set
        return to_dataset(generate(10_000, 5_000, 150_000, seed=1, zipf=1.2), name=name)
    if name == "sparse":  # few events per user over a wide catalogue (a shop's log)
        return to_dataset(generate(30_000, 20_000, 90_000, seed=2, zipf=1.1), name=name)
    raise SystemExit(f"--sets: unknown set {name!r}")


def metrics(answer: list[str], held: set[str]) -> tuple[float, float]:
    hits = [i in held for i in answer[:K]]
    recall = sum(hits) / min(len(held), K)
    dcg = sum(1 / np.log2(r + 2) for r, h in enumerate(hits) if h)
    idcg = sum(1 / np.log2(r + 2) for r in range(min(len(held), K)))
    return recall, dcg / idcg


def run_set(name: str, base_cls: type) -> None:
    ds = dataset(name)
    if ds is None:
        print(f"{name}: not present, skipped")
        return
    split = make_split(ds, "random", 0.2, seed=0)
    train = split.train
    test = split.test.tocsr()
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    algos = [a for a in FIT if a != "ease" or train.n_items <= 6_000]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for algo in algos:
            create(algo, **FIT[algo]).fit(train).save(Path(tmp), algo, dataset=train)
        hy = {"hybrid": Hybrid("hybrid", {"als": 0.15, "itemknn": 0.85})}
        cfg = ServerConfig(models=tmp, hybrids=hy)
        catalog = Catalog(cfg.models)
        catalog.start()
        catalog.wait(600)
        new = Router(cfg, catalog, OnlineState())
        old = base_cls(cfg, catalog, OnlineState())
        print(
            f"\n{name}: {train.n_users:,} users x {train.n_items:,} items, "
            f"{train.interactions.nnz:,} training events, {users.size:,} test users "
            f"(fitted in {time.perf_counter() - t:.0f} s)"
        )
        print(
            f"{'model':<11}{'touched':>9}{'changed':>9}{'R@10 base':>11}{'R@10 now':>10}"
            f"{'N@10 base':>11}{'N@10 now':>10}   us/call touched (base/now), others"
        )
        ids = train.users.ids(users)
        held = [
            set(train.items.ids(test.indices[test.indptr[u] : test.indptr[u + 1]])) for u in users
        ]
        for model in [a for a in algos if a not in ("als", "popularity")] + ["hybrid", "als"]:
            m = catalog.get(model).model if model != "hybrid" else None
            touched = changed = 0
            r_old = r_new = n_old = n_new = 0.0
            secs = np.zeros((2, 2))  # [touched, other] x [base, now]
            for j, (uid, u, h) in enumerate(zip(ids, users, held, strict=True)):
                q = RecQuery(user_id=uid, k=K, model=model)
                first, second = (old, new) if j % 2 else (new, old)
                t0 = time.perf_counter()
                x = first.recommend(q)
                t1 = time.perf_counter()
                y = second.recommend(q)
                t2 = time.perf_counter()
                a, b = (x, y) if j % 2 else (y, x)
                t_a, t_b = (t1 - t0, t2 - t1) if j % 2 else (t2 - t1, t1 - t0)
                hit = False
                if m is not None:
                    s = m.recommend([int(u)], K)[1][0]
                    hit = bool(s.size and s[-1] <= 0)
                    touched += hit
                secs[0 if hit else 1] += (t_a, t_b)
                changed += a.item_ids != b.item_ids
                ro, no = metrics(a.item_ids, h)
                rn, nn = metrics(b.item_ids, h)
                r_old, r_new, n_old, n_new = r_old + ro, r_new + rn, n_old + no, n_new + nn
            n = len(ids)
            tt = f"{touched / n:8.1%}" if m is not None else "       -"
            us = secs * 1e6 / np.maximum([[touched], [n - touched]], 1)
            cost = f"{us[0, 0]:.0f}/{us[0, 1]:.0f}" if touched else "-"
            print(
                f"{model:<11} {tt}{changed / n:9.1%}{r_old / n:11.4f}{r_new / n:10.4f}"
                f"{n_old / n:11.4f}{n_new / n:10.4f}   {cost:>9}, {us[1, 0]:.0f}/{us[1, 1]:.0f}",
                flush=True,
            )
        catalog.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="608d291", help="revision to compare with")
    ap.add_argument("--sets", default="ml-100k,longtail,sparse")
    args = ap.parse_args()
    base_cls = base_router_class(args.base)
    for name in args.sets.split(","):
        run_set(name, base_cls)


if __name__ == "__main__":
    main()
