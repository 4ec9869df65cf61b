"""EASE against a numpy reference, and its memory refusal."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.models import create
from recserve.models.ease import ease_bytes


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
    with pytest.raises(ValueError, match=r"ease: 300 items need 0\.0 GB.*max_memory_gb=1e-06"):
        create("ease", max_memory_gb=1e-6).fit(small)
    assert ease_bytes(100_000) > 100e9  # 100k items: ~200 GB, refused by default


def test_explain_sums_to_the_score(small):
    model = create("ease").fit(small)
    items, scores = model.recommend([9], 3)
    for item, score in zip(items[0], scores[0], strict=True):
        _, c = model._contributions(small.interactions[9], int(item), 9)
        assert c.sum() == pytest.approx(score, rel=1e-4, abs=1e-6)
