"""A hybrid whose components were trained on different catalogues (a content
model on a newer item list, a model kept from an older snapshot) is blended by
item id: the router's general path, against a blend computed here from each
component's own top-n."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.config import Hybrid, ServerConfig
from recserve.data import generate, to_dataset
from recserve.feedback import OnlineState
from recserve.models import create
from recserve.serving import Catalog, RecQuery, Router

WEIGHTS = {"als": 0.6, "itemknn": 0.4}


@pytest.fixture(scope="module")
def setup(small, tmp_path_factory):
    """als on `small` (300 items), itemknn on another set of 200 items whose ids
    overlap small's ("1".."200"), and the hybrid of the two."""
    other = to_dataset(generate(1_000, 200, 20_000, seed=8), name="other")
    root = tmp_path_factory.mktemp("catalogues")
    models = {
        "als": create("als", factors=16, iterations=5).fit(small),
        "itemknn": create("itemknn").fit(other),
    }
    for name, m in models.items():
        m.save(root, name)
    cfg = ServerConfig(models=str(root), hybrids={"mix": Hybrid("mix", WEIGHTS)}, max_k=500)
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(120)
    yield Router(cfg, catalog, OnlineState()), models
    catalog.close()


def by_id(parts: list[tuple[float, list[str], np.ndarray]], k: int) -> list[tuple[str, float]]:
    """Independent blend: each part min-max scaled, weighted, summed per id; the k
    best, ties by id."""
    total: dict[str, float] = {}
    for w, ids, scores in parts:
        s = np.asarray(scores, np.float64)
        span = s.max() - s.min()
        scaled = (s - s.min()) / span if span > 0 else np.ones_like(s)
        for i, v in zip(ids, scaled, strict=True):
            total[i] = total.get(i, 0.0) + w * float(v)
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@pytest.mark.parametrize("k", [1, 10, 60])
@pytest.mark.parametrize("user", ["3", "77", "640"])
def test_recommend_blends_components_over_different_catalogues_by_id(setup, user, k):
    router, models = setup
    exclude = ["5", "250"]  # one id in both catalogues, one only in als's
    parts = []
    for name, w in WEIGHTS.items():
        m = models[name]
        n = min(max(3 * k, 100), m.n_items)
        rows, scores = m.recommend_user(m.users.get(user), n + len(exclude), filter_seen=True)
        keep = ~np.isin(m.items.ids(rows), exclude)
        parts.append((w, m.items.ids(rows[keep][:n]), scores[keep][:n]))
    want = by_id(parts, k)
    got = router.recommend(RecQuery(user_id=user, k=k, model="mix", exclude=exclude))
    assert got.item_ids == [i for i, _ in want]
    np.testing.assert_allclose(got.scores, [v for _, v in want], rtol=1e-5, atol=1e-6)
    assert not set(got.item_ids) & set(exclude)
    assert got.version == ",".join(f"{n}@{router.catalog.get(n).version}" for n in WEIGHTS)
    # Items of one catalogue only are among the answers' candidates.
    assert any(int(i) > 200 for i, _ in by_id(parts, 10_000))


@pytest.mark.parametrize("item", ["1", "150", "280"])
def test_similar_items_blends_over_different_catalogues_by_id(setup, item):
    router, models = setup
    k = 10
    parts = []
    for name, w in WEIGHTS.items():
        m = models[name]
        idx = m.items.get(item)
        if idx < 0:  # "280" is only in als's catalogue
            continue
        rows, scores = m.similar_items(idx, min(max(3 * k, 100), m.n_items - 1))
        parts.append((w, m.items.ids(rows), scores))
    want = by_id(parts, k)
    got = router.similar(item, k, "mix")
    assert got.item_ids == [i for i, _ in want]
    np.testing.assert_allclose(got.scores, [v for _, v in want], rtol=1e-5, atol=1e-6)
    assert item not in got.item_ids
