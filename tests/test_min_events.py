"""`min_events`: a user (or an inline history) with fewer events than the
model's gate is answered by the fallbacks, as a cold user is. On sparse logs
ALS and the neighbourhood models rank users with one to a few events below
popularity (docs/algorithms.md, "Users with few events"); `tune` learns the
gate on the validation split.

References are independent of the models: training counts for popularity,
sets of held-out items for the per-user metrics."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from recserve import tuning
from recserve.cli import main
from recserve.config import Hybrid, ServerConfig
from recserve.data import generate, to_dataset
from recserve.evaluation import as_served, evaluate, ranking_metrics, user_metrics
from recserve.feedback import Event, OnlineState
from recserve.models import bundle, create
from recserve.serving import Catalog, RecQuery, Router
from recserve.tuning import (
    NEW_USER_EVENTS,
    NEW_USER_MAX,
    NEW_USER_SHARE,
    learn_min_events,
    new_user_histories,
    splits,
    tune,
)
from tests.event_logs import events_dataset, popular, zipf_block

K = 10
ALS = {"factors": 8, "iterations": 5}


def _events() -> list[tuple[str, str]]:
    """A Zipf-popular main block of 600 users with 10 events each, plus `one`
    (1 event), `two` and `two_b` (2 events) and `three` (3 events)."""
    out = zipf_block(11)
    out += [("one", "i150"), ("two", "i150"), ("two", "i120"), ("two_b", "i150")]
    out += [("two_b", "i120"), ("three", "i150"), ("three", "i120"), ("three", "i100")]
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return events_dataset(tmp_path_factory.mktemp("gate") / "events.csv", _events())


@pytest.fixture(scope="module")
def router(ds, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, algo, params in (
        ("als", "als", ALS),
        ("als3", "als", {**ALS, "min_events": 3}),
        ("knn3", "itemknn", {"min_events": 3}),
        ("alsh", "als", {**ALS, "min_history": 3}),  # inline histories only
        ("alsk", "als", {**ALS, "min_events": 3, "min_history": 0}),  # known users only
        ("alsp", "als", {**ALS, "history_prior": 2.0}),
        ("knnp", "itemknn", {"history_prior": 1.0}),
        ("alsu", "als", {**ALS, "user_prior": 2.0}),
        ("knnu", "itemknn", {"user_prior": 1.0}),
        ("alsu_ivf", "als", {**ALS, "user_prior": 2.0, "index": "ivf", "nprobe": 64}),
        ("popularity", "popularity", {}),
    ):
        create(algo, **params).fit(ds).save(root, name, dataset=ds)
    hybrids = {
        "blend": Hybrid("blend", {"als3": 0.5, "als": 0.5}),
        "blendh": Hybrid("blendh", {"alsh": 0.5, "als": 0.5}),
        "blendh2": Hybrid("blendh2", {"als": 0.5, "alsh": 0.5}),  # the gated one second
        "blendp": Hybrid("blendp", {"alsp": 0.6, "knnp": 0.4}),
    }
    cfg = ServerConfig(models=str(root), hybrids=hybrids, fallback=("popularity",))
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(120)
    r = Router(cfg, catalog, OnlineState())
    yield r
    catalog.close()


def own(router: Router, name: str, uid: str) -> list[str]:
    """The model's own ranking of a known user (no gate on this call)."""
    m = router.catalog.get(name).model
    items, _ = m.recommend([m.users.get(uid)], K)
    return m.items.ids(items[0][items[0] >= 0])


@pytest.mark.parametrize("name", ["als3", "knn3"])
def test_a_known_user_below_the_gate_is_answered_by_the_fallback(router, ds, name):
    for uid, seen in (("one", {"i150"}), ("two", {"i150", "i120"})):
        got = router.recommend(RecQuery(user_id=uid, k=K, model=name))
        assert got.served_by == "popularity", (name, uid)
        assert got.item_ids == popular(ds, seen, K), (name, uid)
        assert router.plain_target(RecQuery(user_id=uid, k=K, model=name)) is None
    for uid in ("three", "u5"):
        got = router.recommend(RecQuery(user_id=uid, k=K, model=name))
        assert got.served_by == "" and got.item_ids == own(router, name, uid), (name, uid)
    assert router.plain_target(RecQuery(user_id="u5", k=K, model=name)) is not None
    # a model without a gate serves them all
    got = router.recommend(RecQuery(user_id="one", k=K, model="als"))
    assert got.served_by == "" and got.item_ids == own(router, "als", "one")


@pytest.mark.parametrize("name", ["als3", "knn3"])
def test_an_inline_history_below_the_gate_is_answered_by_the_fallback(router, ds, name):
    short = [("i150", 1.0), ("i120", 1.0)]
    got = router.recommend(RecQuery(user_id="new", history=short, k=K, model=name))
    assert got.served_by == "popularity" and got.item_ids == popular(ds, {"i150", "i120"}, K)
    # dislikes are no evidence: two likes and a dislike are still two
    mixed = [*short, ("i100", -1.0)]
    got = router.recommend(RecQuery(user_id="new", history=mixed, k=K, model=name))
    assert got.served_by == "popularity"
    full = [*short, ("i100", 1.0)]
    got = router.recommend(RecQuery(user_id="new", history=full, k=K, model=name))
    m = router.catalog.get(name).model
    items, _ = m.recommend_from_history(m.items.index(["i150", "i120", "i100"]), k=K)
    assert got.served_by == "" and got.item_ids == m.items.ids(items)


@pytest.mark.parametrize("dense", [True, False])
def test_inline_histories_and_known_users_have_their_own_gates(router, ds, dense):
    short = [("i150", 1.0), ("i120", 1.0)]

    def folded(name: str) -> list[str]:
        m = router.catalog.get(name).model
        items, _ = m.recommend_from_history(m.items.index(["i150", "i120"]), k=K)
        return m.items.ids(items)

    # min_history 3 (min_events 0): the two-item history goes down the chain,
    # the known user with two events does not
    got = router.recommend(RecQuery(user_id="new", history=short, k=K, model="alsh"))
    assert got.served_by == "popularity" and got.item_ids == popular(ds, {"i150", "i120"}, K)
    got = router.recommend(RecQuery(user_id="two", k=K, model="alsh"))
    assert got.served_by == "" and got.item_ids == own(router, "alsh", "two")
    # min_events 3, min_history 0: the other way round
    got = router.recommend(RecQuery(user_id="two", k=K, model="alsk"))
    assert got.served_by == "popularity" and got.item_ids == popular(ds, {"i150", "i120"}, K)
    got = router.recommend(RecQuery(user_id="new", history=short, k=K, model="alsk"))
    assert got.served_by == "" and got.item_ids == folded("alsk")
    # a hybrid (dense path and general path) blends the history without alsh,
    # whichever its place among the components
    real = router._hybrid_dense
    if not dense:
        router._hybrid_dense = lambda *a: None  # type: ignore[method-assign]
    try:
        for name in ("blendh", "blendh2"):
            got = router.recommend(RecQuery(user_id="new", history=short, k=K, model=name))
            assert "alsh@" not in got.version and got.version.startswith("als@"), name
            assert got.item_ids == folded("als")
            got = router.recommend(RecQuery(user_id="two", k=K, model=name))
            assert "alsh@" in got.version and "als@" in got.version
    finally:
        router._hybrid_dense = real  # type: ignore[method-assign]


def test_events_recorded_since_training_count_toward_the_gate(router):
    router = Router(router.cfg, router.catalog, OnlineState())  # its own recorded events
    q = RecQuery(user_id="two_b", k=K, model="als3")
    assert router.recommend(q).served_by == "popularity"
    router.online.apply([Event("two_b", "i100", 1.0, 0)])
    got = router.recommend(q)
    assert got.served_by == "" and got.folded_in
    assert not {"i150", "i120", "i100"} & set(got.item_ids)


@pytest.mark.parametrize("dense", [True, False])
def test_a_hybrid_blends_without_a_gated_component(router, dense):
    real = router._hybrid_dense
    if not dense:
        router._hybrid_dense = lambda *a: None  # type: ignore[method-assign]
    try:
        got = router.recommend(RecQuery(user_id="two", k=K, model="blend"))
        assert got.served_by == "" and got.version.startswith("als@")
        assert "als3@" not in got.version
        assert got.item_ids == own(router, "als", "two")
        both = router.recommend(RecQuery(user_id="u5", k=K, model="blend"))
        assert "als3@" in both.version and "als@" in both.version
    finally:
        router._hybrid_dense = real  # type: ignore[method-assign]


def test_the_recommend_command_refuses_a_user_below_the_gate(router, capsys):
    models = router.cfg.models
    for who in (["--user", "two"], ["--history", "i150,i120"]):
        code = main(["recommend", "--models", models, "--name", "als3", *who, "--k", str(K)])
        _, err = capsys.readouterr()
        gate = "min_events=3" if who[0] == "--user" else "min_history=3"  # -1: as min_events
        assert code == 2 and gate in err and "2 event(s)" in err, err
    code = main(["recommend", "--models", models, "--name", "als3", "--user", "three"])
    out, err = capsys.readouterr()
    assert code == 0, err
    got = [x["item_id"] for x in json.loads(out.strip().splitlines()[-1])["items"]]
    assert got == own(router, "als3", "three")


def test_offline_answers_are_the_ones_the_service_gives(router, ds):
    m = router.catalog.get("als3").model
    users = np.arange(m.n_users)
    recs, scores = m.recommend(users, K)
    got = as_served(m, recs, scores, users=users)
    for u in users:
        uid = m.users.ids([u])[0]
        want = router.recommend(RecQuery(user_id=uid, k=K, model="als3"))
        assert m.items.ids(got[u][got[u] >= 0]) == want.item_ids, uid
    rows = [m.items.index(["i150", "i120"]), m.items.index(["i150", "i120", "i100"])]
    hist = m.history_matrix(rows, [[1.0, 1.0], [1.0, 1.0, 1.0]])
    h_recs, h_scores = m.recommend_histories(hist, K)
    got_h = as_served(m, h_recs, h_scores, histories=hist)
    assert m.items.ids(got_h[0]) == popular(ds, {"i150", "i120"}, K)
    assert np.array_equal(got_h[1], h_recs[1])


def _blend_reference(scores: np.ndarray, counts: np.ndarray, w: float, reached_only: bool):
    """Each eligible item's blended score (NaN: not eligible), computed from
    the definition: per component, its best max(3k, 100) eligible items (ties
    by lower index; only scores > 0 for a sparse model) min-max normalised
    (all equal: 1), weighted (1 - w, w) and summed; items in neither: 0."""
    eligible = ~np.isnan(scores)
    total = np.where(eligible, 0.0, np.nan)
    n_cand = min(max(3 * K, 100), scores.size)
    for part, weight, only_positive in ((scores, 1 - w, reached_only), (counts, w, False)):
        ok = eligible & (part > 0 if only_positive else True)
        idx = np.flatnonzero(ok)
        best = idx[np.lexsort((idx, -part[idx]))][:n_cand]
        if best.size == 0:
            continue
        lo, hi = part[best].min(), part[best].max()
        total[best] += weight * ((part[best] - lo) / (hi - lo) if hi > lo else 1.0)
    return total


@pytest.mark.parametrize("name", ["alsp", "knnp"])
def test_a_new_users_history_is_blended_with_popularity_under_history_prior(
    router, ds, name, capsys
):
    m = router.catalog.get(name).model
    short = ["i150", "i120"]
    got = router.recommend(
        RecQuery(user_id="new", history=[(i, 1.0) for i in short], k=K, model=name)
    )
    assert got.served_by == "" and len(got.item_ids) == K
    # the model's own scores for every item, through its full ranking
    row = m.history_matrix([m.items.index(short)])
    items, scores = m.recommend_histories(row, m.n_items)
    own_scores = np.full(m.n_items, np.nan)
    keep = items[0] >= 0
    own_scores[items[0][keep]] = scores[0][keep]
    counts = np.bincount(ds.interactions.indices, minlength=m.n_items).astype(float)
    c = m.params["history_prior"]
    want = _blend_reference(own_scores, counts, c / (c + 2), m.sparse_scores)
    served = m.items.index(got.item_ids)
    assert np.allclose(got.scores, want[served], atol=1e-5)
    others = np.setdiff1d(np.flatnonzero(~np.isnan(want)), served)
    assert want[served].min() >= want[others].max() - 1e-5  # the k best blended items
    # popularity reached items the model did not: the blend is neither answer alone
    assert got.item_ids != popular(ds, set(short), K)
    # a known user is served by the model as before
    known = router.recommend(RecQuery(user_id="u5", k=K, model=name))
    assert known.served_by == "" and known.item_ids == own(router, name, "u5")
    # offline (evaluate, tune) and the CLI answer the history the same way
    recs, sc = m.recommend_histories(row, K)
    assert m.items.ids(as_served(m, recs, sc, histories=row)[0]) == got.item_ids
    args = ["recommend", "--models", router.cfg.models, "--name", name, "--history", "i150,i120"]
    assert main([*args, "--k", str(K)]) == 0
    out, _ = capsys.readouterr()
    assert [x["item_id"] for x in json.loads(out.strip().splitlines()[-1])["items"]] == got.item_ids


@pytest.mark.parametrize("name", ["alsu", "knnu"])
def test_a_known_users_answer_is_blended_with_popularity_under_user_prior(router, ds, name, capsys):
    m = router.catalog.get(name).model
    counts = np.bincount(ds.interactions.indices, minlength=m.n_items).astype(float)
    c = m.params["user_prior"]
    plain = "als" if name == "alsu" else None
    for uid in ("one", "two", "three", "u5"):
        u = m.users.get(uid)
        got = router.recommend(RecQuery(user_id=uid, k=K, model=name))
        assert got.served_by == "" and len(got.item_ids) == K
        # the plain request's path (Router._plain) and the general one agree
        assert router.plain_target(RecQuery(user_id=uid, k=K, model=name)) is not None
        general = router.recommend(RecQuery(user_id=uid, k=K, model=name, explain=True))
        assert general.item_ids == got.item_ids and np.allclose(general.scores, got.scores)
        items, scores = m.recommend([u], m.n_items)  # the model's own full ranking
        own_scores = np.full(m.n_items, np.nan)
        keep = items[0] >= 0
        own_scores[items[0][keep]] = scores[0][keep]
        n = m.user_items[u].nnz  # every value here is a like
        want = _blend_reference(own_scores, counts, c / (c + n), m.sparse_scores)
        served = m.items.index(got.item_ids)
        assert np.allclose(got.scores, want[served], atol=1e-5), uid
        others = np.setdiff1d(np.flatnonzero(~np.isnan(want)), served)
        assert want[served].min() >= want[others].max() - 1e-5  # the k best blended items
        # offline (evaluate, tune) and the CLI answer the user the same way
        recs, sc = m.recommend([u], K)
        assert m.items.ids(as_served(m, recs, sc, users=np.array([u]))[0]) == got.item_ids
        args = ["recommend", "--models", router.cfg.models, "--name", name, "--user", uid]
        assert main([*args, "--k", str(K)]) == 0
        out, _ = capsys.readouterr()
        line = json.loads(out.strip().splitlines()[-1])
        assert [x["item_id"] for x in line["items"]] == got.item_ids
    # the blend moves a one-event user's answer (the same ALS without a
    # prior ranks otherwise), and a new user's history is answered without
    # it (history_prior 0)
    if plain is not None:
        a = router.recommend(RecQuery(user_id="one", k=K, model=name)).item_ids
        assert a != router.recommend(RecQuery(user_id="one", k=K, model=plain)).item_ids
        h = [("i150", 1.0), ("i120", 1.0)]
        a = router.recommend(RecQuery(user_id="new", history=h, k=K, model=name))
        b = router.recommend(RecQuery(user_id="new", history=h, k=K, model=plain))
        assert a.item_ids == b.item_ids


def test_a_user_prior_does_not_apply_through_an_approximate_index(router):
    """An IVF model has no dense row to blend: its known users are answered by
    its own ranking on the plain path and the general one alike, and the
    plain request stays batchable (Router.plain_prior 0)."""
    m = router.catalog.get("alsu_ivf").model
    assert m.item_index is not None and m.params["user_prior"] == 2.0
    assert Router.plain_prior(router.catalog.get("alsu_ivf")) == 0.0
    assert Router.plain_prior(router.catalog.get("alsu")) == 2.0
    for uid in ("one", "three", "u5"):
        got = router.recommend(RecQuery(user_id=uid, k=K, model="alsu_ivf"))
        assert got.served_by == "" and got.item_ids == own(router, "alsu_ivf", uid)
        general = router.recommend(RecQuery(user_id=uid, k=K, model="alsu_ivf", explain=True))
        assert general.item_ids == got.item_ids


def test_a_hybrid_blends_its_components_without_their_history_prior(router):
    history = [("i150", 1.0), ("i120", 1.0), ("i100", 1.0)]
    q = RecQuery(user_id="new", history=history, k=K, model="blendp")
    dense = router.recommend(q)  # the dense path blends the components' own rows
    real = router._hybrid_dense
    router._hybrid_dense = lambda *a: None  # type: ignore[method-assign]
    try:
        general = router.recommend(q)
    finally:
        router._hybrid_dense = real  # type: ignore[method-assign]
    assert general.item_ids == dense.item_ids and np.allclose(general.scores, dense.scores)


def _reference(recs: np.ndarray, relevant: list[set[int]], k: int) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {"recall": [], "ndcg": [], "hit_rate": [], "mrr": []}
    for row, rel in zip(recs, relevant, strict=True):
        top = [int(i) for i in row[:k] if i >= 0]
        hits = [i in rel for i in top]
        out["recall"].append(sum(hits) / min(k, len(rel)))
        dcg = sum(1 / np.log2(r + 2) for r, h in enumerate(hits) if h)
        out["ndcg"].append(dcg / sum(1 / np.log2(r + 2) for r in range(min(k, len(rel)))))
        out["hit_rate"].append(float(any(hits)))
        first = [i for i, x in enumerate(row) if x >= 0 and int(x) in rel]
        out["mrr"].append(1 / (first[0] + 1) if first else 0.0)
    return {n: np.array(v) for n, v in out.items()}


def test_per_user_metrics_match_a_reference_and_average_to_the_means():
    import scipy.sparse as sp

    rng = np.random.default_rng(3)
    n_users, n_items, k = 40, 30, 5
    recs = np.stack([rng.permutation(n_items)[:8] for _ in range(n_users)])
    recs[::7, 6:] = -1  # short lists
    relevant = [set(rng.choice(n_items, rng.integers(1, 6), replace=False)) for _ in recs]
    rows = [sorted(r) for r in relevant]
    test = sp.csr_matrix(
        (
            np.ones(sum(map(len, rows))),
            np.concatenate(rows),
            np.r_[0, np.cumsum(list(map(len, rows)))],
        ),
        shape=(n_users, n_items),
    )
    per_user, coverage = user_metrics(recs, test, [k], n_items)
    want = _reference(recs, relevant, k)
    for name in ("recall", "ndcg", "hit_rate"):
        assert per_user[f"{name}@{k}"] == pytest.approx(want[name]), name
    assert per_user["mrr"] == pytest.approx(want["mrr"])
    means = ranking_metrics(recs, test, [k], n_items)
    assert means[f"ndcg@{k}"] == pytest.approx(want["ndcg"].mean())
    assert means[f"coverage@{k}"] == coverage[f"coverage@{k}"]


@pytest.fixture(scope="module")
def sparse_log():
    """Three events per user on average: ALS ranks its one- and two-event users
    below popularity here."""
    return to_dataset(generate(6000, 3000, 18000, seed=2, zipf=1.1))


def test_tune_learns_a_gate_that_holds_on_the_held_out_test(sparse_log):
    outer, inner = splits(sparse_log, "random", 0.2, 0, 1)
    gate = learn_min_events("als", ALS, inner, "ndcg@20", 20, None, known_prior=False)
    assert gate["min_events"] > 1 and 0 < gate["gated"] < gate["users"]
    assert gate["gated_value"] > gate["value"]
    # the gate learned on validation also raises the test figure, which never saw it
    plain = evaluate(create("als", **ALS), sparse_log, "random", [20], split=outer)
    gated = create("als", **ALS, min_events=gate["min_events"])
    with_gate = evaluate(gated, sparse_log, "random", [20], split=outer)
    assert with_gate["metrics"]["ndcg@20"] > plain["metrics"]["ndcg@20"]


def test_no_gate_where_the_model_beats_popularity_for_everyone():
    dense = to_dataset(generate(1000, 500, 30000, seed=21, zipf=0.9))
    _, inner = splits(dense, "random", 0.2, 0, 1)
    for algo, params in (("als", ALS), ("itemknn", {})):
        gate = learn_min_events(algo, params, inner, "ndcg@20", 20, None)
        assert gate["min_events"] == 0 and gate["gated"] == 0, algo
    assert learn_min_events("popularity", {}, inner, "ndcg@20", 20, None)["min_events"] == 0
    assert learn_min_events("svd", {}, inner, "rmse", 20, None)["min_events"] == 0


def test_new_user_histories_hold_whole_users_out_of_training(sparse_log):
    m = sparse_log.interactions.tocsr()
    train, events, relevant = new_user_histories(sparse_log, threshold=4.0)
    t = train.interactions.tocsr()
    before, after = np.diff(m.indptr), np.diff(t.indptr)
    held = np.flatnonzero(after != before)
    assert (after[held] == 0).all() and (before[held] >= NEW_USER_EVENTS).all()
    pool = int((before >= NEW_USER_EVENTS).sum())
    assert held.size == len(events) == min(NEW_USER_MAX, int(pool * NEW_USER_SHARE))
    others = np.setdiff1d(np.arange(m.shape[0]), held)
    assert (m[others] != t[others]).nnz == 0 and train.timestamps.size == t.nnz
    for u, (items, values), rel in zip(held, events, relevant, strict=True):
        row = m[u]
        assert sorted(items) == sorted(row.indices)  # every event, in random order
        assert (values == row.toarray()[0, items]).all()
        assert (rel == (values >= 4.0)).all()
    assert new_user_histories(to_dataset(generate(40, 50, 300, seed=1)), None) is None  # too few
    # by_time (temporal protocol): the same users, each one's events oldest first
    timed = new_user_histories(sparse_log, threshold=4.0, by_time=True)
    assert (timed[0].interactions != t).nnz == 0
    stamps = sparse_log.timestamps
    for u, (items, _), (same, _) in zip(held, timed[1], events, strict=True):
        assert sorted(items) == sorted(same)
        when = stamps[m.indptr[u] : m.indptr[u + 1]][np.searchsorted(m[u].indices, items)]
        assert (np.diff(when) >= 0).all()


def test_tune_folds_new_users_in_from_their_oldest_events_when_temporal(
    sparse_log, tmp_path, monkeypatch
):
    seen = []
    real = tuning.new_user_histories

    def spy(ds, threshold, seed=0, by_time=False):
        seen.append(by_time)
        return real(ds, threshold, seed, by_time)

    monkeypatch.setattr(tuning, "new_user_histories", spy)
    for protocol in ("temporal", "random"):
        tune(
            sparse_log,
            ["als"],
            name=protocol,
            models_dir=tmp_path,
            trials=1,
            fixed=ALS,
            protocol=protocol,
        )
    assert seen == [True, False]


def _heavy_users(lo: int):
    """sparse_log's users with `lo` or more events only: the validation users'
    counts never go as low as a new user's one- or two-item history."""
    syn = generate(6000, 3000, 18000, seed=2, zipf=1.1)
    keep = np.bincount(syn.users, minlength=syn.n_users)[syn.users] >= lo
    return to_dataset(
        dataclasses.replace(
            syn,
            users=syn.users[keep],
            items=syn.items[keep],
            ratings=syn.ratings[keep],
            timestamps=syn.timestamps[keep],
        )
    )


def test_new_users_from_short_histories_set_a_gate_the_validation_users_cannot():
    ds = _heavy_users(7)
    # users the learning never sees, to check its choice on
    rest, events, _ = new_user_histories(ds, None, seed=1)
    _, inner = splits(rest, "random", 0.2, 0, 1)
    alone = learn_min_events("als", ALS, inner, "ndcg@20", 20, None, new_users=False)
    assert alone["min_events"] == 0 and alone["min_history"] == -1 and not alone["new_histories"]
    gate = learn_min_events("als", ALS, inner, "ndcg@20", 20, None)
    assert gate["min_events"] == 0 and gate["gated"] == 0  # the known users keep the model
    assert gate["gated_value"] == gate["value"]
    assert gate["min_history"] >= 2 and 0 < gate["new_gated"] <= gate["new_histories"]
    assert gate["new_gated_value"] > gate["new_value"]
    # the held-out users, folded in from one event: the gate answers them with
    # the most popular items (counted here) and that recalls more of the rest
    model = create("als", **ALS, min_history=gate["min_history"]).fit(rest)
    counts = np.bincount(rest.interactions.indices, minlength=rest.n_items)
    order = np.lexsort((np.arange(counts.size), -counts))
    rows = model.history_matrix([items[:1] for items, _ in events])
    recs, scores = model.recommend_histories(rows, 20)
    served = as_served(model, recs, scores, histories=rows)
    recall = {"model": [], "served": []}
    for r, (items, _) in enumerate(events):
        truth = set(items[1:].tolist())
        assert served[r].tolist() == [i for i in order if i != items[0]][:20]
        for name, got in (("model", recs[r]), ("served", served[r])):
            recall[name].append(len(truth & set(got.tolist())) / min(20, len(truth)))
    assert np.mean(recall["served"]) > np.mean(recall["model"])


def test_tune_learns_a_history_prior_that_beats_model_and_popularity_for_new_users():
    ds = to_dataset(generate(3000, 1500, 45000, seed=4, zipf=1.1))
    rest, events, _ = new_user_histories(ds, None, seed=1)  # never seen by the learning
    _, inner = splits(rest, "random", 0.2, 0, 1)
    gate = learn_min_events("als", ALS, inner, "ndcg@20", 20, None, known_prior=False)
    assert gate["history_prior"] > 0 and gate["min_history"] == 0
    assert gate["new_gated_value"] > gate["new_value"]
    assert gate["gated_value"] == gate["value"]  # known users: untouched
    model = create("als", **ALS, history_prior=gate["history_prior"]).fit(rest)
    counts = np.bincount(rest.interactions.indices, minlength=rest.n_items)
    order = np.lexsort((np.arange(counts.size), -counts))
    for h in (1, 2, 3):  # the held-out users folded in from h events
        use = [items for items, _ in events if items.size > h]
        rows = model.history_matrix([items[:h] for items in use])
        recs, scores = model.recommend_histories(rows, 20)
        served = as_served(model, recs, scores, histories=rows)
        recall: dict[str, list[float]] = {"model": [], "served": [], "popularity": []}
        for r, items in enumerate(use):
            truth, seen = set(items[h:].tolist()), set(items[:h].tolist())
            pop = [i for i in order if i not in seen][:20]
            for name, got in (("model", recs[r]), ("served", served[r]), ("popularity", pop)):
                recall[name].append(
                    len(truth & set(np.asarray(got).tolist())) / min(20, len(truth))
                )
        mean = {name: np.mean(v) for name, v in recall.items()}
        assert mean["served"] > max(mean["model"], mean["popularity"]), (h, mean)


def test_the_prior_is_learned_on_a_sample_of_histories_past_a_catalogue_budget(monkeypatch):
    ds = to_dataset(generate(3000, 1500, 45000, seed=4, zipf=1.1))
    rest, events, _ = new_user_histories(ds, None, seed=1)
    model = create("als", **ALS).fit(rest)
    use = [items for items, _ in events if items.size > 2][:300]
    rows = model.history_matrix([items[:2] for items in use])
    truth = model.history_matrix([items[2:] for items in use])
    whole = tuning._prior_metrics(model, rows, truth, "ndcg@20", 20)
    assert whole is not None and not np.isnan(whole).any()
    monkeypatch.setattr(tuning, "PRIOR_CELLS", 120 * model.n_items)
    part = tuning._prior_metrics(model, rows, truth, "ndcg@20", 20)
    scored = ~np.isnan(part[0])
    assert scored.sum() == 120 and scored[0] and scored[-1]  # evenly spaced, ends included
    assert (np.isnan(part) == ~scored).all()
    assert np.allclose(part[:, scored], whole[:, scored])
    # the choice reads the scored rows only
    gated = whole[0] - 1.0  # a gate far worse than any prior
    assert tuning._learn_prior(gated, part) == (
        tuning.PRIOR_GRID[int(np.argmax(whole[:, scored].mean(axis=1)))],
        int(np.argmax(whole[:, scored].mean(axis=1))),
    )


def test_algorithms_are_compared_with_a_prior_that_changed_the_validation_histories():
    r = tuning.AlgoResult("als", best_value=0.40)
    r.gate = {"gated": 0, "value": 0.40, "gated_value": 0.40}  # nothing changed
    assert r.served_value() == 0.40
    r.gate = {"gated": 0, "value": 0.40, "gated_value": 0.43}  # users protocol, blended
    assert r.served_value() == pytest.approx(0.43)
    r.gate = {"gated": 12, "value": 0.40, "gated_value": 0.41}  # a gate
    assert r.served_value() == pytest.approx(0.41)


def test_tune_publishes_the_learned_gate_and_keeps_a_given_one(sparse_log, tmp_path, caplog):
    params = {**ALS, "user_prior": 0.0}  # given: the gate is what is learned for known users
    with caplog.at_level(logging.INFO, logger="recserve.tuning"):
        out = tune(sparse_log, ["als"], name="t", models_dir=tmp_path, trials=1, fixed=params)
    doc = bundle.read_manifest(bundle.resolve(tmp_path, "t"))
    learned = doc["tuning"]["min_events"]["min_events"]
    assert learned > 1 and out["params"]["min_events"] == learned
    assert doc["params"]["min_events"] == learned
    history = doc["tuning"]["min_events"]["min_history"]  # learned on new users here
    assert history >= 0 and doc["tuning"]["min_events"]["new_histories"] > 0
    assert doc["params"]["min_history"] in (-1, history)  # -1: follows min_events
    assert create("als", **doc["params"]).history_gate() == history
    assert any("min_events=" in r.getMessage() for r in caplog.records)
    out = tune(
        sparse_log,
        ["als"],
        name="u",
        models_dir=tmp_path,
        trials=1,
        fixed={**params, "min_events": 0},
    )
    doc = bundle.read_manifest(bundle.resolve(tmp_path, "u"))
    assert doc["params"]["min_events"] == 0 and doc["tuning"]["min_events"] is None
    assert doc["params"]["min_history"] == -1  # a given min_events: neither gate learned


def test_hybrid_tuning_leaves_a_gated_component_out_as_the_server(ds):
    from recserve.evaluation import make_split
    from recserve.tuning import candidates

    split = make_split(ds, "random", 0.3, 0, 1)
    cands = candidates(
        {"als3": create("als", **ALS, min_events=4), "als": create("als", **ALS)}, split, 20
    )
    relevant = split.test.tocsr()
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    events = np.diff(split.train.interactions.tocsr().indptr)[users]  # all likes here
    gated = events < 4
    assert gated.any() and not gated.all()
    assert (cands.items[0][gated] == -1).all()
    assert (cands.items[0][~gated] >= 0).all()
    assert (cands.items[1] >= 0).all()


def test_tune_compares_the_algorithms_as_served(sparse_log, tmp_path):
    out = tune(sparse_log, ["als", "popularity"], name="t", models_dir=tmp_path, trials=1)
    doc = bundle.read_manifest(bundle.resolve(tmp_path, "t"))
    per_algo = {r["algorithm"]: r for r in doc["tuning"]["algorithms"]}
    als = per_algo["als"]
    assert als["min_events"]["user_prior"] > 0  # the blend lifts ALS's known users here
    assert als["min_events"]["min_events"] == 0  # in the gate's place
    lifted = als["best_value"] + als["min_events"]["gated_value"] - als["min_events"]["value"]
    assert out["best_by_algorithm"]["als"] == pytest.approx(lifted)
    assert lifted > als["best_value"]
    assert per_algo["popularity"]["min_events"]["min_events"] == 0
    want = max(out["best_by_algorithm"], key=out["best_by_algorithm"].get)
    assert out["algorithm"] == want
    assert out["validation"] == pytest.approx(out["best_by_algorithm"][want])


def test_tune_learns_a_user_prior_that_beats_the_gate_on_the_held_out_test(sparse_log, tmp_path):
    outer, inner = splits(sparse_log, "random", 0.2, 0, 1)
    learned = learn_min_events("als", ALS, inner, "ndcg@20", 20, None)
    assert learned["user_prior"] > 0 and learned["min_events"] == 0
    assert learned["gated_value"] > learned["value"] and learned["gated"] == 0
    gate = learn_min_events("als", ALS, inner, "ndcg@20", 20, None, known_prior=False)
    assert gate["min_events"] > 1
    # on the test split, which the learning never saw: the blend beats the
    # gate, which beats the model alone (evaluate answers as served: as_served)
    test = {}
    for name, extra in (
        ("plain", {}),
        ("gate", {"min_events": gate["min_events"]}),
        ("prior", {"user_prior": learned["user_prior"]}),
    ):
        got = evaluate(create("als", **ALS, **extra), sparse_log, "random", [20], split=outer)
        test[name] = got["metrics"]["ndcg@20"]
    assert test["prior"] > test["gate"] > test["plain"], test
    # tune publishes it, and a given user_prior is kept
    out = tune(sparse_log, ["als"], name="p", models_dir=tmp_path, trials=1, fixed=ALS)
    doc = bundle.read_manifest(bundle.resolve(tmp_path, "p"))
    assert doc["params"]["user_prior"] == out["params"]["user_prior"] > 0
    assert doc["params"]["min_events"] == 0
    fixed = {**ALS, "user_prior": 0.5}
    tune(sparse_log, ["als"], name="q", models_dir=tmp_path, trials=1, fixed=fixed)
    doc = bundle.read_manifest(bundle.resolve(tmp_path, "q"))
    assert doc["params"]["user_prior"] == 0.5
