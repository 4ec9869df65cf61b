"""kernels.topk against a brute-force Python reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.kernels import topk


def reference(scores: np.ndarray, k: int, exclude: set[int], cand: list[int]) -> list[int]:
    """Best k eligible items: higher score first, then lower index; NaN never."""
    pool = set(cand) if cand else set(range(scores.size))
    eligible = [
        j for j in pool if 0 <= j < scores.size and j not in exclude and not np.isnan(scores[j])
    ]
    return sorted(eligible, key=lambda j: (-float(scores[j]), j))[:k]


def rows(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(lists) + 1, np.int64)
    np.cumsum([len(x) for x in lists], out=indptr[1:])
    flat = [j for x in lists for j in x]
    return indptr, np.array(flat, np.int32)


def check(scores, k, excl, cand, out_i, out_s):
    for q in range(scores.shape[0]):
        ref = reference(scores[q], k, set(excl[q]), cand[q] if cand else [])
        got = [int(j) for j in out_i[q] if j >= 0]
        assert got == ref, (q, got, ref)
        assert (out_i[q, len(ref) :] == -1).all()
        np.testing.assert_array_equal(out_s[q, : len(ref)], scores[q, ref])


@pytest.mark.parametrize("threads", [1, 2])
def test_dense_matches_reference_with_ties_and_exclusions(threads):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (64, 40)).astype(np.float32)  # many ties
    scores[3, 5] = np.nan
    excl = [list(rng.integers(0, 40, rng.integers(0, 10))) for _ in range(64)]
    excl[7] = list(range(40))  # nothing eligible
    excl[8] = list(range(35))  # fewer than k eligible
    cand = [[] if q % 3 else list(rng.integers(0, 40, 6)) for q in range(64)]
    cand[9] = [2, 2, 2, 50, -1]  # repeats and out-of-range candidates
    i, s = topk.topk_dense(scores, 8, *rows(excl), *rows(cand), n_threads=threads)
    check(scores, 8, excl, cand, i, s)


def test_read_only_memory_mapped_input(tmp_path):
    scores = np.random.default_rng(1).random((5, 30), dtype=np.float32)
    np.save(tmp_path / "s.npy", scores)
    mapped = np.load(tmp_path / "s.npy", mmap_mode="r")
    assert not mapped.flags.writeable
    i, _ = topk.topk_dense(mapped, 4)
    check(scores, 4, [[]] * 5, None, i, _)


@pytest.mark.parametrize("shape", ["random", "ties", "descending", "ascending", "mostly_nan"])
def test_large_k_selection_by_a_sampled_floor_matches_reference(shape):
    # From k = 32 on, over rows at least 8 k long, the selection gathers the
    # entries above a sampled floor instead of keeping a heap (the hybrid's
    # 100 candidates, SimilarItems k = 100); sorted rows, heavy exclusions and
    # NaN make the floor miss and take the heap instead. Same answer either way.
    rng = np.random.default_rng(len(shape))
    for trial in range(60):
        n = int(rng.choice([300, 2500, 4099]))
        if shape == "random":
            row = rng.standard_normal(n)
        elif shape == "ties":
            row = rng.integers(0, 5, n).astype(float)
        elif shape == "descending":
            row = np.sort(rng.standard_normal(n))[::-1]
        elif shape == "ascending":
            row = np.sort(rng.standard_normal(n))
        else:
            row = rng.standard_normal(n)
            row[rng.random(n) < 0.9] = np.nan
        scores = np.ascontiguousarray(row, np.float32)[None, :]
        k = int(rng.choice([32, 33, 100, 250, n // 8]))
        excl = [
            sorted(set(rng.integers(0, n, int(rng.choice([0, 10, n // 2, n - k // 2]))).tolist()))
        ]
        out_i, out_s = topk.topk_dense(scores, k, *rows(excl))
        check(scores, k, excl, None, out_i, out_s)
        if trial % 10 == 0:  # the one-user call selects the same way
            q = np.ones((1, 1), np.float32)
            got_i, got_s = topk.topk_user(q, 0, scores.T.copy(), k, *rows(excl), True, None)
            np.testing.assert_array_equal(got_i, out_i[0, : got_i.size])
            np.testing.assert_array_equal(got_s, out_s[0, : got_i.size])
            assert (out_i[0, got_i.size :] == -1).all()


def test_ranked_walk_equals_dense_selection():
    rng = np.random.default_rng(2)
    shared = rng.integers(0, 6, 50).astype(np.float32)
    order = np.lexsort((np.arange(50), -shared)).astype(np.int32)
    excl = [list(rng.integers(0, 50, rng.integers(0, 20))) for _ in range(30)]
    cand = [[] if q % 4 else list(rng.integers(0, 50, 8)) for q in range(30)]
    i1, s1 = topk.topk_ranked(order, shared, 30, 10, *rows(excl), *rows(cand))
    dense = np.ascontiguousarray(np.broadcast_to(shared, (30, 50)))
    i2, s2 = topk.topk_dense(dense, 10, *rows(excl), *rows(cand))
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_ranked_one_is_the_dense_selection_and_leaves_its_mask_clean():
    # Popularity's serving call: one query, the caller's per-thread mask.
    rng = np.random.default_rng(5)
    shared = rng.integers(0, 6, 50).astype(np.float32)
    order = np.lexsort((np.arange(50), -shared)).astype(np.int32)
    mask = np.zeros(50, np.uint8)
    for _ in range(40):
        excl = rng.integers(-3, 53, rng.integers(0, 45)).astype(np.int32)  # repeats, out of range
        k = int(rng.integers(0, 60))
        got_i, got_s = topk.ranked_one(order, shared, k, excl, mask)
        kept = excl[(excl >= 0) & (excl < 50)]
        i2, s2 = topk.topk_dense(shared[None, :].copy(), k, *rows([list(kept)]))
        n = int((i2[0] >= 0).sum())
        np.testing.assert_array_equal(got_i, i2[0, :n])
        np.testing.assert_array_equal(got_s, s2[0, :n])
        assert not mask.any()
    with pytest.raises(ValueError, match="order and mask: expected length 50"):
        topk.ranked_one(order, shared, 3, np.zeros(0, np.int32), np.zeros(49, np.uint8))
    with pytest.raises(TypeError, match="exclude: expected dtype int32"):
        topk.ranked_one(order, shared, 3, np.zeros(0, np.int64), mask)
    with pytest.raises(ValueError, match="k: must be >= 0"):
        topk.ranked_one(order, shared, -1, np.zeros(0, np.int32), mask)


def test_wrappers_name_what_is_wrong():
    good = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="scores: expected dtype float32, got float64"):
        topk.topk_dense(good.astype(np.float64), 2)
    with pytest.raises(ValueError, match="scores: expected 2-d"):
        topk.topk_dense(np.zeros(3, np.float32), 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        topk.topk_dense(np.zeros((3, 4), np.float32).T, 2)
    with pytest.raises(ValueError, match="exclude_indptr: expected length 3"):
        topk.topk_dense(good, 2, np.zeros(2, np.int64), np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="decreases at row 1"):
        topk.topk_dense(good, 2, np.array([0, 2, 1], np.int64), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="k: must be >= 0"):
        topk.topk_dense(good, -1)
    with pytest.raises(TypeError, match="exclude_indices: expected dtype int32"):
        topk.topk_dense(good, 2, np.zeros(3, np.int64), np.zeros(0, np.int64))


def test_openmp_is_compiled_in():
    assert topk.have_openmp(), "setup.py should build with OpenMP on this machine (gcc)"


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 90),
    k=st.integers(1, 70),
    data=st.data(),
)
def test_properties(n, k, data):
    # Ties, infinities and NaN anywhere, so the selection's skip over blocks of
    # 8 below the heap's worst meets equal scores, NaN and excluded items.
    values = data.draw(
        st.lists(
            st.sampled_from([0.0, 1.0, 2.5, -3.0, np.inf, -np.inf, np.nan]), min_size=n, max_size=n
        )
    )
    scores = np.array([values], np.float32)
    excl = data.draw(st.lists(st.integers(-5, n + 5), max_size=n))
    i, s = topk.topk_dense(scores, k, *rows([excl]))
    got = [int(j) for j in i[0] if j >= 0]
    assert got == reference(scores[0], k, set(excl), [])
    eligible = {j for j in range(n) if not np.isnan(scores[0, j])} - set(excl)
    assert len(got) == min(k, len(eligible))
    assert not set(got) & set(excl)
    assert len(set(got)) == len(got)
    assert all(s[0, a] >= s[0, a + 1] for a in range(len(got) - 1))


def int_vectors(rng, n, d):
    """Small-integer float32 vectors: their dot products are exact in float32,
    so the fused kernels' scores equal numpy's bit for bit (and ties stay ties)."""
    return rng.integers(-2, 3, (n, d)).astype(np.float32)


@pytest.mark.parametrize("filter_seen", [True, False])
@pytest.mark.parametrize("d", [5, 37, 64])
def test_user_matches_reference(tmp_path, filter_seen, d):
    # d=5: the dot's scalar tail only; 37: 32-float block + 8-float block + tail; 64: blocks.
    rng = np.random.default_rng(d)
    users, vectors = int_vectors(rng, 20, d), int_vectors(rng, 70, d)
    bias = rng.integers(-3, 4, 70).astype(np.float32)
    seen = [sorted(set(rng.integers(0, 70, rng.integers(0, 30)).tolist())) for _ in range(20)]
    seen[2] = list(range(68))  # fewer than k eligible
    indptr, indices = rows(seen)
    np.save(tmp_path / "v.npy", vectors)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")  # bundles map their arrays
    for b in (None, bias):
        scores = (users @ vectors.T + (0 if b is None else b)).astype(np.float32)
        for u in range(20):
            got_i, got_s = topk.topk_user(users, u, mapped, 5, indptr, indices, filter_seen, b)
            ref = reference(scores[u], 5, set(seen[u]) if filter_seen else set(), [])
            assert got_i.tolist() == ref, (u, got_i, ref)
            np.testing.assert_array_equal(got_s, scores[u, ref])


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(0, 30))
def test_rank_found_is_the_exact_top_k_of_the_found_ids(seed, k):
    # An ANN answer re-ranked exactly: found ids (with FAISS's -1 padding and,
    # defensively, ids outside the catalogue) minus banned ones (any order,
    # repeats, outside ids), scored q . v, ties by lower id.
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 200)), int(rng.integers(1, 40))
    vectors, q = int_vectors(rng, n, d), int_vectors(rng, 1, d)[0]
    found = rng.permutation(n)[: int(rng.integers(0, n + 1))].astype(np.int64)
    pads = [-1] * int(rng.integers(0, 4)) + [n, n + 7]
    found = np.concatenate([found, np.array(pads, np.int64)])
    banned = rng.integers(-3, n + 3, int(rng.integers(0, 30))).astype(np.int32)
    items, scores, kept, n_banned = topk.rank_found(vectors, q, found, banned, k)
    scores_all = (vectors @ q).astype(np.float32)
    ok = [int(f) for f in found if 0 <= f < n and f not in set(banned.tolist())]
    want = sorted(ok, key=lambda j: (-float(scores_all[j]), j))[:k]
    assert items.tolist() == want
    np.testing.assert_array_equal(scores, scores_all[want])
    assert kept == len(ok)
    assert n_banned == len({int(b) for b in banned if 0 <= b < n})
    # cosine (SimilarItems over an index): score / the row's norm, a zero row
    # scoring 0.
    norms = np.sqrt((vectors**2).sum(1, dtype=np.float32))
    cos = np.where(norms > 0, scores_all / np.where(norms > 0, norms, 1), 0).astype(np.float32)
    items, scores, _, _ = topk.rank_found(vectors, q, found, banned, k, cosine=True)
    want = sorted(ok, key=lambda j: (-float(cos[j]), j))[:k]
    assert items.tolist() == want
    np.testing.assert_array_equal(scores, cos[want])


def test_rank_found_names_what_is_wrong():
    v = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="q: 3 dimensions, vectors have 4"):
        topk.rank_found(v, np.zeros(3, np.float32), np.zeros(1, np.int64), [], 2)
    with pytest.raises(TypeError, match="found: expected dtype int64"):
        topk.rank_found(v, np.zeros(4, np.float32), np.zeros(1, np.int32), [], 2)
    with pytest.raises(ValueError, match="k: must be >= 0"):
        topk.rank_found(v, np.zeros(4, np.float32), np.zeros(1, np.int64), [], -1)


def test_user_kernel_names_what_is_wrong():
    q, v = np.zeros((2, 4), np.float32), np.zeros((5, 4), np.float32)
    ptr, ind = np.zeros(3, np.int64), np.zeros(0, np.int32)
    with pytest.raises(ValueError, match="queries: 3 dimensions, vectors have 4"):
        topk.topk_user(np.zeros((2, 3), np.float32), 0, v, 2, ptr, ind)
    with pytest.raises(ValueError, match="bias: length 4, expected 5"):
        topk.topk_user(q, 0, v, 2, ptr, ind, bias=np.zeros(4, np.float32))
    with pytest.raises(IndexError, match=r"user: index 2 outside \[0, 2\)"):
        topk.topk_user(q, 2, v, 2, ptr, ind)
    with pytest.raises(ValueError, match="seen_indptr: expected length 3"):
        topk.topk_user(q, 0, v, 2, ptr[:2], ind)
    with pytest.raises(ValueError, match="seen_indptr: row 1 lies outside seen_indices"):
        topk.topk_user(q, 1, v, 2, np.array([0, 0, 9], np.int64), ind)
    with pytest.raises(TypeError, match="seen_indices: expected dtype int32"):
        topk.topk_user(q, 0, v, 2, ptr, ind.astype(np.int64))


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_topk_row_and_the_dense_one_user_rows(n, k, seed):
    rng = np.random.default_rng(seed)
    scores = rng.choice([0.0, 1.0, -2.0, 0.5, np.nan], n).astype(np.float32)
    items, vals = topk.topk_row(scores, k)
    want = reference(scores, k, set(), [])
    assert items.tolist() == want
    np.testing.assert_array_equal(vals, scores[want])
    # dense_user: q . V + bias with NaN at the seen row; dense_rows_sum: weighted rows.
    d = int(rng.integers(1, 20))
    Q = rng.standard_normal((3, d)).astype(np.float32)
    V = rng.standard_normal((n, d)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    indptr, indices = rows([[], sorted(set(rng.integers(0, n, 4).tolist())), [0]])
    out = np.empty(n, np.float32)
    topk.dense_user(Q, 1, V, out, indptr, indices, bias)
    want_row = (V.astype(np.float64) @ Q[1] + bias).astype(np.float32)
    want_row[indices[indptr[1] : indptr[2]]] = np.nan
    np.testing.assert_allclose(out, want_row, rtol=1e-5, atol=1e-5)
    got_i, got_v = topk.topk_user(Q, 1, V, 5, indptr, indices, True, bias)
    assert got_i.tolist() == reference(out, 5, set(), [])
    np.testing.assert_array_equal(got_v, out[got_i])  # the same sums, bit for bit
    M = rng.standard_normal((7, n)).astype(np.float32)
    picked = rng.integers(0, 7, 5).astype(np.int32)
    w = rng.random(5).astype(np.float32)
    topk.dense_rows_sum(M, picked, w, out, picked[:2])
    want_sum = (w[:, None].astype(np.float64) * M[picked]).sum(0).astype(np.float32)
    want_sum[picked[:2][picked[:2] < n]] = np.nan
    np.testing.assert_allclose(out, want_sum, rtol=1e-4, atol=1e-5)
    topk.dense_rows_sum(M, picked, None, out)
    np.testing.assert_allclose(out, M[picked].sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_dense_rows_sum_is_scipys_product_bit_for_bit(n):
    # EASE's one-user row: the vectorised kernel (AVX2 and baseline builds) adds
    # the rows in history order with a separate multiply and add, so its sums
    # are scipy's CSR x dense product's exactly (what the batch path computes).
    rng = np.random.default_rng(n)
    m = rng.standard_normal((300, n)).astype(np.float32)
    idx = rng.choice(300, 60, replace=False).astype(np.int32)
    w = rng.random(60).astype(np.float32)
    out = np.empty(n, np.float32)
    for weights in (w, None):
        topk.dense_rows_sum(m, idx, weights, out)
        data = w if weights is not None else np.ones(60, np.float32)
        row = sp.csr_matrix((data, idx, [0, 60]), shape=(1, 300))
        np.testing.assert_array_equal(out, np.asarray(row @ m).ravel())


def test_dense_rows_refuse_bad_arguments():
    M = np.zeros((3, 4), np.float32)
    with pytest.raises(IndexError, match="indices"):
        topk.dense_rows_sum(M, np.array([3], np.int32), None, np.empty(4, np.float32))
    with pytest.raises(ValueError, match="out"):
        topk.dense_rows_sum(M, np.array([0], np.int32), None, np.empty(5, np.float32))
    with pytest.raises(ValueError, match="values"):
        topk.dense_rows_sum(
            M, np.array([0], np.int32), np.ones(2, np.float32), np.empty(4, np.float32)
        )
    ro = np.empty(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        topk.dense_user(np.zeros((1, 2), np.float32), 0, np.zeros((4, 2), np.float32), ro)
    with pytest.raises(IndexError, match="user"):
        topk.dense_user(
            np.zeros((1, 2), np.float32), 1, np.zeros((4, 2), np.float32), np.empty(4, np.float32)
        )


def test_unpadded_counts_the_items_of_a_padded_row():
    """A top-k row is padded with -1 at its end: what the serving path keeps of
    it is the same as a full count of entries >= 0."""
    from recserve.models.base import unpadded

    rng = np.random.default_rng(0)
    for n in range(0, 12):
        for pad in range(0, n + 1):
            row = np.r_[rng.permutation(50)[: n - pad], np.full(pad, -1)].astype(np.int32)
            assert unpadded(row) == int((row >= 0).sum()) == n - pad
