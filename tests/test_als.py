"""Implicit ALS against numpy least squares, and its fold-in and explain guarantees."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.evaluation import evaluate
from recserve.kernels import als as alsk
from recserve.models import create, load_named
from tests.service_helpers import assert_explanation


def weighted_lstsq(
    conf_row: sp.csr_matrix, y: np.ndarray, reg: float, per_positive: bool = False
) -> np.ndarray:
    """argmin_x sum_i c_i (p_i - y_i.x)^2 + reg |x|^2 over every item i (numpy,
    float64); a stored value s is c = |s| and p = 1 if s > 0 else 0 (a dislike).
    per_positive: ALS-WR, reg times the row's positive values (at least 1)."""
    if per_positive:
        reg *= max(int((conf_row.data > 0).sum()), 1)
    n, f = y.shape
    c, p = np.ones(n), np.zeros(n)
    c[conf_row.indices] = np.abs(conf_row.data)
    p[conf_row.indices] = conf_row.data > 0
    if conf_row.nnz == 0:
        return np.zeros(f)
    yd = y.astype(np.float64)
    w = np.sqrt(c)[:, None]
    x, *_ = np.linalg.lstsq(
        np.vstack([w * yd, np.sqrt(reg) * np.eye(f)]),
        np.concatenate([np.sqrt(c) * p, np.zeros(f)]),
        rcond=None,
    )
    return x


def signed(conf: sp.csr_matrix, share: float, seed: int) -> sp.csr_matrix:
    """Some of the confidences as dislikes (negative: preference 0)."""
    out = conf.copy()
    out.data[np.random.default_rng(seed).random(out.nnz) < share] *= -1.0
    return out


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dislikes", [0.0, 0.3])
@pytest.mark.parametrize("threads", [1, 2])
def test_exact_sweep_equals_numpy_least_squares(threads, dislikes, weighted):
    # weighted: ALS-WR (Spark's penalty), reg times each row's positive values.
    rng = np.random.default_rng(0)
    conf = sp.random(60, 40, density=0.15, random_state=2, format="csr", dtype=np.float32)
    conf.data = 1.0 + 5.0 * conf.data
    conf = signed(conf, dislikes, 9)
    if dislikes:  # a row of dislikes only: no positive event, the penalty counts once
        conf.data[conf.indptr[0] : conf.indptr[1]] = -np.abs(conf.data[: conf.indptr[1]])
        assert conf[0].nnz and (conf[0].data < 0).all()
    y = (rng.standard_normal((40, 12)) * 0.5).astype(np.float32)
    x = np.full((60, 12), 7.0, np.float32)  # overwritten, even rows without events
    alsk.solve_rows(
        conf.indptr, conf.indices, conf.data, y, x, 0.3, n_threads=threads, weighted=weighted
    )
    for u in range(60):
        want = weighted_lstsq(conf[u], y, 0.3, weighted)
        np.testing.assert_allclose(x[u], want, rtol=1e-4, atol=1e-6)
        if conf[u].nnz:  # the serving one-row solve too
            one = np.empty(12, np.float32)
            g = (y.T @ y + 0.3 * np.eye(12, dtype=np.float32)).astype(np.float32)
            alsk.solve_row(conf[u].indices, conf[u].data, y, g, one, 0.3 if weighted else 0.0)
            np.testing.assert_allclose(one, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dislikes", [0.0, 0.3])
def test_cg_converges_to_cholesky(dislikes, weighted):
    rng = np.random.default_rng(1)
    conf = sp.random(80, 50, density=0.1, random_state=3, format="csr", dtype=np.float32)
    conf.data = 1.0 + 10.0 * conf.data
    conf = signed(conf, dislikes, 4)
    y = (rng.standard_normal((50, 16)) * 0.3).astype(np.float32)
    args = (conf.indptr, conf.indices, conf.data, y)
    exact = np.zeros((80, 16), np.float32)
    alsk.solve_rows(*args, exact, 0.05, weighted=weighted)
    cg = np.zeros((80, 16), np.float32)
    errors = []
    for _ in range(30):  # warm-started 3-step rounds, as training runs them
        alsk.solve_rows(*args, cg, 0.05, cg_steps=3, weighted=weighted)
        errors.append(float(np.abs(cg - exact).max()))
    assert errors[-1] < 1e-5 and errors[-1] < errors[0] / 1e4
    full = np.zeros((80, 16), np.float32)  # f steps: CG is exact in exact arithmetic
    alsk.solve_rows(*args, full, 0.05, cg_steps=16, weighted=weighted)
    np.testing.assert_allclose(full, exact, atol=1e-4)
    if weighted:  # and not the unweighted solution
        plain = np.zeros((80, 16), np.float32)
        alsk.solve_rows(*args, plain, 0.05)
        assert np.abs(plain - exact).max() > 1e-3


def counts(ds, seed: int = 0):
    """The dataset's events as heavy-tailed counts (play counts: log-normal)."""
    out = copy.deepcopy(ds)
    rng = np.random.default_rng(seed)
    out.interactions.data = np.round(np.exp(rng.normal(1.5, 1.5, out.nnz))).astype(np.float32) + 1
    return out


@pytest.mark.parametrize(("heavy", "weighted"), [(False, False), (True, False), (False, True)])
def test_fold_in_equals_the_trained_user(small, heavy, weighted):
    if heavy:
        small = counts(small)
    model = create("als", factors=24, iterations=6, weighted_reg=weighted).fit(small)
    assert (model.value_median > 0) == heavy
    for u in (0, 5, 321):
        folded = model.fold_in(small.interactions[u])
        np.testing.assert_allclose(folded[0], model.user_factors[u], rtol=1e-5, atol=1e-6)
        items = small.interactions[u].indices
        a, _ = model.recommend([u], 10)
        b, _ = model.recommend_from_history(items, small.interactions[u].data, k=10)
        np.testing.assert_array_equal(a[0], b)


@pytest.mark.parametrize(
    ("dislikes", "heavy", "weighted"),
    [(False, False, False), (True, False, False), (True, True, False), (True, False, True)],
)
def test_explain_is_the_decomposition_of_the_score(small, dislikes, heavy, weighted):
    """ALS folds a user in as x = A^-1 sum_i p_i c_i y_i with A = Y'Y + reg I +
    sum_i (c_i - 1) y_i y_i' (c = 1 + alpha |r| / s, s the training data's mean
    |value|; p = 0 for a dislike, a negative r): the score y_j . x splits into
    p_i c_i y_j' A^-1 y_i per history item. Computed here from the factors alone;
    explain returns exactly the positive terms, and all of them add up to the
    score (the trained user vector is that fold-in up to ALS's convergence).
    Heavy-tailed values: |r| is log1p(|r| / median) over its mean instead.
    weighted (ALS-WR): reg I counts once per positive event of the row."""
    data = counts(small) if heavy else small
    if dislikes:  # every third event a dislike (value -1, or minus the count)
        data = copy.deepcopy(data)
        data.interactions.data[::3] = -1.0 if not heavy else -data.interactions.data[::3]
    model = create("als", factors=16, iterations=5, weighted_reg=weighted).fit(data)
    p = model.params
    y = np.asarray(model.item_factors, np.float64)
    u = 42
    row = data.interactions[u]
    every = np.abs(data.interactions.data.astype(np.float64))
    if heavy:
        median = np.median(every)
        r = np.log1p(np.abs(row.data) / median) / np.log1p(every / median).mean()
    else:
        r = np.abs(row.data.astype(np.float64)) / every.mean()
    c = 1.0 + p["alpha"] * r
    pref = (row.data > 0).astype(np.float64)
    assert pref.min() == (0.0 if dislikes else 1.0)
    yi = y[row.indices]
    reg = p["regularization"] * (max(int(pref.sum()), 1) if weighted else 1)
    a = y.T @ y + reg * np.eye(y.shape[1]) + (yi.T * (c - 1.0)) @ yi
    items, scores = model.recommend([u], 3)
    for item, score in zip(items[0], scores[0], strict=True):
        terms = pref * c * (yi @ np.linalg.solve(a, y[int(item)]))
        assert terms.sum() == pytest.approx(score, rel=1e-3)
        assert_explanation(model, u, int(item), row.indices, terms, rtol=1e-3)


def test_alpha_is_unit_free(small, tmp_path):
    # The same interactions in other units (ratings x 100, as play counts or
    # watch seconds would be) train the same model: alpha applies to the value
    # over the training data's mean |value|, kept in the bundle for fold-in.
    scaled = copy.deepcopy(small)
    scaled.interactions.data = scaled.interactions.data * 100.0
    a = create("als", factors=16, iterations=4).fit(small)
    b = create("als", factors=16, iterations=4).fit(scaled)
    assert b.value_scale == pytest.approx(100.0 * a.value_scale, rel=1e-6)
    np.testing.assert_allclose(b.user_factors, a.user_factors, rtol=1e-3, atol=1e-4)
    items, values = small.interactions[7].indices, small.interactions[7].data
    want, _ = a.recommend_from_history(items, values, k=10)
    b.save(tmp_path, "b")
    loaded = load_named(tmp_path, "b")
    assert loaded.value_scale == b.value_scale
    got, _ = loaded.recommend_from_history(items, values * 100.0, k=10)
    np.testing.assert_array_equal(got, want)
    # A bundle written before the unit was kept is Hu et al.'s raw form.
    old = create("als")
    arrays = {k: v for k, v in b._arrays().items() if k != "value_scale"}
    old._restore(arrays)
    assert old.value_scale == 1.0


def test_heavy_tailed_values_weigh_on_a_log_scale(small, tmp_path):
    # Counts whose 99th percentile is many times their median: on the linear
    # scale a few huge counts set the unit and most events sit at confidence ~1.
    # "auto" weighs them by log1p(count / median) instead, which no unit changes;
    # ratings stay linear.
    heavy = counts(small)
    v = np.abs(heavy.interactions.data.astype(np.float64))
    assert np.quantile(v, 0.99) / np.median(v) > 4
    a = create("als", factors=16, iterations=4).fit(heavy)
    median = np.median(v)
    assert a.value_median == pytest.approx(median)
    assert a.value_scale == pytest.approx(np.log1p(v / median).mean(), rel=1e-6)
    row = heavy.interactions[3]
    want = 1 + a.params["alpha"] * np.log1p(row.data / median) / a.value_scale
    np.testing.assert_allclose(a._confidence_values(row.data), want, rtol=1e-5)
    scaled = copy.deepcopy(heavy)
    scaled.interactions.data = scaled.interactions.data * 1000.0
    b = create("als", factors=16, iterations=4).fit(scaled)
    np.testing.assert_allclose(b.user_factors, a.user_factors, rtol=1e-3, atol=1e-4)
    # The bundle keeps the scale: a history in the bundle's units folds in alike.
    b.save(tmp_path, "b")
    loaded = load_named(tmp_path, "b")
    assert loaded.value_median == b.value_median and loaded.value_scale == b.value_scale
    want_items, _ = a.recommend_from_history(row.indices, row.data, k=10)
    got, _ = loaded.recommend_from_history(row.indices, row.data * 1000.0, k=10)
    np.testing.assert_array_equal(got, want_items)
    # Ratings stay linear under auto; the param forces either scale; binary wins.
    assert create("als", factors=8, iterations=2).fit(small).value_median == 0
    assert create("als", factors=8, iterations=2, values="log").fit(small).value_median > 0
    assert create("als", factors=8, iterations=2, values="linear").fit(heavy).value_median == 0
    assert create("als", factors=8, iterations=2, binary=True).fit(heavy).value_median == 0
    with pytest.raises(ValueError, match="param values: expected one of auto, linear, log"):
        create("als", values="sqrt")
    # A bundle written before the log scale existed is linear.
    old = create("als")
    old._restore({k: v for k, v in b._arrays().items() if k != "value_median"})
    assert old.value_median == 0 and old.value_scale == b.value_scale


def test_als_beats_popularity_on_collaborative_data(small):
    pop = evaluate(create("popularity"), small, "random", (20,))["metrics"]["recall@20"]
    als = evaluate(create("als", factors=32, iterations=10, alpha=5.0), small, "random", (20,))[
        "metrics"
    ]["recall@20"]
    assert als > 1.2 * pop, (als, pop)


def test_dislikes_are_learned_as_dislikes(small):
    # Negative values (thumbs down) are preference 0 at confidence 1 + alpha |r|.
    # They used to enter as confidences below zero: the row systems lost
    # definiteness, Cholesky failed, the factors stayed zero, and recall was 0.
    # Now the dislikes add information: held-out likes are found at least as
    # well as by a model that never saw the dislikes, and disliked items rank
    # below liked ones for their users.
    from recserve.evaluation import make_split

    mixed = copy.deepcopy(small)
    rng = np.random.default_rng(5)
    hate = rng.random(mixed.nnz) < 0.3
    mixed.interactions.data = np.where(hate, -1.0, 1.0).astype(np.float32)
    split = make_split(mixed, "random", 0.2, 0, 1)
    m = split.train.interactions
    keep = m.data > 0
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    likes = sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)
    likes_only = type(split)(
        split.train.with_interactions(likes, split.train.timestamps[keep]), split.test
    )
    params = {"factors": 16, "iterations": 8}
    both = evaluate(create("als", **params), mixed, ks=(20,), split=split, threshold=1)
    pos = evaluate(create("als", **params), mixed, ks=(20,), split=likes_only, threshold=1)
    assert both["metrics"]["recall@20"] > 0.9 * pos["metrics"]["recall@20"] > 0
    model = create("als", **params).fit(split.train)
    scores = np.asarray(model.user_factors @ model.item_factors.T)
    liked = scores[rows[keep], m.indices[keep]].mean()
    disliked = scores[rows[~keep], m.indices[~keep]].mean()
    assert liked > 0.5 > disliked, (liked, disliked)


def test_solve_rows_rejects_bad_input():
    y = np.zeros((5, 3), np.float32)
    x = np.zeros((2, 3), np.float32)
    ip, ix, c = np.array([0, 1, 1]), np.array([4]), np.array([2.0])
    with pytest.raises(TypeError, match="Y: expected dtype float32"):
        alsk.solve_rows(ip, ix, c, y.astype(np.float64), x, 0.1)
    with pytest.raises(ValueError, match="X: has 4 factors"):
        alsk.solve_rows(ip, ix, c, y, np.zeros((2, 4), np.float32), 0.1)
    with pytest.raises(ValueError, match=r"item ids must lie in \[0, 5\)"):
        alsk.solve_rows(ip, np.array([9]), c, y, x, 0.1)
    with pytest.raises(ValueError, match="regularization"):
        alsk.solve_rows(ip, ix, c, y, x, -1.0)
    ro = np.zeros((2, 3), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        alsk.solve_rows(ip, ix, c, y, ro, 0.1)


@pytest.mark.parametrize("weighted", [False, True])
def test_one_row_solve_is_the_batch_solve(small, weighted):
    """A serving fold-in (one history) takes solve_row: the same factors,
    bit for bit, as the batch solve gives that history among others, for
    rated, negative (confidence < 1), repeated-free and empty histories."""
    model = create("als", factors=16, iterations=3, binary=False, weighted_reg=weighted)
    model.fit(small)
    rng = np.random.default_rng(2)
    rows = []
    for size in (0, 1, 10, 70, 150):  # past one CHUNK of 64 items too
        items = rng.choice(small.n_items, size, replace=False)
        values = rng.integers(-3, 6, size).astype(float)  # c = 1 + alpha r < 1 for r < 0
        rows.append(model.history_matrix([items], [values]))
    batch = model.fold_in(sp.vstack([*rows, rows[2]]).tocsr())
    for i, row in enumerate(rows):
        one = model.fold_in(row)
        assert one.shape == (1, 16) and one.dtype == np.float32
        np.testing.assert_array_equal(one[0], batch[i])
    assert not model.fold_in(rows[0]).any()  # an empty history: zero factors


@pytest.mark.parametrize("weighted", [0.0, 0.2])
def test_contributions_kernel_is_numpys_decomposition(weighted):
    # What explanations rank: p_i c_i y_j . A^-1 y_i for each history item i and
    # asked item j, A = G + sum (c_i - 1) y_i y_i^T (+ ALS-WR's penalty), against
    # numpy's solve; dislikes (s < 0) weigh in A and give nothing.
    rng = np.random.default_rng(12)
    y = (rng.standard_normal((90, 10)) * 0.4).astype(np.float32)
    g = y.T.astype(np.float64) @ y.astype(np.float64) + 0.2 * np.eye(10)
    for n in (1, 6, 70):
        idx = np.sort(rng.choice(90, n, replace=False)).astype(np.int32)
        s = (1.0 + 3.0 * rng.random(n)).astype(np.float32)
        s[rng.random(n) < 0.3] *= -1.0
        items = rng.choice(90, 7, replace=False).astype(np.int64)
        yi = y[idx].astype(np.float64)
        c = np.abs(s.astype(np.float64))
        a = g + (yi.T * (c - 1.0)) @ yi + weighted * (max(int((s > 0).sum()), 1) - 1) * np.eye(10)
        z = np.linalg.solve(a, y[items].T.astype(np.float64))
        want = np.where(s > 0, c, 0.0)[:, None] * (yi @ z)
        got = alsk.contributions(idx, s, y, g, items, weighted)
        assert got.shape == (n, 7) and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    empty = alsk.contributions(np.zeros(0, np.int32), np.zeros(0, np.float32), y, g, items)
    assert empty.shape == (0, 7)
    with pytest.raises(ValueError, match=r"items: ids must lie in \[0, 90\)"):
        alsk.contributions(idx, s, y, g, np.array([90]))
    with pytest.raises(ValueError, match="G: expected shape"):
        alsk.contributions(idx, s, y, np.eye(9), items)
    with pytest.raises(ValueError, match="one value per nonzero"):
        alsk.contributions(idx, s[:-1].copy(), y, g, items)


def test_solve_row_rejects_bad_input():
    y = np.zeros((5, 3), np.float32)
    g = np.eye(3, dtype=np.float32)
    ix, c, out = np.array([4], np.int32), np.array([2.0], np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"item ids must lie in \[0, 5\)"):
        alsk.solve_row(np.array([5], np.int32), c, y, g, out)
    with pytest.raises(ValueError, match="G: expected shape"):
        alsk.solve_row(ix, c, y, np.eye(4, dtype=np.float32), out)
    with pytest.raises(ValueError, match="out: expected 3"):
        alsk.solve_row(ix, c, y, g, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="one value per nonzero"):
        alsk.solve_row(ix, np.ones(2, np.float32), y, g, out)
    with pytest.raises(TypeError, match="G: expected dtype float32"):
        alsk.solve_row(ix, c, y, g.astype(np.float64), out)


def test_absurd_values_count_as_at_most_ten_thousand_units(small):
    # A value 10^9 times the unit made a confidence whose float32 solve failed:
    # the user came out as zeros and got items in index order. And one corrupt
    # 1e30 in the training file set the unit to ~1e26, so every other value
    # weighed nothing. Now a value counts as at most 10^4 units, and the unit
    # counts values above the 99.9th percentile at it.
    model = create("als", factors=16, iterations=4).fit(small)
    items = np.array([2, 30, 61])
    cap = 1e4 * model.value_scale
    want, _ = model.recommend_from_history(items, [cap, cap, 1.0], k=10)
    for huge in (1e9, 1e30, 3e38):
        got, scores = model.recommend_from_history(items, [huge, huge, 1.0], k=10)
        np.testing.assert_array_equal(got, want)
        assert np.isfinite(scores).all() and scores[0] > 0
    corrupt = copy.deepcopy(small)
    corrupt.interactions.data[7] = 1e30
    fitted = create("als", factors=16, iterations=4).fit(corrupt)
    assert fitted.value_scale == pytest.approx(model.value_scale, rel=0.01)
    ordinary = np.array([1.0, 3.0, 5.0], np.float32)
    np.testing.assert_allclose(
        fitted._confidence_values(ordinary), model._confidence_values(ordinary), rtol=0.01
    )
    assert np.isfinite(fitted.user_factors).all() and fitted.user_factors.any(axis=1).all()
