"""Items a neighbourhood model's evidence does not reach (score exactly 0: no
co-occurrence with the history) are never ranked by index. Before, a user
whose only item was seen by no one else got the catalogue's first items in id
order from itemknn, userknn, rp3beta and EASE, and a hybrid gave such a
component's all-zero row the full weight of its first 100 items.

The reference here is independent of the models: which items co-occur with a
history in the training data, and the training counts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recserve.cli import main
from recserve.config import Hybrid, ServerConfig
from recserve.feedback import Event, OnlineState
from recserve.models import create
from recserve.models.base import fill_unreached
from recserve.serving import Catalog, RecQuery, Router
from tests.event_logs import events_dataset, popular, zipf_block

SPARSE = ["itemknn", "userknn", "rp3beta", "ease"]
K = 10


def _events() -> list[tuple[str, str]]:
    """A Zipf-popular main block, plus:
    - `lonely` saw `rare`, which no one else saw (reaches nothing);
    - `partial` saw `p`, which co-occurs (through `pal`) with `q1`, `q2` only;
    - `duo` saw `d1`, `d2`, which co-occur with each other only (both seen)."""
    out = zipf_block(7)
    out += [("lonely", "rare"), ("partial", "p"), ("pal", "p"), ("pal", "q1"), ("pal", "q2")]
    out += [("duo", "d1"), ("duo", "d2")]
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return events_dataset(tmp_path_factory.mktemp("unreached") / "events.csv", _events())


def _router(ds, root: Path, fallback: tuple[str, ...]) -> Router:
    for algo in [*SPARSE, "als", "popularity"]:
        params = {"factors": 8, "iterations": 5} if algo == "als" else {}
        create(algo, **params).fit(ds).save(root, algo, dataset=ds)
    hybrids = {"als+itemknn": Hybrid("als+itemknn", {"als": 0.15, "itemknn": 0.85})}
    cfg = ServerConfig(models=str(root), hybrids=hybrids, fallback=fallback)
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(120)
    return Router(cfg, catalog, OnlineState())


@pytest.fixture(scope="module")
def router(ds, tmp_path_factory):
    r = _router(ds, tmp_path_factory.mktemp("models"), ("popularity",))
    yield r
    r.catalog.close()


@pytest.mark.parametrize("algo", SPARSE)
def test_a_user_whose_history_reaches_nothing_is_answered_as_a_cold_one(router, ds, algo):
    want = popular(ds, {"rare"}, K)
    known = router.recommend(RecQuery(user_id="lonely", k=K, model=algo))
    cold = router.recommend(RecQuery(user_id="new", history=[("rare", 1.0)], k=K, model=algo))
    for got in (known, cold):
        assert got.served_by == "popularity", algo
        assert got.item_ids == want, algo
    # every item it reaches is seen: nothing eligible has evidence either
    duo = router.recommend(RecQuery(user_id="duo", k=K, model=algo))
    assert duo.served_by == "popularity" and duo.item_ids == popular(ds, {"d1", "d2"}, K)


@pytest.mark.parametrize("algo", SPARSE)
def test_unreached_items_fill_an_answer_by_popularity(router, ds, algo):
    reached = {"q1", "q2"}  # what `p` co-occurs with
    for q in (
        RecQuery(user_id="partial", k=K, model=algo),
        RecQuery(user_id="new", history=[("p", 1.0)], k=K, model=algo),
    ):
        got = router.recommend(q)
        assert got.served_by == "", algo
        assert set(got.item_ids[:2]) == reached, algo
        assert all(s > 0 for s in got.scores[:2]) and got.scores[2:] == [0.0] * (K - 2)
        assert got.item_ids[2:] == popular(ds, {"p", *reached}, K - 2), algo
    # exclusions and candidates hold on the filled part too
    top = popular(ds, {"p", *reached}, 3)
    got = router.recommend(RecQuery(user_id="partial", k=K, model=algo, exclude=top[:2]))
    assert got.item_ids[2:] == popular(ds, {"p", *reached, *top[:2]}, K - 2)
    pool = ["q2", top[2], top[0], "i050"]
    got = router.recommend(RecQuery(user_id="partial", k=3, model=algo, candidates=pool))
    assert got.item_ids == ["q2", top[0], top[2]]
    # include_seen: `p` itself is reached (its self-similarity) or filled, never dropped
    got = router.recommend(RecQuery(user_id="partial", k=K, model=algo, include_seen=True))
    assert len(got.item_ids) == K and reached <= set(got.item_ids)


@pytest.mark.parametrize("algo", SPARSE)
def test_the_recommend_command_answers_as_the_server(router, algo, capsys):
    # `recserve recommend` reads the bundle without a server: the same fill, and
    # a user reaching nothing is refused with the reason, not ranked by index.
    models = router.cfg.models
    for who, q in (
        (["--user", "partial"], RecQuery(user_id="partial", k=K, model=algo)),
        (["--history", "p"], RecQuery(user_id="x", history=[("p", 1.0)], k=K, model=algo)),
    ):
        code = main(["recommend", "--models", models, "--name", algo, *who, "--k", str(K)])
        out, err = capsys.readouterr()
        assert code == 0, err
        got = json.loads(out.strip().splitlines()[-1])["items"]
        want = router.recommend(q)
        assert [x["item_id"] for x in got] == want.item_ids, (algo, who)
        assert [x["score"] for x in got] == pytest.approx(want.scores, rel=1e-5), (algo, who)
    for who in (["--user", "lonely"], ["--history", "rare"]):
        code = main(["recommend", "--models", models, "--name", algo, *who, "--k", str(K)])
        _, err = capsys.readouterr()
        assert code == 2 and who[0][2:] + ": " in err and "shares no evidence" in err, (algo, err)


def test_users_with_full_evidence_keep_the_models_ranking(router, ds):
    for algo in SPARSE:
        m = router.catalog.get(algo).model
        for uid in ("u1", "u17", "u300"):
            items, scores = m.recommend([m.users.get(uid)], K)
            got = router.recommend(RecQuery(user_id=uid, k=K, model=algo))
            assert scores[0][-1] > 0 and got.item_ids == m.items.ids(items[0]), (algo, uid)


@pytest.mark.parametrize("dense", [True, False])
def test_a_hybrid_takes_only_the_items_a_component_reached(router, ds, dense):
    real = router._hybrid_dense
    if not dense:
        router._hybrid_dense = lambda *a: None  # type: ignore[method-assign]
    try:
        # itemknn reaches nothing for `lonely`: the blend is ALS's ranking alone,
        # not ALS re-ranked inside itemknn's first 100 items by index
        got = router.recommend(RecQuery(user_id="lonely", k=K, model="als+itemknn"))
        als = router.recommend(RecQuery(user_id="lonely", k=K, model="als"))
        assert got.served_by == "" and got.version.startswith("als@")
        assert got.item_ids == als.item_ids
        # `partial`: itemknn's candidates are q1 and q2 alone, each ahead of ALS's picks
        got = router.recommend(RecQuery(user_id="partial", k=K, model="als+itemknn"))
        assert set(got.item_ids[:2]) == {"q1", "q2"}
        assert (
            got.item_ids[2:]
            == [i for i in als_for(router, "partial") if i not in {"q1", "q2"}][: K - 2]
        )
    finally:
        router._hybrid_dense = real  # type: ignore[method-assign]


def als_for(router: Router, uid: str) -> list[str]:
    return router.recommend(RecQuery(user_id=uid, k=K + 2, model="als")).item_ids


def test_similar_items_are_only_the_ones_that_share_evidence(ds, tmp_path):
    router = _router(ds, tmp_path, ())  # no fallback with an item similarity
    try:
        for algo in ("itemknn", "rp3beta"):
            got = router.similar("p", K, algo)
            assert set(got.item_ids) == {"q1", "q2"} and min(got.scores) > 0, algo
            # known, similar to nothing: an empty answer, not NOT_FOUND or index order
            got = router.similar("rare", K, algo)
            assert got.item_ids == [] and got.served_by == "", algo
        got = router.similar("rare", K, "als+itemknn")  # ALS still places it
        assert len(got.item_ids) == K and got.version.startswith("als@")
    finally:
        router.catalog.close()


def test_the_last_resort_never_offers_what_the_user_has_seen(ds, tmp_path):
    # No model of the chain serves a history that reaches nothing eligible; the
    # builtin popularity answers, and like a model it leaves out the items of
    # the inline and the recorded history (it once ranked them first).
    router = _router(ds, tmp_path, ())
    try:
        router.online.apply([Event("back", "d1", 1.0, 0)])
        n = len(ds.items)
        for algo in SPARSE:
            for q in (
                RecQuery(user_id="new", history=[("d1", 1.0), ("d2", 1.0)], k=n, model=algo),
                RecQuery(user_id="back", history=[("d2", 1.0)], k=n, model=algo),
            ):
                got = router.recommend(q)
                assert got.served_by.startswith("builtin-popularity:"), algo
                assert got.item_ids == popular(ds, {"d1", "d2"}, n), algo
                got = router.recommend(replace(q, include_seen=True))  # whoever answers
                assert {"d1", "d2"} <= set(got.item_ids), algo
        # a known user's training items, as before
        got = router.recommend(RecQuery(user_id="duo", k=n, model="itemknn"))
        assert got.item_ids == popular(ds, {"d1", "d2"}, n)
    finally:
        router.catalog.close()


@pytest.mark.parametrize("seed", range(6))
def test_the_fill_takes_the_most_popular_unreached_items(seed):
    # Against the plain reference: every item of the popularity order scored
    # exactly 0, first ones first. Rows where the popular head is mostly
    # reached or not eligible make the fill read past its first prefix.
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 5000))
    k = int(rng.integers(1, min(300, n // 2)))
    row = np.zeros(n, np.float32)
    order = rng.permutation(n)
    # the popular head: seen (NaN) or disliked (< 0), so no zero to fill with
    head = order[: int(rng.integers(0, n // 2))]
    row[head] = rng.choice([np.nan, -0.25], head.size, p=[0.8, 0.2])
    # fewer reached (> 0) items than k, anywhere: the rest of the answer is filled
    row[rng.choice(n, int(rng.integers(0, k)), replace=False)] = rng.uniform(0.1, 1, 1)
    elig = np.flatnonzero(~np.isnan(row))
    top = elig[np.lexsort((elig, -row[elig]))][:k]
    scores = row[top]
    if not (scores > 0).any():
        assert fill_unreached(top.astype(np.int32), scores, row, order) is None
        return
    got_items, got_scores = fill_unreached(top.astype(np.int32), scores, row, order)
    pos = int((scores > 0).sum())
    zeros = order[row[order] == 0]
    negs = top[scores < 0]
    want = np.concatenate([top[:pos], zeros, negs])[: top.size]
    assert got_items.tolist() == want.tolist()
    assert got_scores.tolist() == row[want].tolist()


@pytest.mark.parametrize("n", [40, 3000])
def test_the_blend_kernel_takes_only_positive_entries_where_asked(n):
    # Reference: blend_rows (numpy) over each row's n_cand best entries, taken
    # among the entries > 0 for the rows flagged positive.
    from recserve.serving.blend import blend_dense, blend_rows

    rng = np.random.default_rng(n)
    rows = rng.standard_normal((3, n)).astype(np.float32)
    rows[0, rng.random(n) < 0.9] = 0.0  # a sparse row: few reached items
    rows[1, rng.random(n) < 0.1] = np.nan
    rows[2] = 0.0  # reached nothing
    weights = [0.5, 0.3, 0.2]
    for positive in ([1, 0, 1], [1, 1, 1], [0, 0, 0]):
        for n_cand, k in ((10, 5), (100, 10), (n, n)):
            parts = []
            for c in range(3):
                r = rows[c]
                ok = ~np.isnan(r) & ((r > 0) if positive[c] else True)
                idx = np.flatnonzero(ok)
                idx = idx[np.lexsort((idx, -r[idx]))][:n_cand]
                if idx.size:
                    parts.append((weights[c], idx, r[idx]))
            want_i, want_s = blend_rows(parts, k, n)
            got_i, got_s, counts = blend_dense(
                rows, weights, n_cand, k, np.array(positive, np.uint8)
            )
            np.testing.assert_array_equal(got_i, want_i)
            np.testing.assert_allclose(got_s, want_s, rtol=1e-12)
            if positive[2]:
                assert counts[2] == 0
    with pytest.raises(ValueError, match="positive"):
        blend_dense(rows, weights, 10, 5, np.ones(2, np.uint8))


def test_hybrid_tuning_blends_only_the_reached_items_as_the_server(ds):
    import scipy.sparse as sp

    from recserve import tuning
    from recserve.evaluation import Split

    users = [ds.users.get(u) for u in ("lonely", "partial", "u3")]
    held = ds.items.index(["i199", "i199", "i000"])
    test = sp.csr_matrix((np.ones(3), (users, held)), shape=ds.interactions.shape)
    models = {"itemknn": create("itemknn"), "als": create("als", factors=8, iterations=5)}
    cands = tuning.candidates(models, Split(ds, test), 20)
    knn = cands.items[0]
    assert (knn[0] == -1).all()  # lonely: itemknn reaches nothing
    assert set(ds.items.ids(knn[1][knn[1] >= 0])) == {"q1", "q2"}
    assert (knn[2] >= 0).all()  # a user of the main block: 20 reached items
    assert (cands.items[1] >= 0).all()  # ALS scores everything


@pytest.mark.parametrize("algo", SPARSE)
def test_offline_evaluation_scores_the_answers_the_service_gives(router, ds, algo):
    # evaluate() (and so tune and the below-popularity warning) ranks what a
    # client would get: the router's answer, user for user, known and folded in.
    from recserve.evaluation import as_served

    m = router.catalog.get(algo).model
    users = np.arange(m.n_users)
    recs, scores = m.recommend(users, K)
    got = as_served(m, recs, scores, users=users)
    hist = m.history_matrix([m.items.index(["p"]), m.items.index(["rare"])], [[1.0], [1.0]])
    h_recs, h_scores = m.recommend_histories(hist, K)
    got_h = as_served(m, h_recs, h_scores, histories=hist)
    changed = 0
    for u in users:
        want = router.recommend(RecQuery(user_id=m.users.ids([u])[0], k=K, model=algo))
        assert m.items.ids(got[u][got[u] >= 0]) == want.item_ids, (algo, u)
        changed += not np.array_equal(got[u], recs[u])
    assert changed >= 3  # lonely, partial, duo at least
    for r, item in enumerate(["p", "rare"]):
        want = router.recommend(RecQuery(user_id="", history=[(item, 1.0)], k=K, model=algo))
        assert m.items.ids(got_h[r][got_h[r] >= 0]) == want.item_ids, (algo, item)
