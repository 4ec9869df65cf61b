# Sparse neighbourhood kernels: top-K similarity between the rows of A and the
# columns of B (A @ B, item-item when A is items x users and B its transpose),
# BM25 / TF-IDF weighting, and fused "history x similarity -> top-k" scoring.
# All work runs under nogil in OpenMP prange loops with per-thread scratch.
import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.math cimport NAN, isfinite, pow, sqrt
from libc.stdlib cimport qsort
from libc.string cimport memset

from .parallel cimport recserve_prefetch, resolve_threads, threads_for
from .topk cimport (best_of_row, buffer_offer, drain_best, heap_drain, heap_offer, mark, nan_at,
                   select_topk, worse)

from .topk import check_array, check_rows, rows_or_empty


ctypedef struct Entry:
    # One nonzero of the transposed matrix: column and value side by side, so
    # the hot loop reads one stream (and half the cache lines) instead of two.
    int col
    float val


SIMILARITIES = {"dot": 0, "cosine": 1, "asymmetric": 2, "jaccard": 3}
WEIGHTINGS = {"none": 0, "bm25": 1, "tfidf": 2}


def as_csr(indptr, indices, data, Py_ssize_t n_cols, str name):
    """Validate CSR arrays and return them as (int64, int32, float32) without
    copying when they already are (read-only, memory-mapped arrays included).
    float64 data and int32 index pointers are converted; anything else is
    refused with a message naming the argument."""
    if not isinstance(indptr, np.ndarray) or indptr.dtype.kind not in "iu":
        raise TypeError(f"{name}_indptr: expected an integer numpy array")
    if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu":
        raise TypeError(f"{name}_indices: expected an integer numpy array")
    if not isinstance(data, np.ndarray) or data.dtype not in (np.float32, np.float64):
        got = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise TypeError(f"{name}_data: expected float32 or float64, got {got}")
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise ValueError(f"{name}_indices: values must lie in [0, {n_cols})")
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.shape[0] != indices.shape[0]:
        raise ValueError(f"{name}_data: length {data.shape[0]} != {name}_indices "
                         f"length {indices.shape[0]}")
    check_rows(indptr, indices, indptr.shape[0] - 1, name)
    return indptr, indices, data


cdef class CheckedCSR:
    """CSR arrays validated once by as_csr, for a matrix a kernel reads on every
    request (a model's similarity matrix): score_topk then skips the O(nnz)
    checks, which cost more than the scoring itself for one user."""

    cdef readonly object indptr, indices, data
    cdef readonly Py_ssize_t n_cols

    def __init__(self, indptr, indices, data, Py_ssize_t n_cols):
        self.indptr, self.indices, self.data = as_csr(indptr, indices, data, n_cols, "s")
        self.n_cols = n_cols

    @property
    def n_rows(self):
        return self.indptr.shape[0] - 1


def weight(indptr, indices, data, Py_ssize_t n_cols, str scheme="bm25", double K1=1.2,
           double B=0.75, idf=None, double avg_len=0.0, int n_threads=0):
    """BM25 or TF-IDF weights of a CSR whose rows are documents and columns terms.

    idf = log(n_rows) - log1p(document frequency) and the mean row length come
    from the matrix itself unless given (to weight a new row exactly as the
    training rows were). Returns (weighted float32 data, idf float32, avg_len).
    BM25: x (K1 + 1) / (K1 (1 - B + B len / avg_len) + x) idf; TF-IDF: sqrt(x) idf.
    """
    if scheme not in ("bm25", "tfidf"):
        raise ValueError(f"weighting: expected bm25 or tfidf, got {scheme!r}")
    indptr, indices, data = as_csr(indptr, indices, data, n_cols, "x")
    cdef Py_ssize_t n_rows = indptr.shape[0] - 1
    if idf is None:
        df = np.bincount(indices, minlength=n_cols)
        idf = (np.log(max(n_rows, 1)) - np.log1p(df)).astype(np.float32)
    else:
        idf = check_array(np.ascontiguousarray(idf, dtype=np.float32), "idf", np.float32, 1)
        if idf.shape[0] != n_cols:
            raise ValueError(f"idf: expected length {n_cols}, got {idf.shape[0]}")
    # Each row's sum, from the non-empty rows' starts only: reduceat reads an
    # index equal to data.size (empty rows at the end) as out of bounds.
    lengths = np.zeros(n_rows)
    nz = np.diff(indptr) > 0
    if data.size:
        lengths[nz] = np.add.reduceat(data.astype(np.float64), indptr[:n_rows][nz])
    if avg_len <= 0:
        avg_len = float(lengths.mean()) if n_rows else 1.0
    if avg_len <= 0:
        avg_len = 1.0
    out = np.empty_like(data)
    cdef const long long[::1] ip = indptr
    cdef const int[::1] ix = indices
    cdef const float[::1] x = data
    cdef const float[::1] w = idf
    cdef const double[::1] ln = np.ascontiguousarray(lengths, dtype=np.float64)
    cdef float[::1] o = out
    cdef int bm25 = scheme == "bm25"
    cdef double k1 = K1, b = B, avg = avg_len, norm
    cdef Py_ssize_t i
    cdef long long p
    with nogil:
        for i in prange(n_rows, schedule="static", num_threads=resolve_threads(n_threads)):
            norm = K1 * (1.0 - b + b * ln[i] / avg)
            for p in range(ip[i], ip[i + 1]):
                if bm25:
                    o[p] = <float>(x[p] * (k1 + 1.0) / (norm + x[p]) * w[ix[p]])
                else:
                    o[p] = <float>(sqrt(x[p]) * w[ix[p]])
    return out, idf, avg_len


def check_knn_params(str similarity, int k, double alpha, double shrink):
    """Validate the similarity parameters shared by knn and knn_self."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {', '.join(SIMILARITIES)}, "
                         f"got {similarity!r}")
    if k <= 0:
        raise ValueError(f"k: must be positive, got {k}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
    if shrink < 0:
        raise ValueError(f"shrink: must be >= 0, got {shrink}")


def knn_col_norm(b_indices, b_data, Py_ssize_t n_cols, str similarity="cosine"):
    """B's per-column norms as knn uses them (sums of squares; counts for
    jaccard), for a caller that reuses one B across calls (a fold-in's
    item -> users matrix) and passes them as knn's col_norm, saving that
    O(nnz(B)) pass per call."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {sorted(SIMILARITIES)}, got {similarity!r}")
    b_indices = np.asarray(b_indices)
    if SIMILARITIES[similarity] == 3:
        return np.bincount(b_indices, minlength=n_cols).astype(np.float64)
    # float64 also for an empty B: bincount's weighted sum of nothing is int64 zeros.
    squares = np.asarray(b_data, np.float64) ** 2
    return np.bincount(b_indices, weights=squares, minlength=n_cols).astype(np.float64, copy=False)


cdef inline double transform(int kind, double d, double ri, double cj, double sh) noexcept nogil:
    """Similarity from a dot product d and the two sides' norms (see knn)."""
    cdef double den
    if kind == 0:
        return d
    if kind == 3:
        den = ri + cj - d + sh
    else:
        den = ri * cj + sh
    return d / den if den > 0 else 0.0


cdef int knn_row(const int* aix, const float* ax, long long a0, long long a1, double rn_i,
                 const long long* bip, const int* bix, const float* bx, const double* cn,
                 const float* cs, int kind, bint bin_, double sh, int n_cols, int k,
                 Py_ssize_t self_col, double* ACC, float* VAL, unsigned char* FLAG,
                 unsigned char* MASK, int* TOUCH, int* HI, float* HV, int* oi,
                 float* ov) noexcept nogil:
    """One row of knn: the row a0..a1 of A times B, transformed, its top k into
    oi/ov; returns how many. self_col >= 0 is never kept. The scratch (n_cols
    wide, k for the heap) is left zeroed as found."""
    cdef long long p, q
    cdef int j, u, n_touched = 0, m, c
    cdef double d, w
    for p in range(a0, a1):
        u = aix[p]
        w = 1.0 if bin_ else ax[p]
        for q in range(bip[u], bip[u + 1]):
            j = bix[q]
            if not FLAG[j]:
                FLAG[j] = 1
                TOUCH[n_touched] = j
                n_touched = n_touched + 1
            ACC[j] += w * (1.0 if bin_ else bx[q])
    for c in range(n_touched):
        j = TOUCH[c]
        d = ACC[j]
        if d == 0.0:
            VAL[j] = NAN  # products that cancel exactly make no neighbour
            continue
        VAL[j] = <float>(transform(kind, d, rn_i, cn[j], sh) * cs[j])
    if self_col >= 0:
        MASK[self_col] = 1
    m = select_topk(VAL, n_cols, k, MASK, TOUCH if n_touched > 0 else NULL, n_touched,
                    HI, HV, oi, ov)
    if n_touched == 0:
        m = 0
    if self_col >= 0:
        MASK[self_col] = 0
    for c in range(n_touched):
        j = TOUCH[c]
        ACC[j] = 0.0
        VAL[j] = 0.0
        FLAG[j] = 0
    return m


def knn(a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, Py_ssize_t n_cols,
        int k, str similarity="cosine", double alpha=0.5, double shrink=0.0,
        col_scale=None, bint exclude_self=False, int n_threads=0, col_norm=None):
    """Top-k entries of every row of A @ B under a similarity transform.

    A is rows x inner (CSR), B is inner x n_cols (CSR). With d = (A @ B)[i, j]:
      dot         d
      cosine      d / (|a_i| |b_j| + shrink)              (|.| = L2 norm)
      asymmetric  d / (|a_i|^2alpha |b_j|^2(1-alpha) + shrink)
      jaccard     c / (n_i + n_j - c + shrink), on binarised A and B
    optionally times col_scale[j] (RP3beta's popularity penalty). With
    exclude_self, entry (i, i) is never kept. col_norm: knn_col_norm of B,
    when the caller keeps it (computed here otherwise). Returns CSR (indptr int64,
    indices int32, data float32), at most k entries per row, best first,
    ties by lower column.
    """
    check_knn_params(similarity, k, alpha, shrink)
    a_indptr, a_indices, a_data = as_csr(a_indptr, a_indices, a_data,
                                         b_indptr.shape[0] - 1, "a")
    b_indptr, b_indices, b_data = as_csr(b_indptr, b_indices, b_data, n_cols, "b")
    cdef int kind = SIMILARITIES[similarity]
    cdef Py_ssize_t n_rows = a_indptr.shape[0] - 1
    if exclude_self and n_rows > n_cols:
        raise ValueError("exclude_self needs a square product (rows <= n_cols)")
    binary = kind == 3
    if col_norm is None:
        col_norm = knn_col_norm(b_indices, b_data, n_cols, similarity)
    else:
        col_norm = check_array(np.asarray(col_norm), "col_norm", np.float64, 1)
        if col_norm.shape[0] != n_cols:
            raise ValueError(f"col_norm: expected length {n_cols}, got {col_norm.shape[0]}")
    if binary:
        row_norm = np.diff(a_indptr).astype(np.float64)
    else:
        sq = a_data.astype(np.float64) ** 2
        row_norm = np.zeros(n_rows)
        nz = np.diff(a_indptr) > 0
        if sq.size:
            row_norm[nz] = np.add.reduceat(sq, a_indptr[:n_rows][nz])
    if kind == 1:
        row_norm, col_norm = np.sqrt(row_norm), np.sqrt(col_norm)
    elif kind == 2:
        row_norm, col_norm = row_norm ** alpha, col_norm ** (1.0 - alpha)
    scale = (np.ones(n_cols, np.float32) if col_scale is None
             else check_array(np.ascontiguousarray(col_scale, dtype=np.float32),
                              "col_scale", np.float32, 1))
    if scale.shape[0] != n_cols:
        raise ValueError(f"col_scale: expected length {n_cols}, got {scale.shape[0]}")

    # no more threads than rows: each thread's scratch is n_cols wide
    cdef int nt = threads_for(n_threads, n_rows)
    out_idx = np.empty((n_rows, k), np.int32)
    out_val = np.empty((n_rows, k), np.float32)
    counts = np.zeros(n_rows, np.int32)
    width = max(n_cols, 1)
    acc_buf = np.zeros((nt, width), np.float64)
    val_buf = np.zeros((nt, width), np.float32)
    flag_buf = np.zeros((nt, width), np.uint8)
    mask_buf = np.zeros((nt, width), np.uint8)
    touch_buf = np.empty((nt, width), np.int32)
    heap_i = np.empty((nt, k), np.int32)
    heap_v = np.empty((nt, k), np.float32)

    cdef const long long[::1] aip = a_indptr
    cdef const int[::1] aix = a_indices
    cdef const float[::1] ax = a_data
    cdef const long long[::1] bip = b_indptr
    cdef const int[::1] bix = b_indices
    cdef const float[::1] bx = b_data
    cdef const double[::1] rn = np.ascontiguousarray(row_norm, dtype=np.float64)
    cdef const double[::1] cn = np.ascontiguousarray(col_norm, dtype=np.float64)
    cdef const float[::1] cs = scale
    cdef int[:, ::1] oi = out_idx
    cdef float[:, ::1] ov = out_val
    cdef int[::1] cnt = counts
    cdef double[:, ::1] ACC = acc_buf
    cdef float[:, ::1] VAL = val_buf
    cdef unsigned char[:, ::1] FLAG = flag_buf
    cdef unsigned char[:, ::1] MASK = mask_buf
    cdef int[:, ::1] TOUCH = touch_buf
    cdef int[:, ::1] HI = heap_i
    cdef float[:, ::1] HV = heap_v
    cdef double sh = shrink
    cdef bint bin_ = binary, excl = exclude_self
    cdef Py_ssize_t i
    cdef int t
    if n_rows == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    with nogil, parallel(num_threads=nt):
        for i in prange(n_rows, schedule="dynamic", chunksize=32):
            t = threadid()
            cnt[i] = knn_row(&aix[0] if aix.shape[0] else NULL, &ax[0] if ax.shape[0] else NULL,
                             aip[i], aip[i + 1], rn[i], &bip[0],
                             &bix[0] if bix.shape[0] else NULL, &bx[0] if bx.shape[0] else NULL,
                             &cn[0] if n_cols else NULL, &cs[0] if n_cols else NULL, kind,
                             bin_, sh, <int>n_cols, k,
                             i if excl else -1, &ACC[t, 0], &VAL[t, 0], &FLAG[t, 0],
                             &MASK[t, 0], &TOUCH[t, 0], &HI[t, 0], &HV[t, 0], &oi[i, 0],
                             &ov[i, 0])
    keep = np.arange(k)[None, :] < counts[:, None]
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, out_idx[keep], out_val[keep]


cdef void apply_offers(const int* rows, const int* items, const float* scores, int m,
                       int* counts, int* order, int n, int k, int cap, int* bn, float* fv,
                       int* fi, int* bi, float* bv) noexcept nogil:
    """Apply m deferred (row, item, score) offers to the rows' top-k buffers in row order.

    A counting sort by row turns random buffer accesses (cache misses) into a
    sequential walk over the buffers.
    """
    cdef int e, r, j
    cdef Py_ssize_t base
    for r in range(n + 1):
        counts[r] = 0
    for e in range(m):
        counts[rows[e] + 1] += 1
    for r in range(n):
        counts[r + 1] += counts[r]
    for e in range(m):
        order[counts[rows[e]]] = e
        counts[rows[e]] += 1
    for r in range(m):
        e = order[r]
        j = rows[e]
        if worse(fv[j], fi[j], scores[e], items[e]):
            base = <Py_ssize_t>j * cap
            bn[j] = buffer_offer(bi + base, bv + base, bn[j], cap, k, items[e], scores[e],
                                 &fv[j], &fi[j])


cdef inline void scatter_partners(const long long* ap, const int* ai, const float* av,
                                  const long long* pp, const long long* bp, const Entry* B,
                                  int o, bint binary, double* acc) noexcept nogil:
    """acc[j] += a[o, u] * a[j, u] for every entry (o, u) of A's row o and every
    partner j that follows it in B's row u (B = A.T, rows sorted by label).

    knn_self's pair-once scatter, shared by its dense and buffered paths so
    both sum every dot product in the same order (hence the same floats).
    """
    cdef long long p, q
    cdef int u
    cdef double w
    for p in range(ap[o], ap[o + 1]):
        u = ai[p]
        w = 1.0 if binary else av[p]
        if p + 2 < ap[o + 1]:  # later segments are random jumps: fetch them early
            recserve_prefetch(&B[pp[p + 2] + 1])
            recserve_prefetch(&B[pp[p + 2] + 9])
        if binary:
            for q in range(pp[p] + 1, bp[u + 1]):
                acc[B[q].col] += 1.0
        else:
            for q in range(pp[p] + 1, bp[u + 1]):
                acc[B[q].col] += w * B[q].val


def knn_self(indptr, indices, data, Py_ssize_t n_inner, int k, str similarity="cosine",
             double alpha=0.5, double shrink=0.0, col_scale=None, int n_threads=0):
    """Top-k neighbours of every row of A among the other rows: knn(A, A.T) with
    exclude_self, computing each pair's dot product once.

    A is rows x n_inner (items x users for item-item). Row i accumulates only
    the rows j > i and offers the pair to both rows' top-k buffers; each thread
    keeps its own buffers for every row (no locks), merged per row at the end.
    That halves the scatter-add work of the general kernel. Results equal
    knn(A, A.T, exclude_self=True) exactly, ties included.
    """
    check_knn_params(similarity, k, alpha, shrink)
    indptr, indices, data = as_csr(indptr, indices, data, n_inner, "a")
    cdef Py_ssize_t n = indptr.shape[0] - 1
    cdef int kind = SIMILARITIES[similarity]
    binary = kind == 3
    scale = (np.ones(n, np.float32) if col_scale is None
             else check_array(np.ascontiguousarray(col_scale, dtype=np.float32),
                              "col_scale", np.float32, 1))
    if scale.shape[0] != n:
        raise ValueError(f"col_scale: expected length {n}, got {scale.shape[0]}")
    if n == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)

    # Rows are visited in order of increasing length (popularity, for items)
    # under new labels: on long-tailed data most accumulations then land in a
    # small, cache-resident suffix of the accumulator. Heaps hold original
    # ids, so ties still break by the original id and results are identical.
    relabel = np.argsort(np.diff(indptr), kind="stable").astype(np.int32)  # new -> old
    newlabel = np.empty(n, np.int32)
    newlabel[relabel] = np.arange(n, dtype=np.int32)

    # The transpose B = A.T as interleaved (col, val) entries, with rows
    # visited in new-label order so B's rows are sorted, the squared norms
    # (under new labels), and the position of every entry of A inside B: row
    # i then scans B row u from just past its own entry, i.e. only the
    # partners j > i. Threads fill disjoint ranges of rows (equal shares of
    # the entries); per-thread column counts give each its own slots in B.
    cdef int nt = resolve_threads(n_threads)
    cdef Py_ssize_t nnz = indices.shape[0]
    cdef int tt = <int>max(1, min(nt, (64 * 2**20) // max(1, 8 * (n_inner + 1))))
    lengths = np.diff(indptr)[relabel]
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(1, tt) * (nnz / tt))
    bounds = np.concatenate([[0], np.minimum(bounds + 1, n), [n]]).astype(np.int64)
    slots = np.zeros((tt, n_inner + 1), np.int64)
    b_indptr = np.zeros(n_inner + 1, np.int64)
    norm = np.zeros(n, np.float64)
    entries = np.empty(2 * max(nnz, 1), np.int32)  # Entry records, 8 bytes each
    pos = np.empty(nnz, np.int64)
    cdef const long long[::1] aip = indptr
    cdef const int[::1] aix = indices
    cdef const float[::1] ax = data
    cdef const int[::1] rl = relabel
    cdef const long long[::1] rb = bounds
    cdef long long[:, ::1] SL = slots
    cdef long long[::1] bip_w = b_indptr
    cdef double[::1] norm_w = norm
    cdef int[::1] ent_w = entries
    cdef Entry* B = <Entry*>&ent_w[0]
    cdef long long[::1] pos_w = pos
    cdef long long* fill
    cdef Py_ssize_t i, o
    cdef long long p, q
    cdef int tid
    cdef bint bin0 = binary
    with nogil:
        for tid in prange(tt, schedule="static", num_threads=tt):
            fill = &SL[tid, 0]
            for i in range(rb[tid], rb[tid + 1]):
                o = rl[i]
                for p in range(aip[o], aip[o + 1]):
                    fill[aix[p]] += 1
        for o in range(n_inner):  # slots[t, u]: where thread t starts in B's row u
            q = bip_w[o]
            for tid in range(tt):
                p = SL[tid, o]
                SL[tid, o] = q
                q = q + p
            bip_w[o + 1] = q
        for tid in prange(tt, schedule="static", num_threads=tt):
            fill = &SL[tid, 0]
            for i in range(rb[tid], rb[tid + 1]):
                o = rl[i]
                for p in range(aip[o], aip[o + 1]):
                    norm_w[i] += 1.0 if bin0 else <double>ax[p] * ax[p]
                    q = fill[aix[p]]
                    fill[aix[p]] = q + 1
                    B[q].col = <int>i
                    B[q].val = ax[p]
                    pos_w[p] = q
    if kind == 1:
        rnorm = cnorm = np.sqrt(norm)
    elif kind == 2:
        rnorm, cnorm = norm ** alpha, norm ** (1.0 - alpha)
    else:
        rnorm = cnorm = norm
    scale = np.ascontiguousarray(scale[relabel])

    if <double>n * n * 4 <= DENSE_SCORES_BYTES:
        out_idx, out_val, counts = _dense_scores_topk(
            indptr, indices, data, b_indptr, entries, pos, relabel,
            np.ascontiguousarray(rnorm, dtype=np.float64),
            np.ascontiguousarray(cnorm, dtype=np.float64), scale, k, kind, shrink,
            binary, col_scale is None and kind != 2, nt)
        return _to_csr(out_idx, out_val, counts, k)
    # Per thread and row a top-k buffer of 2k slots (see buffer_offer), and
    # its floor in compact arrays that stay in cache: most offers lose to the
    # floor and never touch the (large, cold) buffer itself.
    cdef int bcap = 2 * k
    buf_i = np.empty((nt, n, bcap), np.int32)
    buf_v = np.empty((nt, n, bcap), np.float32)
    buf_size = np.zeros((nt, n), np.int32)
    floor_v = np.full((nt, n), -np.inf, np.float32)
    floor_i = np.full((nt, n), np.iinfo(np.int32).max, np.int32)
    acc_buf = np.zeros((nt, n), np.float64)
    flag_buf = np.zeros((nt, n), np.uint8)
    touch_buf = np.empty((nt, n), np.int32)
    # Deferred offers to other rows' buffers (see apply_offers).
    cdef int cap = <int>min(1 << 20, max(1024, 4 * n))
    buf_rows = np.empty((nt, cap), np.int32)
    buf_items = np.empty((nt, cap), np.int32)
    buf_scores = np.empty((nt, cap), np.float32)
    buf_order = np.empty((nt, cap), np.int32)
    buf_counts = np.empty((nt, n + 1), np.int32)
    buf_n = np.zeros(nt, np.int32)
    cdef const long long[::1] bip = b_indptr
    cdef const long long[::1] ps = pos
    cdef const double[::1] rn = np.ascontiguousarray(rnorm, dtype=np.float64)
    cdef const double[::1] cn = np.ascontiguousarray(cnorm, dtype=np.float64)
    cdef const float[::1] cs = scale
    cdef int[:, :, ::1] HI = buf_i
    cdef float[:, :, ::1] HV = buf_v
    cdef int[:, ::1] HN = buf_size
    cdef float[:, ::1] FV = floor_v
    cdef int[:, ::1] FI = floor_i
    cdef double[:, ::1] ACC = acc_buf
    cdef unsigned char[:, ::1] FLAG = flag_buf
    cdef int[:, ::1] TOUCH = touch_buf
    cdef double* acc
    cdef unsigned char* flag
    cdef int* touch
    cdef const long long* bp = &bip[0]
    cdef int[:, ::1] BR = buf_rows
    cdef int[:, ::1] BI = buf_items
    cdef float[:, ::1] BS = buf_scores
    cdef int[:, ::1] BO = buf_order
    cdef int[:, ::1] BC = buf_counts
    cdef int[::1] BN = buf_n
    cdef int* br
    cdef int* bitems
    cdef float* bs
    cdef const int[::1] orig_v = relabel
    cdef const int* orig = &orig_v[0]
    cdef double sh = shrink, d, w
    cdef float sij, sji, fvi
    cdef double ri
    cdef int fii, oi_, nbuf
    cdef bint bin_ = binary, dense
    # Without a column scale, dot, cosine and Jaccard give (j, i) the very same
    # float as (i, j) (the denominator's factors commute): compute it once, and
    # skip the multiplication by a scale of ones.
    cdef bint mirrored = col_scale is None and kind != 2
    cdef long long work
    cdef int t, me, j, u, c, n_touched
    # Raw pointers everywhere in the hot loops: memoryview fields would be
    # reloaded on every iteration (the compiler cannot rule out aliasing).
    cdef const long long* ap = &aip[0]
    cdef const int* ai = &aix[0]
    cdef const float* av = &ax[0]
    cdef const long long* pp = &ps[0]
    cdef const double* rnp = &rn[0]
    cdef const double* cnp = &cn[0]
    cdef const float* csp = &cs[0]
    cdef int* hn
    cdef float* fv
    cdef int* fi
    cdef int* hi
    cdef float* hv
    me = 0  # set in the block, which copies it in (firstprivate): a value first
    with nogil, parallel(num_threads=nt):
        for i in prange(n, schedule="dynamic", chunksize=16):
            t = threadid()
            acc = &ACC[t, 0]
            flag = &FLAG[t, 0]
            touch = &TOUCH[t, 0]
            hn = &HN[t, 0]
            fv = &FV[t, 0]
            fi = &FI[t, 0]
            hi = &HI[t, 0, 0]
            hv = &HV[t, 0, 0]
            br = &BR[t, 0]
            bitems = &BI[t, 0]
            bs = &BS[t, 0]
            # Work of this row (entries it will scatter); when it is large
            # next to the columns it can reach (j > i), skip first-touch
            # bookkeeping and find the touched columns by one sequential scan.
            o = orig[i]
            work = 0
            for p in range(ap[o], ap[o + 1]):
                u = ai[p]
                work = work + bp[u + 1] - pp[p] - 1
            dense = work * 4 >= n - i
            n_touched = 0
            if dense:
                scatter_partners(ap, ai, av, pp, bp, B, o, bin_, acc)
            else:
                for p in range(ap[o], ap[o + 1]):
                    u = ai[p]
                    w = 1.0 if bin_ else av[p]
                    if p + 2 < ap[o + 1]:  # later segments are random jumps: fetch early
                        recserve_prefetch(&B[pp[p + 2] + 1])
                    for q in range(pp[p] + 1, bp[u + 1]):
                        j = B[q].col
                        if not flag[j]:
                            flag[j] = 1
                            touch[n_touched] = j
                            n_touched = n_touched + 1
                        acc[j] += w * (1.0 if bin_ else B[q].val)
            if dense:  # branch-free compaction: the nonzero test is a coin flip here
                for j in range(<int>i + 1, <int>n):
                    touch[n_touched] = j
                    n_touched = n_touched + (acc[j] != 0.0)
            if not dense:
                for c in range(n_touched):
                    flag[touch[c]] = 0
            # Row i's floor, its id and the deferred-offer count live in locals
            # (the compiler must otherwise reload them after every store);
            # they are re-read whenever a call below may have changed them.
            fvi = fv[i]
            fii = fi[i]
            oi_ = orig[i]
            ri = rnp[i]
            nbuf = BN[t]
            for c in range(n_touched):
                j = touch[c]
                d = acc[j]
                acc[j] = 0.0
                if d == 0.0:
                    continue  # products that cancel exactly make no neighbour
                if mirrored:
                    sij = sji = <float>transform(kind, d, ri, cnp[j], sh)
                else:
                    sij = <float>(transform(kind, d, ri, cnp[j], sh) * csp[j])
                    sji = <float>(transform(kind, d, rnp[j], cnp[i], sh) * csp[i])
                if worse(fvi, fii, sij, orig[j]):
                    hn[i] = buffer_offer(hi + i * bcap, hv + i * bcap, hn[i], bcap, k, orig[j],
                                         sij, &fv[i], &fi[i])
                    fvi = fv[i]
                    fii = fi[i]
                if worse(fv[j], fi[j], sji, oi_):
                    if nbuf == cap:
                        apply_offers(br, bitems, bs, nbuf, &BC[t, 0], &BO[t, 0], <int>n, k,
                                     bcap, hn, fv, fi, hi, hv)
                        nbuf = 0
                        fvi = fv[i]
                        fii = fi[i]
                    br[nbuf] = j
                    bitems[nbuf] = oi_
                    bs[nbuf] = sji
                    nbuf = nbuf + 1
            BN[t] = nbuf
        # What each thread still holds goes to its own buffers.
        me = threadid()
        apply_offers(&BR[me, 0], &BI[me, 0], &BS[me, 0], BN[me], &BC[me, 0], &BO[me, 0],
                     <int>n, k, bcap, &HN[me, 0], &FV[me, 0], &FI[me, 0], &HI[me, 0, 0],
                     &HV[me, 0, 0])

    # Merge: every row's per-thread buffers into one top-k, best first.
    out_idx = np.empty((n, k), np.int32)
    out_val = np.empty((n, k), np.float32)
    counts = np.zeros(n, np.int32)
    merge_i = np.empty((nt, nt * bcap), np.int32)
    merge_v = np.empty((nt, nt * bcap), np.float32)
    cdef int[:, ::1] oi = out_idx
    cdef float[:, ::1] ov = out_val
    cdef int[::1] cnt = counts
    cdef int[:, ::1] MI = merge_i
    cdef float[:, ::1] MV = merge_v
    cdef int src, e, size
    with nogil, parallel(num_threads=nt):
        for i in prange(n, schedule="static"):
            t = threadid()
            size = 0
            for src in range(nt):
                for e in range(HN[src, i]):
                    MI[t, size] = HI[src, i, e]
                    MV[t, size] = HV[src, i, e]
                    size = size + 1
            o = orig[i]  # written straight to the row's original place
            cnt[o] = drain_best(&MI[t, 0], &MV[t, 0], size, k, &oi[o, 0], &ov[o, 0])
    return _to_csr(out_idx, out_val, counts, k)


def _to_csr(out_idx, out_val, counts, int k):
    """CSR (indptr, indices, data) of per-row top-k lists (n x k, counts[i] valid)."""
    n = counts.shape[0]
    out_indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=out_indptr[1:])
    if out_indptr[n] == n * k:  # every row full (the usual case): no gather
        return out_indptr, out_idx.reshape(-1), out_val.reshape(-1)
    keep = np.arange(k)[None, :] < counts[:, None]
    return out_indptr, out_idx[keep], out_val[keep]


# Up to this many bytes of float32 scores (n x n), knn_self keeps every pair's
# score in one dense matrix instead of per-row top-k buffers: on small, dense
# catalogues (MovieLens: 1.7k-3.7k items, most pairs co-occur) the buffers
# would accept half of all offers, and a dense row is selected in one pass.
DENSE_SCORES_BYTES = 64 * 2**20


cdef _dense_scores_topk(indptr, indices, data, b_indptr, entries, pos, relabel, rnorm, cnorm,
                        scale, int k, int kind, double shrink, bint binary, bint mirrored,
                        int nt):
    """knn_self's path for small n: row i's scatter (partners j > i, as in the
    buffered path) fills S[i, j > i] (and S[j, i] when the two directions
    differ; otherwise the lower triangle is the upper's transpose, copied tile
    by tile); then every row of S is selected on its own by best_of_row. Same
    candidates, same floats, same total order, so the same result."""
    cdef Py_ssize_t n = indptr.shape[0] - 1
    scores = np.empty((n, n), np.float32)
    acc_buf = np.zeros((nt, n), np.float64)
    cand_i = np.empty((nt, n), np.int32)
    cand_v = np.empty((nt, n), np.float32)
    out_idx = np.empty((n, k), np.int32)
    out_val = np.empty((n, k), np.float32)
    counts = np.zeros(n, np.int32)
    cdef const long long[::1] aip = indptr
    cdef const int[::1] aix = indices
    cdef const float[::1] ax = data
    cdef const long long[::1] bip = b_indptr
    cdef const int[::1] ent = entries
    cdef const Entry* B = <const Entry*>&ent[0]
    cdef const long long[::1] ps = pos
    cdef const int[::1] orig = relabel
    cdef const double[::1] rn = rnorm
    cdef const double[::1] cn = cnorm
    cdef const float[::1] cs = scale
    cdef float[:, ::1] S = scores
    cdef double[:, ::1] ACC = acc_buf
    cdef int[:, ::1] CI = cand_i
    cdef float[:, ::1] CV = cand_v
    cdef int[:, ::1] oi = out_idx
    cdef float[:, ::1] ov = out_val
    cdef int[::1] cnt = counts
    cdef double* acc
    cdef float* srow
    cdef float nan = float("nan")
    cdef float sij, sji
    cdef double d, sh = shrink
    cdef Py_ssize_t i, j
    cdef int t, u
    with nogil, parallel(num_threads=nt):
        for i in prange(n, schedule="dynamic", chunksize=16):
            t = threadid()
            acc = &ACC[t, 0]
            scatter_partners(&aip[0], &aix[0], &ax[0], &ps[0], &bip[0], B, orig[i], binary,
                             acc)
            srow = &S[i, 0]
            srow[i] = nan
            for j in range(i + 1, n):
                d = acc[j]
                acc[j] = 0.0
                if d == 0.0:  # no co-occurrence, or products that cancel: no neighbour
                    sij = sji = nan
                elif mirrored:
                    sij = sji = <float>transform(kind, d, rn[i], cn[j], sh)
                else:
                    sij = <float>(transform(kind, d, rn[i], cn[j], sh) * cs[j])
                    sji = <float>(transform(kind, d, rn[j], cn[i], sh) * cs[i])
                srow[j] = sij
                if not mirrored:
                    S[j, i] = sji
    cdef Py_ssize_t nb = (n + 63) // 64, bj, bi, r, c, r1, c1
    if mirrored:  # the lower triangle as the upper's transpose, tile by tile
        with nogil, parallel(num_threads=nt):
            for bj in prange(nb, schedule="dynamic"):
                for bi in range(bj + 1):
                    r1 = min(n, (bj + 1) * 64)
                    for r in range(bj * 64, r1):
                        c1 = min(r, (bi + 1) * 64)
                        for c in range(bi * 64, c1):
                            S[r, c] = S[c, r]
    with nogil, parallel(num_threads=nt):
        for i in prange(n, schedule="static"):
            t = threadid()
            u = orig[i]  # written straight to the row's original place
            cnt[u] = best_of_row(&S[i, 0], &orig[0], <int>n, k, &CI[t, 0], &CV[t, 0],
                                 &oi[u, 0], &ov[u, 0])
    return out_idx, out_val, counts


cdef inline bint better(float sa, int ia, float sb, int ib) noexcept nogil:
    return sa > sb or (sa == sb and ia < ib)


cdef void score_row(const int* hix, const float* hx, long long h0, long long h1,
                    const long long* sip, const int* six, const float* sx, int n, int k,
                    const int* exi, long long e0, long long e1, const int* cai, int nc,
                    float* ACC, unsigned char* FLAG, unsigned char* MASK, int* TOUCH,
                    int* HI, float* HV, int* TI, float* TV, int* ZI,
                    int* oi, float* ov) noexcept nogil:
    """One row of score_topk: accumulate history x S into ACC (touched items
    listed in TOUCH), select the top k into oi / ov (pre-filled with -1 / -inf),
    and leave the scratch zeroed again."""
    cdef long long p, r
    cdef int i, j, c, m, nz, a, b, o
    cdef int n_touched = 0
    cdef float w
    for p in range(h0, h1):
        i = hix[p]
        w = hx[p]
        for r in range(sip[i], sip[i + 1]):
            j = six[r]
            if not FLAG[j]:
                FLAG[j] = 1
                TOUCH[n_touched] = j
                n_touched = n_touched + 1
            ACC[j] += w * sx[r]
    mark(MASK, exi, e0, e1, n, 1)
    if nc > 0:
        # Dense scores (0 where untouched) restricted to the candidates.
        select_topk(ACC, n, k, MASK, cai, nc, HI, HV, oi, ov)
    else:
        m = 0
        if n_touched > 0:
            m = select_topk(ACC, n, k, MASK, TOUCH, n_touched, HI, HV, TI, TV)
        if m == k and TV[k - 1] > 0:
            for c in range(k):
                oi[c] = TI[c]
                ov[c] = TV[c]
        else:
            # Untouched eligible items score 0: take them in id order and
            # merge with the touched ones (negatives rank below zeros, and a
            # touched score of exactly 0 ties with them, by lower id).
            nz = 0
            for j in range(n):
                if nz == k:
                    break
                if not MASK[j] and not FLAG[j]:
                    ZI[nz] = j
                    nz = nz + 1
            a = 0
            b = 0
            for o in range(k):
                if a < m and (b >= nz or better(TV[a], TI[a], 0.0, ZI[b])):
                    oi[o] = TI[a]
                    ov[o] = TV[a]
                    a = a + 1
                elif b < nz:
                    oi[o] = ZI[b]
                    ov[o] = 0.0
                    b = b + 1
                else:
                    break
    mark(MASK, exi, e0, e1, n, 0)
    for c in range(n_touched):
        j = TOUCH[c]
        ACC[j] = 0.0
        FLAG[j] = 0


def score_topk(h_indptr, h_indices, h_data, s_indptr, s_indices, s_data, Py_ssize_t n_items,
               int k, exclude_indptr=None, exclude_indices=None, cand_indptr=None,
               cand_indices=None, int n_threads=0):
    """Top-k of (H @ S) per row with exclusions, without materialising dense scores.

    H (rows x inner) holds histories (or neighbour weights), S (inner x items)
    similarities (or neighbours' items). Items untouched by a row score 0 and
    still count as eligible, so a row gets exactly min(k, eligible) items,
    matching a dense computation (best first, ties by lower item id).
    Exclusions / candidates as in kernels.topk.topk_dense. S may be given as a
    CheckedCSR (with s_indices and s_data None): validated once, not per call.
    """
    if k <= 0:
        raise ValueError(f"k: must be positive, got {k}")
    if isinstance(s_indptr, CheckedCSR):
        if s_indices is not None or s_data is not None:
            raise TypeError("s: give a CheckedCSR alone (s_indices and s_data None)")
        if s_indptr.n_cols != n_items:
            raise ValueError(f"s: a CheckedCSR of {s_indptr.n_cols} columns, not {n_items}")
        s_indptr, s_indices, s_data = s_indptr.indptr, s_indptr.indices, s_indptr.data
    else:
        s_indptr, s_indices, s_data = as_csr(s_indptr, s_indices, s_data, n_items, "s")
    h_indptr, h_indices, h_data = as_csr(h_indptr, h_indices, h_data,
                                         s_indptr.shape[0] - 1, "h")
    cdef Py_ssize_t nq = h_indptr.shape[0] - 1
    exclude_indptr, exclude_indices = rows_or_empty(exclude_indptr, exclude_indices, nq,
                                                    "exclude")
    cand_indptr, cand_indices = rows_or_empty(cand_indptr, cand_indices, nq, "cand")
    cdef int nt = threads_for(n_threads, nq)
    out_idx = np.full((nq, k), -1, np.int32)
    out_val = np.full((nq, k), -np.inf, np.float32)
    width = max(n_items, 1)
    acc_buf = np.zeros((nt, width), np.float32)
    flag_buf = np.zeros((nt, width), np.uint8)
    mask_buf = np.zeros((nt, width), np.uint8)
    touch_buf = np.empty((nt, width), np.int32)
    heap_i = np.empty((nt, k), np.int32)
    heap_v = np.empty((nt, k), np.float32)
    tmp_i = np.empty((nt, k), np.int32)
    tmp_v = np.empty((nt, k), np.float32)
    zero_i = np.empty((nt, k), np.int32)

    cdef const long long[::1] hip = h_indptr
    cdef const int[::1] hix = h_indices
    cdef const float[::1] hx = h_data
    cdef const long long[::1] sip = s_indptr
    cdef const int[::1] six = s_indices
    cdef const float[::1] sx = s_data
    cdef const long long[::1] exp = exclude_indptr
    cdef const int[::1] exi = exclude_indices
    cdef const long long[::1] cap = cand_indptr
    cdef const int[::1] cai = cand_indices
    cdef int[:, ::1] oi = out_idx
    cdef float[:, ::1] ov = out_val
    cdef float[:, ::1] ACC = acc_buf
    cdef unsigned char[:, ::1] FLAG = flag_buf
    cdef unsigned char[:, ::1] MASK = mask_buf
    cdef int[:, ::1] TOUCH = touch_buf
    cdef int[:, ::1] HI = heap_i
    cdef float[:, ::1] HV = heap_v
    cdef int[:, ::1] TI = tmp_i
    cdef float[:, ::1] TV = tmp_v
    cdef int[:, ::1] ZI = zero_i
    cdef Py_ssize_t qi
    cdef int t
    cdef int n = <int>n_items
    if nq == 0:
        return out_idx, out_val
    with nogil, parallel(num_threads=nt):
        for qi in prange(nq, schedule="dynamic", chunksize=16):
            t = threadid()
            score_row(&hix[0] if hix.shape[0] else NULL, &hx[0] if hx.shape[0] else NULL,
                      hip[qi], hip[qi + 1], &sip[0], &six[0] if six.shape[0] else NULL,
                      &sx[0] if sx.shape[0] else NULL, n, k,
                      &exi[0] if exi.shape[0] else NULL, exp[qi], exp[qi + 1],
                      &cai[cap[qi]] if cai.shape[0] else NULL, <int>(cap[qi + 1] - cap[qi]),
                      &ACC[t, 0], &FLAG[t, 0], &MASK[t, 0], &TOUCH[t, 0], &HI[t, 0], &HV[t, 0],
                      &TI[t, 0], &TV[t, 0], &ZI[t, 0], &oi[qi, 0], &ov[qi, 0])
    return out_idx, out_val


cdef class Scratch:
    """The buffers of one-row scoring over n items, reused across calls (one per
    thread: not thread-safe). Grows its top-k buffers to the largest k asked."""

    cdef readonly Py_ssize_t n
    cdef int k
    cdef object acc, flag, mask, touch, hi, hv, ti, tv, zi

    def __init__(self, Py_ssize_t n_items):
        self.n = max(n_items, 1)
        self.acc = np.zeros(self.n, np.float32)
        self.flag = np.zeros(self.n, np.uint8)
        self.mask = np.zeros(self.n, np.uint8)
        self.touch = np.empty(self.n, np.int32)
        self.k = 0
        self._grow(16)

    def _grow(self, int k):
        if k > self.k:
            self.k = k
            self.hi, self.ti, self.zi = (np.empty(k, np.int32) for _ in range(3))
            self.hv, self.tv = (np.empty(k, np.float32) for _ in range(2))


cdef class KnnScratch(Scratch):
    """Scratch for KnnIndex.query: the one-row buffers plus a float64
    accumulator and a float32 similarity row (knn sums in double and selects
    from the transformed values)."""

    cdef object acc64, val

    def __init__(self, Py_ssize_t n_cols):
        super().__init__(n_cols)
        self.acc64 = np.zeros(self.n, np.float64)
        self.val = np.zeros(self.n, np.float32)


cdef class KnnIndex:
    """B (inner x n_cols, CSR) validated once, with its column norms already
    transformed, for knn queries of one row at a time: a fold-in's search of
    its neighbours (userknn: a new user's weighted history against every
    training user). knn() re-validated B (O(nnz)) and recomputed the norms'
    transform (O(n_cols)) and allocated its scratch on every call, several
    times the search itself for a ten-item row. query() returns what knn
    returns for a one-row A, bit for bit."""

    cdef readonly object indptr, indices, data, col_den, col_scale
    cdef readonly Py_ssize_t n_rows, n_cols
    cdef readonly str similarity
    cdef readonly double alpha, shrink
    cdef int kind

    def __init__(self, b_indptr, b_indices, b_data, Py_ssize_t n_cols, str similarity="cosine",
                 double alpha=0.5, double shrink=0.0, col_scale=None, col_norm=None):
        check_knn_params(similarity, 1, alpha, shrink)
        self.indptr, self.indices, self.data = as_csr(b_indptr, b_indices, b_data, n_cols, "b")
        self.n_rows = self.indptr.shape[0] - 1
        self.n_cols = n_cols
        self.similarity, self.alpha, self.shrink = similarity, alpha, shrink
        self.kind = SIMILARITIES[similarity]
        if col_norm is None:
            col_norm = knn_col_norm(self.indices, self.data, n_cols, similarity)
        else:
            col_norm = check_array(np.asarray(col_norm), "col_norm", np.float64, 1)
            if col_norm.shape[0] != n_cols:
                raise ValueError(f"col_norm: expected length {n_cols}, got {col_norm.shape[0]}")
        # The same numpy expressions as knn's, so the same roundings.
        if self.kind == 1:
            col_norm = np.sqrt(col_norm)
        elif self.kind == 2:
            col_norm = col_norm ** (1.0 - alpha)
        self.col_den = np.ascontiguousarray(col_norm, dtype=np.float64)
        scale = (np.ones(n_cols, np.float32) if col_scale is None
                 else check_array(np.ascontiguousarray(col_scale, dtype=np.float32),
                                  "col_scale", np.float32, 1))
        if scale.shape[0] != n_cols:
            raise ValueError(f"col_scale: expected length {n_cols}, got {scale.shape[0]}")
        self.col_scale = scale

    def query(self, indices, data, int k, KnnScratch scratch):
        """The top k columns of a @ B for one row a (indices into B's rows, and
        their values), transformed like knn: 1-d (columns int32, similarities
        float32), best first, ties by lower column."""
        if k <= 0:
            raise ValueError(f"k: must be positive, got {k}")
        if scratch.n != max(self.n_cols, 1):
            raise ValueError(f"scratch: sized for {scratch.n} columns, not {self.n_cols}")
        if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu":
            raise TypeError("indices: expected an integer numpy array")
        if not isinstance(data, np.ndarray) or data.dtype not in (np.float32, np.float64):
            got = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
            raise TypeError(f"data: expected float32 or float64, got {got}")
        a_ix = np.ascontiguousarray(indices, dtype=np.int32)
        a_x = np.ascontiguousarray(data, dtype=np.float32)
        if a_x.ndim != 1 or a_ix.ndim != 1 or a_x.shape[0] != a_ix.shape[0]:
            raise ValueError(f"data: expected one value per index ({a_ix.shape[0]})")
        cdef const int[::1] aix = a_ix
        cdef const float[::1] ax = a_x
        cdef Py_ssize_t n = a_ix.shape[0], e
        cdef int rows = <int>self.n_rows
        for e in range(n):
            if aix[e] < 0 or aix[e] >= rows:
                raise ValueError(f"indices: values must lie in [0, {rows}), got {aix[e]}")
        # The row norm by knn's expressions (reduceat's summation, numpy's powers).
        if self.kind == 3:
            rn = np.array([float(n)])
        else:
            rn = np.zeros(1)
            if n:
                rn[:] = np.add.reduceat(a_x.astype(np.float64) ** 2, np.zeros(1, np.int64))
        if self.kind == 1:
            rn = np.sqrt(rn)
        elif self.kind == 2:
            rn = rn ** self.alpha
        cdef double rn_i = rn[0]
        scratch._grow(k)
        out_i = np.empty(k, np.int32)
        out_v = np.empty(k, np.float32)
        cdef const long long[::1] bip = self.indptr
        cdef const int[::1] bix = self.indices
        cdef const float[::1] bx = self.data
        cdef const double[::1] cn = self.col_den
        cdef const float[::1] cs = self.col_scale
        cdef double[::1] ACC = scratch.acc64
        cdef float[::1] VAL = scratch.val
        cdef unsigned char[::1] FLAG = scratch.flag
        cdef unsigned char[::1] MASK = scratch.mask
        cdef int[::1] TOUCH = scratch.touch
        cdef int[::1] HI = scratch.hi
        cdef float[::1] HV = scratch.hv
        cdef int[::1] oi = out_i
        cdef float[::1] ov = out_v
        cdef int m = 0
        if n == 0:
            return out_i[:0], out_v[:0]
        with nogil:
            m = knn_row(&aix[0], &ax[0], 0, n, rn_i, &bip[0],
                        &bix[0] if bix.shape[0] else NULL, &bx[0] if bx.shape[0] else NULL,
                        &cn[0] if self.n_cols else NULL, &cs[0] if self.n_cols else NULL,
                        self.kind, self.kind == 3, self.shrink, <int>self.n_cols, k, -1,
                        &ACC[0], &VAL[0], &FLAG[0], &MASK[0], &TOUCH[0], &HI[0], &HV[0],
                        &oi[0], &ov[0])
        return out_i[:m], out_v[:m]


def score_one(CheckedCSR hist, Py_ssize_t row, CheckedCSR sim, int k, CheckedCSR seen,
              Scratch scratch):
    """score_topk for one row of validated matrices, the serving path's call: the
    scores of row `row` of hist x sim, without the items of row `row` of `seen`
    (None: nothing excluded), with no per-call validation of the big arrays
    and no allocation but the answer. Returns 1-d (items int32, scores
    float32), exactly min(k, eligible) long, equal to score_topk's row."""
    if k <= 0:
        raise ValueError(f"k: must be positive, got {k}")
    if hist.n_cols != sim.n_rows:
        raise ValueError(f"hist: {hist.n_cols} columns, but sim has {sim.n_rows} rows")
    if not 0 <= row < hist.n_rows:
        raise IndexError(f"row: must be in [0, {hist.n_rows}), got {row}")
    if seen is not None and (seen.n_cols != sim.n_cols or seen.n_rows != hist.n_rows):
        raise ValueError("seen: must have hist's rows and sim's columns")
    if scratch.n != max(sim.n_cols, 1):
        raise ValueError(f"scratch: sized for {scratch.n} items, not {sim.n_cols}")
    cdef const long long[::1] eip = (seen if seen is not None else hist).indptr
    cdef const int[::1] eix = (seen if seen is not None else hist).indices
    cdef long long e0 = eip[row] if seen is not None else 0
    cdef long long e1 = eip[row + 1] if seen is not None else 0
    scratch._grow(k)
    out_i = np.full(k, -1, np.int32)
    out_v = np.full(k, -np.inf, np.float32)
    cdef const long long[::1] hip = hist.indptr
    cdef const int[::1] hix = hist.indices
    cdef const float[::1] hx = hist.data
    cdef const long long[::1] sip = sim.indptr
    cdef const int[::1] six = sim.indices
    cdef const float[::1] sx = sim.data
    cdef float[::1] ACC = scratch.acc
    cdef unsigned char[::1] FLAG = scratch.flag
    cdef unsigned char[::1] MASK = scratch.mask
    cdef int[::1] TOUCH = scratch.touch
    cdef int[::1] HI = scratch.hi
    cdef float[::1] HV = scratch.hv
    cdef int[::1] TI = scratch.ti
    cdef float[::1] TV = scratch.tv
    cdef int[::1] ZI = scratch.zi
    cdef int[::1] oi = out_i
    cdef float[::1] ov = out_v
    cdef long long h0 = hip[row], h1 = hip[row + 1]
    cdef int n = <int>sim.n_cols
    cdef int m = 0
    with nogil:
        score_row(&hix[0] if hix.shape[0] else NULL, &hx[0] if hx.shape[0] else NULL, h0, h1,
                  &sip[0], &six[0] if six.shape[0] else NULL, &sx[0] if sx.shape[0] else NULL,
                  n, k, &eix[0] if (e1 > e0) else NULL, e0, e1, NULL, 0,
                  &ACC[0], &FLAG[0], &MASK[0], &TOUCH[0], &HI[0], &HV[0], &TI[0], &TV[0],
                  &ZI[0], &oi[0], &ov[0])
        while m < k and oi[m] >= 0:
            m = m + 1
    return out_i[:m], out_v[:m]



cdef void dense_sum(const int* hix, const float* hx, long long h0, long long h1,
                    const long long* sip, const int* six, const float* sx, int n,
                    float* O) noexcept nogil:
    """O[0:n] = sum over p in [h0, h1) of hx[p] * row hix[p] of S, in p order (the
    order score_row adds them), 0 where untouched."""
    cdef long long p, r
    cdef int i, j
    cdef float w
    for j in range(n):
        O[j] = 0.0
    for p in range(h0, h1):
        i = hix[p]
        w = hx[p]
        for r in range(sip[i], sip[i + 1]):
            O[six[r]] += w * sx[r]


def dense_one(CheckedCSR hist, Py_ssize_t row, CheckedCSR sim, CheckedCSR seen, out):
    """out[:] = row `row` of hist x sim (0 where untouched), NaN at the items of
    row `row` of `seen` (None: nothing): the scores score_one selects from,
    summed in the same order, for a caller that combines rows (the hybrid)."""
    if hist.n_cols != sim.n_rows:
        raise ValueError(f"hist: {hist.n_cols} columns, but sim has {sim.n_rows} rows")
    if not 0 <= row < hist.n_rows:
        raise IndexError(f"row: must be in [0, {hist.n_rows}), got {row}")
    if seen is not None and (seen.n_cols != sim.n_cols or seen.n_rows != hist.n_rows):
        raise ValueError("seen: must have hist's rows and sim's columns")
    check_array(out, "out", np.float32, 1)
    if out.shape[0] != sim.n_cols:
        raise ValueError(f"out: expected {sim.n_cols} entries, got {out.shape[0]}")
    if not out.flags.writeable:
        raise ValueError("out: must be writable")
    cdef const long long[::1] hip = hist.indptr
    cdef const int[::1] hix = hist.indices
    cdef const float[::1] hx = hist.data
    cdef const long long[::1] sip = sim.indptr
    cdef const int[::1] six = sim.indices
    cdef const float[::1] sx = sim.data
    cdef const long long[::1] eip
    cdef const int[::1] eix
    cdef long long e0 = 0, e1 = 0
    if seen is not None:
        eip = seen.indptr
        eix = seen.indices
        e0, e1 = eip[row], eip[row + 1]
    cdef float[::1] O = out
    cdef long long h0 = hip[row], h1 = hip[row + 1]
    cdef int n = <int>sim.n_cols
    if n == 0:
        return
    with nogil:
        dense_sum(&hix[0] if h1 > h0 else NULL, &hx[0] if h1 > h0 else NULL, h0, h1, &sip[0],
                  &six[0] if six.shape[0] else NULL, &sx[0] if sx.shape[0] else NULL, n, &O[0])
        if e1 > e0:
            nan_at(&O[0], &eix[0], e0, e1, n)


def dense_history(CheckedCSR sim, indices, data, out, seen=None):
    """out[:] = sum over p of data[p] * row indices[p] of sim (0 where untouched),
    added in p order as score_topk adds one history row, NaN at the items of
    `seen` (int32; None: nothing): a folded-in user's row, for the hybrid."""
    check_array(indices, "indices", np.int32, 1)
    check_array(data, "data", np.float32, 1)
    if indices.shape[0] != data.shape[0]:
        raise ValueError(f"data: length {data.shape[0]}, indices {indices.shape[0]}")
    check_array(out, "out", np.float32, 1)
    if out.shape[0] != sim.n_cols:
        raise ValueError(f"out: expected {sim.n_cols} entries, got {out.shape[0]}")
    if not out.flags.writeable:
        raise ValueError("out: must be writable")
    cdef const int[::1] HI = indices
    cdef const float[::1] HX = data
    cdef Py_ssize_t n_rows = sim.n_rows, p
    for p in range(HI.shape[0]):
        if not 0 <= HI[p] < n_rows:
            raise IndexError(f"indices: {HI[p]} outside [0, {n_rows})")
    cdef const int[::1] SE
    cdef long long ns = 0
    if seen is not None:
        check_array(seen, "seen", np.int32, 1)
        SE = seen
        ns = SE.shape[0]
    cdef const long long[::1] sip = sim.indptr
    cdef const int[::1] six = sim.indices
    cdef const float[::1] sx = sim.data
    cdef float[::1] O = out
    cdef int n = <int>sim.n_cols
    cdef Py_ssize_t m = HI.shape[0]
    if n == 0:
        return
    with nogil:
        dense_sum(&HI[0] if m else NULL, &HX[0] if m else NULL, 0, m, &sip[0],
                  &six[0] if six.shape[0] else NULL, &sx[0] if sx.shape[0] else NULL, n, &O[0])
        if ns:
            nan_at(&O[0], &SE[0], 0, ns, n)


cdef enum:
    FILTER_BITS = 15  # block's column filter: 32k bits (4 KB on the stack)
    FILTER_WORDS = (1 << FILTER_BITS) // 64


cdef inline unsigned int filter_slot(unsigned int col) noexcept nogil:
    # Fibonacci hashing: spreads evenly spaced columns over the filter.
    return (col * 2654435769u) >> (32 - FILTER_BITS)


cdef int cmp_keys(const void* a, const void* b) noexcept nogil:
    cdef long long x = (<const long long*> a)[0], y = (<const long long*> b)[0]
    return (x > y) - (x < y)


def block(CheckedCSR m, rows, cols):
    """m[rows][:, cols] as a dense float64 (len(rows) x len(cols)) array, as
    scipy's toarray gives it (repeated rows and columns allowed; a row's
    repeated entries summed): what an explanation reads of a similarity
    matrix. scipy's two fancy-index steps cost ~100 us on a 30 x 10 block;
    this reads each chosen row once: a 32k-bit filter of the wanted columns
    turns most entries away in a predictable branch (a binary search over
    the sorted columns per entry mispredicts, ~25 ns each at 10 columns), and
    the rest are found by binary search."""
    check_array(rows, "rows", np.int64, 1)
    check_array(cols, "cols", np.int64, 1)
    cdef const long long[::1] R = rows
    cdef const long long[::1] C = cols
    cdef Py_ssize_t nr = R.shape[0], nc = C.shape[0], i, j
    cdef Py_ssize_t n_rows = m.n_rows, n_cols = m.n_cols
    for i in range(nr):
        if not 0 <= R[i] < n_rows:
            raise IndexError(f"rows: {R[i]} outside [0, {n_rows})")
    for j in range(nc):
        if not 0 <= C[j] < n_cols:
            raise IndexError(f"cols: {C[j]} outside [0, {n_cols})")
    out = np.zeros((nr, nc), np.float64)
    if nr == 0 or nc == 0:
        return out
    cdef double[:, ::1] O = out
    cdef const long long[::1] ip = m.indptr
    cdef const int[::1] ix = m.indices
    cdef const float[::1] x = m.data
    # (column << 32 | position), sorted: a column's positions lie side by side.
    keys = np.empty(nc, np.int64)
    cdef long long[::1] K = keys
    cdef long long p, c, lo, hi, mid
    cdef long long MASK32 = 0xFFFFFFFF
    cdef unsigned long long[FILTER_WORDS] wanted
    cdef unsigned int h
    with nogil:
        memset(wanted, 0, sizeof(wanted))
        for j in range(nc):
            K[j] = (C[j] << 32) | j
            h = filter_slot(<unsigned int> C[j])
            wanted[h >> 6] |= 1ULL << (h & 63)
        qsort(&K[0], nc, sizeof(long long), cmp_keys)
        for i in range(nr):
            for p in range(ip[R[i]], ip[R[i] + 1]):
                h = filter_slot(<unsigned int> ix[p])
                if not (wanted[h >> 6] >> (h & 63)) & 1:
                    continue
                c = (<long long> ix[p]) << 32
                lo = 0
                hi = nc
                while lo < hi:  # the first key of column ix[p]
                    mid = (lo + hi) >> 1
                    if K[mid] < c:
                        lo = mid + 1
                    else:
                        hi = mid
                while lo < nc and (K[lo] >> 32) == ix[p]:
                    O[i, <Py_ssize_t> (K[lo] & MASK32)] += x[p]
                    lo += 1
    return out


def history_row(items, values, Py_ssize_t n_items):
    """One history as a CSR row's (indices int32, data float32): sorted, a
    repeated item keeping its last value, `values` None meaning 1 each; an
    index outside [0, n_items) (the first one, in history order) raises
    IndexError and a non-finite value ValueError, as history_matrix does.
    A fold-in's ten-item history costs a few numpy calls otherwise; here it
    is one pass (histories of up to 64 items are sorted in place by
    insertion, longer ones by numpy's stable argsort)."""
    check_array(items, "items", np.int64, 1)
    cdef Py_ssize_t n = items.shape[0], a, b
    if values is not None:
        check_array(values, "values", np.float32, 1)
        if values.shape[0] != n:
            raise ValueError("history: values and items differ in length")
    cdef const long long[::1] I = items
    cdef const float[::1] V
    for a in range(n):
        if not 0 <= I[a] < n_items:
            raise IndexError(f"history: item index {I[a]} outside [0, {n_items})")
    if values is not None:
        V = values
        for a in range(n):
            if not isfinite(V[a]):
                raise ValueError("history: values must be finite")
    order = np.argsort(items, kind="stable") if n > 64 else np.arange(n)
    cdef long long[::1] O = order
    cdef long long t
    if n <= 64:  # stable insertion sort of positions by item
        for a in range(1, n):
            t = O[a]
            b = a
            while b > 0 and I[O[b - 1]] > I[t]:
                O[b] = O[b - 1]
                b -= 1
            O[b] = t
    out_i = np.empty(n, np.int32)
    out_v = np.empty(n, np.float32)
    cdef int[::1] OI = out_i
    cdef float[::1] OV = out_v
    cdef Py_ssize_t m = 0
    for a in range(n):
        if a + 1 < n and I[O[a + 1]] == I[O[a]]:
            continue  # a later position of the same item follows: it wins
        OI[m] = <int>I[O[a]]
        OV[m] = V[O[a]] if values is not None else 1.0
        m += 1
    return out_i[:m], out_v[:m]
