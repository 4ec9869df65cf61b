"""kernels.similarity against dense numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.kernels import similarity as simk


def random_csr(rows, cols, density, seed, dtype=np.float32, integer=True):
    m = sp.random(rows, cols, density=density, random_state=seed, format="csr", dtype=dtype)
    if integer:  # small integers: plenty of exact ties
        m.data = np.ceil(m.data * 3).astype(dtype)
    m = m.tolil()
    m[:, cols // 2] = 0  # an empty column
    m[rows // 3, :] = 0  # an empty row
    m = m.tocsr()
    m.eliminate_zeros()
    return m


def dense_similarity(a, b, kind, alpha=0.5, shrink=0.0, col_scale=None):
    a, b = a.toarray().astype(np.float64), b.toarray().astype(np.float64)
    if kind == "jaccard":
        a, b = (a != 0).astype(float), (b != 0).astype(float)
    d = a @ b
    if kind == "dot":
        s = d
    elif kind == "jaccard":
        den = a.sum(1)[:, None] + b.sum(0)[None, :] - d + shrink
        s = np.divide(d, den, out=np.zeros_like(d), where=den > 0)
    else:
        rn, cn = (a**2).sum(1), (b**2).sum(0)
        if kind == "cosine":
            den = np.sqrt(rn)[:, None] * np.sqrt(cn)[None, :] + shrink
        else:
            den = (rn**alpha)[:, None] * (cn ** (1 - alpha))[None, :] + shrink
        s = np.divide(d, den, out=np.zeros_like(d), where=den > 0)
    if col_scale is not None:
        s = s * col_scale[None, :]
    return d, s


def reference_topk(d, s, k, exclude_self):
    """Per row: top-k columns with a nonzero product, ties by lower column."""
    out = []
    for i in range(s.shape[0]):
        cols = [j for j in range(s.shape[1]) if d[i, j] != 0 and not (exclude_self and j == i)]
        out.append(sorted(cols, key=lambda j: (-np.float32(s[i, j]), j))[:k])
    return out


@pytest.mark.parametrize("kind", ["dot", "cosine", "asymmetric", "jaccard"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kept_norm", [False, True])
def test_item_item_knn_matches_dense(kind, dtype, threads, kept_norm):
    # kept_norm: B's column norms computed once by knn_col_norm and passed in, as
    # a caller reusing one B does (userknn's fold-in)
    x = random_csr(120, 60, 0.08, seed=1, dtype=dtype)  # users x items
    a = x.T.tocsr()
    b = a.T.tocsr()
    norm = simk.knn_col_norm(b.indices, b.data, 60, kind) if kept_norm else None
    ip, ix, v = simk.knn(
        a.indptr,
        a.indices,
        a.data,
        b.indptr,
        b.indices,
        b.data,
        60,
        7,
        kind,
        alpha=0.3,
        shrink=2.0 if kind != "dot" else 0.0,
        exclude_self=True,
        n_threads=threads,
        col_norm=norm,
    )
    d, s = dense_similarity(a, b, kind, alpha=0.3, shrink=2.0 if kind != "dot" else 0.0)
    ref = reference_topk(d, s, 7, exclude_self=True)
    for i in range(60):
        got = ix[ip[i] : ip[i + 1]].tolist()
        assert got == ref[i], (i, got, ref[i])
        np.testing.assert_allclose(v[ip[i] : ip[i + 1]], s[i, ref[i]], rtol=2e-6)
    assert ip[31] == ip[30]  # the empty item has no neighbours


def test_knn_on_read_only_memory_mapped_arrays(tmp_path):
    x = random_csr(50, 30, 0.2, seed=2)
    a = x.T.tocsr()
    b = a.T.tocsr()
    for name, arr in [("ip", a.indptr.astype(np.int64)), ("ix", a.indices), ("v", a.data)]:
        np.save(tmp_path / f"{name}.npy", arr)
    mapped = [np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("ip", "ix", "v")]
    got = simk.knn(*mapped, b.indptr, b.indices, b.data, 30, 5, "cosine", exclude_self=True)
    want = simk.knn(
        a.indptr, a.indices, a.data, b.indptr, b.indices, b.data, 30, 5, "cosine", exclude_self=True
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_col_scale_rp3_style():
    x = random_csr(80, 40, 0.1, seed=3)
    a, b = x.T.tocsr(), x
    scale = np.linspace(0.1, 2.0, 40).astype(np.float32)
    ip, ix, v = simk.knn(
        a.indptr,
        a.indices,
        a.data,
        b.indptr,
        b.indices,
        b.data,
        40,
        6,
        "dot",
        col_scale=scale,
        exclude_self=True,
    )
    d, s = dense_similarity(a, b, "dot", col_scale=scale.astype(np.float64))
    ref = reference_topk(d, s, 6, True)
    assert [ix[ip[i] : ip[i + 1]].tolist() for i in range(40)] == ref
    for i in range(40):
        np.testing.assert_allclose(v[ip[i] : ip[i + 1]], s[i, ref[i]], rtol=2e-6)


@pytest.mark.parametrize("empty_tail", [0, 3], ids=["middle-empty", "last-rows-empty"])
def test_weighting_bm25_and_tfidf_match_formulas(empty_tail):
    m = random_csr(30, 20, 0.3, seed=4)  # rows are documents
    if empty_tail:  # documents with no terms at the end (new items in a temporal split)
        m = m.tolil()
        m[30 - empty_tail :, :] = 0
        m = m.tocsr()
        m.eliminate_zeros()
    dense = m.toarray().astype(np.float64)
    df = (dense != 0).sum(0)
    idf = np.log(30) - np.log1p(df)
    lengths = dense.sum(1)
    norm = 1.2 * (1 - 0.75 + 0.75 * lengths / lengths.mean())
    bm25 = np.where(dense != 0, dense * 2.2 / (norm[:, None] + dense) * idf[None, :], 0)
    data, got_idf, avg = simk.weight(m.indptr, m.indices, m.data, 20, "bm25", 1.2, 0.75)
    np.testing.assert_allclose(
        sp.csr_matrix((data, m.indices, m.indptr)).toarray(), bm25, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(got_idf, idf, rtol=1e-6)
    assert avg == pytest.approx(lengths.mean())
    data, _, _ = simk.weight(m.indptr, m.indices, m.data, 20, "tfidf")
    np.testing.assert_allclose(
        sp.csr_matrix((data, m.indices, m.indptr)).toarray(),
        np.sqrt(dense) * idf[None, :],
        rtol=1e-5,
        atol=1e-6,
    )


def dense_topk(scores, k, excl, cand):
    out = []
    for q in range(scores.shape[0]):
        pool = set(cand[q]) if cand and cand[q] else set(range(scores.shape[1]))
        el = [j for j in pool if j not in set(excl[q])]
        out.append(sorted(el, key=lambda j: (-np.float32(scores[q, j]), j))[:k])
    return out


def lists_csr(lists):
    indptr = np.zeros(len(lists) + 1, np.int64)
    np.cumsum([len(x) for x in lists], out=indptr[1:])
    return indptr, np.array([j for x in lists for j in x], np.int32)


@pytest.mark.parametrize("threads", [1, 2])
def test_score_topk_matches_dense_including_zero_fill_and_negatives(threads):
    rng = np.random.default_rng(5)
    h = random_csr(40, 25, 0.1, seed=6)
    h.data[::4] *= -1  # negative history weights: some scores fall below zero
    s = random_csr(25, 50, 0.1, seed=7)
    scores = (h @ s).toarray()
    excl = [list(rng.integers(0, 50, rng.integers(0, 8))) for _ in range(40)]
    cand = [[] if q % 3 else list(rng.integers(0, 50, 5)) for q in range(40)]
    i, v = simk.score_topk(
        h.indptr,
        h.indices,
        h.data,
        s.indptr,
        s.indices,
        s.data,
        50,
        12,
        *lists_csr(excl),
        *lists_csr(cand),
        n_threads=threads,
    )
    ref = dense_topk(scores, 12, excl, cand)
    for q in range(40):
        got = [int(j) for j in i[q] if j >= 0]
        assert got == ref[q], (q, got, ref[q])
        np.testing.assert_allclose(v[q, : len(got)], scores[q, got], rtol=1e-5, atol=1e-6)


def test_wrappers_reject_bad_input():
    x = random_csr(10, 8, 0.3, seed=8)
    with pytest.raises(ValueError, match="similarity: expected one of"):
        simk.knn(x.indptr, x.indices, x.data, x.indptr, x.indices, x.data, 8, 3, "pearson")
    with pytest.raises(TypeError, match="a_data: expected float32 or float64"):
        simk.knn(x.indptr, x.indices, x.data.astype(np.int32), x.indptr, x.indices, x.data, 8, 3)
    with pytest.raises(ValueError, match=r"b_indices: values must lie in \[0, 4\)"):
        simk.knn(x.indptr, x.indices, x.data, x.indptr, x.indices, x.data, 4, 3)
    with pytest.raises(ValueError, match="col_norm"):
        simk.knn(x.indptr, x.indices, x.data, x.indptr, x.indices, x.data, 8, 3, col_norm=[1.0])
    with pytest.raises(ValueError, match="similarity"):
        simk.knn_col_norm(x.indices, x.data, 8, "pearson")
    with pytest.raises(ValueError, match="k: must be positive"):
        simk.score_topk(x.indptr, x.indices, x.data, x.indptr, x.indices, x.data, 8, 0)
    with pytest.raises(ValueError, match="weighting: expected bm25 or tfidf"):
        simk.weight(x.indptr, x.indices, x.data, 8, "log")


def test_score_topk_ties_a_cancelled_score_with_untouched_items_by_id():
    """Item 5 is reached by the history but its terms cancel to exactly 0 (1 x 2 -
    2 x 1): it ties with the untouched items, which score 0 too, and the tie goes
    to the lower id, as in the dense computation (a CI run's random order found
    the kernel putting the reached zero first)."""
    h = sp.csr_matrix(np.array([[1.0, -2.0]], np.float32))
    s = sp.csr_matrix((np.array([2.0, 1.0, 1.0], np.float32), ([0, 0, 1], [5, 7, 5])), shape=(2, 8))
    for k in (1, 2, 3):
        i, v = simk.score_topk(h.indptr, h.indices, h.data, s.indptr, s.indices, s.data, 8, k)
        (want,) = dense_topk((h @ s).toarray(), k, [[]], None)
        assert i[0].tolist() == want == [7, 0, 1][:k]
        assert v[0].tolist() == [1.0, 0.0, 0.0][:k]


@settings(max_examples=120, deadline=None)
@given(data=st.data(), k=st.integers(1, 30))
def test_score_topk_properties(data, k):
    """One non-empty history against a random similarity with small integer
    values (exact sums, many ties): the kernel's list is the dense reference's
    top-k of h @ s, exclusions removed and ties by item index, with its scores."""
    n_items = data.draw(st.integers(1, 25))
    seed = data.draw(st.integers(0, 10_000))
    rng = np.random.default_rng(seed)
    seen = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True))
    weights = data.draw(st.lists(st.sampled_from([-2.0, -1.0, 1.0, 2.0, 3.0]), min_size=6))
    h = sp.csr_matrix(
        (np.array(weights[: len(seen)], np.float32), (np.zeros(len(seen), int), seen)),
        shape=(1, 6),
    )
    s = sp.random(6, n_items, density=0.4, random_state=seed, format="csr", dtype=np.float32)
    s.data = rng.integers(1, 4, s.data.size).astype(np.float32)
    excl = data.draw(st.lists(st.integers(0, n_items - 1), max_size=n_items))
    i, v = simk.score_topk(
        h.indptr, h.indices, h.data, s.indptr, s.indices, s.data, n_items, k, *lists_csr([excl])
    )
    dense = (h.astype(np.float64) @ s.astype(np.float64)).toarray()
    (want,) = dense_topk(dense, k, [excl], None)
    got = [int(j) for j in i[0] if j >= 0]
    assert got == want
    np.testing.assert_array_equal(v[0, : len(got)], dense[0, want].astype(np.float32))


@pytest.fixture(params=["dense", "buffered"])
def knn_self_path(request, monkeypatch):
    """Run knn_self on its dense score matrix (small catalogues) or on its
    per-row top-k buffers (forced by a zero dense budget)."""
    if request.param == "buffered":
        monkeypatch.setattr(simk, "DENSE_SCORES_BYTES", 0)
    return request.param


@pytest.mark.parametrize("kind", ["dot", "cosine", "asymmetric", "jaccard"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scaled", [False, True])
def test_knn_self_equals_general_knn_exactly(kind, threads, scaled, knn_self_path):
    """The pair-once kernel gives the same lists, values and ties as knn(A, A.T),
    on both of its paths, with and without a column scale."""
    x = random_csr(150, 70, 0.1, seed=9)
    a = x.T.tocsr()
    b = a.T.tocsr()
    scale = np.random.default_rng(3).uniform(0.5, 2.0, 70).astype(np.float32) if scaled else None
    want = simk.knn(
        a.indptr,
        a.indices,
        a.data,
        b.indptr,
        b.indices,
        b.data,
        70,
        9,
        kind,
        alpha=0.3,
        shrink=1.0,
        col_scale=scale,
        exclude_self=True,
        n_threads=threads,
    )
    got = simk.knn_self(
        a.indptr,
        a.indices,
        a.data,
        150,
        9,
        kind,
        alpha=0.3,
        shrink=1.0,
        col_scale=scale,
        n_threads=threads,
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("k", [1, 4, 40, 300])
def test_knn_self_matches_dense_reference(k, knn_self_path):
    """Against numpy: binary data (ties everywhere, broken by the lower id),
    rows with fewer than k partners, and pairs whose products cancel to an
    exact zero (no neighbour) on a catalogue wider than the sampled floor."""
    x = random_csr(60, 400, 0.03, seed=4)
    x.data[:] = 1.0
    x = x.tolil()
    x[0, 0], x[0, 1], x[1, 0], x[1, 1] = 1.0, 1.0, 1.0, -1.0  # items 0, 1 cancel exactly
    x[2, 0] = x[2, 1] = 0.0
    x = x.tocsr()
    x.eliminate_zeros()
    a = x.T.tocsr()  # items x users
    dense = a.toarray().astype(np.float64)
    d = dense @ dense.T
    np.fill_diagonal(d, 0.0)
    ip, ix, v = simk.knn_self(a.indptr, a.indices, a.data, 60, k, "dot", n_threads=2)
    for i in range(400):
        row = [(-d[i, j], j) for j in np.flatnonzero(d[i])]
        want = sorted(row)[:k]
        got = ix[ip[i] : ip[i + 1]]
        assert got.tolist() == [j for _, j in want], i
        np.testing.assert_allclose(v[ip[i] : ip[i + 1]], [-s for s, _ in want], rtol=1e-6)
    assert 1 not in ix[ip[0] : ip[1]].tolist()  # the cancelled pair is no neighbour


def test_score_one_equals_score_topk_row_by_row_and_checks_its_inputs():
    """The serving kernel (matrices validated once, scratch reused) gives each row
    exactly score_topk's answer, negatives and zero fill included, with or without
    the row's own items excluded, whatever k and whatever ran before it."""
    rng = np.random.default_rng(4)
    h = sp.random(40, 30, density=0.15, format="csr", random_state=1, dtype=np.float32)
    s = sp.random(30, 25, density=0.2, format="csr", random_state=2, dtype=np.float32)
    s.data -= 0.3  # some negative similarities
    seen = sp.random(40, 25, density=0.2, format="csr", random_state=3, dtype=np.float32)
    chk = [simk.CheckedCSR(m.indptr, m.indices, m.data, m.shape[1]) for m in (h, s, seen)]
    scratch = simk.Scratch(25)
    for row in rng.permutation(40):
        for k in (1, 5, 25):
            for excl in (None, seen):
                got = simk.score_one(
                    chk[0], int(row), chk[1], k, None if excl is None else chk[2], scratch
                )
                e = (
                    (np.zeros(2, np.int64), np.zeros(0, np.int32))
                    if excl is None
                    else (
                        np.array([0, excl[row].nnz], np.int64),
                        excl[row].indices.astype(np.int32),
                    )
                )
                want = simk.score_topk(
                    h[row].indptr.astype(np.int64),
                    h[row].indices,
                    h[row].data,
                    s.indptr.astype(np.int64),
                    s.indices,
                    s.data,
                    25,
                    k,
                    e[0],
                    e[1],
                )
                n = int((want[0][0] >= 0).sum())
                np.testing.assert_array_equal(got[0], want[0][0][:n])
                np.testing.assert_array_equal(got[1], want[1][0][:n])
    with pytest.raises(ValueError, match="values must lie"):
        simk.CheckedCSR(s.indptr, s.indices, s.data, 3)
    with pytest.raises(IndexError):
        simk.score_one(chk[0], 40, chk[1], 5, None, scratch)
    with pytest.raises(ValueError, match="columns"):
        simk.score_one(chk[1], 0, chk[1], 5, None, scratch)
    with pytest.raises(ValueError, match="scratch"):
        simk.score_one(chk[0], 0, chk[1], 5, None, simk.Scratch(7))
    # S given as a CheckedCSR to score_topk: the same answers as the raw arrays.
    a = simk.score_topk(h.indptr.astype(np.int64), h.indices, h.data, chk[1], None, None, 25, 7)
    b = simk.score_topk(
        h.indptr.astype(np.int64),
        h.indices,
        h.data,
        s.indptr.astype(np.int64),
        s.indices,
        s.data,
        25,
        7,
    )
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("kind", ["dot", "cosine", "asymmetric", "jaccard"])
@pytest.mark.parametrize("scaled", [False, True])
def test_knn_index_query_is_knn_of_one_row_and_matches_dense(kind, scaled):
    # A fold-in's search: one new row against B validated once (userknn).
    b = random_csr(70, 90, 0.1, seed=3, integer=False)  # inner x columns
    b.data -= 0.2  # negative products, some cancelling
    rng = np.random.default_rng(4)
    scale = rng.random(90).astype(np.float32) if scaled else None
    shrink = 0.0 if kind == "dot" else 1.5
    index = simk.KnnIndex(b.indptr, b.indices, b.data, 90, kind, 0.3, shrink, scale)
    scratch = simk.KnnScratch(90)
    for trial in range(40):
        n = int(rng.integers(0, 12))
        ai = rng.choice(70, n, replace=False).astype(np.int32)
        ad = rng.standard_normal(n).astype(np.float64 if trial % 2 else np.float32)
        k = int(rng.choice([1, 5, 30, 200]))
        qi, qv = index.query(ai, ad, k, scratch)
        _, ix, v = simk.knn(
            np.array([0, n], np.int64), ai, ad, b.indptr, b.indices, b.data, 90, k, kind,
            alpha=0.3, shrink=shrink, col_scale=scale, n_threads=1,
        )  # fmt: skip
        np.testing.assert_array_equal(qi, ix)
        np.testing.assert_array_equal(qv, v)  # bit for bit: the same kernel row
        a = sp.csr_matrix((ad, ai, [0, n]), shape=(1, 70))
        d, s = dense_similarity(a, b, kind, alpha=0.3, shrink=shrink, col_scale=scale)
        ref = [j for j in range(90) if d[0, j] != 0]
        if not ref:
            assert qi.size == 0
            continue
        # best first, and nothing outside the answer beats its last entry
        np.testing.assert_allclose(qv, s[0, qi], rtol=1e-5, atol=1e-6)
        assert (np.diff(qv) <= 0).all() and set(qi) <= set(ref)
        rest = sorted(set(ref) - set(qi.tolist()))
        assert qi.size == min(k, len(ref))
        if rest:
            assert s[0, rest].max() <= qv[-1] + 1e-5


def test_knn_index_checks_its_inputs():
    b = random_csr(20, 30, 0.2, seed=5)
    index = simk.KnnIndex(b.indptr, b.indices, b.data, 30, "cosine")
    scratch = simk.KnnScratch(30)
    ok_i, ok_v = np.array([1, 4], np.int32), np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"indices: values must lie in \[0, 20\), got 20"):
        index.query(np.array([1, 20], np.int32), ok_v, 5, scratch)
    with pytest.raises(ValueError, match="data: expected one value per index"):
        index.query(ok_i, np.ones(3, np.float32), 5, scratch)
    with pytest.raises(TypeError, match="data: expected float32 or float64"):
        index.query(ok_i, np.ones(2, np.int64), 5, scratch)
    with pytest.raises(ValueError, match="k: must be positive"):
        index.query(ok_i, ok_v, 0, scratch)
    with pytest.raises(ValueError, match="scratch: sized for 31 columns, not 30"):
        index.query(ok_i, ok_v, 5, simk.KnnScratch(31))
    with pytest.raises(ValueError, match="similarity"):
        simk.KnnIndex(b.indptr, b.indices, b.data, 30, "pearson")
    with pytest.raises(ValueError, match=r"b_indices: values must lie in \[0, 29\)"):
        simk.KnnIndex(b.indptr, b.indices, b.data, 29, "dot")
    with pytest.raises(ValueError, match="col_norm: expected length 30"):
        simk.KnnIndex(b.indptr, b.indices, b.data, 30, "dot", col_norm=np.ones(29))
    # the scratch is left clean: a query after another answers as on a fresh one
    index.query(np.array([0, 2, 3], np.int32), np.full(3, 2.0, np.float32), 7, scratch)
    after = index.query(ok_i, ok_v, 5, scratch)
    fresh = index.query(ok_i, ok_v, 5, simk.KnnScratch(30))
    assert after[0].size and after[0].tolist() == fresh[0].tolist()
    np.testing.assert_array_equal(after[1], fresh[1])


@pytest.mark.parametrize("kind", sorted(simk.SIMILARITIES))
def test_column_norms_of_an_empty_matrix_are_float64_zeros(kind):
    # numpy's weighted bincount of nothing is int64: KnnIndex refused it, so a
    # userknn trained on dislikes alone (no positive evidence) failed every fold-in.
    norm = simk.knn_col_norm(np.zeros(0, np.int32), np.zeros(0, np.float32), 5, kind)
    assert norm.dtype == np.float64 and norm.tolist() == [0.0] * 5
    empty = np.zeros(6, np.int64)
    index = simk.KnnIndex(
        empty, np.zeros(0, np.int32), np.zeros(0, np.float32), 5, kind, col_norm=norm
    )
    scratch = simk.KnnScratch(5)
    users, sims = index.query(np.array([1], np.int32), np.array([1.0], np.float32), 3, scratch)
    assert users.size == 0 and sims.size == 0


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(1, 40),
    n_cols=st.sampled_from([1, 7, 300, 70_000]),  # past the column filter's 32k slots
    rows=st.lists(st.integers(0, 39), max_size=30),
    cols=st.lists(st.integers(0, 69_999), max_size=40),
    seed=st.integers(0, 2**16),
)
def test_block_is_scipys_fancy_index(n_rows, n_cols, rows, cols, seed):
    """block(m, rows, cols) == m[rows][:, cols].toarray() in float64: rows out of
    column order (as a kNN matrix keeps them, best first), repeated rows and
    columns, a row's repeated entries (summed), empty rows, columns that share
    a filter slot."""
    rng = np.random.default_rng(seed)
    rows = np.array([r % n_rows for r in rows], np.int64)
    wanted = np.array([c % n_cols for c in cols], np.int64)
    lens = rng.integers(0, 12, n_rows)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    # Entries drawn from the wanted columns, their filter-slot twins (c + 2**15
    # hashes near c) and anywhere; unsorted, with repeats.
    pool = np.concatenate([wanted, (wanted + 2**15) % n_cols, rng.integers(0, n_cols, 8)])
    indices = rng.choice(pool, int(lens.sum())).astype(np.int32)
    data = rng.choice([0.5, 1.0, 2.5, -1.0, 1e-3], indices.size).astype(np.float32)
    m = sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))
    # The reference sums a row's repeated entries in float64, as block does
    # (scipy would sum float32 data in float32).
    m64 = m.astype(np.float64)
    want = m64[rows][:, wanted].toarray() if rows.size and wanted.size else None
    got = simk.block(simk.CheckedCSR(indptr, indices, data, n_cols), rows, wanted)
    assert got.dtype == np.float64 and got.shape == (rows.size, wanted.size)
    if want is not None:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_block_checks_its_inputs():
    m = simk.CheckedCSR(np.array([0, 1, 2]), np.array([0, 2], np.int32), np.ones(2, np.float32), 3)
    with pytest.raises(IndexError, match="rows: 2 outside"):
        simk.block(m, np.array([0, 2]), np.array([0]))
    with pytest.raises(IndexError, match="cols: -1 outside"):
        simk.block(m, np.array([0]), np.array([-1]))
    with pytest.raises(TypeError, match="rows: expected dtype int64"):
        simk.block(m, np.array([0], np.int32), np.array([0]))
    assert simk.block(m, np.zeros(0, np.int64), np.array([0, 2])).shape == (0, 2)
    np.testing.assert_array_equal(
        simk.block(m, np.array([1, 0]), np.array([2, 0, 2])), [[1, 0, 1], [0, 1, 0]]
    )
