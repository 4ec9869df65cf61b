"""The `min_events` gate (or, where it wins, the `user_prior` blend) that
`recserve tune` learns, on the eight logs of bench_density.py: for each
algorithm, what was learned on the validation split (tuning.learn_min_events,
defaults otherwise), the validation users it gates, and test Recall@20 on
evaluate's random split without and with it (the test never saw the choice).
--no-user-prior learns the gate alone, as tune did before user_prior.

    python bench/bench_min_events.py --algos als,userknn,bpr,itemknn
    python bench/bench_min_events.py --z 1.0          # a laxer test than GATE_Z
    python bench/bench_min_events.py --histories 1,2,3,5 --algos als,itemknn,userknn
    python bench/bench_min_events.py --histories 1,2,3,5 --algos als,itemknn --blend

--histories measures the gate for inline histories (`min_history`): new users
folded in from a short history. On each log a fifth of the users with 8 or
more events (at most 1,000) is held out of training and of the gates'
learning (tune's, on the other users); each is folded in from h of its
events, chosen at random, and the rest are its test items; Recall@20 of each
model without and with its learned gates, and popularity's, per h.
--no-new-users learns as tune did before min_history: from the validation
users only (inline histories then follow min_events).

The tables behind docs/algorithms.md, "Users with few events".
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import scipy.sparse as sp
from bench_density import K, logs

from recserve import tuning
from recserve.data import Dataset
from recserve.evaluation import as_served, evaluate, ranking_metrics
from recserve.models import create
from recserve.serving.blend import blend_dense
from recserve.tuning import learn_min_events, splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--algos", default="als,userknn,bpr,itemknn")
    ap.add_argument("--metric", default=f"recall@{K}", help="what the gate is learned on")
    ap.add_argument("--z", type=float, default=tuning.GATE_Z, help="the gate's paired z")
    ap.add_argument("--histories", default="", help="history lengths for new users, e.g. 1,2,3")
    ap.add_argument(
        "--blend",
        action="store_true",
        help="with --histories: each model blended with popularity, weights (1 - w, w)",
    )
    ap.add_argument(
        "--no-user-prior",
        action="store_true",
        help="learn the min_events gate alone for known users (tune before user_prior)",
    )
    ap.add_argument(
        "--no-new-users",
        action="store_true",
        help="learn from the validation users only (tune before it scored new users too)",
    )
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.histories and args.blend:
        soft_blend(args.algos.split(","), [int(h) for h in args.histories.split(",")])
        return
    if args.histories:
        short_histories(
            args.algos.split(","),
            [int(h) for h in args.histories.split(",")],
            not args.no_new_users,
        )
        return
    tuning.GATE_Z = args.z
    metric = args.metric
    k = int(metric.partition("@")[2] or K)
    print(f"gate learned on validation {metric}; test {metric} without -> with it")
    for name, ds in logs().items():
        outer, inner = splits(ds, "random", 0.2, 0, 1)
        pop = evaluate(create("popularity"), ds, "random", [k], split=outer)["metrics"][metric]
        for algo in args.algos.split(","):
            t = time.perf_counter()
            gate = learn_min_events(
                algo,
                {},
                inner,
                metric,
                k,
                None,
                new_users=not args.no_new_users,
                known_prior=not args.no_user_prior,
            )
            took = time.perf_counter() - t
            plain = evaluate(create(algo), ds, "random", [k], split=outer)["metrics"][metric]
            n = gate["min_events"]
            gated = plain
            learned = {p: gate[p] for p in ("min_events", "user_prior") if gate[p]}
            if learned:
                model = create(algo, **learned)
                gated = evaluate(model, ds, "random", [k], split=outer)["metrics"][metric]
            print(
                f"{name:14} {algo:8} min_events {n:3d} (user_prior {gate['user_prior']:g}, "
                f"min_history {gate['min_history']:2d}, history_prior {gate['history_prior']:g})  "
                f"gates {gate['gated']:5d} of {gate['users']:5d} validation users  "
                f"test {plain:.4f} -> {gated:.4f} "
                f"({gated / plain:.2f}x; popularity {pop:.4f})  learned in {took:.1f} s",
                flush=True,
            )


def _gates(g: dict) -> dict:
    """A learned gate (learn_min_events) as model parameters."""
    return {k: g[k] for k in ("min_events", "min_history", "history_prior")}


def _held_out(rng: np.random.Generator) -> Iterator[tuple[str, sp.csr_matrix, np.ndarray, Dataset]]:
    """For each log: (its name, its matrix, a fifth of its users with 8 or
    more events (at most 1,000), the log without them); a log with fewer
    than 50 such users is skipped, and said."""
    for name, ds in logs().items():
        m = ds.interactions.tocsr()
        pool = np.flatnonzero(np.diff(m.indptr) >= 8)
        if pool.size < 50:
            print(f"{name:14} fewer than 50 users with 8 or more events: skipped")
            continue
        new = rng.choice(pool, min(1000, pool.size // 5), replace=False)
        keep = np.ones(m.shape[0], bool)
        keep[new] = False
        train = m.multiply(keep[:, None]).tocsr()
        train.eliminate_zeros()
        yield name, m, new, ds.with_interactions(train, np.zeros(train.nnz, np.int64))


def short_histories(algos: list[str], lengths: list[int], new_users: bool) -> None:
    """Recall@K of new users folded in from h history items, each model
    without and with the gate learned on the rest of the log, against
    popularity (see the module's docstring)."""
    rng = np.random.default_rng(0)
    print(
        f"new users folded in from h items: test Recall@{K}, model without -> with the "
        "gates learned on the other users, and popularity"
    )
    for name, m, new, data in _held_out(rng):
        _, inner = splits(data, "random", 0.2, 0, 1)
        models = {"popularity": create("popularity").fit(data)}
        gates = {}
        for a in algos:
            gates[a] = learn_min_events(a, {}, inner, f"recall@{K}", K, None, new_users=new_users)
            models[a] = create(a).fit(data)
        print(
            f"{name:14} for histories: "
            + ", ".join(
                f"{a} gate {create(a, **_gates(g)).history_gate()} prior {g['history_prior']:g}"
                for a, g in gates.items()
            )
        )
        for h in lengths:
            hist, test = [], []
            for u in new:
                idx, val = (
                    m.indices[m.indptr[u] : m.indptr[u + 1]],
                    m.data[m.indptr[u] : m.indptr[u + 1]],
                )
                order = rng.permutation(idx.size)
                hist.append((idx[order[:h]], val[order[:h]]))
                test.append(np.sort(idx[order[h:]]))
            indptr = np.r_[0, np.cumsum([t.size for t in test])]
            if indptr[-1] == 0:
                continue
            truth = sp.csr_matrix(
                (np.ones(indptr[-1]), np.concatenate(test), indptr), shape=(new.size, m.shape[1])
            )
            row = []
            for label, model in models.items():
                rows = model.history_matrix([i for i, _ in hist], [v for _, v in hist])
                recs, scores = model.recommend_histories(rows, K)
                plain = as_served(model, recs, scores, histories=rows)  # as the service
                value = ranking_metrics(plain, truth, [K], m.shape[1])[f"recall@{K}"]
                if label not in gates:
                    row.append(f"{label} {value:.3f}")
                    continue
                model.params |= _gates(gates[label])
                served = as_served(model, recs, scores, histories=rows)
                model.params |= {"min_events": 0, "min_history": -1, "history_prior": 0.0}
                gated = ranking_metrics(served, truth, [K], m.shape[1])[f"recall@{K}"]
                row.append(f"{label} {value:.3f} -> {gated:.3f}")
            print(f"{name:14} {new.size:4d} new users, h={h:2d}: " + "  ".join(row), flush=True)


def soft_blend(algos: list[str], lengths: list[int]) -> None:
    """Recall@K of new users folded in from h items when each model's answer is
    blended with popularity's, as a hybrid of the two with weights (1 - w, w)
    blends them (serving.blend.blend_dense), for w from 0 (the model) to 1
    (popularity); the same held-out users as --histories."""
    rng = np.random.default_rng(0)
    weights = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    print(f"new users folded in from h items: test Recall@{K} of model x (1 - w) + popularity x w")
    for name, m, new, data in _held_out(rng):
        popular = create("popularity").fit(data)
        models = {a: create(a).fit(data) for a in algos}
        for h in lengths:
            hist, test = [], []
            for u in new:
                lo, hi = m.indptr[u], m.indptr[u + 1]
                order = rng.permutation(hi - lo)
                hist.append((m.indices[lo:hi][order[:h]], m.data[lo:hi][order[:h]]))
                test.append(np.sort(m.indices[lo:hi][order[h:]]))
            indptr = np.r_[0, np.cumsum([t.size for t in test])]
            if indptr[-1] == 0:
                continue
            truth = sp.csr_matrix(
                (np.ones(indptr[-1]), np.concatenate(test), indptr), shape=(new.size, m.shape[1])
            )
            for label, model in models.items():
                rows = model.history_matrix([i for i, _ in hist], [v for _, v in hist])
                dense = np.empty((new.size, 2, m.shape[1]), np.float32)
                for r in range(new.size):
                    model.dense_history(rows[r], dense[r, 0])
                    popular.dense_history(rows[r], dense[r, 1])
                positive = np.array([model.sparse_scores, 0], np.uint8)
                row = []
                for w in weights:
                    recs = np.full((new.size, K), -1, np.int64)
                    for r in range(new.size):
                        items, _, _ = blend_dense(
                            dense[r], [1 - w, w], max(3 * K, 100), K, positive
                        )
                        recs[r, : items.size] = items
                    value = ranking_metrics(recs, truth, [K], m.shape[1])[f"recall@{K}"]
                    row.append(f"w{w:.1f} {value:.3f}")
                print(f"{name:14} {label:8} h={h:2d}: " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
