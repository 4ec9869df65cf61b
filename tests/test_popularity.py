"""Popularity against numpy references."""

from __future__ import annotations

import numpy as np

from recserve.models import create


def test_counts_values_and_decay_match_numpy(small):
    m = small.interactions
    plain = create("popularity").fit(small)
    np.testing.assert_array_equal(plain.scores, np.bincount(m.indices, minlength=m.shape[1]))
    valued = create("popularity", weighting="value").fit(small)
    np.testing.assert_allclose(
        valued.scores, np.bincount(m.indices, weights=m.data, minlength=m.shape[1]), rtol=1e-6
    )
    decayed = create("popularity", half_life_days="30").fit(small)
    age = (small.timestamps.max() - small.timestamps) / 86_400
    ref = np.bincount(m.indices, weights=0.5 ** (age / 30), minlength=m.shape[1])
    np.testing.assert_allclose(decayed.scores, ref, rtol=1e-5)


def test_ties_break_by_lower_index(small):
    model = create("popularity").fit(small)
    order = sorted(range(small.n_items), key=lambda j: (-model.scores[j], j))
    items, _ = model.recommend_from_history([], k=small.n_items)
    assert items.tolist() == order
