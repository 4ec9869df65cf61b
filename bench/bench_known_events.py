"""Known users who record events after training: how far one event moves their
answer, and how well the updated user predicts their next rating.

1. The quickstart setup (in process, `Router.recommend`): 300 known users each
   record one item they never had (value 4). Per model, the mean share of the
   user's top 10 before the event still in it after (the new item left out),
   served as now (KnownUserRow: the trained user updated) and, side by side,
   the same row folded in from nothing (the earlier serving); then the
   microseconds of each (dense_history), alternated in this process.
2. ml-100k, when ../shared/data holds it: each user's last two ratings held
   out (temporal); the first is recorded, the second predicted by svd and
   bayes_mf. RMSE of the prediction from the trained user alone, from the row
   folded in from nothing, and from the updated user.

    python bench/bench_known_events.py --workdir /tmp/qs

The quickstart is made in --workdir if missing (bench_router.quickstart_router).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_router import quickstart_router

from recserve.feedback import Event
from recserve.kernels import topk
from recserve.models.base import KnownUserRow
from recserve.serving import RecQuery

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def top(router, user: str, model: str, k: int) -> list[str]:
    """The item ids of one Recommend, in process."""
    return list(router.recommend(RecQuery(user, k=k, model=model)).item_ids)


def continuity(workdir: Path, n_users: int) -> None:
    router, catalog = quickstart_router(workdir)
    names = [s.name for s in catalog.slots()] + sorted(router.cfg.hybrids)
    rng = np.random.default_rng(5)
    users = [str(u) for u in rng.choice(np.arange(1, 6000), n_users, replace=False)]
    items = [str(i) for i in range(1, 2501)]
    asked = {n: {u: top(router, u, n, 10) for u in users} for n in names}
    new = {u: items[int(rng.integers(0, len(items)))] for u in users}
    router.online.apply([Event(u, new[u], 4.0, 0) for u in users])
    print(f"{'model':<12}{'kept of 10, updated':>22}{'from nothing':>15}")
    for n in names:
        kept, plain = [], []
        slot = catalog.get(n)
        m = slot.model if slot is not None else None
        for u in users:
            before = [i for i in asked[n][u] if i != new[u]]
            after = [i for i in top(router, u, n, 11) if i != new[u]]
            kept.append(len(set(after[: len(before)]) & set(before)) / max(len(before), 1))
            if m is None or m.users.get(u) < 0 or m.items.get(new[u]) < 0:
                continue
            own, vals = m.training_row(m.users.get(u))
            idx = np.r_[own, m.items.get(new[u])]
            row = m.history_matrix([idx], [np.r_[vals, 4.0]])  # unmarked: from nothing
            out = np.empty(m.n_items, np.float32)
            if m.dense_history(row, out):
                got, _ = topk.topk_row(out, len(before))
                ids = m.items.ids(got)
                plain.append(len(set(ids) & set(before)) / max(len(before), 1))
        was = f"{np.mean(plain):15.2f}" if plain else f"{'(blend)':>15}"
        print(f"{n:<12}{np.mean(kept):22.2f}{was}", flush=True)
    cost(catalog, users, new)
    catalog.close()


def cost(catalog, users: list[str], new: dict[str, str], rounds: int = 3) -> None:
    """Microseconds per dense_history of each user's row (training row + the
    new event), marked as theirs and unmarked, alternated in this process."""
    print(f"\nus per dense_history, {rounds} rounds alternated")
    print(f"{'model':<12}{'updated':>22}{'from nothing':>22}")
    for name in ("svd", "bayes_mf", "bpr", "userknn", "als"):
        slot = catalog.get(name)
        if slot is None or slot.model is None:
            continue
        m = slot.model
        pairs = []
        for u in users:
            user = m.users.get(u)
            if user < 0 or m.items.get(new[u]) < 0:
                continue
            own, vals = m.training_row(user)
            row = m.history_matrix([np.r_[own, m.items.get(new[u])]], [np.r_[vals, 4.0]])
            pairs.append((KnownUserRow.of(row, user), row))
        out = np.empty(m.n_items, np.float32)
        took: list[list[float]] = [[], []]
        for _ in range(rounds):
            for side in (0, 1):
                t = time.perf_counter()
                for pair in pairs:
                    m.dense_history(pair[side], out)
                took[side].append((time.perf_counter() - t) / len(pairs) * 1e6)
        ours, theirs = (" / ".join(f"{v:.0f}" for v in side) for side in took)
        print(f"{name:<12}{ours:>22}{theirs:>22}")


def next_rating() -> None:
    from recserve.data import load_dataset
    from recserve.evaluation import split_temporal
    from recserve.models import create

    ds = load_dataset(ML100K)
    split = split_temporal(ds, 2)
    train, test = split.train.interactions, split.test
    print(f"\nml-100k, next rating after one recorded ({test.nnz // 2} users): RMSE")
    print(f"{'model':<10}{'trained':>10}{'from nothing':>14}{'updated':>10}")
    for algo in ("svd", "bayes_mf"):
        m = create(algo).fit(split.train)
        err: dict[str, list[float]] = {"trained": [], "nothing": [], "updated": []}
        for u in np.flatnonzero(np.diff(test.indptr) == 2):
            lo, hi = test.indptr[u], test.indptr[u + 1]
            (first, second), (r1, r2) = test.indices[lo:hi], test.data[lo:hi]
            own = train.indices[train.indptr[u] : train.indptr[u + 1]]
            vals = train.data[train.indptr[u] : train.indptr[u + 1]]
            row = m.history_matrix([np.r_[own, first]], [np.r_[vals, r1]])
            target = np.array([second])
            err["trained"].append(m.score(int(u), target)[0][0] - r2)
            err["nothing"].append(m.score_history(row, target)[0][0] - r2)
            known = KnownUserRow.of(row, int(u))
            err["updated"].append(m.score_history(known, target)[0][0] - r2)
        rmse = {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in err.items()}
        print(f"{algo:<10}{rmse['trained']:10.4f}{rmse['nothing']:14.4f}{rmse['updated']:10.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="var/bench-router")
    ap.add_argument("--users", type=int, default=300)
    args = ap.parse_args()
    continuity(Path(args.workdir), args.users)
    if (ML100K / "u.data.xz").exists() or (ML100K / "u.data").exists():
        next_rating()
    else:
        print(f"\n{ML100K} not present: the ml-100k part skipped")


if __name__ == "__main__":
    main()
