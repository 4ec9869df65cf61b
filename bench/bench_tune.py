"""Defaults against tuned parameters and against implicit's defaults, on data the
defaults were not chosen on.

Sets (positives only, every user with a random 20% of their events held out,
Recall@20 and NDCG@20 on evaluate's test split):
  ml-100k      ratings >= 4 of MovieLens 100K (skipped when ../shared/data is absent)
  dense        synthetic, 2,000 users x 1,000 items x 100,000 events (5% full), Zipf 0.9
  longtail     synthetic, 10,000 users x 5,000 items x 150,000 events (0.3%), Zipf 1.2,
               narrow tastes (taste_concentration 0.05)
  sparse       synthetic, 30,000 users x 20,000 items x 90,000 events (0.015%), Zipf 1.1
               (not in the default --sets: the study of the defaults did not include it)

For each algorithm: its default; `recserve tune --trials N` (searched on a
validation split taken from evaluate's training part, then refitted there and
scored on evaluate's test split); implicit's default where implicit has the
algorithm (ALS, BPR, cosine item-kNN), on the same split; and the tuning time.
The last columns check the targets: default >= 0.95 x tuned, default >= implicit.

    python bench/bench_tune.py                      # every set, 30 trials
    python bench/bench_tune.py --sets dense --algos als,bpr --trials 10
    python bench/bench_tune.py --study study.json   # the defaults study (below)
    python bench/bench_tune.py --algos itemknn --candidates '{"K1": 0.6}' '{"B": 0.3}'

--study: tunes every algorithm on every set, then scores each set's best
parameters on every set's validation split, and proposes as default the
candidate (each set's best, or today's default) whose worst ratio to the
per-set best is highest: good everywhere rather than best on one set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # implicit calls BLAS from its threads

import numpy as np
import scipy.sparse as sp

from recserve import tuning
from recserve.data import Dataset, generate, load_dataset, to_dataset
from recserve.evaluation import evaluate, ranking_metrics
from recserve.models import create
from recserve.models.registry import MODELS

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
ALGOS = ("itemknn", "userknn", "rp3beta", "als", "bpr", "ease")
K = 20


def positives(ds: Dataset, threshold: float) -> Dataset:
    """Only the events with value >= threshold, as 1s (implicit feedback)."""
    m = ds.interactions.tocsr().copy()
    keep = m.data >= threshold
    ts = ds.timestamps[keep] if ds.timestamps is not None else None
    m.data = keep.astype(np.float32)
    m.eliminate_zeros()
    out = ds.with_interactions(sp.csr_matrix(m), ts)
    out.name = f"{ds.name}>={threshold:g}"
    return out


def datasets(names: list[str]) -> dict[str, Dataset]:
    out: dict[str, Dataset] = {}
    for name in names:
        if name == "ml-100k":
            if not ML100K.exists():
                print(f"ml-100k: {ML100K} absent, skipped")
                continue
            out[name] = positives(load_dataset(str(ML100K)), 4.0)
        elif name == "dense":
            out[name] = to_dataset(generate(2_000, 1_000, 100_000, seed=21, zipf=0.9), name=name)
        elif name == "longtail":
            out[name] = to_dataset(
                generate(10_000, 5_000, 150_000, seed=22, zipf=1.2, taste_concentration=0.05),
                name=name,
            )
        elif name == "sparse":  # few events per user over a wide catalogue (a shop's log)
            out[name] = to_dataset(generate(30_000, 20_000, 90_000, seed=2, zipf=1.1), name=name)
        else:
            raise SystemExit(f"unknown set {name}")
    return out


def score_on(model, split) -> dict[str, float]:
    r = evaluate(model, split.train, ks=[K], split=split)
    return {"recall": r["metrics"][f"recall@{K}"], "ndcg": r["metrics"][f"ndcg@{K}"]}


def implicit_default(algo: str, split, threads: int) -> dict[str, float] | None:
    """implicit's model with its own defaults, fitted and scored on the same split."""
    try:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking
        from implicit.nearest_neighbours import CosineRecommender
    except ImportError:
        return None
    makers = {
        "als": lambda: AlternatingLeastSquares(num_threads=threads, random_state=0),
        "bpr": lambda: BayesianPersonalizedRanking(num_threads=threads, random_state=0),
        "itemknn": lambda: CosineRecommender(num_threads=threads),
    }
    if algo not in makers:
        return None
    train = split.train.interactions.tocsr().astype(np.float32)
    model = makers[algo]()
    model.fit(train, show_progress=False)
    users = np.flatnonzero(np.diff(split.test.indptr))
    recs, _ = model.recommend(users, train[users], N=K, filter_already_liked_items=True)
    m = ranking_metrics(np.asarray(recs), split.test[users], [K], train.shape[1])
    return {"recall": m[f"recall@{K}"], "ndcg": m[f"ndcg@{K}"]}


def make(algo: str, params: dict, threads: int):
    model = create(algo, **params)
    model.n_threads = threads
    return model


def bench(sets: dict[str, Dataset], algos: list[str], trials: int, threads: int) -> list[dict]:
    rows = []
    head = (
        f"{'set':<10}{'algo':<9}{'R@20 def':>9}{'tuned':>8}{'impl.':>8}"
        f"{'N@20 def':>9}{'tuned':>8}{'impl.':>8}{'tune s':>8}{'def/tun':>8}  checks"
    )
    print(head)
    for set_name, ds in sets.items():
        outer, inner = tuning.splits(ds, "random", 0.2, 0, 1)
        for algo in algos:
            default = score_on(make(algo, {}, threads), outer)
            t = time.perf_counter()
            found = tuning.search(
                algo, inner, f"ndcg@{K}", K, trials, 0, threads=threads, progress=False
            )
            tune_s = time.perf_counter() - t
            tuned = score_on(make(algo, found.best_params, threads), outer)
            imp = implicit_default(algo, outer, threads)
            ratio = default["recall"] / tuned["recall"] if tuned["recall"] else float("nan")
            checks = ["ok" if ratio >= 0.95 else "DEFAULT < 0.95 TUNED"]
            if imp is not None:
                checks.append("ok" if default["recall"] >= imp["recall"] else "BELOW IMPLICIT")
            row = {
                "set": set_name,
                "algo": algo,
                "default": default,
                "tuned": tuned,
                "tuned_params": found.best_params,
                "implicit": imp,
                "tune_seconds": round(tune_s, 1),
                "default_over_tuned": ratio,
            }
            rows.append(row)
            ir = f"{imp['recall']:>8.4f}" if imp else f"{'-':>8}"
            inn = f"{imp['ndcg']:>8.4f}" if imp else f"{'-':>8}"
            print(
                f"{set_name:<10}{algo:<9}{default['recall']:>9.4f}{tuned['recall']:>8.4f}{ir}"
                f"{default['ndcg']:>9.4f}{tuned['ndcg']:>8.4f}{inn}{tune_s:>8.1f}{ratio:>8.2f}"
                f"  {' '.join(checks)}",
                flush=True,
            )
    return rows


def study(sets: dict[str, Dataset], algos: list[str], trials: int, threads: int) -> dict:
    """Tune on every set alone (its best validation score), then search once more
    for the parameters whose worst ratio to those bests, over every set, is the
    highest: the default that is good everywhere rather than best on one set."""
    import optuna

    inner = {n: tuning.splits(ds, "random", 0.2, 0, 1)[1] for n, ds in sets.items()}
    out: dict = {}
    for algo in algos:
        cls = MODELS[algo]
        space = tuning.space(cls)
        best: dict[str, float] = {}
        starts = [{n: p.default for n, p in space.items()}]
        for n in sets:
            t = time.perf_counter()
            found = tuning.search(
                algo, inner[n], f"recall@{K}", K, trials, 0, threads=threads, progress=False
            )
            best[n] = found.best_value
            starts.append({k: v for k, v in found.best_params.items() if k in space})
            took = time.perf_counter() - t
            print(f"{algo} on {n}: {found.best_value:.4f} in {took:.0f}s {found.best_params}")

        def worst(trial, space=space, algo=algo, best=best):
            params = {k: tuning.suggest(trial, k, p) for k, p in space.items()}
            ratios = []
            for n in sets:
                r = score_on(make(algo, params, threads), inner[n])["recall"]
                trial.set_user_attr(n, r)
                ratios.append(r / best[n])
            return min(ratios)

        joint = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
        )
        for start in starts:
            joint.enqueue_trial(start)
        joint.optimize(worst, n_trials=len(starts) + trials)
        pick = joint.best_trial
        current = joint.trials[0]
        out[algo] = {
            "per_set_best": best,
            "params": pick.params,
            "worst_ratio": pick.value,
            "recall": pick.user_attrs,
            "current_default_worst_ratio": current.value,
            "current_default_recall": current.user_attrs,
        }
        print(
            f"{algo}: pick worst ratio {pick.value:.3f} (current default {current.value:.3f}) "
            f"{pick.params}",
            flush=True,
        )
    return out


def candidates(sets: dict[str, Dataset], algo: str, configs: list[dict], threads: int) -> None:
    """Score parameter sets (beside the default) on every set's validation and test
    splits: how a default is picked by its worst validation ratio, the test split
    shown only to check it."""
    splits = {n: tuning.splits(ds, "random", 0.2, 0, 1) for n, ds in sets.items()}
    scored = []
    for params in [{}, *configs]:
        val = {n: score_on(make(algo, params, threads), s[1])["recall"] for n, s in splits.items()}
        test = {n: score_on(make(algo, params, threads), s[0])["recall"] for n, s in splits.items()}
        scored.append((params, val, test))
        cells = " | ".join(f"{n} val {val[n]:.4f} test {test[n]:.4f}" for n in splits)
        print(f"{json.dumps(params)}: {cells}", flush=True)
    best = {n: max(v[n] for _, v, _ in scored) for n in splits}
    for params, val, _ in scored:
        worst = min(val[n] / best[n] for n in splits)
        print(f"worst validation ratio to the best here {worst:.3f}: {json.dumps(params)}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sets", default="ml-100k,dense,longtail")
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--study", default=None, metavar="OUT.json", help="run the defaults study")
    ap.add_argument("--out", default=None, help="write the rows as JSON")
    ap.add_argument(
        "--candidates",
        nargs="+",
        metavar="JSON",
        help="score these parameter sets of the one --algos on every split, no tuning",
    )
    args = ap.parse_args()
    algos = [a for a in args.algos.split(",") if a]
    for a in algos:
        if a not in MODELS:
            raise SystemExit(f"unknown algorithm {a}")
    sets = datasets([s for s in args.sets.split(",") if s])
    for n, ds in sets.items():
        print(f"{n}: {ds.n_users} users x {ds.n_items} items, {ds.interactions.nnz} events")
    if args.candidates:
        if len(algos) != 1:
            raise SystemExit("--candidates needs exactly one --algos")
        candidates(sets, algos[0], [json.loads(c) for c in args.candidates], args.threads)
        return
    if args.study:
        Path(args.study).write_text(
            json.dumps(study(sets, algos, args.trials, args.threads), indent=1, default=str)
        )
        return
    rows = bench(sets, algos, args.trials, args.threads)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
