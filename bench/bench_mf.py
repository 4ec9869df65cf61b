"""Factorization: ALS and BPR vs implicit's, and svd vs Surprise's SVD, same run.

ALS: both libraries optimise the same objective. The confidence matrix
C = 1 + alpha * R is built once and given to implicit with its alpha=1
(implicit treats matrix values as confidences); same factors, regularization,
CG steps, iterations and threads. Prints seconds per iteration (fit time /
iterations, everything included) and the ratio (ours / implicit; < 1 is
faster), and Recall@20 / NDCG@20 of both under the random 80/20 protocol,
computed by the same metric code.

BPR: same factors, learning rate 0.01, regularization 0.01, iterations and
threads for both; seconds per iteration and Recall@20 / NDCG@20. implicit
draws negatives proportionally to popularity and skips a step whose negative
is a positive: our `negatives=popular` is that sampler (the like-for-like
row); `uniform` (our default) is timed and scored beside it.

All timings are the best of --repeat rounds (on data under 1M interactions
at least 3, 5 for svd whose ml-100k fit takes 0.1 s), the sides run
alternately within each round.

svd: our explicit biased MF vs Surprise's SVD with the same factors, epochs,
learning rate and regularization on the same 80/20 split of the ratings
(Surprise's Trainset is built from that split directly): fit seconds, ratio
(ours / Surprise; the target is <= 0.2, i.e. 5x faster) and test RMSE/MAE of
both, predictions clipped to the rating scale for both.

    python bench/bench_mf.py                       # ml-100k (if present) and 5M synthetic
    python bench/bench_mf.py --factors 32,64,128 --iterations 10 --threads 2
    python bench/bench_mf.py --skip-als --svd-synthetic 0
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Before numpy loads OpenBLAS: implicit asks for serial BLAS (it calls BLAS from
# its OpenMP threads, as our ALS does; recserve limits its own with threadpoolctl).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from alternate import best_of

from recserve.data import generate, load_dataset, to_dataset
from recserve.evaluation import ranking_metrics, rating_metrics, split_random
from recserve.models import create

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def ranking_row(name, model, f, ours_s, theirs_s, rec_ours, rec_theirs, split, users, n_items):
    """One comparison row: timings, their ratio and Recall/NDCG@20 of both lists."""
    m_o = ranking_metrics(rec_ours, split.test[users], [20], n_items)
    m_t = ranking_metrics(np.asarray(rec_theirs), split.test[users], [20], n_items)
    return {
        "dataset": name,
        "model": model,
        "factors": f,
        "s_per_iter": ours_s,
        "s_per_iter_implicit": theirs_s,
        "ratio": ours_s / theirs_s,
        "recall@20": m_o["recall@20"],
        "recall@20_implicit": m_t["recall@20"],
        "ndcg@20": m_o["ndcg@20"],
        "ndcg@20_implicit": m_t["ndcg@20"],
    }


def rounds(ds, repeat, small=3):
    """Timing rounds for a dataset: at least `small` under 1M interactions, where a
    fit takes well under a second and single runs swing by a third on this VM."""
    return max(repeat, small) if ds.nnz < 1_000_000 else repeat


def run_als(name, ds, factors, iterations, threads, alpha, reg, repeat):
    from implicit.cpu.als import AlternatingLeastSquares

    split = split_random(ds, 0.2, seed=0)
    train = split.train.interactions.tocsr().astype(np.float32)
    conf = train.copy()
    conf.data = (1.0 + alpha * conf.data).astype(np.float32)
    users = np.flatnonzero(np.diff(split.test.indptr))
    rows = []
    for f in factors:

        def make_ours(f=f):
            m = create(
                "als", factors=f, iterations=iterations, regularization=reg, alpha=alpha, cg_steps=3
            )
            m.n_threads = threads
            return m.fit(split.train)

        def make_theirs(f=f):
            # A new model each round: implicit's fit continues from existing factors.
            m = AlternatingLeastSquares(
                factors=f,
                iterations=iterations,
                regularization=reg,
                alpha=1.0,
                use_cg=True,
                num_threads=threads,
                random_state=0,
                calculate_training_loss=False,
            )
            m.fit(conf, show_progress=False)
            return m

        (ours_s, ours), (theirs_s, theirs) = best_of(rounds(ds, repeat), make_ours, make_theirs)
        ours_s, theirs_s = ours_s / iterations, theirs_s / iterations
        rec_o, _ = ours.recommend(users, 20)
        rec_t, _ = theirs.recommend(users, train[users], N=20, filter_already_liked_items=True)
        row = ranking_row(name, "als", f, ours_s, theirs_s, rec_o, rec_t, split, users, ds.n_items)
        rows.append(row)
        print(
            f"{name:<12}{f:>8}{ours_s:>10.3f}{theirs_s:>10.3f}{row['ratio']:>7.2f}"
            f"{row['recall@20']:>8.4f}{row['recall@20_implicit']:>8.4f}"
            f"{row['ndcg@20']:>8.4f}{row['ndcg@20_implicit']:>8.4f}",
            flush=True,
        )
    return rows


def run_bpr(name, ds, factors, iterations, threads, repeat):
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    split = split_random(ds, 0.2, seed=0)
    train = split.train.interactions.tocsr().astype(np.float32)
    users = np.flatnonzero(np.diff(split.test.indptr))
    rows = []
    for f in factors:

        def make_theirs(f=f):
            # A new model each round: implicit's fit continues from existing factors.
            m = BayesianPersonalizedRanking(
                factors=f,
                learning_rate=0.01,
                regularization=0.01,
                iterations=iterations,
                num_threads=threads,
                random_state=0,
            )
            m.fit(train, show_progress=False)
            return m

        def make_ours(negatives, f=f):
            m = create("bpr", factors=f, epochs=iterations, lr=0.01, reg=0.01, negatives=negatives)
            m.n_threads = threads
            return m.fit(split.train)

        # implicit draws negatives proportionally to popularity (our "popular");
        # the uniform sampler is timed and scored beside it.
        samplers = ("uniform", "popular")
        timed = best_of(
            rounds(ds, repeat),
            make_theirs,
            *(lambda n=n: make_ours(n) for n in samplers),
        )
        theirs = timed[0][1]
        theirs_s = timed[0][0] / iterations
        rec_t, _ = theirs.recommend(users, train[users], N=20, filter_already_liked_items=True)
        for negatives, (seconds, model) in zip(samplers, timed[1:], strict=True):
            ours_s = seconds / iterations
            rec_o, _ = model.recommend(users, 20)
            row = ranking_row(
                name,
                f"bpr {negatives}",
                f,
                ours_s,
                theirs_s,
                rec_o,
                rec_t,
                split,
                users,
                ds.n_items,
            )
            rows.append(row)
            print(
                f"{name:<12}{negatives:<9}{f:>5}{ours_s:>10.4f}{theirs_s:>10.4f}"
                f"{row['ratio']:>7.2f}{row['recall@20']:>8.4f}"
                f"{row['recall@20_implicit']:>8.4f}{row['ndcg@20']:>8.4f}"
                f"{row['ndcg@20_implicit']:>8.4f}",
                flush=True,
            )
    return rows


def surprise_trainset(train):
    """A surprise.Trainset over our dense ids (no pandas, no files)."""
    from surprise import Trainset

    coo = train.tocoo()
    ur, ir = {}, {}
    for u, i, r in zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist(), strict=True):
        ur.setdefault(u, []).append((i, r))
        ir.setdefault(i, []).append((u, r))
    # Surprise needs inner ids 0..n-1: remap, keeping ours to translate back.
    u_in = {u: k for k, u in enumerate(sorted(ur))}
    i_in = {i: k for k, i in enumerate(sorted(ir))}
    ur2 = {u_in[u]: [(i_in[i], r) for i, r in v] for u, v in ur.items()}
    ir2 = {i_in[i]: [(u_in[u], r) for u, r in v] for i, v in ir.items()}
    scale = (float(coo.data.min()), float(coo.data.max()))
    return Trainset(ur2, ir2, len(u_in), len(i_in), coo.nnz, scale, u_in, i_in), u_in, i_in


def run_svd(name, ds, factors, epochs, threads, repeat):
    from surprise import SVD

    split = split_random(ds, 0.2, seed=0)
    test = split.test.tocoo()
    trainset, u_in, i_in = surprise_trainset(split.train.interactions)

    def fit_theirs():
        model = SVD(n_factors=factors, n_epochs=epochs, lr_all=0.005, reg_all=0.02, random_state=0)
        return model.fit(trainset)

    def fit_ours(hogwild):
        # Serial SGD is deterministic; Hogwild uses `threads` (same hyper-parameters).
        model = create("svd", factors=factors, epochs=epochs, hogwild=hogwild)
        model.n_threads = threads
        return model.fit(split.train)

    (theirs_s, theirs), *ours_runs = best_of(
        rounds(ds, repeat, small=5), fit_theirs, lambda: fit_ours(False), lambda: fit_ours(True)
    )
    pred_t = np.array(
        [
            theirs.estimate(u_in[u], i_in[i]) if u in u_in and i in i_in else trainset.global_mean
            for u, i in zip(test.row.tolist(), test.col.tolist(), strict=True)
        ]
    )
    m_t = rating_metrics(np.clip(pred_t, *trainset.rating_scale), test.data)
    rows = []
    for label, (ours_s, ours) in zip(("serial", f"hogwild x{threads}"), ours_runs, strict=True):
        pred = np.clip(
            ours.mu
            + ours.bu[test.row]
            + ours.bi[test.col]
            + np.einsum("ij,ij->i", ours.P[test.row], ours.Q[test.col]),
            *ours.scale,
        )
        m_o = rating_metrics(pred, test.data)
        row = {
            "dataset": name,
            "model": f"svd {label}",
            "factors": factors,
            "epochs": epochs,
            "fit_s": ours_s,
            "fit_surprise_s": theirs_s,
            "ratio": ours_s / theirs_s,
            "rmse": m_o["rmse"],
            "rmse_surprise": m_t["rmse"],
            "mae": m_o["mae"],
            "mae_surprise": m_t["mae"],
        }
        rows.append(row)
        print(
            f"{name:<12}{label:<12}{ours_s:>8.2f}{theirs_s:>10.2f}{row['ratio']:>7.3f}"
            f"{m_o['rmse']:>9.4f}{m_t['rmse']:>9.4f}{m_o['mae']:>9.4f}"
            f"{m_t['mae']:>9.4f}",
            flush=True,
        )
    return rows


def synthetic(n):
    return to_dataset(
        generate(n // 50, max(2_000, n // 250), n, seed=11), name=f"synth-{n / 1e6:g}M"
    )


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", default="32,64,128", help="ALS factor counts")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--regularization", type=float, default=0.05)
    ap.add_argument(
        "--synthetic",
        type=int,
        default=5_000_000,
        help="synthetic interactions for ALS (0 to skip)",
    )
    ap.add_argument("--skip-als", action="store_true")
    ap.add_argument("--skip-bpr", action="store_true")
    ap.add_argument("--bpr-iterations", type=int, default=50)
    ap.add_argument("--svd-factors", type=int, default=100)
    ap.add_argument("--svd-epochs", type=int, default=20)
    ap.add_argument(
        "--svd-synthetic",
        type=int,
        default=5_000_000,
        help="synthetic ratings for svd vs Surprise (0 to skip)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timings: best of this many alternating rounds (3 or more under 1M)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    ml = load_dataset(ML100K) if ML100K.exists() else None
    if ml is None:
        print(f"(skipping ml-100k: {ML100K} not present)")
    if not args.skip_als:
        factors = [int(x) for x in args.factors.split(",")]
        common = (
            factors,
            args.iterations,
            args.threads,
            args.alpha,
            args.regularization,
            args.repeat,
        )
        print(
            f"{'dataset':<12}{'factors':>8}{'s/iter':>10}{'implicit':>10}{'ratio':>7}"
            f"{'R@20':>8}{'impl.':>8}{'N@20':>8}{'impl.':>8}"
        )
        if ml is not None:
            rows += run_als("ml-100k", ml, *common)
        if args.synthetic:
            ds = synthetic(args.synthetic)
            rows += run_als(ds.name, ds, *common)
    if not args.skip_bpr:
        factors = [int(x) for x in args.factors.split(",")]
        print(
            f"\n{'dataset':<12}{'negative':<9}{'f':>5}{'bpr s/it':>10}{'implicit':>10}{'ratio':>7}"
            f"{'R@20':>8}{'impl.':>8}{'N@20':>8}{'impl.':>8}"
        )
        if ml is not None:
            rows += run_bpr("ml-100k", ml, factors, args.bpr_iterations, args.threads, args.repeat)
        if args.synthetic:
            ds = synthetic(args.synthetic)
            rows += run_bpr(ds.name, ds, factors, args.bpr_iterations, args.threads, args.repeat)
    print(
        f"\n{'dataset':<12}{'svd':<12}{'fit s':>8}{'surprise':>10}{'ratio':>7}"
        f"{'RMSE':>9}{'surprise':>9}{'MAE':>9}{'surprise':>9}"
    )
    if ml is not None:
        rows += run_svd("ml-100k", ml, args.svd_factors, args.svd_epochs, args.threads, args.repeat)
    if args.svd_synthetic:
        ds = synthetic(args.svd_synthetic)
        rows += run_svd(ds.name, ds, args.svd_factors, args.svd_epochs, args.threads, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
