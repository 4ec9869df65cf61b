"""The hybrid blend: min-max per component, weighted sum, ties by id; the row
blend (one shared item space) against the id blend and an independent loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.data import IdMap
from recserve.serving.blend import blend, blend_rows, minmax


def reference(parts, k):
    """Independent: a plain dict of sums over (weight, ids, scores), sorted."""
    total: dict[str, float] = {}
    for w, ids, scores in parts:
        if not len(ids):
            continue
        lo, hi = min(scores), max(scores)
        for i, s in zip(ids, scores, strict=True):
            v = (s - lo) / (hi - lo) if hi > lo else 1.0
            total[i] = total.get(i, 0.0) + w * v
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@settings(max_examples=150, deadline=None)
@given(
    n_items=st.integers(1, 40),
    k=st.integers(1, 50),
    data=st.data(),
)
def test_row_blend_equals_the_id_blend_and_the_reference(n_items, k, data):
    ids = IdMap.from_ids([f"i{j:03d}" for j in range(n_items)])
    parts_rows, parts_ids = [], []
    for _ in range(data.draw(st.integers(1, 4))):
        n = data.draw(st.integers(0, n_items))
        rows = np.array(data.draw(st.permutations(range(n_items)))[:n], np.int32)
        # Few distinct values: ties within and across parts are common.
        scores = np.array(
            data.draw(
                st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), min_size=n, max_size=n)
            ),
            np.float32,
        )
        w = data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
        parts_rows.append((w, rows, scores))
        parts_ids.append((w, ids.ids(rows), scores.astype(np.float64).tolist()))
    want = reference(parts_ids, k)
    assert blend(((w, i, np.asarray(s)) for w, i, s in parts_ids), k) == want
    rows, totals = blend_rows(parts_rows, k, n_items)
    assert ids.ids(rows) == [i for i, _ in want]
    np.testing.assert_array_equal(totals, [v for _, v in want])


def test_minmax_maps_onto_the_unit_interval():
    np.testing.assert_allclose(minmax(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(minmax(np.array([7.0, 7.0])), [1.0, 1.0])
    assert blend_rows([], 3, 5)[0].size == 0
    with pytest.raises(ValueError):
        minmax(np.array([]))
