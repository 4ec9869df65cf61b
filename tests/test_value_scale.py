"""Heavy-tailed values (play counts, quantities) weigh on a log scale in the
neighbourhood models: checked against the same model fitted, linear, on values
numpy has put on that scale, for known users, fold-ins, dense rows, explanations,
similar items and bundles; ratings stay linear."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from recserve.models import create, load_named
from recserve.models.base import HEAVY_TAIL_RATIO

NEIGHBOURHOOD = ["itemknn", "userknn", "rp3beta", "content"]


def counts(ds, seed: int = 0):
    """The dataset's events as log-normal counts; every fifth a dislike."""
    out = copy.deepcopy(ds)
    rng = np.random.default_rng(seed)
    c = np.round(np.exp(rng.normal(1.5, 1.5, out.nnz))).astype(np.float32) + 1
    c[::5] *= -1
    out.interactions.data = c
    return out


def numpy_log(ds, median: float):
    """The same events with values sign(v) log1p(|v| / median), by numpy."""
    out = copy.deepcopy(ds)
    v = out.interactions.data.astype(np.float64)
    out.interactions.data = (np.sign(v) * np.log1p(np.abs(v) / median)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def heavy(small):
    return counts(small)


@pytest.fixture(scope="module", params=NEIGHBOURHOOD)
def pair(request, heavy):
    """(the model fitted on counts, the reference: linear on numpy's log values)."""
    model = create(request.param).fit(heavy)
    v = np.abs(heavy.interactions.data.astype(np.float64))
    median = float(np.median(v))
    assert np.quantile(v, 0.99) / median > HEAVY_TAIL_RATIO
    assert model.value_median == pytest.approx(median)
    ref = create(request.param, values="linear").fit(numpy_log(heavy, median))
    return model, ref


def log_values(values, median):
    v = np.asarray(values, np.float64)
    return np.sign(v) * np.log1p(np.abs(v) / median)


def test_known_users_rank_as_on_log_values(pair, heavy):
    model, ref = pair
    users = np.arange(0, heavy.n_users, 29)
    for a, b in zip(model.recommend(users, 10), ref.recommend(users, 10), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    row = np.empty(heavy.n_items, np.float32)
    want = np.empty(heavy.n_items, np.float32)
    for u in users[:8]:
        i, s = model.recommend_user(int(u), 10)
        ri, rs = ref.recommend_user(int(u), 10)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_allclose(s, rs, rtol=1e-5)
        assert model.dense_user(int(u), row) and ref.dense_user(int(u), want)
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)


def test_fold_ins_take_raw_values_and_weigh_them_as_training_did(pair, heavy):
    # A history arrives in the data's own units (counts) and is scaled by the
    # median kept from training: a known user's own row folded in is that user.
    model, ref = pair
    m = model.value_median
    out = np.empty(heavy.n_items, np.float32)
    want = np.empty(heavy.n_items, np.float32)
    for u in (3, 77, 400):
        row = heavy.interactions[u]
        got_i, got_s = model.recommend_from_history(row.indices, row.data, k=10)
        ref_i, ref_s = ref.recommend_from_history(row.indices, log_values(row.data, m), k=10)
        np.testing.assert_array_equal(got_i, ref_i)
        np.testing.assert_allclose(got_s, ref_s, rtol=1e-5, atol=1e-6)
        if model.algorithm != "userknn":  # userknn's known users rank from their sim row
            known_i, _ = model.recommend([u], 10)
            np.testing.assert_array_equal(got_i, known_i[0])
        hist = model.history_matrix([row.indices], [row.data])
        ref_hist = ref.history_matrix([row.indices], [log_values(row.data, m)])
        assert model.dense_history(hist, out) and ref.dense_history(ref_hist, want)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        batch_i, _ = model.recommend_histories(hist, 10)
        np.testing.assert_array_equal(batch_i[0], got_i)
        np.testing.assert_allclose(
            model._score_history(hist), ref._score_history(ref_hist), rtol=1e-5, atol=1e-6
        )


def test_explanations_and_similar_items_follow_the_scale(pair, heavy):
    model, ref = pair
    m = model.value_median
    for u in (5, 123):
        items, _ = model.recommend([u], 5)
        got = model.explain_user_items(u, items[0], 3)
        want = ref.explain_user_items(u, items[0], 3)
        for (gi, gv), (wi, wv) in zip(got, want, strict=True):
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_allclose(gv, wv, rtol=1e-4, atol=1e-6)
        row = heavy.interactions[u]
        hist = model.history_matrix([row.indices], [row.data])
        ref_hist = ref.history_matrix([row.indices], [log_values(row.data, m)])
        for (gi, gv), (wi, wv) in zip(
            model.explain_items(hist, items[0], 3),
            ref.explain_items(ref_hist, items[0], 3),
            strict=True,
        ):
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_allclose(gv, wv, rtol=1e-4, atol=1e-6)
    for item in (0, 17, 250):
        a = model.similar_items(item, 8)
        b = ref.similar_items(item, 8)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


def test_the_bundle_keeps_the_scale(pair, heavy, tmp_path):
    model, _ = pair
    model.save(tmp_path, "m")
    loaded = load_named(tmp_path, "m")
    assert loaded.value_median == model.value_median
    users = np.arange(0, heavy.n_users, 61)
    for a, b in zip(model.recommend(users, 10), loaded.recommend(users, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    row = heavy.interactions[9]
    np.testing.assert_array_equal(
        model.recommend_from_history(row.indices, row.data, k=10)[0],
        loaded.recommend_from_history(row.indices, row.data, k=10)[0],
    )
    # Read from the bundle (a memory map), not recomputed at load.
    assert not loaded._weights_rows().data.flags.writeable
    # A bundle written before the scale existed is linear.
    old = create(model.algorithm)
    old.users, old.items, old.user_items = model.users, model.items, model.user_items
    old._restore(
        {k: v for k, v in model._arrays().items() if k not in ("value_median", "weights_data")}
    )
    assert old.value_median == 0 and old._weights_rows() is old.user_items


@pytest.mark.parametrize("algo", NEIGHBOURHOOD)
def test_ratings_stay_linear_and_the_param_forces_either(small, heavy, algo):
    assert create(algo).fit(small).value_median == 0
    assert create(algo, values="log").fit(small).value_median > 0
    model = create(algo, values="linear").fit(heavy)
    assert model.value_median == 0 and model._weights_rows() is model.user_items
    with pytest.raises(ValueError, match="param values: expected one of auto, linear, log"):
        create(algo, values="sqrt")
