"""Known users a model learned nothing about (no training events: a model
fitted on a split, a user whose events all came later) are served as unknown
users without a history are: the model's fallbacks, popularity. Before, they
got an all-zero ranking, the first k items in index order."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.config import Hybrid, ServerConfig
from recserve.feedback import OnlineState
from recserve.models import algorithms, create
from recserve.serving import Catalog, RecQuery, Router

FAST = {
    "als": {"factors": 16, "iterations": 5},
    "svd": {"factors": 16, "epochs": 5},
    "bpr": {"factors": 16, "epochs": 5, "fold_in_epochs": 5},
    "bayes_mf": {"factors": 8, "epochs": 5},
}
REAL = [a for a in algorithms() if a != "popularity"]


def popular(train: sp.csr_matrix, seen: np.ndarray, k: int) -> list[int]:
    """Independent: the k most-interacted training items, not in `seen`, ties by
    lower index (the popularity model's order)."""
    counts = np.bincount(train.indices, minlength=train.shape[1]).astype(np.float64)
    order = np.lexsort((np.arange(counts.size), -counts))
    return [int(i) for i in order if i not in set(seen.tolist())][:k]


@pytest.fixture(scope="module")
def split(small):
    x = small.interactions
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    cold = [0, 7, small.n_users // 2, small.n_users - 1]
    keep = ~np.isin(rows, cold)
    train = sp.csr_matrix((x.data[keep], (rows[keep], x.indices[keep])), shape=x.shape)
    return small.with_interactions(train, small.timestamps[keep]), cold


@pytest.fixture(scope="module")
def router(split, tmp_path_factory):
    ds, _ = split
    root = tmp_path_factory.mktemp("cold-models")
    for algo in algorithms():
        create(algo, **FAST.get(algo, {})).fit(ds).save(root, algo, dataset=ds)
    hybrids = {
        "als+itemknn": Hybrid("als+itemknn", {"als": 0.6, "itemknn": 0.4}),
        "als+popularity": Hybrid("als+popularity", {"als": 0.6, "popularity": 0.4}),
    }
    cfg = ServerConfig(models=str(root), hybrids=hybrids, max_k=500)
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(120)
    yield Router(cfg, catalog, OnlineState())
    catalog.close()


def test_the_models_know_which_users_they_learned_nothing_of(router, split):
    _, cold = split
    for algo in algorithms():
        m = router.catalog.get(algo).model
        want = set() if algo == "popularity" else set(cold)  # popularity serves everyone
        assert {u for u in range(m.n_users) if m.is_cold(u)} == want, algo


def test_imported_factors_of_a_user_without_events_are_served(split):
    # Spark factors imported without --data: no user has seen items, but every
    # user's factors were learned elsewhere: none of them is cold.
    ds, cold = split
    m = create("als", **FAST["als"]).fit(ds)
    assert {u for u in range(m.n_users) if m.is_cold(u)} == set(cold)
    m.user_factors = m.user_factors.copy()
    m.user_factors[cold[0]] = 0.5
    assert {u for u in range(m.n_users) if m.is_cold(u)} == set(cold[1:])


@pytest.mark.parametrize("algo", REAL)
def test_a_user_the_model_learned_nothing_of_gets_its_fallback(router, split, small, algo):
    ds, cold = split
    for u in cold:
        uid = small.users.ids([u])[0]
        got = router.recommend(RecQuery(user_id=uid, k=10, model=algo))
        assert got.served_by == "popularity", (algo, uid)
        want = popular(ds.interactions, ds.interactions[u].indices, 10)
        assert small.items.index(got.item_ids).tolist() == want
        assert got.scores[0] > 0
        stranger = router.recommend(RecQuery(user_id="nobody-at-all", k=10, model=algo))
        assert (got.item_ids, got.scores) == (stranger.item_ids, stranger.scores)


@pytest.mark.parametrize("algo", REAL)
def test_a_cold_users_history_is_folded_in_as_a_strangers(router, split, small, algo):
    _, cold = split
    hist = [(i, 4.0) for i in small.items.ids([3, 11, 40])]
    for u in cold[:2]:
        uid = small.users.ids([u])[0]
        got = router.recommend(RecQuery(user_id=uid, k=10, model=algo, history=hist))
        want = router.recommend(RecQuery(user_id="nobody-at-all", k=10, model=algo, history=hist))
        assert got.served_by == want.served_by == "", algo
        assert got.item_ids == want.item_ids, algo
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
        assert got.folded_in


@pytest.mark.parametrize("algo", REAL)
def test_users_with_events_are_served_by_their_model_as_before(router, split, small, algo):
    _, cold = split
    model = router.catalog.get(algo).model
    for u in (1, 2, small.n_users - 2):
        assert u not in cold
        got = router.recommend(RecQuery(user_id=small.users.ids([u])[0], k=10, model=algo))
        items, scores = model.recommend([u], 10)
        assert got.served_by == "" and got.item_ids == small.items.ids(items[0]), algo
        np.testing.assert_allclose(got.scores, scores[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense", [True, False])
def test_hybrids_skip_the_components_that_know_nothing_of_the_user(router, split, small, dense):
    ds, cold = split
    real = router._hybrid_dense
    if not dense:
        router._hybrid_dense = lambda *a: None  # type: ignore[method-assign]
    try:
        uid = small.users.ids([cold[1]])[0]
        # No component knows the user: the chain's fallback answers.
        got = router.recommend(RecQuery(user_id=uid, k=10, model="als+itemknn"))
        assert got.served_by == "popularity"
        # Popularity serves everyone: the blend is popularity's ranking alone.
        got = router.recommend(RecQuery(user_id=uid, k=10, model="als+popularity"))
        assert got.served_by == "" and got.version.startswith("popularity@")
        want = popular(ds.interactions, np.zeros(0, np.int32), 10)
        assert small.items.index(got.item_ids).tolist() == want
    finally:
        router._hybrid_dense = real  # type: ignore[method-assign]
