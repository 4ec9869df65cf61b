"""Factorization: recserve ALS vs implicit's AlternatingLeastSquares, same run.

Both libraries optimise the same objective: the confidence matrix
C = 1 + alpha * R is built once and given to implicit with its alpha=1 (implicit
treats matrix values as confidences), same factors, regularization, CG steps,
iterations and threads. Prints seconds per iteration at each factor count and
the ratio (ours / implicit; < 1 is faster), and Recall@20 / NDCG@20 of both
under the random 80/20 protocol, computed by the same metric code.

    python bench/bench_mf.py                       # ml-100k (if present) and 5M synthetic
    python bench/bench_mf.py --factors 32,64,128 --iterations 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # implicit warns otherwise

from server.data import generate, load_dataset, to_dataset
from server.evaluation import ranking_metrics, split_random
from server.models import create

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def run(name, ds, factors, iterations, threads, alpha, reg):
    from implicit.cpu.als import AlternatingLeastSquares

    split = split_random(ds, 0.2, seed=0)
    train = split.train.interactions.tocsr().astype(np.float32)
    conf = train.copy()
    conf.data = (1.0 + alpha * conf.data).astype(np.float32)
    users = np.flatnonzero(np.diff(split.test.indptr))
    rows = []
    for f in factors:
        ours = create(
            "als", factors=f, iterations=iterations, regularization=reg, alpha=alpha, cg_steps=3
        )
        ours.n_threads = threads
        t = time.perf_counter()
        ours.fit(split.train)
        ours_s = (time.perf_counter() - t) / iterations
        theirs = AlternatingLeastSquares(
            factors=f,
            iterations=iterations,
            regularization=reg,
            alpha=1.0,
            use_cg=True,
            num_threads=threads,
            random_state=0,
            calculate_training_loss=False,
        )
        t = time.perf_counter()
        theirs.fit(conf, show_progress=False)
        theirs_s = (time.perf_counter() - t) / iterations
        rec_o, _ = ours.recommend(users, 20)
        rec_t, _ = theirs.recommend(users, train[users], N=20, filter_already_liked_items=True)
        m_o = ranking_metrics(rec_o, split.test[users], [20], ds.n_items)
        m_t = ranking_metrics(np.asarray(rec_t), split.test[users], [20], ds.n_items)
        row = {
            "dataset": name,
            "factors": f,
            "s_per_iter": ours_s,
            "s_per_iter_implicit": theirs_s,
            "ratio": ours_s / theirs_s,
            "recall@20": m_o["recall@20"],
            "recall@20_implicit": m_t["recall@20"],
            "ndcg@20": m_o["ndcg@20"],
            "ndcg@20_implicit": m_t["ndcg@20"],
        }
        rows.append(row)
        print(
            f"{name:<12}{f:>8}{ours_s:>10.3f}{theirs_s:>10.3f}{row['ratio']:>7.2f}"
            f"{row['recall@20']:>8.4f}{row['recall@20_implicit']:>8.4f}"
            f"{row['ndcg@20']:>8.4f}{row['ndcg@20_implicit']:>8.4f}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", default="32,64,128")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--regularization", type=float, default=0.05)
    ap.add_argument("--synthetic", type=int, default=5_000_000, help="0 to skip")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    factors = [int(x) for x in args.factors.split(",")]
    print(
        f"{'dataset':<12}{'factors':>8}{'s/iter':>10}{'implicit':>10}{'ratio':>7}"
        f"{'R@20':>8}{'impl.':>8}{'N@20':>8}{'impl.':>8}"
    )
    rows = []
    common = (factors, args.iterations, args.threads, args.alpha, args.regularization)
    if ML100K.exists():
        rows += run("ml-100k", load_dataset(ML100K), *common)
    else:
        print(f"(skipping ml-100k: {ML100K} not present)")
    if args.synthetic:
        n = args.synthetic
        ds = to_dataset(generate(n // 50, max(2_000, n // 250), n, seed=11))
        rows += run(f"synth-{n / 1e6:g}M", ds, *common)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
