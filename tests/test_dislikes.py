"""Negative values are dislikes (a thumbs-down): ALS fits them as preference 0
at confidence 1 + alpha |r| (tests/test_als.py), and the models that learn from
positive evidence alone (itemknn, userknn and rp3beta similarities, BPR's
positives) leave them out of what they learn, while a disliked item still
counts as seen and, in a neighbourhood score, against the items like it.
Before, ALS's recall on MovieLens with dislikes was 0 and itemknn's fell by a
third (docs/algorithms.md)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.models import create
from recserve.models.base import without_dislikes


@pytest.fixture(scope="module")
def mixed(small):
    """`small` with a third of its events turned into dislikes (value -1)."""
    out = copy.deepcopy(small)
    rng = np.random.default_rng(12)
    out.interactions.data = np.where(rng.random(out.nnz) < 0.33, -1.0, 1.0).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def likes(mixed):
    """The same data with the dislikes removed (an independent filter: dense)."""
    dense = mixed.interactions.toarray()
    kept = sp.csr_matrix(np.where(dense > 0, dense, 0.0).astype(np.float32))
    order = np.flatnonzero(mixed.interactions.data > 0)
    return mixed.with_interactions(kept, mixed.timestamps[order])


def test_without_dislikes_keeps_every_other_entry():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, k = (int(x) for x in rng.integers(1, 9, 2))
        m = sp.csr_matrix(rng.choice([-2.0, -1.0, 1.0, 3.0], (n, k)) * (rng.random((n, k)) < 0.5))
        m.data[rng.random(m.nnz) < 0.2] = 0.0  # a stored zero is an event, not a dislike
        got = without_dislikes(m)
        want = m.toarray()
        want[want < 0] = 0.0
        np.testing.assert_array_equal(got.toarray(), want)
        assert got.nnz == int((m.data >= 0).sum()) and got.shape == m.shape
    plain = sp.csr_matrix(np.eye(3, dtype=np.float32))
    assert without_dislikes(plain) is plain


@pytest.mark.parametrize("algo", ["itemknn", "rp3beta", "userknn"])
def test_similarities_are_learned_from_likes_alone(mixed, likes, algo):
    a = create(algo).fit(mixed)
    b = create(algo).fit(likes)
    np.testing.assert_array_equal(a.sim.indptr, b.sim.indptr)
    np.testing.assert_array_equal(a.sim.indices, b.sim.indices)
    np.testing.assert_allclose(a.sim.data, b.sim.data, rtol=1e-6)
    # Scoring reads the full rows: a disliked item is seen, and counts against
    # the items like it (the liked-only model scores higher where they overlap).
    u = int(np.argmax((mixed.interactions.toarray() < 0).sum(1)))
    items, _ = a.recommend([u], 20)
    assert not set(items[0]) & set(mixed.interactions[u].indices)
    if algo != "userknn":  # userknn scores neighbours' rows, not the user's own
        sa, sb = np.empty(a.n_items, np.float32), np.empty(b.n_items, np.float32)
        a.dense_user(u, sa, False)
        b.dense_user(u, sb, False)
        assert (sa <= sb + 1e-5).all() and (sa < sb - 1e-5).any()


def test_userknn_folds_in_from_likes(mixed, likes):
    a, b = create("userknn").fit(mixed), create("userknn").fit(likes)
    row = mixed.interactions[3]
    liked = row.data > 0
    got_a = a._neighbours(row)
    got_b = b._neighbours(
        sp.csr_matrix((row.data[liked], row.indices[liked], [0, liked.sum()]), shape=row.shape)
    )
    np.testing.assert_array_equal(got_a.indices, got_b.indices)
    np.testing.assert_allclose(got_a.data, got_b.data, rtol=1e-6)


def test_bpr_never_takes_a_dislike_for_a_positive(mixed, likes):
    params = {"factors": 8, "epochs": 5, "fold_in_epochs": 5}
    a = create("bpr", **params)
    a.n_threads = 1  # one thread: deterministic for a seed
    a.fit(mixed)
    b = create("bpr", **params)
    b.n_threads = 1
    b.fit(likes)
    np.testing.assert_array_equal(a.P, b.P)
    np.testing.assert_array_equal(a.Q, b.Q)
    row = mixed.interactions[5]
    liked = row.data > 0
    only = sp.csr_matrix((row.data[liked], row.indices[liked], [0, liked.sum()]), shape=row.shape)
    np.testing.assert_array_equal(a.fold_in(row), b.fold_in(only))


@pytest.fixture(scope="module")
def router(mixed, tmp_path_factory):
    """Every algorithm fitted on `mixed` where user 4 has only dislikes and user 6
    only events of value 0, served."""
    from recserve.config import ServerConfig
    from recserve.feedback import OnlineState
    from recserve.models import algorithms
    from recserve.serving import Catalog, Router

    data = copy.deepcopy(mixed)
    x = data.interactions
    x.data[x.indptr[4] : x.indptr[5]] = -1.0
    x.data[x.indptr[6] : x.indptr[7]] = 0.0
    root = tmp_path_factory.mktemp("dislike-models")
    fast = {"als": {"factors": 8, "iterations": 4}, "bpr": {"factors": 8, "epochs": 4}}
    fast |= {"svd": {"factors": 8, "epochs": 4}, "bayes_mf": {"factors": 8, "epochs": 4}}
    for algo in algorithms():
        create(algo, **fast.get(algo, {})).fit(data).save(root, algo, dataset=data)
    cfg = ServerConfig(models=str(root), max_k=500)
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(120)
    yield Router(cfg, catalog, OnlineState()), data
    catalog.close()


def test_a_user_with_only_dislikes_is_served_from_the_fallback(router):
    from recserve.serving import RecQuery

    r, data = router
    uid = data.users.ids([4])[0]
    disliked = set(data.items.ids(data.interactions[4].indices))
    for algo in ("als", "bpr", "itemknn", "userknn", "rp3beta", "ease", "content"):
        m = r.catalog.get(algo).model
        assert m.has_dislikes() and m.is_cold(4) and not m.is_cold(5), algo
        got = r.recommend(RecQuery(user_id=uid, model=algo, k=10))
        assert got.served_by == "popularity" and len(got.item_ids) == 10, algo
        assert not disliked & set(got.item_ids), algo
        # An unknown user whose history is dislikes only: the same way.
        hist = [(i, -1.0) for i in sorted(disliked)[:3]]
        got = r.recommend(RecQuery(user_id="someone", model=algo, k=10, history=hist))
        assert got.served_by == "popularity", algo
        assert not {i for i, _ in hist} & set(got.item_ids), algo
    for algo in ("svd", "bayes_mf"):  # ratings on any scale: the user is known
        m = r.catalog.get(algo).model
        assert not m.is_cold(4), algo
        assert r.recommend(RecQuery(user_id=uid, model=algo, k=10)).served_by == "", algo


def test_a_user_whose_values_are_all_zero_is_cold_where_values_weigh(router):
    # A neighbourhood score is the history's values times similarities: events
    # of value 0 weigh nothing, and such a user was ranked all zeros, items in
    # index order. Where a 0 is an interaction (ALS's confidence 1, BPR's
    # positive, EASE's binary default) the user is known.
    from recserve.serving import RecQuery

    r, data = router
    uid = data.users.ids([6])[0]
    seen = set(data.items.ids(data.interactions[6].indices))
    hist = [(i, 0.0) for i in sorted(seen)[:3]]
    for algo in ("itemknn", "userknn", "rp3beta", "content"):
        m = r.catalog.get(algo).model
        assert m.weighs_by_value and m.is_cold(6) and not m.is_cold(5), algo
        got = r.recommend(RecQuery(user_id=uid, model=algo, k=10))
        assert got.served_by == "popularity" and len(got.item_ids) == 10, algo
        assert not seen & set(got.item_ids), algo
        got = r.recommend(RecQuery(user_id="someone", model=algo, k=10, history=hist))
        assert got.served_by == "popularity" and not {i for i, _ in hist} & set(got.item_ids)
    for algo in ("als", "bpr", "ease"):
        m = r.catalog.get(algo).model
        assert not m.weighs_by_value and not m.is_cold(6), algo
        got = r.recommend(RecQuery(user_id=uid, model=algo, k=10))
        assert got.served_by == "" and not seen & set(got.item_ids), algo
        got = r.recommend(RecQuery(user_id="someone", model=algo, k=10, history=hist))
        assert got.served_by == "", algo
    assert create("ease", binary=False).weighs_by_value


def test_the_bundle_says_whether_its_data_has_dislikes(router, small, tmp_path):
    from recserve.models import load_named

    r, _ = router
    assert r.catalog.get("als").model.manifest["dislikes"] is True
    create("popularity").fit(small).save(tmp_path, "plain", dataset=small)
    plain = load_named(tmp_path, "plain")
    assert plain.manifest["dislikes"] is False and not plain.has_dislikes()


def test_popularity_counts_no_dislike_as_a_vote(router):
    """Popularity's count weighting and the router's last-resort ranking count
    the events that are not dislikes (an item many users thumbed down is not
    popular); the value weighting sums values, a dislike subtracting."""
    r, data = router
    dense = data.interactions.toarray()
    stored = data.interactions.copy()
    stored.data[:] = 1.0  # every stored event, whatever its value
    events = stored.toarray()
    likes = ((dense >= 0) & (events > 0)).sum(axis=0)
    assert (likes != events.sum(axis=0)).any()  # the data has dislikes to leave out
    np.testing.assert_array_equal(create("popularity").fit(data).scores, likes)
    value = create("popularity", weighting="value").fit(data).scores
    np.testing.assert_allclose(value, dense.sum(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(r.catalog.get("als").popular_counts(), likes)


@pytest.mark.parametrize("algo", ["itemknn", "userknn", "rp3beta", "als", "bpr", "ease"])
def test_data_of_dislikes_alone_fits_and_answers(tmp_path, algo):
    # No positive evidence at all: every user is cold to the model, which must
    # still fit, answer a fold-in and round-trip its bundle (userknn's fold-in
    # raised TypeError on int64 column norms).
    from recserve.data import load_dataset
    from recserve.models import load_named

    f = tmp_path / "r.csv"
    f.write_text("user,item,rating\nu0,i0,-1\nu1,i1,-2\nu2,i2,-1\nu2,i0,-3\n")
    params = {"factors": 4, "iterations": 2} if algo == "als" else {}
    params = {"factors": 4, "epochs": 2} if algo == "bpr" else params
    model = create(algo, **params).fit(load_dataset(f))
    assert all(model.is_cold(u) for u in range(model.n_users))
    items, _ = model.recommend_from_history([0], [1.0], k=2)
    assert 0 not in items.tolist() and len(set(items.tolist())) == items.size
    model.save(tmp_path / "m", "x")
    loaded = load_named(tmp_path / "m", "x")
    np.testing.assert_array_equal(loaded.recommend_from_history([0], [1.0], k=2)[0], items)


@pytest.mark.parametrize("algo", ["itemknn", "userknn", "svd", "als"])
@pytest.mark.parametrize("values", ["likes", "dislikes", "zeros"])
def test_training_evidence_counts_a_known_users_row_as_evidence_does(small, algo, values):
    # the serving path's count (the row's length where every value counts)
    # against a count of the row's values by the definition
    data = copy.deepcopy(small)
    rng = np.random.default_rng(4)
    pick = rng.random(data.nnz) < 0.3
    fill = {"likes": 1.0, "dislikes": -1.0, "zeros": 0.0}[values]
    data.interactions.data = np.where(pick, fill, 2.0).astype(np.float32)
    params = {"factors": 8, "iterations": 2} if algo == "als" else {}
    params = {"factors": 8, "epochs": 2} if algo == "svd" else params
    model = create(algo, **params).fit(data)
    x = data.interactions.tocsr()
    for u in range(0, data.n_users, 37):
        row = x.data[x.indptr[u] : x.indptr[u + 1]]
        if model.rates_negatives:
            want = row.size
        elif model.weighs_by_value:
            want = int((row > 0).sum())
        else:
            want = int((row >= 0).sum())
        assert model.training_evidence(u) == want, (u, row)
