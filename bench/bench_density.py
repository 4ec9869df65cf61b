"""Neighbourhood defaults across a log's density: test Recall@20 (random 20%
of every user's events held out, `recserve evaluate`'s split) of popularity
and of each candidate parameter set, on eight logs from 3 to 59 events per
user: MovieLens 100K's ratings >= 4 whole and cut to a random 10 and 5
events per user (skipped when ../shared/data is absent), and five synthetic
ones. It is the table behind the density-following defaults of itemknn and
rp3beta (docs/algorithms.md, "Very sparse logs").

    python bench/bench_density.py --algo itemknn \\
        '{"similarity":"cosine","weighting":"bm25"}' '{"similarity":"dot","weighting":"tfidf"}'
    python bench/bench_density.py --algo rp3beta '{"alpha":1.1,"beta":0.16}'

The default ({}) is always scored first; the log's median training events per
user (what the defaults choose by) is printed beside each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tune import ML100K, positives

from recserve.data import Dataset, generate, load_dataset, to_dataset
from recserve.evaluation import evaluate, make_split
from recserve.models import create
from recserve.models.neighbors import median_events

K = 20


def cut(ds: Dataset, per_user: int, seed: int = 0) -> Dataset:
    """`ds` with each user's events cut to a random `per_user` of them."""
    m = ds.interactions.tocsr()
    rng = np.random.default_rng(seed)
    keep = np.zeros(m.nnz, bool)
    for u in range(m.shape[0]):
        a, b = int(m.indptr[u]), int(m.indptr[u + 1])
        if b > a:
            keep[rng.choice(np.arange(a, b), min(per_user, b - a), replace=False)] = True
    out = m.copy()
    out.data = np.where(keep, out.data, 0).astype(out.data.dtype)
    out.eliminate_zeros()
    return ds.with_interactions(out, ds.timestamps[keep] if ds.timestamps is not None else None)


def logs() -> dict[str, Dataset]:
    out: dict[str, Dataset] = {}
    if ML100K.is_dir():
        ml = positives(load_dataset(str(ML100K)), 4.0)
        out |= {"ml-100k": ml, "ml-100k/10": cut(ml, 10), "ml-100k/5": cut(ml, 5)}
    synthetic = {
        "30kx20k z1.1": ((30_000, 20_000, 90_000), dict(seed=2, zipf=1.1)),
        "20kx10k z0.9": ((20_000, 10_000, 100_000), dict(seed=3, zipf=0.9)),
        "20kx10k z1.1": ((20_000, 10_000, 160_000), dict(seed=4, zipf=1.1)),
        "dense": ((2_000, 1_000, 100_000), dict(seed=21, zipf=0.9)),
        "longtail": ((10_000, 5_000, 150_000), dict(seed=22, zipf=1.2, taste_concentration=0.05)),
    }
    for name, (shape, kw) in synthetic.items():
        out[name] = to_dataset(generate(*shape, **kw), name=name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--algo", default="itemknn")
    ap.add_argument("candidates", nargs="*", help="parameter sets as JSON")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    cands = [{}, *(json.loads(c) for c in args.candidates)]
    print(f"{args.algo}: test Recall@{K}; candidates: " + " | ".join(map(json.dumps, cands)))
    for name, ds in logs().items():
        m = ds.interactions
        per_user = m.nnz / max(1, int((np.diff(m.indptr) > 0).sum()))
        median = median_events(make_split(ds, "random", 0.2, 0, 1).train.interactions)
        row = [recall(create(args.algo, **c), ds) for c in cands]
        print(
            f"{name:14} {per_user:5.1f} events/user (median {median:3.0f} in training)  "
            f"popularity {recall(create('popularity'), ds):.4f} | "
            + " ".join(f"{r:.4f}" for r in row),
            flush=True,
        )


def recall(model, ds: Dataset) -> float:
    """Test Recall@K on evaluate's random split (seed 0): what `recserve evaluate` prints."""
    return evaluate(model, ds, "random", [K])["metrics"][f"recall@{K}"]


if __name__ == "__main__":
    main()
