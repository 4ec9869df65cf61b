"""The hybrid's dense path (every component's row in one scratch matrix, one
blend kernel pass) against the general path (each component's own top-n call,
then the numpy row blend), for hybrids of every algorithm, and the blend kernel
against blend_rows on rows with NaNs and heavy ties."""

from __future__ import annotations

import itertools
import math
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.config import Hybrid, ServerConfig
from recserve.feedback import Event, OnlineState
from recserve.kernels import topk
from recserve.models import algorithms, create
from recserve.serving import Catalog, RecQuery, RequestError, Router
from recserve.serving.blend import blend_dense, blend_rows
from recserve.serving.catalog import default_loader

FAST = {
    "als": {"factors": 16, "iterations": 5},
    "svd": {"factors": 16, "epochs": 5},
    "bpr": {"factors": 16, "epochs": 5, "fold_in_epochs": 5},
    "bayes_mf": {"factors": 8, "epochs": 5},
}


def top_n(row: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent: the n best non-NaN entries of a row, ties by lower index."""
    idx = np.flatnonzero(~np.isnan(row))
    order = np.lexsort((idx, -row[idx].astype(np.float64)))[:n]
    return idx[order].astype(np.int32), row[idx[order]]


@settings(max_examples=200, deadline=None)
@given(
    n_items=st.integers(1, 400), k=st.integers(1, 30), n_cand=st.integers(1, 120), data=st.data()
)
def test_blend_kernel_equals_blend_rows_over_each_rows_top_n(n_items, k, n_cand, data):
    n_rows = data.draw(st.integers(1, 4))
    # Few distinct values (ties everywhere), NaN for ineligible entries.
    values = st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0, -1.0, -np.inf, np.nan])
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if data.draw(st.booleans()):
        rows = rng.choice([0.0, 0.5, 1.0, 2.0, -1.0, np.nan], (n_rows, n_items)).astype(np.float32)
    else:
        rows = rng.standard_normal((n_rows, n_items)).astype(np.float32)
        rows[rng.random((n_rows, n_items)) < 0.1] = np.nan
    rows[0, : data.draw(st.integers(0, 3))] = data.draw(values)
    weights = [data.draw(st.sampled_from([0.1, 0.25, 0.5, 1.0])) for _ in range(n_rows)]
    parts = []
    for w, row in zip(weights, rows, strict=True):
        items, scores = top_n(row, n_cand)
        if items.size and np.isfinite(scores).all():
            parts.append((w, items, scores))
        elif items.size:  # -inf within the candidates: min-max is NaN in both; skip the case
            return
    want_rows, want_totals = blend_rows(parts, k, n_items)
    got_rows, got_totals, counts = blend_dense(rows, weights, n_cand, k)
    want_counts = [min(n_cand, int((~np.isnan(r)).sum())) for r in rows]
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_array_equal(got_rows, want_rows)
    np.testing.assert_array_equal(got_totals, want_totals)


@pytest.mark.parametrize("n_items", [3_000, 40_000])
@pytest.mark.parametrize("n_cand", [1, 7, 100, 900])
def test_blend_kernel_on_long_rows_of_ties_infinities_and_nans(n_items, n_cand):
    # Rows far longer than the kernel's gather buffer (3 n_cand + 512 entries):
    # a constant row, few distinct values, -inf and NaN runs, a rising row
    # (every entry beats the ones before it) and noise each fill the buffer
    # again and again; each cut keeps the n_cand best and raises the floor.
    rng = np.random.default_rng(n_items + n_cand)
    rising = np.arange(n_items, dtype=np.float32)
    ties = rng.choice([0.0, 1.0, 2.0], n_items).astype(np.float32)
    holes = rng.standard_normal(n_items).astype(np.float32)
    holes[rng.random(n_items) < 0.5] = np.nan
    holes[rng.random(n_items) < 0.2] = -np.inf
    infs = np.full(n_items, -np.inf, np.float32)
    infs[: n_items // 3] = np.nan
    noise = rng.standard_normal(n_items).astype(np.float32)
    rows = np.stack([np.zeros(n_items, np.float32), ties, rising, holes, noise, infs])
    weights = [0.5, 0.25, 1.0, 0.1, 0.3, 0.2]
    for pick in ([0], [1], [2], [3], [4], [5], [0, 1, 2, 3, 4], [1, 3, 5]):
        parts = []
        for c in pick:
            items, scores = top_n(rows[c], n_cand)
            if np.isinf(scores).any():  # min-max of -inf is NaN in both: not compared
                continue
            parts.append((weights[c], items, scores))
        sub = rows[[c for c in pick if not np.isinf(top_n(rows[c], n_cand)[1]).any()]]
        if not parts:
            continue
        want_rows, want_totals = blend_rows(parts, 25, n_items)
        got_rows, got_totals, counts = blend_dense(
            np.ascontiguousarray(sub), [w for w, _, _ in parts], n_cand, 25
        )
        assert counts.tolist() == [len(i) for _, i, _ in parts]
        np.testing.assert_array_equal(got_rows, want_rows)
        np.testing.assert_array_equal(got_totals, want_totals)
    # The -inf row's candidates themselves: the n_cand lowest-indexed -inf entries.
    got = blend_dense(rows[5:6], [1.0], n_cand, 5)
    assert got[2].tolist() == [min(n_cand, n_items - n_items // 3)]


def test_blend_kernel_from_many_threads_at_once():
    # The kernels keep zeroed accumulators between calls (a pool, shared by
    # blend_dense and prior_user) and release the GIL: threads blending
    # catalogues of different sizes at once must each get the answer they get
    # alone.
    rng = np.random.default_rng(11)
    cases = []
    priors = []
    for n in (50, 3_000, 60_000, 150_000, 700):
        rows = rng.choice([0.0, 0.5, 1.0, 2.0], (3, n)).astype(np.float32)
        rows += rng.standard_normal((3, n)).astype(np.float32) * (n % 7 == 0)
        rows[rng.random((3, n)) < 0.2] = np.nan
        cases.append((rows, blend_dense(rows, [0.5, 0.3, 0.2], 40, 15)))
        Q, V = rng.standard_normal((2, 8)).astype(np.float32), rng.random((n, 8), np.float32)
        counts = rng.integers(0, 9, n).astype(np.float32)
        args = (Q, 1, V, 0.7, 0.3, 40, 15, np.argsort(-counts, kind="stable").astype(np.int32))
        priors.append((args, counts, topk.prior_user(*args, counts)))
    errors: list[str] = []

    def work(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(200) % len(cases)
        for j, i in enumerate(order):
            rows, (want_rows, want_totals, want_counts) = cases[i]
            got = blend_dense(rows, [0.5, 0.3, 0.2], 40, 15)
            if not (
                np.array_equal(got[0], want_rows)
                and np.array_equal(got[1], want_totals)
                and np.array_equal(got[2], want_counts)
            ):
                errors.append(f"case {i} differs")
            if j % 2:
                args, counts, want = priors[i]
                got = topk.prior_user(*args, counts)
                if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
                    errors.append(f"prior case {i} differs")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    # The references themselves: blend_rows over each row's top 40.
    for rows, (want_rows, want_totals, _) in cases:
        parts = [(w, *top_n(r, 40)) for w, r in zip([0.5, 0.3, 0.2], rows, strict=True)]
        ref_rows, ref_totals = blend_rows(parts, 15, rows.shape[1])
        np.testing.assert_array_equal(want_rows, ref_rows)
        np.testing.assert_array_equal(want_totals, ref_totals)


@settings(max_examples=200, deadline=None)
@given(
    n_items=st.integers(1, 300), k=st.integers(1, 30), n_cand=st.integers(1, 120), data=st.data()
)
def test_blend_kernels_popularity_part_equals_its_dense_row(n_items, k, n_cand, data):
    """The order part (popularity's order, counts and banned items) blends
    exactly as the dense row of the counts, NaN at the banned items, would:
    same items, same sums, same candidate counts. Counts with heavy ties,
    banned items repeated or out of range, rows with NaNs."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n_rows = data.draw(st.integers(0, 3))
    rows = rng.integers(0, 6, (n_rows, n_items)).astype(np.float32)
    rows[rng.random((n_rows, n_items)) < 0.2] = np.nan
    counts = rng.integers(0, data.draw(st.integers(1, 50)), n_items).astype(np.float32)
    banned = rng.integers(-3, n_items + 3, data.draw(st.integers(0, 40))).astype(np.int32)
    order = np.lexsort((np.arange(n_items), -counts)).astype(np.int32)
    weights = rng.random(n_rows + 1) + 0.01
    positive = rng.integers(0, 2, n_rows).astype(np.uint8)
    dense = np.empty((n_rows + 1, n_items), np.float32)
    dense[:n_rows] = rows
    dense[n_rows] = counts
    valid = banned[(banned >= 0) & (banned < n_items)]
    dense[n_rows, valid] = np.nan
    want = blend_dense(dense, weights, n_cand, k, np.r_[positive, 0].astype(np.uint8))
    got = blend_dense(rows, weights, n_cand, k, positive, (order, counts, banned))
    assert got[0].tolist() == want[0].tolist()
    assert got[1].tolist() == want[1].tolist()  # the same sums, added in the same order
    assert got[2].tolist() == want[2].tolist()


@settings(max_examples=200, deadline=None)
@given(
    n_items=st.integers(1, 300), k=st.integers(0, 30), n_cand=st.integers(1, 120), data=st.data()
)
def test_one_users_prior_kernel_is_the_blend_of_its_dense_row(n_items, k, n_cand, data):
    """topk.prior_user (a known user's row blended with popularity in one call)
    answers what dense_user's row blended by blend_dense answers, popularity
    banned at the seen items: same items, same sums. With and without a seen
    row (include_seen) and a bias, factors that tie, seen ids repeated."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    d = data.draw(st.integers(1, 9))
    Q = rng.integers(-2, 3, (3, d)).astype(np.float32)  # small integers: ties
    V = rng.integers(-2, 3, (n_items, d)).astype(np.float32)
    bias = rng.integers(0, 3, n_items).astype(np.float32) if rng.random() < 0.5 else None
    seen = [sorted(rng.integers(0, n_items, rng.integers(0, 12)).tolist()) for _ in range(3)]
    indptr = np.zeros(4, np.int64)
    np.cumsum([len(x) for x in seen], out=indptr[1:])
    indices = np.array([j for x in seen for j in x], np.int32)
    counts = rng.integers(0, data.draw(st.integers(1, 50)), n_items).astype(np.float32)
    order = np.lexsort((np.arange(n_items), -counts)).astype(np.int32)
    user = int(rng.integers(0, 3))
    a = float(rng.random())
    w = (1.0 - a, a)
    for filter_seen in (True, False):
        csr = (indptr, indices) if filter_seen else (None, None)
        row = np.empty(n_items, np.float32)
        topk.dense_user(Q, user, V, row, *csr, bias)
        banned = np.array(seen[user] if filter_seen else [], np.int32)
        if k:
            want = blend_dense(row[None], w, n_cand, k, None, (order, counts, banned))
        else:
            want = (np.zeros(0, np.int32), np.zeros(0), [0])
        got = topk.prior_user(Q, user, V, *w, n_cand, k, order, counts, *csr, bias)
        assert got[0].tolist() == want[0].tolist()
        assert got[1].tolist() == want[1].tolist()  # the same sums, added in the same order
        assert got[2] == want[2][0]  # the row's candidates
    with pytest.raises(ValueError, match="values"):
        topk.prior_user(Q, 0, V, 0.5, 0.5, 3, 2, order, np.ones(n_items + 1, np.float32))
    with pytest.raises(ValueError, match="n_cand"):
        topk.prior_user(Q, 0, V, 0.5, 0.5, 0, 2, order, counts)
    with pytest.raises(IndexError, match="user"):
        topk.prior_user(Q, 3, V, 0.5, 0.5, 3, 2, order, counts)


def test_blend_kernel_refuses_bad_input():
    rows = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="weights"):
        blend_dense(rows, [1.0], 3, 2)
    with pytest.raises(ValueError, match="n_cand"):
        blend_dense(rows, [1.0, 1.0], 0, 2)
    with pytest.raises(TypeError, match="scores"):
        blend_dense(rows.astype(np.float64), [1.0, 1.0], 3, 2)
    assert blend_dense(rows, [1.0, 1.0], 3, 0)[0].size == 0
    order, counts = np.arange(5, dtype=np.int32), np.ones(5, np.float32)
    with pytest.raises(ValueError, match="weights"):  # one more for the order part
        blend_dense(rows, [1.0, 1.0], 3, 2, None, (order, counts, None))
    with pytest.raises(ValueError, match="values"):
        blend_dense(rows, [1.0, 1.0, 1.0], 3, 2, None, (order, counts[:4], None))
    with pytest.raises(TypeError, match="order"):
        blend_dense(rows, [1.0, 1.0, 1.0], 3, 2, None, (order.astype(np.int64), counts, None))
    with pytest.raises(TypeError, match="banned"):
        blend_dense(rows, [1.0, 1.0, 1.0], 3, 2, None, (order, counts, order.astype(np.int64)))


@pytest.fixture(scope="module")
def router(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-models")
    for algo in algorithms():
        create(algo, **FAST.get(algo, {})).fit(small).save(root, algo, dataset=small)
    pairs = list(itertools.combinations(algorithms(), 2))
    hybrids = {f"{a}+{b}": Hybrid(f"{a}+{b}", {a: 0.7, b: 0.3}) for a, b in pairs}
    hybrids["all"] = Hybrid("all", dict.fromkeys(algorithms(), 1.0 / len(algorithms())))
    cfg = ServerConfig(models=str(root), hybrids=hybrids, max_k=500)
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(120)
    yield Router(cfg, catalog, OnlineState())
    catalog.close()


def general(router: Router, q: RecQuery):
    """The same request through the general path (the dense path switched off)."""
    dense = router._hybrid_dense
    router._hybrid_dense = lambda *a: None  # type: ignore[method-assign]
    try:
        return router.recommend(q)
    finally:
        router._hybrid_dense = dense  # type: ignore[method-assign]


def shapes(small, u: str, k: int, include_seen: bool, rng) -> list[RecQuery]:
    """The request shapes the dense path answers: a known user, exclusions, an
    unknown user's inline history, a known user's history on top of training."""
    some = small.items.ids(rng.choice(small.n_items, 12, replace=False))
    hist = [(i, float(v)) for i, v in zip(some[:8], rng.integers(1, 6, 8), strict=True)]
    # values sent without one (None): each component's own meaning (unrated)
    unrated = [(i, None if j % 2 else v) for j, (i, v) in enumerate(hist)]
    base = dict(k=k, include_seen=include_seen)
    return [
        RecQuery(user_id=u, **base),
        RecQuery(user_id=u, exclude=some[8:], **base),
        RecQuery(user_id="", history=hist, **base),
        RecQuery(user_id="someone-new", history=hist[:3], exclude=some[:1], **base),
        RecQuery(user_id=u, history=hist[:2], **base),
        RecQuery(user_id="", history=unrated, **base),
        RecQuery(user_id=u, history=unrated[:3], **base),
    ]


@pytest.mark.parametrize("k", [1, 10, 60])
def test_dense_hybrid_answers_what_the_general_path_answers(router, small, k):
    calls = {"dense": 0}
    explained = {"any": 0}
    real = router._hybrid_dense
    rng = np.random.default_rng(k)

    def counted(*a):
        out = real(*a)
        calls["dense"] += out is not None
        return out

    router._hybrid_dense = counted  # type: ignore[method-assign]
    try:
        for name in router.cfg.hybrids:
            for u in small.users.ids(np.arange(0, small.n_users, 157)):
                for include_seen in (False, True):
                    for q in shapes(small, u, k, include_seen, rng):
                        q.model = name
                        q.explain = bool(rng.integers(2))  # explanations: the dense path too
                        got, want = router.recommend(q), general(router, q)
                        assert got.item_ids == want.item_ids, (name, q)
                        assert got.because == want.because, (name, q)
                        explained["any"] += any(got.because)
                        # With exclusions the general path scores a known user by
                        # BLAS, the dense path by the one-user kernel: float rounding.
                        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-9)
                        assert (got.version, got.folded_in) == (want.version, want.folded_in)
    finally:
        router._hybrid_dense = real  # type: ignore[method-assign]
    assert calls["dense"] > 0 and explained["any"] > 0


def _unreached_by_popularity(model, small, u: int, q: RecQuery, excl, cand):
    """The served answer of a sparse_scores model (docs/serving.md): its items
    scored > 0 as it ranks them, then the eligible items scored 0 by training
    count (ties by index), then those < 0; k long."""
    every, vals = model.recommend(
        [u], small.n_items, exclude=excl, filter_seen=not q.include_seen, candidates=cand
    )
    keep = every[0] >= 0
    every, vals = every[0][keep], vals[0][keep]
    counts = np.bincount(small.interactions.indices, minlength=small.n_items)
    zero = every[vals == 0]
    zero = zero[np.lexsort((zero, -counts[zero]))]
    items = np.r_[every[vals > 0], zero, every[vals < 0]][: q.k]
    scores = np.r_[vals[vals > 0], np.zeros(zero.size), vals[vals < 0]][: q.k]
    return items, scores


@pytest.mark.parametrize("algo", algorithms())
def test_a_known_users_candidates_rank_as_the_model_ranks(router, small, algo):
    # Candidates (and exclusions among them) for a known user: the dense row
    # restricted to the candidates, one top-k; the model's general call's answer.
    model = router.catalog.get(algo).model
    rng = np.random.default_rng(8)
    for u in rng.choice(small.n_users, 5, replace=False):
        seen = small.interactions[int(u)].indices
        cand = np.unique(np.r_[rng.choice(small.n_items, 30, replace=False), seen[:3]])
        excl = cand[:4]
        for include_seen in (False, True):
            q = RecQuery(
                user_id=small.users.ids([u])[0],
                k=12,
                model=algo,
                candidates=small.items.ids(cand),
                exclude=small.items.ids(excl),
                include_seen=include_seen,
            )
            got = router.recommend(q)
            items, scores = model.recommend(
                [int(u)], 12, exclude=excl, filter_seen=not include_seen, candidates=cand
            )
            n = int((items[0] >= 0).sum())
            items, scores = items[0, :n], scores[0, :n]
            if model.sparse_scores and n and scores[-1] <= 0:
                items, scores = _unreached_by_popularity(model, small, int(u), q, excl, cand)
            assert got.item_ids == small.items.ids(items), (u, include_seen)
            np.testing.assert_allclose(got.scores, scores, rtol=1e-5, atol=1e-6)
            assert set(got.item_ids) <= set(small.items.ids(cand)) - set(small.items.ids(excl))


@pytest.mark.parametrize("algo", algorithms())
def test_a_known_users_exclusions_rank_as_the_model_ranks(router, small, algo):
    # One model, a known user, excluded items: the router takes the user's dense
    # row with the exclusions NaN (one top-k call); the answer is the model's
    # own general call's, exclusions built into its sparse matrices.
    model = router.catalog.get(algo).model
    rng = np.random.default_rng(7)
    taken = {"dense": 0}
    real = model.dense_user
    model.dense_user = lambda *a: (taken.__setitem__("dense", taken["dense"] + 1), real(*a))[1]
    try:
        for u in rng.choice(small.n_users, 6, replace=False):
            excl = rng.choice(small.n_items, int(rng.integers(1, 40)), replace=False)
            for include_seen in (False, True):
                q = RecQuery(
                    user_id=small.users.ids([u])[0],
                    k=15,
                    model=algo,
                    exclude=small.items.ids(excl),
                    include_seen=include_seen,
                )
                got = router.recommend(q)
                items, scores = model.recommend(
                    [int(u)], 15, exclude=np.sort(excl), filter_seen=not include_seen
                )
                n = int((items[0] >= 0).sum())
                assert got.item_ids == small.items.ids(items[0, :n]), (u, include_seen)
                np.testing.assert_allclose(got.scores, scores[0, :n], rtol=1e-5, atol=1e-6)
                assert not set(got.item_ids) & set(small.items.ids(excl))
    finally:
        model.dense_user = real
    assert taken["dense"] == 12


def test_recorded_events_are_folded_in_on_the_dense_path(router, small):
    online = OnlineState()
    mine = Router(router.cfg, router.catalog, online)  # its own events, not the fixture's
    u = small.users.ids([5])[0]
    item = small.items.ids([small.n_items - 1])[0]
    online.apply([Event(u, item, 4.0, 0)])  # an event since training: the user is folded in
    q = RecQuery(user_id=u, k=10, model="all")
    got, want = mine.recommend(q), general(mine, q)
    assert got.folded_in and got.item_ids == want.item_ids and item not in got.item_ids
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-9, atol=1e-12)


def test_events_recorded_without_a_value_fold_in_as_on_the_general_path(router, small):
    # NaN: recorded without a value, each component's own `unrated` (a rating
    # model's rows differ from the others': the general path answers)
    online = OnlineState()
    mine = Router(router.cfg, router.catalog, online)
    ids = small.items.ids([3, 8, 13, 21])
    users = (small.users.ids([5])[0], "recorded-newcomer")
    for u in users:
        values = (math.nan, 4.0, math.nan, 2.0)
        online.apply([Event(u, i, v, 0) for i, v in zip(ids, values, strict=True)])
    for name in router.cfg.hybrids:
        for u in users:
            q = RecQuery(user_id=u, k=10, model=name)
            got, want = mine.recommend(q), general(mine, q)
            assert got.item_ids == want.item_ids and not set(got.item_ids) & set(ids), (name, u)
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-9)


def test_recorded_and_inline_history_resolve_to_one_fold_in(router, small):
    """An unknown user's recorded events, then the request's own history (an
    unknown item within tolerance dropped): the model folds in exactly those
    items and values, in that order (a later value of an item wins)."""
    online = OnlineState()
    mine = Router(router.cfg, router.catalog, online)
    ids = small.items.ids([3, 8, 13])
    online.apply([Event("newcomer", ids[0], 5.0, 0), Event("newcomer", ids[1], 2.0, 0)])
    hist = [(ids[1], 4.0), ("not-an-item", 1.0), (ids[2], 3.0)]
    m = router.catalog.get("als").model
    got = mine.recommend(RecQuery(user_id="newcomer", history=hist, k=7, model="als"))
    want_i, want_s = m.recommend_histories(
        m.history_matrix([m.items.index([ids[0], ids[1], ids[1], ids[2]])], [[5, 2, 4, 3]]), 7
    )
    assert got.item_ids == m.items.ids(want_i[0]) and got.folded_in
    np.testing.assert_allclose(got.scores, want_s[0], rtol=1e-6)
    only_inline = mine.recommend(RecQuery(user_id="", history=hist, k=7, model="als"))
    w_i, _ = m.recommend_histories(m.history_matrix([m.items.index([ids[1], ids[2]])], [[4, 3]]), 7)
    assert only_inline.item_ids == m.items.ids(w_i[0])


def test_candidates_take_the_general_path_and_explanations_the_dense_one(router, small):
    u = small.users.ids([3])[0]
    some = small.items.ids([0, 1, 2, 3, 4])
    hy = router.cfg.hybrids["all"]
    stages = dict.fromkeys(("resolve", "retrieve", "rank"), 0.0)
    q = RecQuery(user_id=u, k=5, model="all", candidates=some)
    assert router._hybrid_dense(hy, q, lambda: None, stages) is None
    assert len(router.recommend(q).item_ids) == 5
    q = RecQuery(user_id=u, k=5, model="all", explain=True)
    dense = router._hybrid_dense(hy, q, lambda: None, stages)
    assert dense is not None and len(dense.item_ids) == 5
    assert dense.because == general(router, q).because and any(dense.because)
    with pytest.raises(RequestError, match="unknown") as err:  # unknown ids: refused as before
        router.recommend(RecQuery(user_id="", history=[("nope", 1.0)] * 5, k=5, model="all"))
    assert err.value.field == "history"
    with pytest.raises(RequestError):
        router.recommend(RecQuery(user_id="", history=[("nope", 1.0)] * 5, k=5, model="all"))


@pytest.mark.parametrize("name", ["itemknn+rp3beta", "als+itemknn", "ease+userknn", "all"])
@pytest.mark.parametrize("k", [1, 10, 40])
def test_hybrid_similar_items_blend_the_components_neighbours(router, small, name, k):
    # A hybrid's SimilarItems: each component's max(3k, 100) most similar items,
    # min-max normalised, weighted and summed (blend_rows, numpy, as reference).
    hy = router.cfg.hybrids[name]
    for item in (0, 13, small.n_items - 1):
        parts = []
        for algo, w in hy.weights.items():
            m = router.catalog.get(algo).model
            try:
                i, v = m.similar_items(item, min(max(3 * k, 100), small.n_items - 1))
            except NotImplementedError:
                continue
            if m.sparse_scores:  # a similarity of 0 (or less) is no likeness: dropped
                i, v = i[v > 0], v[v > 0]
            if i.size:
                parts.append((w, i, v))
        rows, totals = blend_rows(parts, k, small.n_items)
        got = router.similar(small.items.ids([item])[0], k, name)
        assert got.item_ids == small.items.ids(rows), (name, item)
        np.testing.assert_allclose(got.scores, totals, rtol=1e-6)


def test_a_hybrid_follows_its_components_loads_and_reloads(small, tmp_path):
    """The router derives a hybrid's components once per catalogue change: the
    hybrid is not ready while a component loads, and after a component's new
    version is published and reloaded, answers name (and use) the new version."""
    for algo in ("popularity", "itemknn"):
        create(algo).fit(small).save(tmp_path, algo, dataset=small)
    hy = Hybrid("h", {"popularity": 0.5, "itemknn": 0.5})
    cfg = ServerConfig(models=str(tmp_path), hybrids={"h": hy})
    gate = threading.Event()

    def slow_itemknn(path, full_verify):
        if "itemknn" in str(path):
            gate.wait(30)
        return default_loader(path, full_verify)

    catalog = Catalog(cfg.models, loader=slow_itemknn)
    router = Router(cfg, catalog, OnlineState())
    catalog.start()
    u = small.users.ids([0])[0]
    try:
        deadline = time.monotonic() + 30
        while not catalog.ready("popularity") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not router.ready("h")
        # The hybrid waits for itemknn: the chain's next model answers.
        assert router.recommend(RecQuery(user_id=u, k=5, model="h")).served_by == "popularity"
        gate.set()
        assert catalog.wait(60)
        assert router.ready("h")
        first = router.recommend(RecQuery(user_id=u, k=5, model="h"))
        v_knn = catalog.get("itemknn").version
        assert first.version == f"popularity@{catalog.get('popularity').version},itemknn@{v_knn}"
        # A new itemknn that scores differently (a weak shrinkage) is published and reloaded.
        create("itemknn", k=5, similarity="dot").fit(small).save(tmp_path, "itemknn", dataset=small)
        switched, refused = catalog.reload()
        assert [s.name for s in switched] == ["itemknn"] and not refused
        assert catalog.get("itemknn").version != v_knn
        again = router.recommend(RecQuery(user_id=u, k=5, model="h"))
        assert again.version.endswith(f"itemknn@{catalog.get('itemknn').version}")
        assert again.item_ids == general(router, RecQuery(user_id=u, k=5, model="h")).item_ids
    finally:
        gate.set()
        catalog.close()


@pytest.mark.parametrize(
    "name", ["als+itemknn", "itemknn+userknn", "content+itemknn", "bpr+itemknn"]
)
def test_hybrid_explanations_merge_each_components_in_weight_order(router, small, name):
    """Independent of the router's merge: each component model's own
    explanation of every answered item, heavier component first (0.7 before
    0.3), merged without repeats and cut at EXPLAIN_ITEMS. bpr explains nothing,
    content only some items: the lighter component fills in."""
    from recserve.serving.router import EXPLAIN_ITEMS

    a, b = name.split("+")
    rng = np.random.default_rng(11)
    for u in rng.choice(small.n_users, 8, replace=False):
        uid = small.users.ids([u])[0]
        got = router.recommend(RecQuery(user_id=uid, k=10, model=name, explain=True))
        idx = small.items.index(got.item_ids)
        want: list[list[str]] = [[] for _ in got.item_ids]
        for algo in (a, b):
            m = router.catalog.get(algo).model
            for j, (hist, _) in enumerate(m.explain_user_items(int(u), idx, EXPLAIN_ITEMS)):
                want[j] += [i for i in small.items.ids(hist) if i not in want[j]]
        assert got.because == [w[:EXPLAIN_ITEMS] for w in want], (name, uid)
