"""The model contract, checked on every registered algorithm with its defaults.

A new algorithm gets these tests by registering itself; per-algorithm
parameters for speed go in FAST_PARAMS.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.models import NotFittedError, algorithms, base, create, load_named
from recserve.models.base import KnownUserRow, known_user

FAST_PARAMS: dict[str, dict[str, object]] = {
    "als": {"factors": 16, "iterations": 5},
    "svd": {"factors": 16, "epochs": 5},
    "bpr": {"factors": 16, "epochs": 5, "fold_in_epochs": 5},
    "bayes_mf": {"factors": 8, "epochs": 5},
}


@pytest.fixture(scope="module", params=algorithms())
def fitted(request, small):
    model = create(request.param, **FAST_PARAMS.get(request.param, {}))
    return model.fit(small)


def test_recommend_shape_order_and_no_seen_items(fitted, small):
    users = np.arange(0, small.n_users, 97)
    items, scores = fitted.recommend(users, k=15)
    assert items.shape == scores.shape == (users.size, 15)
    seen = small.interactions
    for row, u in enumerate(users):
        got = items[row][items[row] >= 0]
        eligible = small.n_items - seen[u].nnz
        assert got.size == min(15, eligible)
        assert not set(got) & set(seen.indices[seen.indptr[u] : seen.indptr[u + 1]])
        assert np.all(np.diff(scores[row][: got.size]) <= 0)
        assert len(set(got)) == got.size


@pytest.mark.parametrize("filter_seen", [True, False])
def test_recommend_user_is_the_top_k_of_the_dense_scores(fitted, small, filter_seen):
    # The one-user serving call (a fused kernel for exact embedding models)
    # against the model's dense scores computed by numpy: the returned items
    # carry those scores, best first, and no eligible item left out scores higher.
    seen = small.interactions
    for u in range(0, small.n_users, 41):
        items, scores = fitted.recommend_user(u, k=12, filter_seen=filter_seen)
        dense = fitted._score_users(np.array([u]))[0].astype(np.float64)
        banned = set(seen.indices[seen.indptr[u] : seen.indptr[u + 1]]) if filter_seen else set()
        eligible = [j for j in range(small.n_items) if j not in banned]
        assert items.dtype == np.int32 and items.size == min(12, len(eligible))
        assert not set(items.tolist()) & banned and len(set(items.tolist())) == items.size
        np.testing.assert_allclose(scores, dense[items], rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(scores) <= 0)
        rest = np.setdiff1d(eligible, items)
        if rest.size:
            assert dense[rest].max() <= scores[-1] + 1e-5


@pytest.mark.parametrize("filter_seen", [True, False])
def test_dense_user_is_the_row_recommend_user_selects_from(fitted, small, filter_seen):
    # What a hybrid blends: the one-user row, NaN exactly at the seen items,
    # whose top-k (numpy, ties by lower index) is recommend_user's answer.
    seen = small.interactions
    row = np.empty(small.n_items, np.float32)
    for u in range(0, small.n_users, 37):
        assert fitted.dense_user(u, row, filter_seen)
        banned = seen.indices[seen.indptr[u] : seen.indptr[u + 1]] if filter_seen else []
        np.testing.assert_array_equal(np.flatnonzero(np.isnan(row)), np.sort(banned))
        items, scores = fitted.recommend_user(u, k=12, filter_seen=filter_seen)
        ok = np.flatnonzero(~np.isnan(row))
        order = ok[np.lexsort((ok, -row[ok]))][:12]
        np.testing.assert_array_equal(items, order)
        np.testing.assert_array_equal(scores, row[order])
    with pytest.raises(ValueError, match="out"):
        fitted.dense_user(0, np.empty(small.n_items + 1, np.float32))
    with pytest.raises(IndexError):
        fitted.dense_user(small.n_users, row)


@pytest.mark.parametrize("filter_seen", [True, False])
def test_dense_history_is_the_row_recommend_histories_selects_from(fitted, small, filter_seen):
    # The fold-in row a hybrid blends: NaN exactly at the history's items, and
    # its top-k (numpy, ties by lower index) is recommend_histories' answer.
    rng = np.random.default_rng(3)
    out = np.empty(small.n_items, np.float32)
    for _ in range(6):
        items = np.unique(rng.integers(0, small.n_items, 8))
        row = fitted.history_matrix([items], [rng.integers(1, 6, items.size)])
        if not fitted.dense_history(row, out, filter_seen):
            pytest.skip(f"{fitted.algorithm}: approximate fold-in ranking")
        banned = items if filter_seen else np.zeros(0, int)
        np.testing.assert_array_equal(np.flatnonzero(np.isnan(out)), banned)
        got_i, got_s = fitted.recommend_histories(row, k=12, filter_seen=filter_seen)
        n = int((got_i[0] >= 0).sum())
        ok = np.flatnonzero(~np.isnan(out))
        order = ok[np.lexsort((ok, -out[ok]))][:12]
        np.testing.assert_array_equal(got_i[0, :n], order)
        np.testing.assert_array_equal(got_s[0, :n], out[order])
    with pytest.raises(ValueError, match="row"):
        fitted.dense_history(fitted.history_matrix([[0], [1]]), out)


def test_one_history_matrix_is_the_general_one(fitted, small):
    # A cold request's history takes a shortcut past the general COO build: the
    # same matrix (sorted indices, a repeated item keeps its last value), checked
    # against a dict and against the history's row in a two-history call.
    rng = np.random.default_rng(5)
    for size in (0, 1, 10, 40, 64, 65, 200):  # up to 64 sorted in the kernel, numpy beyond
        items = rng.integers(0, min(small.n_items, 30 if size <= 40 else 80), size)  # repeats
        values = rng.integers(1, 6, size).astype(float)
        for vals in (values, None):
            one = fitted.history_matrix([items], None if vals is None else [vals])
            want = {
                int(i): (1.0 if vals is None else float(v))
                for i, v in zip(items, values, strict=True)
            }
            assert one.shape == (1, small.n_items) and one.has_sorted_indices
            np.testing.assert_array_equal(one.indices, sorted(want))
            np.testing.assert_array_equal(one.data, [want[i] for i in sorted(want)])
            two = fitted.history_matrix([items, [0]], None if vals is None else [vals, [1.0]])
            assert (one != two[0]).nnz == 0 and one.dtype == two.dtype
            # The row is made without scipy's constructor: it must be the matrix
            # the constructor makes of the same arrays, attributes and behaviour.
            ref = sp.csr_matrix((one.data, one.indices, one.indptr), shape=one.shape)
            ref.has_canonical_format = True
            assert one.__dict__.keys() == ref.__dict__.keys()
            assert (one.indptr.dtype, one.indices.dtype) == (ref.indptr.dtype, ref.indices.dtype)
            dense = np.zeros((1, small.n_items), np.float32)
            dense[0, sorted(want)] = [want[i] for i in sorted(want)]
            np.testing.assert_array_equal(one.toarray(), dense)
            np.testing.assert_array_equal((one @ one.T).toarray(), (ref @ ref.T).toarray())
            assert one.has_canonical_format and one.nnz == len(want)
    with pytest.raises(IndexError, match="item index -2 outside"):  # the first bad one
        fitted.history_matrix([[0, -2, small.n_items]])
    with pytest.raises(IndexError, match=f"item index {small.n_items} outside"):
        fitted.history_matrix([[0, small.n_items]])
    with pytest.raises(IndexError, match="item index -1 outside"):
        fitted.history_matrix([[-1]])
    with pytest.raises(ValueError, match="differ in length"):
        fitted.history_matrix([[0, 1]], [[1.0]])
    with pytest.raises(ValueError, match="finite"):
        fitted.history_matrix([[0]], [[float("nan")]])


def test_scoring_in_chunks_answers_as_one_chunk(fitted, small, monkeypatch):
    # recommend() and recommend_histories() score score_chunk(n_items) users
    # at a time, fewer on a large catalogue (memory): every chunk size gives
    # the answers of one chunk, exclusions and candidates (per user) included.
    users = np.arange(0, small.n_users, 7)
    seen = small.interactions
    rng = np.random.default_rng(3)
    exclude = [rng.integers(0, small.n_items, 5) for _ in users]
    candidates = [rng.integers(0, small.n_items, 40) for _ in users]
    history = seen[users]

    def answers() -> list[tuple[np.ndarray, np.ndarray]]:
        return [
            fitted.recommend(users, 9),
            fitted.recommend(users, 9, exclude=exclude, candidates=candidates),
            fitted.recommend_histories(history, 9),
            fitted.recommend_histories(history, 9, exclude=exclude),
        ]

    whole = answers()
    assert users.size > 7 and base.score_chunk(small.n_items) >= users.size
    for rows in (1, 3, 7):
        monkeypatch.setattr(base, "SCORE_FLOATS", rows * small.n_items + rows - 1)
        assert base.score_chunk(small.n_items) == rows
        for (items, scores), (want_i, want_s) in zip(answers(), whole, strict=True):
            np.testing.assert_allclose(scores, want_s, rtol=1e-6, atol=1e-6)
            # BLAS may round a product differently per chunk shape: items may
            # trade places only within a near-tie.
            for r in np.flatnonzero((items != want_i).any(axis=1)):
                moved = np.flatnonzero(items[r] != want_i[r])
                assert np.ptp(want_s[r, moved]) <= 1e-5, (r, items[r], want_i[r])


def test_the_scoring_chunk_bounds_a_chunks_floats():
    assert base.score_chunk(1_682) == base.SCORE_CHUNK  # ml-100k: the full chunk
    for n_items in (40_000, 151_669, 10**9):
        rows = base.score_chunk(n_items)
        assert rows >= 1 and (rows == 1 or rows * n_items <= base.SCORE_FLOATS)
    assert base.score_chunk(151_669) == base.SCORE_FLOATS // 151_669
    assert base.score_chunk(0) == base.SCORE_CHUNK


def test_explanations_of_an_answer_at_once_are_each_items_own(fitted, small):
    # A Recommend with explain asks for every answered item's explanation in one
    # call (one factorisation or slice shared by the items): item by item, the
    # same history items and contributions, for a known user and a history row.
    rng = np.random.default_rng(9)
    for u in (3, 50):
        items = rng.choice(small.n_items, 7, replace=False)
        together = fitted.explain_user_items(u, items, 4)
        assert len(together) == items.size
        for item, (idx, contrib) in zip(items, together, strict=True):
            one_idx, one_contrib = fitted.explain(u, int(item), 4)
            np.testing.assert_array_equal(idx, one_idx)
            np.testing.assert_allclose(contrib, one_contrib, rtol=1e-5, atol=1e-7)
            assert idx.size <= 4 and (contrib > 0).all()
            assert np.all(np.diff(contrib) <= 0)
            assert set(idx) <= set(small.interactions[u].indices)
    row = fitted.history_matrix([[1, 5, 9, 40]], [[4.0, 1.0, 5.0, 2.0]])
    items = np.array([0, 2, 7, 60])
    for item, (idx, _) in zip(items, fitted.explain_items(row, items, 3), strict=True):
        np.testing.assert_array_equal(idx, fitted.explain_history(row, int(item), 3)[0])
    assert fitted.explain_items(row, [], 3) == []
    with pytest.raises(IndexError, match="item"):
        fitted.explain_items(row, [small.n_items], 3)


def test_explain_items_ranks_each_items_contributions(small, monkeypatch):
    # explain_items ranks every item's column of the contribution matrix at once;
    # against a per-item Python reference: only positive contributions (not 0,
    # negatives or NaN), largest first, ties by lower history item, at most n.
    model = create("popularity").fit(small)
    rng = np.random.default_rng(4)
    hist = np.array([40, 3, 17, 8, 25, 11], np.int32)  # not sorted: ties go by item
    c = rng.choice([0.0, -1.0, 0.5, 0.25, 2.0, np.nan], size=(hist.size, 9))
    c[:, 0] = 0.0  # an item nothing contributes to
    c[:, 1] = 0.5  # every history item tied
    monkeypatch.setattr(model, "_contributions_many", lambda history, items, user: (hist, c))
    row = model.history_matrix([[1]], [[1.0]])
    for n in (1, 3, 6, 10):
        got = model.explain_items(row, np.arange(9), n)
        assert len(got) == 9
        for j, (idx, val) in enumerate(got):
            pairs = sorted((-v, int(h)) for h, v in zip(hist, c[:, j], strict=True) if v > 0)[:n]
            assert idx.dtype == np.int32 and val.dtype == np.float32
            assert idx.tolist() == [h for _, h in pairs]
            assert val.tolist() == [np.float32(-v) for v, _ in pairs]
    assert all(idx.size == 0 for idx, _ in model.explain_items(row, np.arange(3), 0))


def test_training_row_is_the_users_row_of_the_training_csr(fitted, small):
    # What a known user's fold-in (recorded events on top of training) and
    # explanations start from: the row's items and values, as scipy gives them.
    for u in (0, 3, small.n_users // 2, small.n_users - 1):
        idx, val = fitted.training_row(u)
        row = small.interactions[u]
        assert idx.dtype == np.int32 and val.dtype == np.float32
        np.testing.assert_array_equal(idx, row.indices)
        np.testing.assert_array_equal(val, row.data.astype(np.float32))
    for bad in (-1, small.n_users):
        with pytest.raises(IndexError, match="user"):
            fitted.training_row(bad)


@pytest.mark.parametrize("filter_seen", [True, False])
def test_a_known_users_own_row_marked_as_theirs_folds_in_to_their_trained_row(
    fitted, small, filter_seen
):
    # The row a known user with recorded events is folded in from, before any
    # event changes it: marked as theirs (KnownUserRow), it must give the row
    # they are served from without events, for every model. Folded in from
    # nothing, svd, bayes_mf and bpr gave other vectors (SGD's users are not
    # the fold-in's solve) and userknn counted the user as their own neighbour.
    want = np.empty(small.n_items, np.float32)
    got = np.empty(small.n_items, np.float32)
    for u in range(0, small.n_users, 37):
        if fitted.is_cold(u):
            continue
        idx, val = fitted.training_row(u)
        row = KnownUserRow.of(fitted.history_matrix([idx], [val]), u)
        assert known_user(row) == u and known_user(row.copy()) == -1
        assert fitted.dense_user(u, want, filter_seen)
        assert fitted.dense_history(row, got, filter_seen)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = ~np.isnan(want)
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-5 * np.abs(want[ok]).max())
        if fitted.predicts_ratings:  # Predict's path too
            items = np.arange(0, small.n_items, 13)
            np.testing.assert_allclose(
                fitted.score_history(row, items)[0], fitted.score(u, items)[0], rtol=1e-5
            )


def test_a_known_users_explanations_read_the_training_row_scipy_gives(fitted, small):
    # explain_user_items reads the user's row from the CSR arrays (csr_row), not
    # through scipy's row indexing: the same explanations, bit for bit, for
    # every model, items repeated and in any order.
    rng = np.random.default_rng(8)
    for u in rng.integers(0, small.n_users, 6):
        items = rng.integers(0, small.n_items, 7)
        items[2] = items[5]
        got = fitted.explain_user_items(int(u), items, 4)
        want = fitted.explain_items(fitted.user_items[int(u)], items, 4, user=int(u))
        assert len(got) == len(want) == items.size
        for (gi, gv), (wi, wv) in zip(got, want, strict=True):
            assert gi.dtype == wi.dtype and gv.dtype == wv.dtype
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_array_equal(gv, wv)


def test_exclusions_never_shorten_results(fitted):
    items, _ = fitted.recommend([0], k=10)
    banned = items[0][:5]
    again, _ = fitted.recommend([0], k=10, exclude=banned)
    assert again.shape == (1, 10) and (again[0] >= 0).all()
    assert not set(again[0]) & set(banned)
    # Items 1-5 of the first list still come first, in order.
    assert list(again[0][:5]) == list(items[0][5:10])


def test_include_seen_and_candidates(fitted, small):
    seen = small.interactions[3].indices
    with_seen, _ = fitted.recommend([3], k=fitted.n_items, filter_seen=False)
    assert set(seen) <= set(with_seen[0])
    cands = np.array([5, 6, 7, int(seen[0])])
    got, _ = fitted.recommend([3], k=10, candidates=cands)
    valid = got[0][got[0] >= 0]
    assert set(valid) == set(cands[:3]) - set(seen)


def test_empty_exclude_and_candidate_lists_mean_no_restriction(fitted):
    base, _ = fitted.recommend([0, 1], k=5)
    for kwargs in ({"exclude": []}, {"candidates": []}, {"exclude": np.array([], int)}):
        got, _ = fitted.recommend([0, 1], k=5, **kwargs)
        np.testing.assert_array_equal(got, base)


def test_fold_in_excludes_history_and_returns_exactly_k(fitted):
    history = np.array([1, 2, 3, 50])
    items, scores = fitted.recommend_from_history(history, k=20, exclude=[4])
    assert items.size == 20 and not set(items) & {1, 2, 3, 4, 50}
    assert np.all(np.diff(scores) <= 0)
    empty, _ = fitted.recommend_from_history([], k=5)  # no history at all still answers
    assert empty.size == 5


def test_history_items_with_value_zero_are_seen_too(fitted):
    # An explicit 0 is a value like any other (the contract: "an explicit 0 is
    # stored and used as 0"), and the item is still one the user has seen. With
    # exclusions the seen set was once built by adding sparse matrices, which
    # dropped the zero entries, so those items came back.
    history = np.array([1, 2, 3, 50])
    values = np.array([0.0, 2.0, 0.0, 1.0], np.float32)
    row = fitted.history_matrix([history], [values])
    cands = [np.array([1, 3, 4, 6, 7, 8, 50])]
    for exclude in (None, [np.array([4])]):
        for candidates in (None, cands):
            items, _ = fitted.recommend_histories(
                row, k=fitted.n_items, exclude=exclude, candidates=candidates
            )
            got = set(items[0][items[0] >= 0].tolist())
            assert not got & {1, 2, 3, 50}, (exclude, candidates)
            assert not exclude or 4 not in got
            if candidates is not None:
                assert got <= {4, 6, 7, 8}
    if fitted.n_users > 3:  # a known user's row with an explicit 0, the same way
        seen = fitted.user_items[3]
        zeroed = sp.csr_matrix(
            (np.zeros(seen.indices.size, np.float32), seen.indices, seen.indptr), shape=seen.shape
        )
        items, _ = fitted.recommend_histories(zeroed, k=fitted.n_items, exclude=[np.array([0])])
        assert not set(items[0].tolist()) & set(seen.indices.tolist())


def test_similar_items_never_returns_the_item(fitted):
    items, scores = fitted.similar_items(7, k=10)
    assert items.size == 10 and 7 not in items
    assert np.all(np.diff(scores) <= 0)


def test_score_matches_ranking(fitted):
    items, scores = fitted.recommend([11], k=5)
    got, std = fitted.score(11, items[0])
    if fitted.predicts_ratings:  # ratings are clipped to the scale; ranking is not
        scores = np.clip(scores, *fitted.scale)
    np.testing.assert_allclose(got, scores[0], rtol=1e-5)
    assert std is None or std.shape == got.shape


def test_save_load_round_trip_is_identical(fitted, small, tmp_path):
    fitted.save(tmp_path, "m", metrics={"recall@10": 0.5}, dataset=small)
    loaded = load_named(tmp_path, "m")
    assert loaded.algorithm == fitted.algorithm and loaded.params == fitted.params
    assert loaded.manifest["metrics"] == {"recall@10": 0.5}
    users = np.arange(0, small.n_users, 50)
    for a, b in zip(fitted.recommend(users, 10), loaded.recommend(users, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        fitted.recommend_from_history([1, 2], k=7)[0], loaded.recommend_from_history([1, 2], k=7)[0]
    )


def test_errors_are_clear(fitted):
    algo = fitted.algorithm
    with pytest.raises(ValueError, match="unknown param"):
        create(algo, no_such_param=1)
    with pytest.raises(NotFittedError):
        create(algo).recommend([0], 5)
    with pytest.raises(ValueError, match="k: must be a positive integer"):
        fitted.recommend([0], 0)
    with pytest.raises(IndexError, match="users"):
        fitted.recommend([fitted.n_users], 5)
    with pytest.raises(IndexError, match="history"):
        fitted.recommend_from_history([fitted.n_items], k=5)
    with pytest.raises(ValueError, match="finite"):
        fitted.recommend_from_history([1], [np.nan], k=5)
    with pytest.raises(IndexError, match="item"):
        fitted.similar_items(-1, 5)


@pytest.mark.parametrize("algo", ["als", "bpr", "svd", "bayes_mf"])
@pytest.mark.parametrize("k", [1, 10, 300])
def test_exact_similar_items_are_the_cosine_top_k(small, algo, k):
    # A factor model's exact SimilarItems (one fused kernel call) against a
    # float64 numpy cosine: the same items in order, up to float32 near-ties,
    # and the general path's (BLAS product, general top-k) answer.
    model = create(algo, **FAST_PARAMS[algo]).fit(small)
    y = np.asarray(
        model.Q if algo in ("svd", "bayes_mf") else model._similarity_vectors(), np.float64
    )
    norms = np.linalg.norm(y, axis=1)
    unit = np.divide(y, norms[:, None], out=np.zeros_like(y), where=norms[:, None] > 0)
    for item in (0, 17, small.n_items - 1):
        got_i, got_s = model.similar_items(item, k)
        cos = unit @ unit[item]
        cos[item] = -np.inf
        order = np.lexsort((np.arange(cos.size), -cos))[: min(k, small.n_items - 1)]
        assert got_i.size == order.size and item not in got_i.tolist()
        np.testing.assert_allclose(got_s, cos[got_i], atol=2e-6)
        np.testing.assert_allclose(got_s, cos[order], atol=2e-6)  # the best scores
        near = np.abs(cos[got_i] - cos[order]) > 2e-6
        assert not near.any()  # where the items differ, their scores tie
        gen_i, gen_s = model._similar(np.array([item], np.int64), k)
        n = int((gen_i[0] >= 0).sum())
        np.testing.assert_allclose(got_s, gen_s[0, :n], atol=2e-6)
    with pytest.raises(IndexError, match="item"):
        model.similar_items(small.n_items, k)


def test_a_history_row_falls_back_to_scipys_constructor(monkeypatch):
    """Where scipy's matrices carry attributes the template copy would miss, the
    constructor builds the row (same matrix either way)."""
    from recserve.models import base

    monkeypatch.setattr(base, "_ROW_TEMPLATES", {7: base._NO_TEMPLATE})
    row = base.csr_row(np.array([1, 4], np.int32), np.array([2.0, 3.0], np.float32), 7)
    np.testing.assert_array_equal(row.toarray(), [[0, 2, 0, 0, 3, 0, 0]])
    assert row.has_canonical_format and row.dtype == np.float32


def test_users_and_items_without_training_events_fit_and_serve(small):
    # A temporal split leaves the newest items (last in the index when ids
    # grow with time) and the newest users with no training events; itemknn
    # and userknn crashed in their BM25 weighting on such trailing empty rows.
    x = small.interactions  # canonical CSR, timestamps aligned with its data
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    empty_users = [0, small.n_users // 2, small.n_users - 2, small.n_users - 1]
    empty_items = [0, small.n_items // 2, small.n_items - 2, small.n_items - 1]
    keep = ~np.isin(rows, empty_users) & ~np.isin(x.indices, empty_items)
    train = sp.csr_matrix((x.data[keep], (rows[keep], x.indices[keep])), shape=x.shape)
    assert train.nnz == keep.sum()  # the kept entries, in the same order
    split = small.with_interactions(train, small.timestamps[keep])
    for algo in algorithms():
        model = create(algo, **FAST_PARAMS.get(algo, {})).fit(split)
        users = np.array([empty_users[0], 1, empty_users[-1]])
        items, scores = model.recommend(users, 10)
        assert items.shape == (3, 10) and np.isfinite(scores).all(), algo
        assert all(len(set(row)) == 10 for row in items.tolist()), algo
        assert ((items >= 0) & (items < small.n_items)).all(), algo
        sim, sim_scores = model.similar_items(empty_items[-1], 5)
        assert np.isfinite(sim_scores).all() and empty_items[-1] not in sim, algo
        got, got_scores = model.recommend_from_history([empty_items[-1], 5], k=10)
        assert len(got) == 10 and np.isfinite(got_scores).all(), algo


@pytest.mark.parametrize("algo", algorithms())
def test_training_that_ends_with_nan_is_refused_not_published(small, algo, monkeypatch):
    # A model whose arrays hold NaN answered every request with nothing (NaN is
    # never eligible) and was published as trained (bpr at lr=5 did). fit()
    # now refuses it, naming the array, for every algorithm: here the largest
    # float array of a real fit is poisoned.
    from recserve.models.base import TrainingError

    cls = type(create(algo))
    real = cls._fit

    def poisoned(self, dataset):
        real(self, dataset)
        floats = [(k, a) for k, a in self._arrays().items() if np.asarray(a).dtype.kind == "f"]
        key, arr = max(floats, key=lambda ka: np.asarray(ka[1]).size)
        np.asarray(arr).reshape(-1)[-1] = np.nan
        poisoned.key = key

    monkeypatch.setattr(cls, "_fit", poisoned)
    model = create(algo, **FAST_PARAMS.get(algo, {}))
    with pytest.raises(TrainingError, match=rf"^{algo}: training diverged \(") as info:
        model.fit(small)
    assert f"({poisoned.key} holds NaN or inf)" in str(info.value)
