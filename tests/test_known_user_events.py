"""A known user who records events after training is served from their training
row plus those events. For the models fitted by SGD (svd, bayes_mf, bpr) the
fold-in of a training row is not the trained user, so folding that row in from
nothing replaced about half of the user's top 10 on one recorded event (and
userknn counted the user as their own neighbour). The row now continues the
trained user (KnownUserRow): re-recording what training saw changes nothing,
and one new event moves the answer a little, through the serving core."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.config import Hybrid, ServerConfig
from recserve.feedback import Event, OnlineState
from recserve.models import algorithms, create
from recserve.serving import Catalog, RecQuery, Router
from recserve.serving import router as router_module

FAST = {
    "als": {"factors": 16, "iterations": 5},
    "svd": {"factors": 16, "epochs": 5},
    "bpr": {"factors": 16, "epochs": 5},
    "bayes_mf": {"factors": 8, "epochs": 5},
}


@pytest.fixture(scope="module")
def router(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("known-user-models")
    for algo in algorithms():
        create(algo, **FAST.get(algo, {})).fit(small).save(root, algo, dataset=small)
    catalog = Catalog(str(root))
    catalog.start()
    catalog.wait(120)
    hybrids = {"bpr+userknn": Hybrid("bpr+userknn", {"bpr": 0.5, "userknn": 0.5})}
    yield Router(ServerConfig(models=str(root), hybrids=hybrids), catalog, OnlineState())
    catalog.close()


def _answer(router: Router, uid: str, algo: str, k: int = 10) -> tuple[list[str], list[float]]:
    got = router.recommend(RecQuery(user_id=uid, k=k, model=algo))
    assert got.served_by == "", (algo, uid)
    return list(got.item_ids), list(got.scores)


@pytest.mark.parametrize("algo", [*algorithms(), "bpr+userknn"])
def test_recording_what_training_saw_changes_no_answer(router, small, algo):
    # Users 0-99 re-record one of their training events, same item and value:
    # the row they are folded in from is their training row, so every model
    # and a hybrid (its components' rows) answer as they did before (for svd,
    # bayes_mf, bpr and userknn they did not).
    uids = small.users.ids(np.arange(0, 100, 7))
    before = {uid: _answer(router, uid, algo) for uid in uids}
    x = small.interactions
    events = []
    for u, uid in zip(range(0, 100, 7), uids, strict=True):
        j = x.indptr[u] + (u % (x.indptr[u + 1] - x.indptr[u]))
        events.append(Event(uid, small.items.ids([x.indices[j]])[0], float(x.data[j]), 0))
    online = OnlineState()
    online.apply(events)
    again = Router(router.cfg, router.catalog, online)
    for uid in uids:
        items, scores = _answer(again, uid, algo)
        assert again.recommend(RecQuery(user_id=uid, k=10, model=algo)).folded_in
        assert items == before[uid][0], (algo, uid)
        np.testing.assert_allclose(scores, before[uid][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ["svd", "bayes_mf", "bpr"])
def test_one_new_event_moves_a_known_users_answer_a_little(router, small, algo):
    # 80 users each record one item they never had (a top rating): every answer
    # changes (the event counts), and on average at least 7 of the other 9-10
    # items stay (folded in from nothing: 3.8-4.8 of 10 on the quickstart).
    rng = np.random.default_rng(11)
    users = rng.choice(small.n_users, 80, replace=False)
    uids = small.users.ids(users)
    before = {uid: _answer(router, uid, algo) for uid in uids}
    x = small.interactions
    new = {}
    for u, uid in zip(users, uids, strict=True):
        unseen = np.setdiff1d(np.arange(small.n_items), x.indices[x.indptr[u] : x.indptr[u + 1]])
        new[uid] = small.items.ids([rng.choice(unseen)])[0]
    online = OnlineState()
    online.apply([Event(uid, item, 5.0, 0) for uid, item in new.items()])
    after = Router(router.cfg, router.catalog, online)
    kept = []
    for uid in uids:
        items, scores = _answer(after, uid, algo, k=11)
        assert new[uid] not in items  # now seen
        old_items, old_scores = before[uid]
        assert (items[:10], scores[:10]) != (old_items, old_scores), (algo, uid)
        kept.append(len(set(items[:10]) & set(old_items)) / 10)
    assert np.mean(kept) >= 0.7, (algo, np.mean(kept))


@pytest.mark.parametrize("algo", ["svd", "bayes_mf"])
def test_predicted_ratings_of_a_known_user_follow_their_events(router, small, algo):
    # Predict: re-recording a training rating keeps the predictions (mean and
    # std); a new rating of 5 raises the prediction of the rated item toward 5
    # from the user's trained prediction, not from a fold-in that starts over.
    x = small.interactions
    items = small.items.ids(np.arange(0, small.n_items, 29))
    for u in (3, 90, 512):
        uid = small.users.ids([u])[0]
        before = router.predict(uid, [], items, model=algo)
        j = x.indptr[u]
        seen_id = small.items.ids([x.indices[j]])[0]
        same = router.predict(uid, [(seen_id, float(x.data[j]))], items, model=algo)
        np.testing.assert_allclose(same.rating, before.rating, rtol=1e-5)
        np.testing.assert_allclose(same.std, before.std, rtol=1e-5)
        unseen = np.setdiff1d(np.arange(small.n_items), x.indices[x.indptr[u] : x.indptr[u + 1]])
        target = small.items.ids([unseen[0]])[0]
        was = router.predict(uid, [], [target], model=algo).rating[0]
        now = router.predict(uid, [(target, 5.0)], [target], model=algo).rating[0]
        assert was < now <= 5.0, (algo, uid, was, now)


def _one_event_each(
    router: Router, small, n: int, seed: int, value: float
) -> tuple[list[str], Router]:
    """n random known users, each with one recorded event (an item among the
    first 50, seen or not): their ids, and a router over the same catalogue
    with those events."""
    users = np.random.default_rng(seed).choice(small.n_users, n, replace=False)
    uids = small.users.ids(users)
    online = OnlineState()
    items = small.items.ids(users % 50)
    online.apply([Event(uid, item, value, 0) for uid, item in zip(uids, items, strict=True)])
    return uids, Router(router.cfg, router.catalog, online)


@pytest.mark.parametrize("algo", ["svd", "bayes_mf", "bpr", "userknn"])
def test_candidates_rank_the_same_updated_user(router, small, algo):
    # The general path (candidates: recommend_histories) must continue the user
    # as the dense path does: its answer restricted to candidates is the
    # unrestricted answer without the items left out.
    uids, after = _one_event_each(router, small, 12, seed=3, value=5.0)
    for uid in uids:
        full = after.recommend(RecQuery(user_id=uid, k=20, model=algo))
        dropped = set(full.item_ids[::3])
        pool = [i for i in small.items.ids(np.arange(small.n_items)) if i not in dropped]
        got = after.recommend(RecQuery(user_id=uid, k=10, model=algo, candidates=pool))
        kept = [(i, s) for i, s in zip(full.item_ids, full.scores, strict=True) if i not in dropped]
        assert list(got.item_ids) == [i for i, _ in kept[:10]], (algo, uid)
        np.testing.assert_allclose(got.scores, [s for _, s in kept[:10]], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def mixed_router(small, tmp_path_factory):
    # itemknn and svd on every event; als on two thirds of them (the same
    # users and items): its training rows differ from the others'.
    root = tmp_path_factory.mktemp("known-user-hybrids")
    x = small.interactions
    keep = np.arange(x.nnz) % 3 != 0
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    part = small.with_interactions(
        sp.csr_matrix((x.data[keep], (rows[keep], x.indices[keep])), shape=x.shape),
        small.timestamps[keep],
    )
    create("itemknn").fit(small).save(root, "itemknn", dataset=small)
    create("svd", **FAST["svd"]).fit(small).save(root, "svd", dataset=small)
    create("als", **FAST["als"]).fit(part).save(root, "als_part", dataset=part)
    hybrids = {
        "same": Hybrid("same", {"itemknn": 0.5, "svd": 0.5}),
        "differ": Hybrid("differ", {"itemknn": 0.5, "als_part": 0.5}),
    }
    catalog = Catalog(str(root))
    catalog.start()
    catalog.wait(120)
    yield Router(ServerConfig(models=str(root), hybrids=hybrids), catalog, OnlineState())
    catalog.close()


@pytest.mark.parametrize("hybrid", ["same", "differ"])
def test_hybrid_components_share_a_known_users_row_only_when_their_rows_are_equal(
    mixed_router, small, hybrid, monkeypatch
):
    # The dense blend builds a known user's row (training row + events) once
    # and hands it to the next component of the same user map when that
    # component's training row is equal; als_part's is not, and it must fold
    # in its own. Against the general path (candidates: every item), which
    # builds every component's row itself.
    uids, r = _one_event_each(mixed_router, small, 25, seed=2, value=4.0)
    every = small.items.ids(np.arange(small.n_items))
    built = []
    real = router_module._history_row
    monkeypatch.setattr(
        router_module, "_history_row", lambda m, u, i, v: built.append(u) or real(m, u, i, v)
    )
    for uid in uids:
        built.clear()
        dense = r.recommend(RecQuery(user_id=uid, k=10, model=hybrid))
        assert len(built) == (1 if hybrid == "same" else 2), (hybrid, built)
        general = r.recommend(RecQuery(user_id=uid, k=10, model=hybrid, candidates=every))
        assert dense.folded_in and list(dense.item_ids) == list(general.item_ids), (hybrid, uid)
        np.testing.assert_allclose(dense.scores, general.scores, rtol=1e-5, atol=1e-6)
