"""EASE against a numpy reference, and its memory refusal."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.models import create
from recserve.models.ease import ease_bytes
from tests.service_helpers import assert_explanation


def test_weights_equal_numpy_closed_form(small):
    model = create("ease", l2=50.0).fit(small)
    x = (small.interactions.toarray() > 0).astype(np.float64)
    p = np.linalg.inv(x.T @ x + 50.0 * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(model.weights, b, rtol=1e-4, atol=1e-6)
    assert np.all(np.diag(model.weights) == 0)
    for u in (2, 77):
        got, _ = model.recommend([u], 10)
        scores = np.where(x[u] > 0, -np.inf, x[u] @ b)
        assert got[0].tolist() == list(np.lexsort((np.arange(scores.size), -scores))[:10])


def test_refuses_a_catalogue_that_would_not_fit(small):
    with pytest.raises(ValueError, match=r"ease: 300 items need 1\.8 MB.*max_memory_gb=1e-06"):
        create("ease", max_memory_gb=1e-6).fit(small)
    assert ease_bytes(100_000) > 100e9  # 100k items: ~200 GB, refused by default


def test_explain_is_the_decomposition_of_the_score(small):
    """EASE's score is sum over history items i of x_ui B_ij: explain returns exactly
    those terms (the positive ones), and all of them add up to the score."""
    model = create("ease").fit(small)
    b = np.asarray(model.weights, np.float64)
    u = 9
    row = small.interactions[u]
    x = np.ones_like(row.data) if model.params["binary"] else row.data
    items, scores = model.recommend([u], 3)
    for item, score in zip(items[0], scores[0], strict=True):
        terms = x * b[row.indices, int(item)]
        assert terms.sum() == pytest.approx(score, rel=1e-4, abs=1e-6)
        assert_explanation(model, u, int(item), row.indices, terms)


@pytest.mark.parametrize("binary", [True, False])
def test_a_folded_in_row_is_the_sparse_products_row(small, binary):
    """dense_history sums the history's weight rows in one kernel call: the
    same float32 row as scipy's CSR x dense product (rated values when not
    binary), NaN at the history's items when filtering."""
    m = create("ease", binary=binary).fit(small)
    rng = np.random.default_rng(4)
    out = np.empty(small.n_items, np.float32)
    for size in (1, 10, 40):
        items = rng.integers(0, small.n_items, size)
        row = m.history_matrix([items], [rng.integers(1, 6, size).astype(float)])
        h = row.astype(np.float32)
        if binary:
            h.data[:] = 1.0
        want = np.asarray(h @ m.weights, np.float32)[0]
        assert m.dense_history(row, out, filter_seen=False)
        np.testing.assert_array_equal(out, want)
        assert m.dense_history(row, out, filter_seen=True)
        want[row.indices] = np.nan
        np.testing.assert_array_equal(out, want)


def test_an_l2_too_small_for_the_data_is_a_clear_error():
    # scipy's "k-th leading minor of the array is not positive definite" named
    # neither the model nor the parameter. 100 items among 20 users: the Gram
    # matrix has rank <= 20, singular without l2.
    from recserve.data import generate, to_dataset
    from recserve.models.base import TrainingError

    wide = to_dataset(generate(20, 100, 300, seed=1))
    with pytest.raises(TrainingError, match=r"^ease: .*not positive definite.*raise l2 \(now 0\)"):
        create("ease", l2=0.0).fit(wide)
    create("ease").fit(wide)  # the default l2 solves it
