"""What `history_prior` costs a new user's call: the router's in-process
microseconds per Recommend with an inline history, each model without and
with a prior (the same fitted model saved twice), and the hybrid of the two
(weights 0.5, 0.5; its components without a prior) without and with its own
prior, alternated in one process; then known users' calls to the hybrid
without and with its user_prior.

    python bench/bench_history_prior.py
    python bench/bench_history_prior.py --history 3 --calls 5000

The log: 20,000 users x 10,000 items, 200,000 events (synthetic, Zipf 1.0);
histories of --history random items; two rounds, printed per round.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from recserve.config import Hybrid, ServerConfig
from recserve.data import generate, to_dataset
from recserve.feedback import OnlineState
from recserve.models import create
from recserve.serving import Catalog, RecQuery, Router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--history", type=int, default=10, help="items per new user's history")
    ap.add_argument("--calls", type=int, default=2000, help="calls per model and round")
    ap.add_argument("--prior", type=float, default=2.0, help="the history_prior c")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    ds = to_dataset(generate(20_000, 10_000, 200_000, seed=3, zipf=1.0))
    root = Path(tempfile.mkdtemp(prefix="bench-prior-"))
    names = []
    for algo in ("als", "itemknn"):
        model = create(algo).fit(ds)
        model.save(root, algo, dataset=ds)
        model.params["history_prior"] = args.prior
        model.save(root, f"{algo}-prior", dataset=ds)
        names += [algo, f"{algo}-prior"]
    weights = {"als": 0.5, "itemknn": 0.5}
    hybrids = {
        "hybrid": Hybrid("hybrid", weights),
        "hybrid-prior": Hybrid("hybrid-prior", weights, args.prior),
        "hybrid-user-prior": Hybrid("hybrid-user-prior", weights, user_prior=args.prior),
    }
    names += ["hybrid", "hybrid-prior"]
    cfg = ServerConfig(models=str(root), fallback=("itemknn",), hybrids=hybrids)
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(120)
    router = Router(cfg, catalog, OnlineState())
    rng = np.random.default_rng(0)
    ids = ds.items.ids(np.arange(ds.n_items))
    histories = [
        [(ids[j], 1.0) for j in rng.choice(ds.n_items, args.history, replace=False)]
        for _ in range(args.calls)
    ]
    print(f"new users, {args.history}-item histories, k=10, history_prior {args.prior:g}")
    for rnd in (1, 2):
        row = []
        for name in names:
            t = time.perf_counter()
            for h in histories:
                router.recommend(RecQuery(user_id="", history=h, k=10, model=name))
            row.append(f"{name} {(time.perf_counter() - t) / len(histories) * 1e6:.0f}")
        print(f"round {rnd}: us/call " + ", ".join(row), flush=True)
    users = ds.users.ids(rng.choice(ds.n_users, args.calls))
    print(f"known users, k=10: the hybrid without and with user_prior {args.prior:g}")
    for rnd in (1, 2):
        row = []
        for name in ("hybrid", "hybrid-user-prior"):
            t = time.perf_counter()
            for u in users:
                router.recommend(RecQuery(user_id=u, k=10, model=name))
            row.append(f"{name} {(time.perf_counter() - t) / len(users) * 1e6:.0f}")
        print(f"round {rnd}: us/call " + ", ".join(row), flush=True)
    catalog.close()


if __name__ == "__main__":
    main()
