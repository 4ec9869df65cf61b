"""Item-kNN: recserve vs implicit's CosineRecommender / BM25Recommender, same run.

Same data, same random 80/20 split, same K, same thread count. Prints build
seconds, recommend-all seconds (k=20 for every test user, seen items
filtered), their ratios (ours / implicit: < 1 means we are faster), the
neighbour-list overlap with implicit's lists (implicit keeps each item as its
own neighbour; we do not, so its lists are compared without the item itself),
and Recall@20 / NDCG@20 of both computed by the same metric code.

implicit's K counts the item itself among its neighbours, so its K-list has
K-1 real neighbours. A last "matched" line per dataset runs our cosine with
K-1 and prints the fraction of users whose top-20 list is identical to
implicit's (expect ~1.0: same algorithm, same answers).

    python bench/bench_knn.py                      # ml-100k (if present) and 5M synthetic
    python bench/bench_knn.py --synthetic 5000000 --k 100 --threads 2

Timings are the best of --repeat rounds (10 on data under 1M interactions),
ours and implicit's run alternately within each round.

implicit is a bench-only extra: pip install '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from alternate import best_of

from recserve.data import generate, load_dataset, to_dataset
from recserve.evaluation import ranking_metrics, split_random
from recserve.models import create

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def overlap(ours, theirs) -> float:
    """Mean |ours_i & (theirs_i - {i})| / |theirs_i - {i}| over items with neighbours."""
    ours, theirs = ours.tocsr(), theirs.tocsr()
    fractions = []
    for i in range(theirs.shape[0]):
        t = set(theirs.indices[theirs.indptr[i] : theirs.indptr[i + 1]].tolist()) - {i}
        if t:
            o = set(ours.indices[ours.indptr[i] : ours.indptr[i + 1]].tolist())
            fractions.append(len(o & t) / len(t))
    return float(np.mean(fractions))


def run(name, ds, k, threads, repeat):
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

    if ds.nnz < 1_000_000:  # builds of ~20-60 ms: a few more rounds tame the noise
        repeat = max(repeat, 10)

    split = split_random(ds, 0.2, seed=0)
    train = split.train.interactions.tocsr().astype(np.float32)
    users = np.flatnonzero(np.diff(split.test.indptr))
    rows = []
    pairs = [
        ("cosine", dict(similarity="cosine"), lambda: CosineRecommender(K=k, num_threads=threads)),
        (
            "bm25",
            dict(similarity="dot", weighting="bm25", K1=1.2, B=0.75),
            lambda: BM25Recommender(K=k, K1=1.2, B=0.75, num_threads=threads),
        ),
    ]
    for label, params, make_theirs in pairs:
        ours = create("itemknn", k=k, **params)
        ours.n_threads = threads
        theirs = make_theirs()
        (b_ours, _), (b_theirs, _) = best_of(
            repeat,
            lambda m=ours: m.fit(split.train),
            lambda m=theirs: m.fit(train, show_progress=False),
        )
        (r_ours, (rec_ours, _)), (r_theirs, rec_theirs) = best_of(
            repeat,
            lambda m=ours: m.recommend(users, 20),
            lambda m=theirs: m.recommend(
                users, train[users], N=20, filter_already_liked_items=True
            )[0],
        )
        m_ours = ranking_metrics(rec_ours, split.test[users], [20], ds.n_items)
        m_theirs = ranking_metrics(np.asarray(rec_theirs), split.test[users], [20], ds.n_items)
        rows.append(
            {
                "dataset": name,
                "model": label,
                "k": k,
                "threads": threads,
                "interactions": ds.nnz,
                "users": ds.n_users,
                "items": ds.n_items,
                "build_s": b_ours,
                "build_implicit_s": b_theirs,
                "build_ratio": b_ours / b_theirs,
                "recommend_s": r_ours,
                "recommend_implicit_s": r_theirs,
                "recommend_ratio": r_ours / r_theirs,
                "overlap": overlap(ours.sim, theirs.similarity),
                "recall@20": m_ours["recall@20"],
                "recall@20_implicit": m_theirs["recall@20"],
                "ndcg@20": m_ours["ndcg@20"],
                "ndcg@20_implicit": m_theirs["ndcg@20"],
            }
        )
        print_row(rows[-1])
    matched = create("itemknn", k=k - 1, similarity="cosine")
    matched.n_threads = threads
    rec_m, _ = matched.fit(split.train).recommend(users, 20)
    theirs = CosineRecommender(K=k, num_threads=threads)
    theirs.fit(train, show_progress=False)
    rec_t, _ = theirs.recommend(users, train[users], N=20, filter_already_liked_items=True)
    same = float((rec_m == np.asarray(rec_t)).all(axis=1).mean())
    r_m = ranking_metrics(rec_m, split.test[users], [20], ds.n_items)["recall@20"]
    print(
        f"{name:<14}matched: our cosine K={k - 1} vs implicit K={k} (self included): "
        f"identical top-20 lists {same:.4f}, Recall@20 {r_m:.4f}",
        flush=True,
    )
    rows.append(
        {"dataset": name, "model": "cosine-matched", "identical_lists": same, "recall@20": r_m}
    )
    return rows


HEADER = (
    f"{'dataset':<14}{'model':<8}{'build s':>9}{'implicit':>9}{'ratio':>7}"
    f"{'rec-all s':>10}{'implicit':>9}{'ratio':>7}{'overlap':>9}"
    f"{'R@20':>8}{'impl.':>8}{'N@20':>8}{'impl.':>8}"
)


def print_row(r):
    print(
        f"{r['dataset']:<14}{r['model']:<8}{r['build_s']:>9.3f}{r['build_implicit_s']:>9.3f}"
        f"{r['build_ratio']:>7.2f}{r['recommend_s']:>10.3f}{r['recommend_implicit_s']:>9.3f}"
        f"{r['recommend_ratio']:>7.2f}{r['overlap']:>9.4f}{r['recall@20']:>8.4f}"
        f"{r['recall@20_implicit']:>8.4f}{r['ndcg@20']:>8.4f}{r['ndcg@20_implicit']:>8.4f}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=100, help="neighbours per item (both libraries)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--synthetic", type=int, default=5_000_000, help="synthetic interactions (0 to skip)"
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="timings: best of this many alternating rounds"
    )
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    print(HEADER)
    rows = []
    if ML100K.exists():
        rows += run("ml-100k", load_dataset(ML100K), args.k, args.threads, args.repeat)
    else:
        print(f"(skipping ml-100k: {ML100K} not present)")
    if args.synthetic:
        n = args.synthetic
        ds = to_dataset(
            generate(n // 50, max(2_000, n // 250), n, seed=11), name=f"synth-{n / 1e6:g}M"
        )
        rows += run(ds.name, ds, args.k, args.threads, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
