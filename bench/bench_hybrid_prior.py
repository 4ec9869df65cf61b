"""A hybrid's `history_prior` on new users held out of everything it learned:
for each log, a fifth of the users with 8 or more events (at most 1,000) is
held out; the components are fitted and published on the rest, and
`tune_hybrid` learns the blend weights and the prior there (as `recserve
tune --hybrid` and `recserve quickstart` do); each held-out user is then
folded in from h of its events (at random) and its other events are the test
items. Recall@20 of the hybrid without the prior, with the learned one, and
of popularity, per h; the answers are the served ones
(tuning.hybrid_history_answers, tests/test_hybrid_prior.py). Then the same
for known users and the hybrid's `user_prior` (known_users below).

    python bench/bench_hybrid_prior.py
    python bench/bench_hybrid_prior.py --lengths 1,2,3,5,10 --components als,itemknn
    python bench/bench_hybrid_prior.py --part known

The logs: bench_density.py's (ml-100k when ../shared/data has it, synthetic
ones) with --components at their defaults, and `quickstart`: the embedded
default data with the quickstart's models and its default hybrid (als,
itemknn, content).
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

from recserve.cli import DEFAULT_DATA, DEFAULT_HYBRID, DEFAULT_MODELS
from recserve.data import Dataset, generate, to_dataset
from recserve.models import create
from recserve.tuning import hybrid_history_answers, hybrid_user_answers, splits, tune_hybrid

K = 20


def _params(text: str) -> dict[str, float | int]:
    """ "factors=64" -> {"factors": 64}."""
    key, _, value = text.partition("=")
    return {key: float(value) if "." in value else int(value)}


def _held_out(ds: Dataset, rng: np.random.Generator) -> tuple[Dataset, list[np.ndarray]] | None:
    """(the log without a fifth of its users with 8 or more events, at most
    1,000; each held-out user's items in random order), None below 50 such users."""
    m = ds.interactions.tocsr()
    pool = np.flatnonzero(np.diff(m.indptr) >= 8)
    if pool.size < 50:
        return None
    new = rng.choice(pool, min(1000, pool.size // 5), replace=False)
    keep = np.ones(m.shape[0], bool)
    keep[new] = False
    train = m.multiply(keep[:, None]).tocsr()
    train.eliminate_zeros()
    items = [rng.permutation(m.indices[m.indptr[u] : m.indptr[u + 1]]) for u in new]
    return ds.with_interactions(train, np.zeros(train.nnz, np.int64)), items


def _recall(recs: np.ndarray, truth: list[set[int]]) -> float:
    got = [
        len(t & set(r[r >= 0].tolist())) / min(K, len(t)) for r, t in zip(recs, truth, strict=True)
    ]
    return float(np.mean(got))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", default="1,2,3,5,10", help="history lengths")
    ap.add_argument("--components", default="als,itemknn", help="the hybrid (bench_density logs)")
    ap.add_argument("--trials", type=int, default=20, help="weight search trials")
    ap.add_argument("--part", choices=("new", "known", "both"), default="both")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    lengths = [int(h) for h in args.lengths.split(",")]
    d = DEFAULT_DATA
    quick = to_dataset(
        generate(d["users"], d["items"], d["interactions"], seed=d["seed"]), name="quickstart"
    )
    specs = {
        "quickstart": (quick, [(n, a, p) for n, a, p in DEFAULT_MODELS if n in DEFAULT_HYBRID])
    }
    plain = [(c, c, []) for c in args.components.split(",")]
    specs |= {name: (ds, plain) for name, ds in logs().items()}
    if args.part in ("new", "both"):
        new_users(specs, lengths, args.trials)
    if args.part in ("known", "both"):
        known_users(specs, args.trials)


def _publish(ds: Dataset, comps: list, root: Path) -> list:
    """Each component fitted on `ds` and published under `root` by its name
    (tune_hybrid reads the parameters there); the fitted models, in order."""
    fitted = []
    for c, algo, params in comps:
        kw = {}
        for p in params:
            kw |= _params(p)
        fitted.append(create(algo, **kw).fit(ds))
        fitted[-1].save(root, c, dataset=ds)
    return fitted


def new_users(specs: dict, lengths: list[int], trials: int) -> None:
    """The new-users table (the module's docstring)."""
    every: dict[str, list] = {f"h={h}": [] for h in lengths}
    up = down = 0
    print(
        f"Recall@{K} of held-out new users: hybrid without prior / with the learned one "
        "(popularity)"
    )
    for name, (ds, comps) in specs.items():
        rng = np.random.default_rng(0)
        made = _held_out(ds, rng)
        if made is None:
            print(f"{name:14} fewer than 50 users with 8 or more events: skipped")
            continue
        train, held = made
        root = Path(tempfile.mkdtemp(prefix="bench-hybrid-prior-"))
        t = time.perf_counter()
        fitted = _publish(train, comps, root)
        names = [c for c, _, _ in comps]
        out = tune_hybrid(
            train, names, name="hybrid", models_dir=root, trials=trials, progress=False
        )
        took = time.perf_counter() - t
        order = sorted(range(len(names)), key=lambda i: names[i])  # as served: hybrids.json's order
        models = [fitted[i] for i in order]
        weights = [out["weights"].get(names[i], 0.0) for i in order]
        counts = np.bincount(train.interactions.indices, minlength=train.n_items)
        popular = np.lexsort((np.arange(counts.size), -counts))
        cells = []
        for h in lengths:
            use = [u for u in held if u.size > h]
            if len(use) < 50:  # a log cut to fewer events per user
                cells.append(f"h={h} -")
                continue
            hist = models[0].history_matrix([u[:h] for u in use])
            truth = [set(u[h:].tolist()) for u in use]
            without, prior = hybrid_history_answers(
                models, weights, hist, K, [0.0, out["history_prior"]]
            )
            pop = np.array(
                [[i for i in popular[: K + h] if i not in set(u[:h].tolist())][:K] for u in use]
            )
            r = [_recall(x, truth) for x in (without, prior, pop)]
            every[f"h={h}"].append(r)
            up += r[1] > r[0]
            down += r[1] < r[0]
            cells.append(f"h={h} {r[0]:.4f} / {r[1]:.4f} ({r[2]:.4f})")
        print(
            f"{name:14} prior {out['history_prior']:g} (tune {took:.0f} s): " + ", ".join(cells),
            flush=True,
        )
    print(
        "mean over logs: "
        + ", ".join(
            f"{h} {np.mean([r[0] for r in v]):.4f} / {np.mean([r[1] for r in v]):.4f} "
            f"({np.mean([r[2] for r in v]):.4f})"
            for h, v in every.items()
        )
    )
    print(f"cells up / down with the prior: {up} / {down}")


def known_users(specs: dict, trials: int) -> None:
    """Known users: on evaluate's random split (seed 0) the components are
    fitted on the training part; tune_hybrid learns the weights and user_prior
    on its own validation split of that part; Recall@20 of the test users,
    the hybrid without / with the prior (popularity)."""
    print(f"Recall@{K} of known users (test split): hybrid without / with user_prior (popularity)")
    up = down = 0
    for name, (ds, comps) in specs.items():
        t = time.perf_counter()
        outer, _ = splits(ds, "random", 0.2, 0, 1)
        root = Path(tempfile.mkdtemp(prefix="bench-hybrid-prior-"))
        _publish(ds, comps, root)
        names = [c for c, _, _ in comps]
        out = tune_hybrid(ds, names, name="hybrid", models_dir=root, trials=trials, progress=False)
        took = time.perf_counter() - t
        fitted = _publish(outer.train, comps, Path(tempfile.mkdtemp(prefix="bench-hybrid-prior-")))
        order = sorted(range(len(names)), key=lambda i: names[i])
        test = outer.test.tocsr()
        test.data = (test.data > 0).astype(np.float32)
        test.eliminate_zeros()
        users = np.flatnonzero(np.diff(test.indptr) > 0)
        truth = [set(test.indices[test.indptr[u] : test.indptr[u + 1]].tolist()) for u in users]
        without, prior = hybrid_user_answers(
            [fitted[i] for i in order],
            [out["weights"].get(names[i], 0.0) for i in order],
            users,
            K,
            [0.0, out["user_prior"]],
        )
        train = outer.train.interactions.tocsr()
        counts = np.bincount(train.indices, minlength=train.shape[1])
        popular = np.lexsort((np.arange(counts.size), -counts))
        pop = []
        for u in users:
            seen = set(train.indices[train.indptr[u] : train.indptr[u + 1]].tolist())
            pop.append([i for i in popular[: K + len(seen)] if i not in seen][:K])
        r = [_recall(x, truth) for x in (without, prior, np.array(pop))]
        up += r[1] > r[0]
        down += r[1] < r[0]
        print(
            f"{name:14} user_prior {out['user_prior']:g} (tune {took:.0f} s): "
            f"{r[0]:.4f} / {r[1]:.4f} ({r[2]:.4f})",
            flush=True,
        )
    print(f"logs up / down with the prior: {up} / {down}")


if __name__ == "__main__":
    main()
