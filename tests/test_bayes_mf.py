"""Bayesian MF: calibrated predictive intervals, RMSE close to biased MF, fold-in std."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.data import load_dataset
from recserve.evaluation import evaluate, rating_metrics, split_random
from recserve.models import create

Z90 = 1.6448536269514722  # central 90% of a standard normal


def coverage_and_rmse(model, split):
    test = split.test
    inside, means, truth = [], [], []
    for u in np.flatnonzero(np.diff(test.indptr)):
        items = test.indices[test.indptr[u] : test.indptr[u + 1]]
        ratings = test.data[test.indptr[u] : test.indptr[u + 1]]
        mean, std = model.score(int(u), items)
        if std is not None:  # svd predicts without uncertainty
            inside.append(np.abs(ratings - mean) <= Z90 * std)
        means.append(mean)
        truth.append(ratings)
    rmse = rating_metrics(np.concatenate(means), np.concatenate(truth))["rmse"]
    return (float(np.concatenate(inside).mean()) if inside else float("nan")), rmse


def test_ml100k_intervals_are_calibrated_and_rmse_close_to_biased_mf(ml100k_path):
    split = split_random(load_dataset(ml100k_path), 0.2, seed=0)
    coverage, rmse = coverage_and_rmse(create("bayes_mf").fit(split.train), split)
    assert 0.87 <= coverage <= 0.93, coverage
    _, svd_rmse = coverage_and_rmse(create("svd").fit(split.train), split)
    assert rmse <= svd_rmse + 0.02, (rmse, svd_rmse)


def test_std_is_positive_and_shrinks_with_more_history(small):
    model = create("bayes_mf", factors=8, epochs=10).fit(small)
    assert model.sigma > 0
    items = np.arange(small.n_items)
    _, std = model.score(0, items)
    assert std.shape == items.shape and np.all(std >= model.sigma)
    short = small.interactions[0].copy()  # the same user with only two ratings
    short.data[2:] = 0
    short.eliminate_zeros()
    _, std_short = model.score_history(short, items)
    _, std_full = model.score_history(small.interactions[0], items)
    assert std_full.mean() < std_short.mean()  # more evidence, less uncertainty


@pytest.mark.parametrize("seed", [1, 2])
def test_calibration_on_synthetic_data(small, seed):
    """About 6,000 held-out ratings: the 90% interval's coverage has a standard error
    of 0.4 points, so 0.87-0.93 fails a std that is ~10% too wide or too narrow."""
    split = split_random(small, 0.2, seed=seed)
    coverage, _ = coverage_and_rmse(create("bayes_mf", factors=8).fit(split.train), split)
    assert 0.87 <= coverage <= 0.93, coverage


def test_evaluate_reports_interval_coverage(small):
    result = evaluate(create("bayes_mf", factors=8), small, "random", (10,))
    assert 0.87 <= result["metrics"]["interval90"] <= 0.93
    assert "interval90" not in evaluate(create("svd", factors=8), small, "random", (10,))["metrics"]


def test_score_history_checks_the_item_range(small):
    model = create("bayes_mf", factors=4, epochs=2).fit(small)
    with pytest.raises(IndexError, match=r"items: indices must be in \[0, 300\)"):
        model.score_history(small.interactions[0], [0, 300])
    with pytest.raises(IndexError, match="items"):
        model.score_history(small.interactions[0], [-1])


def test_known_user_std_kernel_equals_the_numpy_posterior(small):
    # score() takes one Cholesky kernel call (sgd.predictive_quad); the numpy
    # posterior (np.linalg.solve on Z^T Z + reg n I) is the reference.
    from recserve.kernels import sgd

    m = create("bayes_mf", factors=6, epochs=3).fit(small)
    seen = small.interactions
    items = np.arange(0, small.n_items, 7)
    for u in range(0, small.n_users, 29):
        mean, std = m.score(u, items)
        want = m.posterior_std(seen[u], items)
        np.testing.assert_allclose(std, want, rtol=1e-6)
        raw = m._score_users(np.array([u]))[0, items]
        np.testing.assert_allclose(mean, np.clip(raw, *m.scale), rtol=1e-5, atol=1e-5)
    Q = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="positive definite"):
        sgd.predictive_quad(Q, np.zeros(0, np.int32), np.array([0]), 0.0)
    with pytest.raises(IndexError, match="items"):
        sgd.predictive_quad(Q, np.zeros(0, np.int32), np.array([3]), 1.0)


def test_std_alone_is_the_scores_std_for_known_and_folded_in_users(small):
    # The serving path asks std_user / std_history for the std of an answer it
    # already scored: the same as score()'s / score_history()'s, and the numpy
    # posterior's; a model without uncertainty answers None.
    m = create("bayes_mf", factors=6, epochs=3).fit(small)
    seen = small.interactions
    items = np.arange(3, small.n_items, 11).astype(np.int32)
    for u in range(0, small.n_users, 37):
        np.testing.assert_array_equal(m.std_user(u, items), m.score(u, items)[1])
        np.testing.assert_allclose(
            m.std_history(seen[u], items), m.posterior_std(seen[u], items), rtol=1e-6
        )
        np.testing.assert_allclose(
            m.std_history(seen[u], items), m.score_history(seen[u], items)[1], rtol=1e-6
        )
    with pytest.raises(IndexError, match="users"):
        m.std_user(small.n_users, items)
    with pytest.raises(IndexError, match="items"):
        m.std_user(0, np.array([small.n_items]))
    svd = create("svd", factors=4, epochs=2).fit(small)
    assert svd.std_user(0, items) is None and svd.std_history(seen[0], items) is None


def test_predictive_quad_on_a_long_history_equals_numpy():
    # A long history gathers its rows 512 at a time into the BLAS update of A:
    # 1,300 seen items take three, against numpy's z^T A^-1 z.
    from recserve.kernels import sgd

    rng = np.random.default_rng(7)
    q = (rng.standard_normal((2000, 12)) * 0.3).astype(np.float32)
    for n in (0, 511, 512, 1300):
        seen = rng.choice(2000, n, replace=False).astype(np.int32)
        items = rng.choice(2000, 40, replace=False).astype(np.int64)
        z = np.hstack([np.ones((n, 1)), q[seen].astype(np.float64)])
        a = z.T @ z + 0.05 * max(n, 1) * np.eye(13)
        zi = np.hstack([np.ones((40, 1)), q[items].astype(np.float64)])
        want = np.einsum("ij,ij->i", zi, np.linalg.solve(a, zi.T).T)
        got = sgd.predictive_quad(q, seen, items, 0.05)
        np.testing.assert_allclose(got, want, rtol=1e-9)
