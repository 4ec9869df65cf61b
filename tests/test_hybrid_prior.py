"""A hybrid's `history_prior`: a new user's answer (an inline history, the
user unknown to every component) blends popularity in as one more part,
weighted c / (c + n) for n events, the components' weights scaled to the
rest. Checked against a blend computed here from each component's full
ranking and the training counts, on the dense path, the general path and
the by-id path (components over different catalogues)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recserve.config import Hybrid, ServerConfig, load_config
from recserve.data import generate, to_dataset
from recserve.feedback import Event, OnlineState
from recserve.models import create
from recserve.serving import Catalog, RecQuery, Router
from recserve.tuning import (
    candidates,
    hybrid_history_answers,
    hybrid_user_answers,
    learn_hybrid_prior,
    learn_user_prior,
    new_user_histories,
    splits,
    tune_hybrid,
)
from tests.event_logs import cluster_events, events_dataset
from tests.test_hybrid_dense import general

ALS = {"factors": 16, "iterations": 5}
C = 1.5
HYBRIDS = {
    "p": Hybrid("p", {"als": 0.6, "itemknn": 0.4}, C),
    "p0": Hybrid("p0", {"als": 0.6, "itemknn": 0.4}),
    "pu": Hybrid("pu", {"als": 0.6, "itemknn": 0.4}, user_prior=C),  # known users only
    "pb": Hybrid("pb", {"als": 0.6, "itemknn": 0.4}, 0.5, 4.0),  # both, each its own c
    "gated": Hybrid("gated", {"als": 0.6, "knn3": 0.4}, C),  # knn3: min_history 3
    "apart": Hybrid("apart", {"als": 0.6, "other": 0.4}, C),  # different catalogues
    "knn3": Hybrid("knn3", {"knn3": 1.0}, C),  # a history below the gate: the fallback's
    "gatedk": Hybrid("gatedk", {"als": 0.6, "knn25": 0.4}, user_prior=C),
    "knn25": Hybrid("knn25", {"knn25": 1.0}, user_prior=C),  # light users: the fallback's
    # one component (the quickstart's default hybrid is ALS alone): known users in one
    # kernel call (Router._one_known_prior), an embedding model's and a biased one's
    "pa": Hybrid("pa", {"als": 0.6}, 0.5, user_prior=C),
    "ps": Hybrid("ps", {"svd": 2.0}, user_prior=C),
}


@pytest.fixture(scope="module")
def setup(small, tmp_path_factory):
    other = to_dataset(generate(1_000, 200, 20_000, seed=8), name="other")
    root = tmp_path_factory.mktemp("hybrid-prior")
    for name, algo, params, data in (
        ("als", "als", ALS, small),
        ("itemknn", "itemknn", {}, small),
        ("svd", "svd", {"factors": 8, "epochs": 5}, small),
        ("knn3", "itemknn", {"min_history": 3}, small),
        ("knn25", "itemknn", {"min_events": 25}, small),  # gates light known users
        ("other", "itemknn", {}, other),
        ("popularity", "popularity", {}, small),
    ):
        create(algo, **params).fit(data).save(root, name, dataset=data)
    cfg = ServerConfig(models=str(root), hybrids=HYBRIDS, max_k=500)
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(120)
    online = OnlineState()
    yield Router(cfg, catalog, online), online, small
    catalog.close()


def _top(ids: list[str], scores: np.ndarray, n: int) -> dict[str, float]:
    """The n best (ties by catalogue position), min-max scaled (all equal: 1)."""
    order = np.lexsort((np.arange(scores.size), -scores))[:n]
    best = scores[order].astype(np.float64)
    if not best.size:
        return {}
    lo, hi = best.min(), best.max()
    scaled = (best - lo) / (hi - lo) if hi > lo else np.ones_like(best)
    return {ids[i]: float(v) for i, v in zip(order, scaled, strict=True)}


def reference(router: Router, hy: Hybrid, q: RecQuery) -> dict[str, float]:
    """Every candidate's blended score, from the definition: each component
    that is not gated ranks the whole catalogue for the history, or for the
    known user (q.user_id, known to every component, no history) (only items
    > 0 for a sparse model); its best max(3k, 100) eligible items, min-max
    scaled, weigh w (1 - a) / W (W: the weights of those components); the
    first component's training counts over the eligible items, treated the
    same way, weigh a = c / (c + n), n the history's distinct items or the
    known user's training events, c history_prior or user_prior."""
    n_cand = max(3 * q.k, 100)
    first = router.catalog.get(next(iter(hy.weights))).model
    known = first.users.get(q.user_id) if q.user_id else -1
    hist = dict(q.history)  # later values win, as a fold-in
    if known >= 0:
        assert not q.history
        row = first.user_items[known]
        hist = dict(zip(first.items.ids(row.indices), row.data, strict=True))
    parts, total_w = [], 0.0
    for name, w in hy.weights.items():
        m = router.catalog.get(name).model
        idx = m.items.index(list(hist))
        vals = np.array(list(hist.values()), np.float32)[idx >= 0]
        gate = m.params.get("min_events", 0) if known >= 0 else m.history_gate()
        if m.evidence(vals) < gate:
            continue
        total_w += w
        excl = m.items.index(list(q.exclude)) if q.exclude else np.zeros(0, np.int64)
        cand = m.items.index(list(q.candidates)) if q.candidates else None
        how = dict(
            exclude=[excl[excl >= 0]],
            filter_seen=not q.include_seen,
            candidates=None if cand is None else [cand[cand >= 0]],
        )
        if known >= 0:
            items, scores = m.recommend([m.users.get(q.user_id)], m.n_items, **how)
        else:
            row = m.history_matrix([idx[idx >= 0]], [vals])
            items, scores = m.recommend_histories(row, m.n_items, **how)
        keep = items[0] >= 0
        if m.sparse_scores:
            keep &= scores[0] > 0
        own = np.full(m.n_items, -np.inf)
        own[items[0][keep]] = scores[0][keep]
        ok = np.flatnonzero(own > -np.inf)
        parts.append((w, _top(m.items.ids(ok), own[ok], n_cand)))
    counts = np.bincount(first.user_items.indices, minlength=first.n_items).astype(np.float64)
    eligible = np.ones(first.n_items, bool)
    if q.candidates:
        eligible[:] = False
        c_idx = first.items.index(list(q.candidates))
        eligible[c_idx[c_idx >= 0]] = True
    for banned in ([*q.exclude], [] if q.include_seen else list(hist)):
        b = first.items.index(banned)
        eligible[b[b >= 0]] = False
    ok = np.flatnonzero(eligible)
    c = hy.user_prior if known >= 0 else hy.history_prior
    a = c / (c + len(hist))
    out: dict[str, float] = {}
    pop = _top(first.items.ids(ok), counts[ok], n_cand)
    for weight, part in [*((w * (1 - a) / total_w, p) for w, p in parts), (a, pop)]:
        for i, v in part.items():
            out[i] = out.get(i, 0.0) + weight * v
    return out


def check(got, want: dict[str, float], k: int) -> None:
    """The served answer is the reference's k best, with its scores."""
    assert len(got.item_ids) == min(k, len(want)) and len(set(got.item_ids)) == len(got.item_ids)
    served = np.array([want[i] for i in got.item_ids])
    np.testing.assert_allclose(got.scores, served, atol=1e-5)
    others = [v for i, v in want.items() if i not in set(got.item_ids)]
    if others:
        assert served.min() >= max(others) - 1e-5


def shapes(ds, rng) -> list[RecQuery]:
    """New users' histories of 1, 2 and 6 items; with exclusions, with
    include_seen, with candidates (the general path only), k 1 to 60."""
    some = ds.items.ids(rng.choice(ds.n_items, 80, replace=False))
    h = [(i, 1.0) for i in some[:6]]
    return [
        RecQuery(user_id="", history=h[:1], k=10),
        RecQuery(user_id="new-1", history=h[:2], k=60),
        RecQuery(user_id="", history=h, k=1),
        RecQuery(user_id="", history=h[:3], exclude=some[6:12], k=10),
        RecQuery(user_id="", history=h[:2], include_seen=True, k=20),
        RecQuery(user_id="", history=h[:3], candidates=some[:50], k=10),
    ]


@pytest.mark.parametrize("name", ["p", "gated", "apart"])
def test_a_new_users_history_blends_popularity_in_as_the_definition_says(setup, name):
    router, _, ds = setup
    rng = np.random.default_rng(len(name))
    hy = router.cfg.hybrids[name]
    for q in shapes(ds, rng):
        q.model = name
        want = reference(router, hy, q)
        got = router.recommend(q)
        assert got.served_by == "" and got.folded_in
        check(got, want, q.k)
        check(general(router, q), want, q.k)


def known_shapes(ds, rng) -> list[RecQuery]:
    """Known users of few and many training events; with exclusions, with
    include_seen, with candidates (the general path only), k 1 to 60."""
    lengths = np.diff(ds.interactions.indptr)
    light, heavy = ds.users.ids([int(np.argmin(lengths)), int(np.argmax(lengths))])
    some = ds.items.ids(rng.choice(ds.n_items, 80, replace=False))
    return [
        RecQuery(user_id=light, k=10),
        RecQuery(user_id=heavy, k=60),
        RecQuery(user_id=light, k=1),
        RecQuery(user_id=heavy, exclude=some[:6], k=10),
        RecQuery(user_id=light, include_seen=True, k=20),
        RecQuery(user_id=light, candidates=some[:50], k=10),
    ]


@pytest.mark.parametrize("name", ["pu", "pb", "pa", "ps"])
def test_a_known_users_answer_blends_popularity_in_under_user_prior(setup, name):
    router, _, ds = setup
    hy = router.cfg.hybrids[name]
    for q in known_shapes(ds, np.random.default_rng(3)):
        q.model = name
        want = reference(router, hy, q)
        got = router.recommend(q)
        assert got.served_by == "" and not got.folded_in
        check(got, want, q.k)
        check(general(router, q), want, q.k)


@pytest.mark.parametrize("name", ["pa", "ps"])
def test_a_one_component_hybrid_answers_known_users_in_one_kernel_call(setup, name, monkeypatch):
    """A known user of a one-component hybrid, nothing excluded or recorded:
    one Recommender.prior_user call answers (no dense row, no blend_dense),
    and it answers what the general path does, explanations too. A request
    with exclusions, and a user with events recorded since, take the dense
    path and answer as the general one."""
    router, _, ds = setup
    slot = router.catalog.get(next(iter(router.cfg.hybrids[name].weights)))
    calls = []
    fused = slot.model.prior_user
    monkeypatch.setattr(slot.model, "prior_user", lambda *a: calls.append(a) or fused(*a))
    lengths = np.diff(ds.interactions.indptr)
    users = ds.users.ids([int(np.argmin(lengths)), int(np.argmax(lengths)), 7, 11])
    some = ds.items.ids(np.arange(5))
    for i, u in enumerate(users):
        for q in (
            RecQuery(user_id=u, k=10, model=name),
            RecQuery(user_id=u, k=1 + 7 * i, model=name, include_seen=True),
            RecQuery(user_id=u, k=5, model=name, explain=True),
        ):
            before = len(calls)
            got, want = router.recommend(q), general(router, q)
            assert len(calls) == before + 1
            assert got.item_ids == want.item_ids and got.version == want.version
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
            assert got.because == want.because
        q = RecQuery(user_id=u, k=10, model=name, exclude=some)
        before = len(calls)
        got, want = router.recommend(q), general(router, q)
        assert len(calls) == before and got.item_ids == want.item_ids
    mine = Router(router.cfg, router.catalog, OnlineState())  # its own recorded events
    mine.online.apply([Event(users[2], ds.items.ids([3])[0], 4.0, 0)])
    q = RecQuery(user_id=users[2], k=10, model=name)
    before = len(calls)
    got, want = mine.recommend(q), general(mine, q)
    assert len(calls) == before and got.item_ids == want.item_ids and got.folded_in


def test_each_prior_answers_only_its_own_users(setup):
    router, _, ds = setup
    rng = np.random.default_rng(9)
    for q in [*shapes(ds, rng), *known_shapes(ds, rng)]:
        known = ds.users.get(q.user_id) >= 0 if q.user_id else False
        plain = router.recommend(dataclasses.replace(q, model="p0"))
        other = router.recommend(dataclasses.replace(q, model="p" if known else "pu"))
        assert other.item_ids == plain.item_ids and np.allclose(other.scores, plain.scores)
        mine = router.recommend(dataclasses.replace(q, model="pu" if known else "p"))
        assert not np.allclose(mine.scores, plain.scores[: len(mine.scores)])


def test_the_prior_changes_short_histories_answers_most(setup):
    router, _, ds = setup
    short = RecQuery(user_id="", history=[(ds.items.ids([7])[0], 1.0)], k=10)
    long = RecQuery(user_id="", history=[(i, 1.0) for i in ds.items.ids(range(40, 70))], k=10)
    moved = []
    for q in (short, long):
        with_prior = router.recommend(dataclasses.replace(q, model="p"))
        without = router.recommend(dataclasses.replace(q, model="p0"))
        moved.append(len(set(with_prior.item_ids) - set(without.item_ids)))
    assert moved[0] > 0 and moved[0] >= moved[1]


def test_known_users_are_answered_as_without_a_prior(setup):
    shared, _, ds = setup
    online = OnlineState()  # its own recorded events, not the fixture's
    router = Router(shared.cfg, shared.catalog, online)
    some = ds.items.ids([3, 5, 8])
    online.apply([Event("42", some[0], 1.0, 0)])  # a known user with newer events too
    for uid in ("7", "42", "900"):
        for q in (
            RecQuery(user_id=uid, k=10),
            RecQuery(user_id=uid, history=[(some[1], 1.0)], k=10),
            RecQuery(user_id=uid, exclude=some[:2], k=30),
        ):
            got = router.recommend(dataclasses.replace(q, model="p"))
            want = router.recommend(dataclasses.replace(q, model="p0"))
            assert got.item_ids == want.item_ids and np.allclose(got.scores, want.scores)
            assert general(router, dataclasses.replace(q, model="p")).item_ids == want.item_ids


def test_a_new_users_recorded_events_count_as_history(setup):
    shared, _, ds = setup
    online = OnlineState()  # its own recorded events, not the fixture's
    router = Router(shared.cfg, shared.catalog, online)
    ids = ds.items.ids([11, 12])
    online.apply([Event("rec-new", ids[0], 1.0, 0)])
    q = RecQuery(user_id="rec-new", history=[(ids[1], 1.0)], k=10, model="p")
    both = dataclasses.replace(q, history=[(ids[0], 1.0), (ids[1], 1.0)])
    want = reference(router, router.cfg.hybrids["p"], both)
    check(router.recommend(q), want, 10)
    check(general(router, q), want, 10)


@pytest.mark.parametrize("name", ["p0", "p", "gated", "knn3"])
def test_offline_answers_are_the_ones_the_service_gives(setup, name):
    # what tune learns the prior from (hybrid_history_answers) is what is served
    router, _, ds = setup
    hy = router.cfg.hybrids[name]
    models = [router.catalog.get(c).model for c in hy.weights]
    rng = np.random.default_rng(5)
    lengths = [1, 1, 2, 3, 4, 7, 12]
    picks = [rng.choice(ds.n_items, h, replace=False) for h in lengths]
    hist = models[0].history_matrix(picks, [np.ones(h, np.float32) for h in lengths])
    for k in (1, 10, 40):
        recs = hybrid_history_answers(
            models, list(hy.weights.values()), hist, k, [hy.history_prior]
        )
        for r, items in enumerate(picks):
            q = RecQuery(user_id="", history=[(i, 1.0) for i in ds.items.ids(items)], k=k)
            got = router.recommend(dataclasses.replace(q, model=name))
            want = recs[0][r]
            assert got.item_ids == ds.items.ids(want[want >= 0]), (name, k, r)
            assert (got.served_by == "popularity") == (name == "knn3" and lengths[r] < 3)


@pytest.mark.parametrize("name", ["p0", "pu", "pb", "gatedk", "knn25"])
def test_offline_known_user_answers_are_the_ones_the_service_gives(setup, name):
    router, _, ds = setup
    hy = router.cfg.hybrids[name]
    models = [router.catalog.get(c).model for c in hy.weights]
    lengths = np.diff(ds.interactions.indptr)
    users = np.r_[np.argsort(lengths)[:6], np.arange(0, ds.n_users, 97)]
    assert lengths[users].min() < 25 <= lengths[users].max()  # knn25 gates some, not all
    for k in (1, 10, 40):
        recs = hybrid_user_answers(models, list(hy.weights.values()), users, k, [hy.user_prior])
        for r, u in enumerate(users):
            q = RecQuery(user_id=ds.users.ids([u])[0], k=k, model=name)
            got = router.recommend(q)
            want = recs[0][r]
            assert got.item_ids == ds.items.ids(want[want >= 0]), (name, k, u)
            gated_out = name == "knn25" and lengths[u] < 25
            assert (got.served_by == "popularity") == gated_out


def _recall(recs: np.ndarray, truth: list[set[int]], k: int) -> float:
    """Mean recall@k against sets of held-out item indices."""
    got = [
        len(t & set(r[r >= 0].tolist())) / min(k, len(t)) for r, t in zip(recs, truth, strict=True)
    ]
    return float(np.mean(got))


def test_tune_learns_a_hybrid_prior_that_holds_for_held_out_new_users(tmp_path):
    ds = to_dataset(generate(3000, 1500, 45000, seed=4, zipf=1.1))
    rest, events, _ = new_user_histories(ds, None, seed=1)  # never seen by the learning
    models = tmp_path / "models"
    fitted = []
    for name, algo, params in (("als", "als", ALS), ("itemknn", "itemknn", {})):
        fitted.append(create(algo, **params).fit(rest))
        fitted[-1].save(models, name, dataset=rest)
    out = tune_hybrid(rest, ["als", "itemknn"], name="h", models_dir=models, trials=8, seed=0)
    assert out["history_prior"] > 0 and out["new_prior_value"] > out["new_value"]
    assert out["new_histories"] > 0
    cfg = load_config(overrides={"models": str(models)})
    assert cfg.hybrids["h"].history_prior == out["history_prior"]  # what serve reads
    weights = [out["weights"]["als"], out["weights"]["itemknn"]]
    counts = np.bincount(rest.interactions.indices, minlength=rest.n_items)
    order = np.lexsort((np.arange(counts.size), -counts))
    for h in (1, 2, 3):  # the held-out users folded in from h events
        use = [items for items, _ in events if items.size > h]
        rows = fitted[0].history_matrix([items[:h] for items in use])
        truth = [set(items[h:].tolist()) for items in use]
        plain, prior = hybrid_history_answers(fitted, weights, rows, 20, [0, out["history_prior"]])
        pop = np.array([[i for i in order[:40] if i not in set(u[:h].tolist())][:20] for u in use])
        recall = {
            n: _recall(x, truth, 20) for n, x in (("plain", plain), ("prior", prior), ("pop", pop))
        }
        assert recall["prior"] > max(recall["plain"], recall["pop"]), (h, recall)


def test_no_hybrid_prior_where_popularity_does_not_help(tmp_path):
    # the components find each user's cluster, popularity only adds noise
    ds = events_dataset(tmp_path / "clusters.csv", cluster_events())
    specs = {"als": ("als", ALS), "itemknn": ("itemknn", {})}
    out = learn_hybrid_prior(specs, {"als": 0.5, "itemknn": 0.5}, ds, "ndcg@20", 20)
    assert out["new_histories"] > 0 and out["history_prior"] == 0.0
    assert out["new_prior_value"] is None and out["new_value"] > 0
    # nor for known users
    models = {"als": create("als", **ALS), "itemknn": create("itemknn")}
    _, inner = splits(ds, "random", 0.2, 0, 1)
    candidates(models, inner, 100)  # fits them on the validation split's training part
    known = learn_user_prior(models, {"als": 0.5, "itemknn": 0.5}, inner, "ndcg@20", 20)
    assert known["known_users"] > 0 and known["user_prior"] == 0.0


@pytest.mark.parametrize("parts", [["als", "itemknn"], ["als"]])  # one model: its priors alone
def test_tune_learns_a_user_prior_that_holds_on_the_test_split(tmp_path, parts):
    # about four events a user: popularity helps the hybrid's known users
    ds = to_dataset(generate(4000, 2000, 16000, seed=4, zipf=1.1))
    outer, _ = splits(ds, "random", 0.2, 0, 1)  # tune learns on outer.train's own split
    models = tmp_path / "models"
    fitted = []
    for name in parts:
        params = ALS if name == "als" else {}
        create(name, **params).fit(ds).save(models, name, dataset=ds)
        fitted.append(create(name, **params).fit(outer.train))
    out = tune_hybrid(ds, parts, name="h", models_dir=models, trials=8, seed=0)
    assert out["user_prior"] > 0 and out["known_prior_value"] > out["known_value"]
    served = load_config(overrides={"models": str(models)}).hybrids["h"]
    assert served.user_prior == out["user_prior"] and list(served.weights) == parts
    test = outer.test.tocsr()
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    weights = [out["weights"][c] for c in parts]
    plain, prior = hybrid_user_answers(fitted, weights, users, 20, [0, out["user_prior"]])
    truth = [set(test[u].indices.tolist()) for u in users]
    assert _recall(prior, truth, 20) > _recall(plain, truth, 20)


def test_a_hybrid_names_each_component_once(tmp_path):
    with pytest.raises(ValueError, match="one or more components, each once"):
        tune_hybrid(generate_small(), ["als", "als"], name="h", models_dir=tmp_path)
    with pytest.raises(ValueError, match="one or more components, each once"):
        tune_hybrid(generate_small(), [], name="h", models_dir=tmp_path)


def generate_small():
    return to_dataset(generate(300, 100, 3000, seed=1))
