"""Explicit biased MF (svd): one SGD epoch against pure Python, fold-in, RMSE."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import numpy as np
import pytest

from recserve.data import load_dataset
from recserve.evaluation import evaluate
from recserve.kernels import sgd
from recserve.models import create
from recserve.models.base import KnownUserRow


def python_epoch(users, items, ratings, order, mu, bu, bi, p, q, lr, reg):
    """Surprise's SVD update, written out in plain Python floats."""
    for k in order:
        u, i, r = int(users[k]), int(items[k]), float(ratings[k])
        err = r - (mu + bu[u] + bi[i] + sum(p[u][a] * q[i][a] for a in range(len(p[u]))))
        bu[u] += lr * (err - reg * bu[u])
        bi[i] += lr * (err - reg * bi[i])
        for a in range(len(p[u])):
            pf, qf = p[u][a], q[i][a]
            p[u][a] += lr * (err * qf - reg * pf)
            q[i][a] += lr * (err * pf - reg * qf)


@pytest.mark.parametrize("factors", [5, 37, 100])
def test_one_epoch_equals_pure_python(factors):
    # 5: only the scalar tail of the vector loops; 37: one 32-float block, one
    # 8-float block and a tail; 100: three 32-float blocks and a tail.
    rng = np.random.default_rng(0)
    n = 400
    users = rng.integers(0, 30, n).astype(np.int32)
    items = rng.integers(0, 20, n).astype(np.int32)
    ratings = rng.integers(1, 6, n).astype(np.float32)
    order = rng.permutation(n).astype(np.int64)
    p = (rng.standard_normal((30, factors)) * 0.1).astype(np.float32)
    q = (rng.standard_normal((20, factors)) * 0.1).astype(np.float32)
    bu, bi = np.zeros(30, np.float32), np.zeros(20, np.float32)
    mu = float(ratings.mean())
    ref = [bu.tolist(), bi.tolist(), p.tolist(), q.tolist()]
    python_epoch(users, items, ratings, order, mu, *ref, 0.01, 0.05)
    sgd.svd_epoch(users, items, ratings, order, mu, bu, bi, p, q, 0.01, 0.05, 1)
    for got, want in zip((bu, bi, p, q), ref, strict=True):
        np.testing.assert_allclose(got, np.array(want), rtol=1e-4, atol=1e-6)


def test_hogwild_epoch_visits_every_rating_once():
    # Two blocks with no user or item in common: whatever the interleaving of
    # the two threads, each must take one contiguous half of `order`, so the
    # result and the squared-error sum equal the serial epoch's.
    rng = np.random.default_rng(1)
    n, f = 600, 24
    half = np.arange(n) < n // 2
    users = np.where(half, rng.integers(0, 15, n), rng.integers(15, 30, n)).astype(np.int32)
    items = np.where(half, rng.integers(0, 10, n), rng.integers(10, 20, n)).astype(np.int32)
    ratings = rng.integers(1, 6, n).astype(np.float32)
    order = np.r_[rng.permutation(n // 2), n // 2 + rng.permutation(n - n // 2)].astype(np.int64)
    start = [
        (rng.standard_normal((30, f)) * 0.1).astype(np.float32),
        (rng.standard_normal((20, f)) * 0.1).astype(np.float32),
    ]
    out = []
    for threads in (1, 2):
        p, q = start[0].copy(), start[1].copy()
        bu, bi = np.zeros(30, np.float32), np.zeros(20, np.float32)
        sse = sgd.svd_epoch(users, items, ratings, order, 3.0, bu, bi, p, q, 0.01, 0.05, threads)
        out.append((sse, bu, bi, p, q))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    for got, want in zip(out[1][1:], out[0][1:], strict=True):
        np.testing.assert_array_equal(got, want)


def test_predictions_are_clipped_to_the_rating_scale(small):
    model = create("svd", factors=8, epochs=3).fit(small)
    model.bu[0], model.bu[1] = 10.0, -10.0  # push two users far outside 1..5
    assert model._score_users(np.array([0])).min() > 5
    assert model._score_users(np.array([1])).max() < 1
    high, std = model.score(0, np.arange(small.n_items))
    low, _ = model.score(1, np.arange(small.n_items))
    assert std is None and np.all(high == 5.0) and np.all(low == 1.0)
    assert model.scale == (1.0, 5.0)


@pytest.mark.parametrize("algo", ["svd", "bayes_mf"])
def test_diverging_training_is_an_error_not_a_model_of_nans(small, algo):
    # Too large an lr overshoots; the model once trained to NaN and ranked
    # every item at -inf.
    with pytest.raises(ValueError, match=r"diverged in epoch \d+ .*lower lr \(now 1\)"):
        create(algo, factors=8, epochs=5, lr=1.0).fit(small)
    ok = create(algo, factors=8, epochs=5).fit(small)  # the advice works
    _, scores = ok.recommend([0, 1], k=5)
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("algo", ["svd", "bayes_mf"])
@pytest.mark.parametrize("times", [1e-6, 0.2, 20.0, 1e6])
def test_ratings_on_any_scale_fit_the_same_model_on_that_scale(small, algo, times):
    # SGD fits the ratings in units of their spread, so ratings times c give the
    # model of the ratings, times c: every prediction, fold-in and interval, the
    # same rankings. Fitted on the raw values, 0-100 ratings lost 14% of rmse
    # to 1-5 stars and 1,000-5,000 diverged.
    base = create(algo, factors=8, epochs=5).fit(small)
    scaled_data = copy.deepcopy(small)
    scaled_data.interactions.data = (small.interactions.data * times).astype(np.float32)
    scaled = create(algo, factors=8, epochs=5).fit(scaled_data)
    assert scaled.scale == pytest.approx((base.scale[0] * times, base.scale[1] * times))
    users = np.array([0, 7, 123, 999])
    np.testing.assert_allclose(
        scaled._score_users(users), base._score_users(users) * times, rtol=2e-4, atol=1e-5 * times
    )
    items, scores = base.recommend(users, k=10)
    got_items, got_scores = scaled.recommend(users, k=10)
    np.testing.assert_array_equal(got_items, items)
    np.testing.assert_allclose(got_scores, scores * times, rtol=2e-4)
    hist = small.interactions[[5, 40]]
    hist_scaled = scaled_data.interactions[[5, 40]]
    np.testing.assert_allclose(
        scaled._score_history(hist_scaled),
        base._score_history(hist) * times,
        rtol=2e-4,
        atol=1e-5 * times,
    )
    want, want_std = base.score(3, np.arange(20))
    got, got_std = scaled.score(3, np.arange(20))
    np.testing.assert_allclose(got, want * times, rtol=2e-4)
    if algo == "bayes_mf":
        np.testing.assert_allclose(got_std, want_std * times, rtol=2e-4)
        assert scaled.sigma == pytest.approx(base.sigma * times, rel=2e-4)


def test_the_rating_unit_is_the_spread_robust_to_outliers_and_sampled_on_large_data():
    from recserve.models.factorization import STAR_SPREAD, UNIT_SAMPLE, rating_unit

    rng = np.random.default_rng(4)
    stars = rng.integers(1, 6, 10_000).astype(np.float32)
    assert rating_unit(stars) == pytest.approx(stars.std() / STAR_SPREAD, rel=1e-6)
    corrupt = stars.copy()
    corrupt[17] = 1e30  # one corrupt value does not set the unit alone
    assert rating_unit(corrupt) == pytest.approx(rating_unit(stars), rel=0.01)
    assert rating_unit(np.full(50, 4.0, np.float32)) == 1.0  # no spread: as they are
    assert rating_unit(np.array([3.0], np.float32)) == 1.0
    big = rng.integers(1, 6, 3 * UNIT_SAMPLE + 7).astype(np.float32)
    assert rating_unit(big) == pytest.approx(big.std() / STAR_SPREAD, rel=0.005)


def test_fold_in_is_the_ridge_solution(small):
    model = create("svd", factors=8, epochs=5).fit(small)
    row = small.interactions[4]
    p, b = model.fold_in(row)
    w = _ridge(model, row.indices, row.data)
    np.testing.assert_allclose(np.r_[b[0], p[0]], w, rtol=1e-4, atol=1e-6)


def _ridge(model, items, ratings):
    """The fold-in's minimiser by least squares on the stacked system (no normal
    equations, no dual): the independent reference for both solve paths."""
    z = np.hstack([np.ones((items.size, 1)), model.Q[items].astype(np.float64)])
    t = ratings - model.mu - model.bi[items]
    f1 = z.shape[1]
    lam = np.sqrt(model.params["reg"] * items.size)
    w, *_ = np.linalg.lstsq(
        np.vstack([z, lam * np.eye(f1)]), np.concatenate([t, np.zeros(f1)]), rcond=None
    )
    return w


@pytest.mark.parametrize("factors", [8, 40])
def test_fold_in_of_short_and_long_histories_is_the_ridge_solution(small, factors):
    # Histories shorter than the factor count take the n x n dual system, longer
    # ones the primal; both must give the ridge solution, row by row in a batch.
    model = create("svd", factors=factors, epochs=3).fit(small)
    rng = np.random.default_rng(factors)
    hists = []
    for n in (1, 2, factors - 1, factors, factors + 1, factors + 7):
        items = rng.choice(small.n_items, n, replace=False)
        hists.append((items, rng.integers(1, 6, n).astype(np.float32)))
    rows = model.history_matrix([h[0] for h in hists], [h[1] for h in hists])
    p, b = model.fold_in(rows)
    for r, (items, ratings) in enumerate(hists):
        order = np.argsort(items)
        want = _ridge(model, items[order], ratings[order])
        np.testing.assert_allclose(np.r_[b[r], p[r]], want, rtol=1e-4, atol=1e-5)
        one_p, one_b = model.fold_in(rows[r])
        np.testing.assert_array_equal(one_p[0], p[r])
        assert one_b[0] == b[r]


@pytest.mark.parametrize("factors", [8, 20, 100])
def test_ridge_kernel_solves_both_systems_and_checks_its_inputs(factors):
    # sgd.ridge_user is the serving fold-in of svd and bayes_mf: the dual n x n
    # system below f + 1 ratings, the primal from there on, against lstsq.
    # The primal gathers 512 rows per BLAS update: 1,100 ratings take three.
    rng = np.random.default_rng(factors)
    q = (rng.standard_normal((1500, factors)) * 0.3).astype(np.float32)
    bi = (rng.standard_normal(1500) * 0.2).astype(np.float32)
    model = SimpleNamespace(Q=q, bi=bi, mu=3.4, params={})
    for n in (0, 1, 3, factors, factors + 1, factors + 25, 512, 1100):
        for reg in (0.02, 0.7):
            items = rng.choice(1500, n, replace=False).astype(np.int32)
            ratings = rng.integers(1, 6, n).astype(np.float64)
            model.params["reg"] = reg
            want = _ridge(model, items, ratings) if n else np.zeros(factors + 1)
            got = sgd.ridge_user(q, bi, 3.4, items, ratings, reg)
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
    ok_items, ok_r = np.array([1, 2], np.int32), np.ones(2)
    with pytest.raises(ValueError, match=r"items: 1500 outside \[0, 1500\)"):
        sgd.ridge_user(q, bi, 0.0, np.array([1, 1500], np.int32), ok_r, 0.1)
    with pytest.raises(ValueError, match="ratings: length 3, expected 2"):
        sgd.ridge_user(q, bi, 0.0, ok_items, np.ones(3), 0.1)
    with pytest.raises(ValueError, match="bias: length 1499"):
        sgd.ridge_user(q, bi[:1499].copy(), 0.0, ok_items, ok_r, 0.1)
    with pytest.raises(ValueError, match="reg: must be >= 0"):
        sgd.ridge_user(q, bi, 0.0, ok_items, ok_r, -1.0)
    with pytest.raises(ValueError, match="not positive definite"):
        sgd.ridge_user(q, bi, 0.0, ok_items, ok_r, 0.0)  # 2 ratings, f + 1 unknowns


@pytest.mark.parametrize("factors", [8, 30])
def test_ridge_kernel_adds_an_extra_right_hand_side_on_both_systems(factors):
    # (Z^T Z + s I) w = Z^T t + e, the known-user update's system: the primal
    # adds e, the dual solves it through Woodbury. Against numpy's solve; and
    # ridge_pull, the e a known user's update puts there, against numpy.
    rng = np.random.default_rng(40 + factors)
    q = (rng.standard_normal((1200, factors)) * 0.3).astype(np.float32)
    bi = (rng.standard_normal(1200) * 0.2).astype(np.float32)
    for n in (0, 1, 5, factors, factors + 1, factors + 20, 1030):  # dual below f + 1
        items = rng.choice(1200, n, replace=False).astype(np.int32)
        ratings = rng.integers(1, 6, n).astype(np.float64)
        e = rng.standard_normal(factors + 1)
        z = np.hstack([np.ones((n, 1)), q[items].astype(np.float64)])
        a = z.T @ z + 0.05 * max(n, 1) * np.eye(factors + 1)
        want = np.linalg.solve(a, z.T @ (ratings - 3.1 - bi[items]) + e)
        got = sgd.ridge_user(q, bi, 3.1, items, ratings, 0.05, e)
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
        # ridge_pull: (Z^T Z + s I) w - Z^T t at w, what a known user's update adds.
        want = a @ e - z.T @ (ratings - 3.1 - bi[items])
        np.testing.assert_allclose(
            sgd.ridge_pull(q, bi, 3.1, items, ratings, e, 0.05), want, rtol=1e-9, atol=1e-9
        )
    with pytest.raises(ValueError, match=f"w: length 3, expected {factors + 1}"):
        sgd.ridge_pull(q, bi, 3.1, items, ratings, np.zeros(3), 0.05)
    with pytest.raises(ValueError, match=r"items: 1200 outside \[0, 1200\)"):
        sgd.ridge_pull(q, bi, 3.1, np.array([1200], np.int32), np.ones(1), e, 0.05)
    with pytest.raises(ValueError, match=f"extra: length 3, expected {factors + 1}"):
        sgd.ridge_user(q, bi, 3.1, items, ratings, 0.05, np.zeros(3))
    with pytest.raises(TypeError, match="extra: expected dtype float64"):
        sgd.ridge_user(q, bi, 3.1, items, ratings, 0.05, np.zeros(factors + 1, np.float32))


def _objective(model, items, ratings, w):
    """The ridge objective of one user's ratings at w = [b_u, p_u], as a sum of
    squares (the fold-in's, written out)."""
    pred = model.mu + model.bi[items] + w[0] + model.Q[items].astype(np.float64) @ w[1:]
    return ((np.clip(ratings, *model.scale) - pred) ** 2).sum() + model.params["reg"] * max(
        items.size, 1
    ) * (w @ w)


def _updated_objective(model, wu, a_t, row, own, w):
    """(w - w_u)^T A_t (w - w_u) + J(row, w) - J(training row, w)."""
    d = w - wu
    return d @ a_t @ d + _objective(model, *row, w) - _objective(model, *own, w)


def _gradient(f, w, h=1e-3):
    """Central differences (exact up to rounding on a quadratic)."""
    return np.array([(f(w + e) - f(w - e)) / (2 * h) for e in h * np.eye(w.size)])


@pytest.mark.parametrize("algo", ["svd", "bayes_mf"])
def test_a_known_users_events_update_their_trained_parameters(small, algo):
    # A known user's row with newer events (KnownUserRow): their trained w_u is
    # the prior mean, the training row's ridge precision A_t its weight, and
    # the newer events the evidence. The answer minimises
    #   (w - w_u)^T A_t (w - w_u) + J(row, w) - J(training row, w),
    # written out below as sums of squares and checked by its gradient (finite
    # differences of a quadratic). It keeps w_u on an unchanged row, and it is
    # the plain fold-in of the row where w_u is its training row's fold-in.
    model = create(algo, factors=8, epochs=5).fit(small)
    rng = np.random.default_rng(5)
    for u in (2, 40, 333):
        own, own_r = model.training_row(u)
        new = rng.choice(np.setdiff1d(np.arange(small.n_items), own), 3, replace=False)
        items = np.concatenate([own, new])
        ratings = np.concatenate([own_r, [5.0, 1.0, 4.0]]).astype(np.float32)
        ratings[0] = 1.0 if own_r[0] > 3 else 5.0  # and one rating changed
        order = np.argsort(items)
        items, ratings = items[order], ratings[order]
        row = KnownUserRow.of(model.history_matrix([items], [ratings]), u)
        p, b = model.fold_in(row)
        w = np.r_[b[0], p[0]].astype(np.float64)
        wu = np.r_[model.bu[u], model.P[u]].astype(np.float64)
        z_t = np.hstack([np.ones((own.size, 1)), model.Q[own].astype(np.float64)])
        a_t = z_t.T @ z_t + model.params["reg"] * own.size * np.eye(wu.size)
        f = functools.partial(_updated_objective, model, wu, a_t, (items, ratings), (own, own_r))
        grad = _gradient(f, w)
        assert np.abs(grad).max() < 1e-4 * np.abs(_gradient(f, wu)).max(), (u, grad)
        # The same user through score_history (Predict) and the dense row.
        mean, _ = model.score_history(row, new)
        pred = model.mu + model.bi[new] + w[0] + model.Q[new] @ w[1:]
        np.testing.assert_allclose(mean, np.clip(pred, *model.scale), rtol=1e-5)
        # Unchanged: w_u itself.
        same = KnownUserRow.of(model.history_matrix([own], [own_r]), u)
        p0, b0 = model.fold_in(same)
        np.testing.assert_allclose(np.r_[b0[0], p0[0]], wu, rtol=1e-5, atol=1e-6)
        # w_u at its training row's ridge solution: the new row's ridge solution.
        exact = copy.deepcopy(model)
        exact.P, exact.bu = exact.P.copy(), exact.bu.copy()
        w_t = _ridge(exact, own, own_r.astype(np.float64))
        exact.bu[u], exact.P[u] = w_t[0], w_t[1:]
        p1, b1 = exact.fold_in(row)
        want = _ridge(exact, items, np.clip(ratings, *exact.scale).astype(np.float64))
        np.testing.assert_allclose(np.r_[b1[0], p1[0]], want, rtol=1e-4, atol=1e-5)


def test_hogwild_trains_as_well(small):
    serial = evaluate(create("svd", factors=16, epochs=8), small, "random", (10,))
    model = create("svd", factors=16, epochs=8, hogwild=True)
    model.n_threads = 2
    parallel = evaluate(model, small, "random", (10,))
    assert abs(serial["metrics"]["rmse"] - parallel["metrics"]["rmse"]) < 0.03


def test_ml100k_rmse(ml100k_path):
    result = evaluate(create("svd"), load_dataset(ml100k_path), "random", (10,))
    # Surprise's SVD reaches ~0.94 on an 80/20 split; the global mean gives ~1.13.
    assert result["metrics"]["rmse"] < 0.96


def test_svd_epoch_rejects_bad_input():
    z32, f = np.zeros(3, np.float32), np.zeros((2, 2), np.float32)
    ids = np.zeros(3, np.int32)
    with pytest.raises(TypeError, match="ratings: expected dtype float32"):
        sgd.svd_epoch(
            ids,
            ids,
            z32.astype(np.float64),
            np.arange(3),
            0.0,
            np.zeros(2, np.float32),
            np.zeros(2, np.float32),
            f,
            f.copy(),
            0.1,
            0.1,
        )
    with pytest.raises(ValueError, match=r"users: ids must lie in \[0, 2\)"):
        sgd.svd_epoch(
            np.array([0, 5, 1], np.int32),
            ids,
            z32,
            np.arange(3),
            0.0,
            np.zeros(2, np.float32),
            np.zeros(2, np.float32),
            f,
            f.copy(),
            0.1,
            0.1,
        )
    with pytest.raises(ValueError, match="lr must be > 0"):
        sgd.svd_epoch(
            ids,
            ids,
            z32,
            np.arange(3),
            0.0,
            np.zeros(2, np.float32),
            np.zeros(2, np.float32),
            f,
            f.copy(),
            0.0,
            0.1,
        )


@pytest.mark.parametrize("algo", ["svd", "bayes_mf"])
def test_history_ratings_beyond_the_scale_count_as_its_ends(small, algo):
    # A 50 (or 1e30) sent on a 1-5 scale folded into a user vector that long:
    # bayes_mf's predictions overflowed to inf. Such a rating is the top (or
    # bottom) of the training scale.
    model = create(algo, factors=8, epochs=3).fit(small)
    low, high = model.scale
    items = np.array([3, 40, 77])
    for sent, meant in (([50.0, 1e30, 3e38], [high] * 3), ([-1e30, 1e30, 3.0], [low, high, 3.0])):
        got_i, got_s = model.recommend_from_history(items, sent, k=10)
        want_i, want_s = model.recommend_from_history(items, meant, k=10)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_s, want_s)
        assert np.isfinite(got_s).all()
        row = model.history_matrix([items], [sent])
        rated, _ = model.score_history(row, np.array([5, 6]))
        assert np.isfinite(rated).all() and (low <= rated).all() and (rated <= high).all()


@pytest.mark.parametrize("algo", ["svd", "bayes_mf"])
def test_explanations_are_each_ratings_share_of_the_folded_in_score(small, algo):
    # Item j's score given a history is linear in the ratings (A depends on
    # the items only), and history item i's contribution is its rating's
    # residual t_i = r_i - mu - b_i times d score_j / d r_i. Against finite
    # differences of the serving fold-in (model.fold_in): each contribution,
    # and that together they are the score past mu + b_j. 6 ratings (the dual
    # system) and 40 (the primal, past f + 1 = 17).
    model = create(algo, factors=16, epochs=5).fit(small)
    lo, hi = model.scale
    rng = np.random.default_rng(31)
    items = np.array([0, 7, 50, 120, 299])

    def scores(hist, vals):
        p, b = model.fold_in(model.history_matrix([hist], [vals]))
        return model.mu + model.bi[items] + b[0] + model.Q[items] @ p[0]

    for n in (6, 40):
        hist = np.sort(rng.choice(np.arange(1, 299), n, replace=False))
        vals = rng.uniform(lo + 0.5, hi - 0.5, n)
        row = model.history_matrix([hist], [vals])
        got_hist, c = model._contributions_many(row, items, None)
        assert got_hist.tolist() == hist.tolist() and c.shape == (n, items.size)
        base = scores(hist, vals)
        t = vals - model.mu - model.bi[hist]
        for i in range(0, n, 5):
            moved = vals.copy()
            moved[i] += 0.25
            slope = (scores(hist, moved) - base) / 0.25
            np.testing.assert_allclose(c[i], t[i] * slope, rtol=2e-3, atol=2e-5)
        np.testing.assert_allclose(
            c.sum(0), base - model.mu - model.bi[items], rtol=1e-4, atol=1e-5
        )
        # what a Recommend with explain returns: the largest positive shares
        for j, (idx, val) in enumerate(model.explain_items(row, items, 3)):
            want = sorted((-v, int(h)) for h, v in zip(hist, c[:, j], strict=True) if v > 0)
            assert idx.tolist() == [h for _, h in want[:3]]
            np.testing.assert_allclose(val, [-v for v, _ in want[:3]], rtol=1e-5)


@pytest.mark.parametrize("algo", ["svd", "bayes_mf"])
def test_dense_predictions_are_mu_plus_biases_plus_the_product(small, algo):
    # _predict (every dense row: batches, evaluation, fold-ins) adds the product
    # in place to save a users x items temporary; its sums are still the
    # definition's, mu + b_u + b_i + p . q in the inputs' precision rounded
    # once to float32, bit for bit, for float32 rows (known users) and float64
    # ones (a fold-in's solve).
    m = create(algo, factors=8, epochs=3).fit(small)
    users = np.arange(0, small.n_users, 11)
    for dtype in (np.float32, np.float64):
        p, bu = m.P[users].astype(dtype), m.bu[users].astype(dtype)
        want = np.asarray(m.mu + bu[:, None] + m.bi[None, :] + p @ m.Q.T, np.float32)
        got = m._predict(p, bu)
        assert got.dtype == np.float32 and got.shape == (users.size, small.n_items)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(m._score_users(users), m._predict(m.P[users], m.bu[users]))
