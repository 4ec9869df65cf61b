"""Neighbourhood models against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.data import Dataset, IdMap
from recserve.models import create


def topk_rows(scores, k, exclude_self):
    """Dense top-k per row (ties by lower index) as a dense matrix with zeros elsewhere."""
    out = np.zeros_like(scores)
    for i in range(scores.shape[0]):
        row = scores[i].copy()
        if exclude_self:
            row[i] = -np.inf
        cols = [
            j
            for j in np.lexsort((np.arange(row.size), -row))
            if np.isfinite(row[j]) and scores[i, j] != 0
        ][:k]
        out[i, cols] = scores[i, cols]
    return out


def rank(scores, seen_row, k):
    s = np.where(seen_row, -np.inf, scores)
    return list(np.lexsort((np.arange(s.size), -s))[:k])


def test_itemknn_cosine_equals_numpy(small):
    model = create("itemknn", k=20).fit(small)
    x = small.interactions.toarray().astype(np.float64)
    norms = np.sqrt((x**2).sum(0))
    cos = (x.T @ x) / np.maximum(np.outer(norms, norms), 1e-30)
    sim = topk_rows(cos, 20, exclude_self=True)
    np.testing.assert_allclose(model.sim.toarray(), sim, rtol=1e-5, atol=1e-7)
    for u in (0, 17, 400):
        got, _ = model.recommend([u], 10)
        assert got[0].tolist() == rank(x[u] @ sim, x[u] > 0, 10)


def test_rp3beta_equals_numpy(small):
    model = create("rp3beta", k=15, alpha=0.8, beta=0.4).fit(small)
    x = (small.interactions.toarray() > 0).astype(np.float64)
    p_ui = x / np.maximum(x.sum(1, keepdims=True), 1e-30)
    p_iu = x.T / np.maximum(x.T.sum(1, keepdims=True), 1e-30)
    deg = x.sum(0)
    w = (p_iu**0.8) @ (p_ui**0.8) * np.where(deg > 0, deg, 1) ** -0.4
    np.testing.assert_allclose(model.sim.toarray(), topk_rows(w, 15, True), rtol=2e-5, atol=1e-7)


def test_userknn_known_and_folded_in_users_equal_numpy(small):
    model = create("userknn", k=30).fit(small)
    x = small.interactions.toarray().astype(np.float64)
    norms = np.sqrt((x**2).sum(1))
    cos = (x @ x.T) / np.maximum(np.outer(norms, norms), 1e-30)
    usim = topk_rows(cos, 30, exclude_self=True)
    for u in (3, 99):
        got, _ = model.recommend([u], 10)
        assert got[0].tolist() == rank(usim[u] @ x, x[u] > 0, 10)
    # A new user: similarities to every training user, top 30, then their items.
    history = np.array([1, 5, 9, 40, 41])
    h = np.zeros(x.shape[1])
    h[history] = 1.0
    sims = (x @ h) / np.maximum(norms * np.sqrt(h @ h), 1e-30)
    top = np.zeros_like(sims)
    keep = [j for j in np.lexsort((np.arange(sims.size), -sims)) if sims[j] != 0][:30]
    top[keep] = sims[keep]
    got, _ = model.recommend_from_history(history, k=10)
    assert got.tolist() == rank(top @ x, h > 0, 10)


def test_bm25_weighting_changes_neighbours(small):
    plain = create("itemknn", k=10).fit(small)
    bm25 = create("itemknn", k=10, weighting="bm25", similarity="dot").fit(small)
    assert (plain.sim != bm25.sim).nnz > 0


def test_content_recommends_items_without_interactions():
    # 4 users, 6 items; items 4 and 5 were never interacted with but share genres.
    x = sp.csr_matrix(
        np.array(
            [[1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
            np.float32,
        )
    )
    feats = sp.csr_matrix(
        np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]], np.float32)
    )
    ds = Dataset(
        x,
        np.zeros(x.nnz, np.int64),
        IdMap.from_ids("abcd"),
        IdMap.from_ids([f"i{j}" for j in range(6)]),
        item_features=feats,
        feature_names=["drama", "comedy", "horror"],
    )
    model = create("content", k=5).fit(ds)
    got, scores = model.recommend([0], 1)  # user a has items 0, 1 (drama)
    assert got[0].tolist() == [4] and scores[0, 0] > 0
    assert model.recommend([3], 1)[0][0].tolist() == [5]  # horror fan gets the new horror item
    assert model.similar_items(0, 2)[0].tolist() == [1, 4]
    with pytest.raises(ValueError, match="needs item features"):
        create("content").fit(
            Dataset(
                x,
                np.zeros(x.nnz, np.int64),
                IdMap.from_ids("abcd"),
                IdMap.from_ids([f"i{j}" for j in range(6)]),
            )
        )


@pytest.mark.parametrize("algo", ["itemknn", "rp3beta", "content"])
def test_explain_contributions_add_up_to_the_score(small, algo):
    model = create(algo, k=50).fit(small)
    items, scores = model.recommend([21], 3)
    for item, score in zip(items[0], scores[0], strict=True):
        because, contrib = model.explain(21, int(item), n=10_000)
        assert set(because) <= set(small.interactions[21].indices)
        assert np.all(np.diff(contrib) <= 0)
        assert contrib.sum() == pytest.approx(score, rel=1e-4)


def test_userknn_explain_names_history_items(small):
    model = create("userknn", k=30).fit(small)
    item = int(model.recommend([8], 1)[0][0, 0])
    because, contrib = model.explain(8, item, n=3)
    assert 0 < because.size <= 3 and set(because) <= set(small.interactions[8].indices)
    assert np.all(np.diff(contrib) <= 0)


@pytest.mark.parametrize("algo", ["itemknn", "userknn", "content"])
def test_memory_budget_fallback_gives_the_same_neighbours(small, monkeypatch, algo):
    import recserve.models.neighbors as nb

    pair_once = create(algo, k=25).fit(small).sim
    monkeypatch.setattr(nb, "KNN_SELF_BUDGET", 0)  # force the general kernel

    def must_not_run(*args, **kwargs):
        raise AssertionError("knn_self ran although over the memory budget")

    monkeypatch.setattr(nb.simk, "knn_self", must_not_run)
    general = create(algo, k=25).fit(small).sim
    np.testing.assert_array_equal(pair_once.indptr, general.indptr)
    np.testing.assert_array_equal(pair_once.indices, general.indices)
    np.testing.assert_allclose(pair_once.data, general.data, rtol=1e-6)
