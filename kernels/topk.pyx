# Top-k selection with exclusions: the one selection routine every recserve
# scoring kernel uses. Partial selection with a k-sized heap (O(n log k)),
# never a full sort; exactly min(k, eligible) results; deterministic ties.
import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.float cimport FLT_MIN
from libc.limits cimport INT_MAX
from libc.math cimport nextafterf, sqrtf
from libc.stdlib cimport calloc, free, malloc

from .parallel cimport recserve_have_openmp, threads_for


cdef extern from *:
    """
    /* scores[i] = q . V[i] (+ bias[i]) for the n rows of V (d floats each):
       one user's exact scores, built for AVX2/FMA and baseline
       (RECSERVE_CLONES). Eight rows at a time, one accumulator each, so q is
       loaded once per eight rows and the eight horizontal sums share one
       shuffle tree (three pairwise-add levels) instead of a reduction per row;
       the remaining rows use the shared vector dot. */
    #if defined(__clang__)
    #define RS_SHUF8(a, b, ...) __builtin_shufflevector((a), (b), __VA_ARGS__)
    #define RS_HAVE_SHUF8 1
    #elif defined(__GNUC__)
    typedef int rs_i8 __attribute__((vector_size(32)));
    #define RS_SHUF8(a, b, ...) __builtin_shuffle((a), (b), (rs_i8){__VA_ARGS__})
    #define RS_HAVE_SHUF8 1
    #endif
    /* [x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7] (AVX's vhaddps);
       a macro: a function returning a 32-byte vector draws GCC's ABI warning
       in the baseline build. */
    #define RS_HADD(x, y) (RS_SHUF8((x), (y), 0, 2, 8, 10, 4, 6, 12, 14) \
                         + RS_SHUF8((x), (y), 1, 3, 9, 11, 5, 7, 13, 15))
    RECSERVE_CLONES
    static void recserve_inner_scores(const float *restrict q, const float *restrict V,
                                      long long n, int d, const float *restrict bias,
                                      float *restrict scores) {
        long long i = 0;
    #ifdef RS_HAVE_SHUF8
        if (d >= 8) {
            int d8 = d & ~7;
            for (; i + 8 <= n; i += 8) {
                const float *r = V + i * d;
                rs_v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                rs_v8 a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
                for (int k = 0; k < d8; k += 8) {
                    rs_v8 x = *(const rs_v8 *)(q + k);
                    a0 += x * *(const rs_v8 *)(r + k);
                    a1 += x * *(const rs_v8 *)(r + d + k);
                    a2 += x * *(const rs_v8 *)(r + 2 * d + k);
                    a3 += x * *(const rs_v8 *)(r + 3 * d + k);
                    a4 += x * *(const rs_v8 *)(r + 4 * d + k);
                    a5 += x * *(const rs_v8 *)(r + 5 * d + k);
                    a6 += x * *(const rs_v8 *)(r + 6 * d + k);
                    a7 += x * *(const rs_v8 *)(r + 7 * d + k);
                }
                /* lo = rows 0-3 (first half of their lanes, then second), hi = rows 4-7 */
                rs_v8 h01 = RS_HADD(a0, a1), h23 = RS_HADD(a2, a3);
                rs_v8 h45 = RS_HADD(a4, a5), h67 = RS_HADD(a6, a7);
                rs_v8 lo = RS_HADD(h01, h23), hi = RS_HADD(h45, h67);
                rs_v8 sum = RS_SHUF8(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11)
                          + RS_SHUF8(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
                /* The last d % 8 dimensions: one 8-row column vector per dimension
                   (the same per-row sums; writing single lanes of `sum` in a loop
                   cost 3-4x the whole row block at d = 20). */
                for (int k = d8; k < d; k++) {
                    rs_v8 col = {r[k], r[d + k], r[2 * d + k], r[3 * d + k],
                                 r[4 * d + k], r[5 * d + k], r[6 * d + k], r[7 * d + k]};
                    sum += q[k] * col;
                }
                if (bias)
                    sum += *(const rs_v8 *)(bias + i);
                *(rs_v8 *)(scores + i) = sum;
            }
        }
    #endif
        for (; i < n; i++)
            scores[i] = recserve_sdot(q, V + i * d, d) + (bias ? bias[i] : 0.0f);
    }
    /* out = sum over p of w[p] * M[idx[p]] (w NULL: weights 1), rows of n
       floats ld apart, added in p order with a separate multiply and add (no
       FMA contraction: the same sums as scipy's CSR x dense product); built
       for AVX2 and baseline (RECSERVE_CLONES), where the Cython loop it
       replaces was baseline SSE only. */
    #if defined(__GNUC__) && !defined(__clang__)
    #define RS_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
    #else
    #define RS_NO_CONTRACT
    #endif
    RECSERVE_CLONES RS_NO_CONTRACT
    static void recserve_rows_sum(float *restrict out, const float *restrict M, long long ld,
                                  const int *restrict idx, const float *restrict w,
                                  long long m, int n) {
        for (int j = 0; j < n; j++) out[j] = 0.0f;
        for (long long p = 0; p < m; p++) {
            const float *restrict row = M + (long long)idx[p] * ld;
            float wp = w ? w[p] : 1.0f;
            for (int j = 0; j < n; j++) out[j] += wp * row[j];
        }
    }
    /* Whether any of s[0..7] is above t (NaN never is): two 4-float vector
       compares (SSE, in the baseline build too). */
    #if defined(__GNUC__) || defined(__clang__)
    typedef float rs_v4 __attribute__((vector_size(16), aligned(4)));
    typedef int rs_i4 __attribute__((vector_size(16)));
    static inline int recserve_any_above(const float *s, float t) {
        rs_v4 tv = {t, t, t, t};
        rs_i4 m = (*(const rs_v4 *)s > tv) | (*(const rs_v4 *)(s + 4) > tv);
        return (m[0] | m[1] | m[2] | m[3]) != 0;
    }
    #else
    static inline int recserve_any_above(const float *s, float t) {
        return (s[0] > t) | (s[1] > t) | (s[2] > t) | (s[3] > t)
             | (s[4] > t) | (s[5] > t) | (s[6] > t) | (s[7] > t);
    }
    #endif
    """
    int recserve_any_above(const float* s, float t) noexcept nogil
    void recserve_inner_scores(const float* q, const float* V, long long n, int d,
                               const float* bias, float* scores) noexcept nogil
    float recserve_sdot(const float* a, const float* b, int f) noexcept nogil
    void recserve_rows_sum(float* out, const float* M, long long ld, const int* idx,
                           const float* w, long long m, int n) noexcept nogil


cdef enum:
    # From this k on, select_topk gathers the entries above a sampled floor and
    # selects among them (select_gathered) instead of keeping a heap, whose
    # hundreds of sifts mispredict: topk_user of k = 100 over 2,500 items took
    # 38-50 us with the heap, 28-32 us so (17-22 us at k = 10). Below it the
    # heap's block skip is as cheap.
    GATHER_MIN_K = 32


cdef int select_gathered(const float* scores, int n, int k, const unsigned char* mask,
                         int* out_idx, float* out_val) noexcept nogil:
    """select_topk's answer (no candidates) by a sampled floor: the q-th best of
    256 evenly spaced entries (masked and NaN as -inf) is a floor about 2k
    eligible entries reach; one branch-free pass gathers them and drain_best
    orders the k best (the same total order: score, then lower index).
    Returns -1, having written nothing, when the floor gathers fewer than k or
    more than the buffer holds (the caller then keeps a heap)."""
    cdef int r = 256 if n > 256 else n
    cdef int q = <int>((2 * <long long>k * r) // n) + 1
    cdef int a, j, m = 0
    # About q n / r ~ 2 k + n / r entries reach the floor; room for 4x that.
    cdef int cap = 8 * k + 4 * (n // r) + 256
    cdef float tv, below
    cdef int* ci
    cdef float* cv
    if q >= r:
        return -1
    tv = sample_floor(scores, mask, n, r, q)
    if tv == -INFINITY:
        return -1
    if cap > n:
        cap = n
    ci = <int*> malloc(cap * sizeof(int))
    cv = <float*> malloc(cap * sizeof(float))
    if ci == NULL or cv == NULL:
        free(ci)
        free(cv)
        return -1
    # Blocks of 8 with no entry at or above the floor are skipped with one
    # vector compare (most of them); the others gather branch-free. NaN fails
    # every comparison: never gathered.
    below = nextafterf(tv, -INFINITY)
    j = 0
    while j < n and m <= cap - 8:
        if j + 8 <= n and not recserve_any_above(scores + j, below):
            j = j + 8
            continue
        for a in range(j, min(j + 8, n)):
            ci[m] = a
            cv[m] = scores[a]
            m = m + ((scores[a] >= tv) & (mask[a] == 0))
        j = j + 8
    if m < k or j < n:
        m = -1
    else:
        m = drain_best(ci, cv, m, k, out_idx, out_val)
    free(ci)
    free(cv)
    return m


cdef int select_topk(const float* scores, int n, int k, unsigned char* mask,
                     const int* cand, int n_cand,
                     int* heap_idx, float* heap_val,
                     int* out_idx, float* out_val) noexcept nogil:
    """Best k of scores[0:n] whose mask byte is 0, best first; NaN never selected.

    With `cand` (n_cand item ids) only those items are considered; repeated or
    out-of-range candidates are ignored. The mask is left as it was found.
    """
    cdef int i, c, size = 0
    cdef float s
    if k <= 0:
        return 0
    if cand == NULL and k >= GATHER_MIN_K and n >= 8 * k:
        size = select_gathered(scores, n, k, mask, out_idx, out_val)
        if size >= 0:
            return size
        size = 0
    if cand == NULL:
        i = 0
        while i < n and size < k:
            s = scores[i]
            if not mask[i] and s == s:
                size = heap_offer(heap_idx, heap_val, size, k, i, s)
            i += 1
        # The heap is full and items come in ascending index: one enters only
        # with a score above the heap's worst (an equal score loses the tie to
        # the lower index), so a block of 8 with none above it is skipped at once.
        while i < n:
            if i + 8 <= n and not recserve_any_above(scores + i, heap_val[0]):
                i += 8
                continue
            s = scores[i]
            if s > heap_val[0] and not mask[i]:
                size = heap_offer(heap_idx, heap_val, size, k, i, s)
            i += 1
    else:
        for i in range(n_cand):
            c = cand[i]
            if c < 0 or c >= n or mask[c]:
                continue
            mask[c] = 2  # seen once: a repeated candidate is skipped
            s = scores[c]
            if s != s:
                continue
            size = heap_offer(heap_idx, heap_val, size, k, c, s)
        for i in range(n_cand):
            c = cand[i]
            if 0 <= c < n and mask[c] == 2:
                mask[c] = 0
    return heap_drain(heap_idx, heap_val, size, out_idx, out_val)


cdef int walk_ranked(const int* order, const float* scores, int n, int k,
                     unsigned char* mask, int* out_idx, float* out_val) noexcept nogil:
    """First k items of a precomputed best-first `order` whose mask byte is 0.

    For scores shared by every query (popularity): O(k + excluded) per query.
    """
    cdef int i, item, m = 0
    if k <= 0:
        return 0
    for i in range(n):
        item = order[i]
        if mask[item]:
            continue
        out_idx[m] = item
        out_val[m] = scores[item]
        m += 1
        if m == k:
            break
    return m


cdef void mark(unsigned char* mask, const int* items, long long start, long long stop,
               int n, unsigned char value) noexcept nogil:
    """Set mask[items[start:stop]] = value, ignoring out-of-range item ids."""
    cdef long long j
    cdef int item
    for j in range(start, stop):
        item = items[j]
        if 0 <= item < n:
            mask[item] = value


# ---------------------------------------------------------------------------
# Python-level wrappers: validate, then run the nogil kernels.

def have_openmp() -> bool:
    """Whether these kernels were compiled with OpenMP."""
    return bool(recserve_have_openmp())


_DTYPES = {}  # dtype argument -> np.dtype: made once (0.2 us each time otherwise)


def check_array(arr, str name, dtype, int ndim):
    """Return `arr` if it is a C-contiguous ndarray of `dtype` and `ndim`, else raise naming it."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    want = _DTYPES.get(dtype)
    if want is None:
        want = _DTYPES[dtype] = np.dtype(dtype)
    if arr.dtype != want:
        raise TypeError(f"{name}: expected dtype {want}, got {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim}-d array, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (np.ascontiguousarray)")
    return arr


def check_rows(indptr, indices, Py_ssize_t n_rows, str name):
    """Validate a CSR-style (indptr int64, indices int32) pair with n_rows rows."""
    check_array(indptr, f"{name}_indptr", np.int64, 1)
    check_array(indices, f"{name}_indices", np.int32, 1)
    if indptr.shape[0] != n_rows + 1:
        raise ValueError(
            f"{name}_indptr: expected length {n_rows + 1} (one row per query), "
            f"got {indptr.shape[0]}")
    cdef const long long[::1] ip = indptr
    cdef Py_ssize_t i
    if ip[0] != 0 or ip[n_rows] > indices.shape[0]:
        raise ValueError(f"{name}_indptr: must start at 0 and end within {name}_indices")
    for i in range(n_rows):
        if ip[i + 1] < ip[i]:
            raise ValueError(f"{name}_indptr: decreases at row {i}")


def rows_or_empty(indptr, indices, Py_ssize_t n_rows, str name):
    """Validated (indptr, indices) per-row lists, or empty rows when both are None."""
    if indptr is None and indices is None:
        return np.zeros(n_rows + 1, np.int64), np.zeros(0, np.int32)
    if indptr is None or indices is None:
        raise ValueError(f"{name}_indptr and {name}_indices go together")
    check_rows(indptr, indices, n_rows, name)
    return indptr, indices


def topk_dense(scores, int k, exclude_indptr=None, exclude_indices=None,
               cand_indptr=None, cand_indices=None, int n_threads=0):
    """Top-k per row of a dense float32 score matrix, with per-row exclusions.

    exclude_*: CSR rows of item ids never returned for that row (seen items,
    request excludes). cand_*: CSR rows restricting a row to those items; an
    empty candidate row means "no restriction". Returns (items int32, scores
    float32), both (n_rows, k), best first, padded with -1 / -inf where fewer
    than k items are eligible.
    """
    check_array(scores, "scores", np.float32, 2)
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    cdef Py_ssize_t nq = scores.shape[0]
    cdef int n = <int> scores.shape[1]
    ex_ptr, ex_ind = rows_or_empty(exclude_indptr, exclude_indices, nq, "exclude")
    ca_ptr, ca_ind = rows_or_empty(cand_indptr, cand_indices, nq, "cand")
    cdef int nt = threads_for(n_threads, nq)
    out_idx = np.full((nq, k), -1, np.int32)
    out_val = np.full((nq, k), -np.inf, np.float32)
    masks = np.zeros((nt, max(n, 1)), np.uint8)
    heap_i = np.empty((nt, max(k, 1)), np.int32)
    heap_v = np.empty((nt, max(k, 1)), np.float32)
    cdef const float[:, ::1] S = scores
    cdef const long long[::1] exp = ex_ptr
    cdef const int[::1] exi = ex_ind
    cdef const long long[::1] cap = ca_ptr
    cdef const int[::1] cai = ca_ind
    cdef int[:, ::1] oi = out_idx
    cdef float[:, ::1] ov = out_val
    cdef unsigned char[:, ::1] M = masks
    cdef int[:, ::1] HI = heap_i
    cdef float[:, ::1] HV = heap_v
    cdef Py_ssize_t q
    cdef int t, nc
    if nq == 0 or k == 0:
        return out_idx, out_val
    with nogil, parallel(num_threads=nt):
        for q in prange(nq, schedule="dynamic", chunksize=16):
            t = threadid()
            mark(&M[t, 0], &exi[0] if exi.shape[0] else NULL, exp[q], exp[q + 1], n, 1)
            nc = <int> (cap[q + 1] - cap[q])
            select_topk(&S[q, 0], n, k, &M[t, 0],
                        &cai[cap[q]] if nc > 0 else NULL, nc,
                        &HI[t, 0], &HV[t, 0], &oi[q, 0], &ov[q, 0])
            mark(&M[t, 0], &exi[0] if exi.shape[0] else NULL, exp[q], exp[q + 1], n, 0)
    return out_idx, out_val


def topk_user(queries, Py_ssize_t user, vectors, int k, seen_indptr, seen_indices,
              bint filter_seen=True, bias=None):
    """Top-k of queries[user] . vectors (+ bias) without the user's seen items
    (row `user` of the seen CSR, when filter_seen): one known user, the common
    serving request, on the calling thread. Same answer as topk_dense on that
    row's scores; the scratch is malloc'd, so the call allocates only its two
    outputs.
    Returns 1-d (items int32, scores float32), min(k, eligible) long, best first.
    """
    check_array(queries, "queries", np.float32, 2)
    check_array(vectors, "vectors", np.float32, 2)
    check_array(seen_indptr, "seen_indptr", np.int64, 1)
    check_array(seen_indices, "seen_indices", np.int32, 1)
    if queries.shape[1] != vectors.shape[1]:
        raise ValueError(
            f"queries: {queries.shape[1]} dimensions, vectors have {vectors.shape[1]}")
    if not 0 <= user < queries.shape[0]:
        raise IndexError(f"user: index {user} outside [0, {queries.shape[0]})")
    if seen_indptr.shape[0] != queries.shape[0] + 1:
        raise ValueError(
            f"seen_indptr: expected length {queries.shape[0] + 1}, got {seen_indptr.shape[0]}")
    if bias is not None:
        check_array(bias, "bias", np.float32, 1)
        if bias.shape[0] != vectors.shape[0]:
            raise ValueError(f"bias: length {bias.shape[0]}, expected {vectors.shape[0]}")
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    cdef const float[:, ::1] Qv = queries
    cdef const float[:, ::1] V = vectors
    cdef const long long[::1] ip = seen_indptr
    cdef const int[::1] ix = seen_indices
    cdef const float[::1] B
    cdef const float* bp = NULL
    if bias is not None:
        B = bias
        bp = &B[0]
    cdef int n = <int> vectors.shape[0]
    cdef int d = <int> vectors.shape[1]
    cdef long long a = 0, b = 0
    if filter_seen:
        a, b = ip[user], ip[user + 1]
        if b < a or a < 0 or b > ix.shape[0]:
            raise ValueError(f"seen_indptr: row {user} lies outside seen_indices")
    out_idx = np.empty(k, np.int32)
    out_val = np.empty(k, np.float32)
    if k == 0 or n == 0:
        return out_idx[:0], out_val[:0]
    cdef int[::1] oi = out_idx
    cdef float[::1] ov = out_val
    cdef int m = 0
    cdef bint failed = False
    cdef unsigned char* mask
    cdef float* scores
    cdef int* hi
    cdef float* hv
    with nogil:
        mask = <unsigned char*> calloc(n, 1)
        scores = <float*> malloc(n * sizeof(float))
        hi = <int*> malloc(k * sizeof(int))
        hv = <float*> malloc(k * sizeof(float))
        if mask == NULL or scores == NULL or hi == NULL or hv == NULL:
            failed = True
        else:
            recserve_inner_scores(&Qv[user, 0], &V[0, 0], n, d, bp, scores)
            if b > a:
                mark(mask, &ix[0], a, b, n, 1)
            m = select_topk(scores, n, k, mask, NULL, 0, hi, hv, &oi[0], &ov[0])
        free(mask)
        free(scores)
        free(hi)
        free(hv)
    if failed:
        raise MemoryError(f"topk_user: no scratch for {n} items")
    return out_idx[:m], out_val[:m]


def rank_found(vectors, q, found, banned, int k, bint cosine=False):
    """Exact re-ranking of an ANN search's answer for one query: the ids of
    `found` (int64, FAISS's row; -1 = nothing) that lie in [0, n_items) and are
    not in `banned` (int32 or int64, any order, repeats allowed), scored
    q . vectors[id] (float32 sums, as topk_user sums), divided by the row's
    norm when `cosine` (the cosine for a unit q; a zero row scores 0), the
    best k kept, ties by lower id. FAISS returns each id at most once.

    Returns (items int32, scores float32) best first, min(k, kept) long; the
    number of ids kept; and the number of distinct banned ids in the catalogue
    (so the caller knows how many items were eligible at all)."""
    check_array(vectors, "vectors", np.float32, 2)
    check_array(q, "q", np.float32, 1)
    check_array(found, "found", np.int64, 1)
    if q.shape[0] != vectors.shape[1]:
        raise ValueError(f"q: {q.shape[0]} dimensions, vectors have {vectors.shape[1]}")
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    cdef Py_ssize_t n = vectors.shape[0]
    if n > INT_MAX:
        raise ValueError(f"vectors: {n} rows; at most {INT_MAX}")
    ban = np.sort(np.asarray(banned, np.int64))
    cdef const long long[::1] B = ban
    cdef float sc, norm
    cdef const long long[::1] F = found
    cdef const float[:, ::1] V = vectors
    cdef const float[::1] Q = q
    cdef int d = <int> vectors.shape[1]
    cdef Py_ssize_t nf = F.shape[0], nb = B.shape[0], t, lo, hi, mid
    cdef long long f, prev = -1
    cdef int kept = 0, size = 0, banned_in = 0, m = 0
    cdef int kk = k if k < nf else <int> nf
    out_idx = np.empty(kk, np.int32)
    out_val = np.empty(kk, np.float32)
    cdef int[::1] oi = out_idx
    cdef float[::1] ov = out_val
    cdef int* hi_ = <int*> malloc((kk + 1) * sizeof(int))
    cdef float* hv = <float*> malloc((kk + 1) * sizeof(float))
    if hi_ == NULL or hv == NULL:
        free(hi_)
        free(hv)
        raise MemoryError("rank_found: no scratch")
    with nogil:
        for t in range(nb):  # distinct banned ids inside the catalogue
            if 0 <= B[t] < n and B[t] != prev:
                banned_in += 1
            prev = B[t]
        for t in range(nf):
            f = F[t]
            if f < 0 or f >= n:
                continue
            lo = 0
            hi = nb
            while lo < hi:  # the first banned id >= f
                mid = (lo + hi) >> 1
                if B[mid] < f:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < nb and B[lo] == f:
                continue
            kept += 1
            if kk > 0:
                sc = recserve_sdot(&Q[0], &V[f, 0], d)
                if cosine:
                    norm = sqrtf(recserve_sdot(&V[f, 0], &V[f, 0], d))
                    sc = sc / norm if norm > 0 else 0.0
                size = heap_offer(hi_, hv, size, kk, <int> f, sc)
        if kk > 0:
            m = heap_drain(hi_, hv, size, &oi[0], &ov[0])
    free(hi_)
    free(hv)
    return out_idx[:m], out_val[:m], kept, banned_in


def topk_ranked(order, scores, Py_ssize_t n_queries, int k,
                exclude_indptr=None, exclude_indices=None,
                cand_indptr=None, cand_indices=None, int n_threads=0):
    """Top-k for many queries that share one score vector (e.g. popularity).

    `order` is every item id best-first (ties by lower id) and `scores` the
    shared float32 scores. Per-query exclusions and candidates as in topk_dense.
    """
    check_array(order, "order", np.int32, 1)
    check_array(scores, "scores", np.float32, 1)
    if order.shape[0] != scores.shape[0]:
        raise ValueError(
            f"order: length {order.shape[0]} differs from scores length {scores.shape[0]}")
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    if n_queries < 0:
        raise ValueError(f"n_queries: must be >= 0, got {n_queries}")
    cdef int n = <int> scores.shape[0]
    ex_ptr, ex_ind = rows_or_empty(exclude_indptr, exclude_indices, n_queries, "exclude")
    ca_ptr, ca_ind = rows_or_empty(cand_indptr, cand_indices, n_queries, "cand")
    cdef int nt = threads_for(n_threads, n_queries)
    out_idx = np.full((n_queries, k), -1, np.int32)
    out_val = np.full((n_queries, k), -np.inf, np.float32)
    masks = np.zeros((nt, max(n, 1)), np.uint8)
    heap_i = np.empty((nt, max(k, 1)), np.int32)
    heap_v = np.empty((nt, max(k, 1)), np.float32)
    cdef const int[::1] O = order
    cdef const float[::1] S = scores
    cdef const long long[::1] exp = ex_ptr
    cdef const int[::1] exi = ex_ind
    cdef const long long[::1] cap = ca_ptr
    cdef const int[::1] cai = ca_ind
    cdef int[:, ::1] oi = out_idx
    cdef float[:, ::1] ov = out_val
    cdef unsigned char[:, ::1] M = masks
    cdef int[:, ::1] HI = heap_i
    cdef float[:, ::1] HV = heap_v
    cdef Py_ssize_t q
    cdef int t, nc
    if n_queries == 0 or k == 0 or n == 0:
        return out_idx, out_val
    with nogil, parallel(num_threads=nt):
        for q in prange(n_queries, schedule="dynamic", chunksize=64):
            t = threadid()
            mark(&M[t, 0], &exi[0] if exi.shape[0] else NULL, exp[q], exp[q + 1], n, 1)
            nc = <int> (cap[q + 1] - cap[q])
            if nc > 0:
                select_topk(&S[0], n, k, &M[t, 0], &cai[cap[q]], nc,
                            &HI[t, 0], &HV[t, 0], &oi[q, 0], &ov[q, 0])
            else:
                walk_ranked(&O[0], &S[0], n, k, &M[t, 0], &oi[q, 0], &ov[q, 0])
            mark(&M[t, 0], &exi[0] if exi.shape[0] else NULL, exp[q], exp[q + 1], n, 0)
    return out_idx, out_val


def ranked_one(order, scores, int k, exclude, mask):
    """topk_ranked for one query without candidates, the serving call of a
    shared-score model (popularity): the first k items of `order` not in
    `exclude` (int32 ids; out-of-range ids ignored), with no per-call
    allocation but the answer. `mask` is the caller's uint8 scratch of
    len(scores) zero bytes (one per thread), left zeroed. Returns 1-d
    (items int32, scores float32), exactly min(k, eligible) long, equal to
    topk_ranked's row."""
    check_array(order, "order", np.int32, 1)
    check_array(scores, "scores", np.float32, 1)
    check_array(exclude, "exclude", np.int32, 1)
    check_array(mask, "mask", np.uint8, 1)
    if order.shape[0] != scores.shape[0] or mask.shape[0] != max(scores.shape[0], 1):
        raise ValueError(f"order and mask: expected length {scores.shape[0]} (scores)")
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    cdef int n = <int> scores.shape[0], m = 0
    out_idx = np.empty(max(k, 1), np.int32)
    out_val = np.empty(max(k, 1), np.float32)
    cdef const int[::1] O = order
    cdef const float[::1] S = scores
    cdef const int[::1] E = exclude
    cdef unsigned char[::1] M = mask
    cdef int[::1] oi = out_idx
    cdef float[::1] ov = out_val
    cdef long long ne = E.shape[0]
    if k > 0 and n > 0:
        with nogil:
            mark(&M[0], &E[0] if ne else NULL, 0, ne, n, 1)
            m = walk_ranked(&O[0], &S[0], n, k, &M[0], &oi[0], &ov[0])
            mark(&M[0], &E[0] if ne else NULL, 0, ne, n, 0)
    return out_idx[:m], out_val[:m]


# ---------------------------------------------------------------------------
# Dense one-user rows and the hybrid blend: a hybrid scores each component into
# a row of one (components x items) scratch matrix (NaN = not eligible), then
# blend_dense selects, normalises, sums and ranks in one nogil pass, where the
# general path made one top-n call per component and a dozen numpy operations.

def check_row(out, Py_ssize_t n, str name="out"):
    """Validate a writable C-contiguous float32 row of n entries."""
    check_array(out, name, np.float32, 1)
    if out.shape[0] != n:
        raise ValueError(f"{name}: expected {n} entries, got {out.shape[0]}")
    if not out.flags.writeable:
        raise ValueError(f"{name}: must be writable")


cdef struct UserRow:
    # one known user's scoring inputs: queries[user] . vectors (+ bias), the
    # seen CSR's row `user` (seen[a:b]) excluded; NULL where not given
    const float* q
    const float* vectors
    const float* bias
    const int* seen
    long long a
    long long b
    int n
    int d


cdef UserRow user_row(queries, Py_ssize_t user, vectors, seen_indptr, seen_indices,
                      bias) except *:
    """The checked inputs of a one-user scoring call (dense_user, prior_user).
    The pointers are into the given arrays, which the caller holds."""
    check_array(queries, "queries", np.float32, 2)
    check_array(vectors, "vectors", np.float32, 2)
    if queries.shape[1] != vectors.shape[1]:
        raise ValueError(
            f"queries: {queries.shape[1]} dimensions, vectors have {vectors.shape[1]}")
    if not 0 <= user < queries.shape[0]:
        raise IndexError(f"user: index {user} outside [0, {queries.shape[0]})")
    cdef UserRow r
    r.n = <int> vectors.shape[0]
    r.d = <int> vectors.shape[1]
    r.bias = r.seen = NULL
    r.a = r.b = 0
    cdef const float[:, ::1] Qv = queries
    cdef const float[:, ::1] V = vectors
    r.q = &Qv[user, 0] if r.d else NULL
    r.vectors = &V[0, 0] if r.n and r.d else NULL
    cdef const float[::1] B
    if bias is not None:
        check_array(bias, "bias", np.float32, 1)
        if bias.shape[0] != vectors.shape[0]:
            raise ValueError(f"bias: length {bias.shape[0]}, expected {vectors.shape[0]}")
        if r.n:
            B = bias
            r.bias = &B[0]
    cdef const long long[::1] ip
    cdef const int[::1] ix
    if seen_indptr is not None:
        check_array(seen_indptr, "seen_indptr", np.int64, 1)
        check_array(seen_indices, "seen_indices", np.int32, 1)
        if seen_indptr.shape[0] != queries.shape[0] + 1:
            raise ValueError(f"seen_indptr: expected length {queries.shape[0] + 1}, "
                             f"got {seen_indptr.shape[0]}")
        ip = seen_indptr
        r.a, r.b = ip[user], ip[user + 1]
        if r.b < r.a or r.a < 0 or r.b > seen_indices.shape[0]:
            raise ValueError(f"seen_indptr: row {user} lies outside seen_indices")
        if r.b > r.a:
            ix = seen_indices
            r.seen = &ix[0]
    return r


cdef void fill_user_row(const UserRow* r, float* out) noexcept nogil:
    """out[:n] = the user's scores, NaN at the seen items."""
    recserve_inner_scores(r.q, r.vectors, r.n, r.d, r.bias, out)
    if r.seen != NULL:
        nan_at(out, r.seen, r.a, r.b, r.n)


def dense_user(queries, Py_ssize_t user, vectors, out, seen_indptr=None, seen_indices=None,
               bias=None):
    """out[:] = queries[user] . vectors (+ bias), NaN at the items of row `user`
    of the seen CSR (when given): the scores topk_user selects from, computed
    the same way (same sums, same rounding), for a caller that combines rows."""
    cdef UserRow r = user_row(queries, user, vectors, seen_indptr, seen_indices, bias)
    check_row(out, r.n)
    if r.n == 0:
        return
    cdef float[::1] O = out
    with nogil:
        fill_user_row(&r, &O[0])


def dense_rows_sum(matrix, indices, values, out, seen=None):
    """out[:] = sum over p of values[p] * matrix[indices[p]], added in p order
    (scipy's CSR x dense product, one history row of EASE), NaN at the items
    of `seen` (int32) when given. values None: every weight is 1."""
    check_array(matrix, "matrix", np.float32, 2)
    check_array(indices, "indices", np.int32, 1)
    cdef Py_ssize_t n_in = matrix.shape[0]
    cdef int n = <int> matrix.shape[1]
    check_row(out, n)
    cdef const float[::1] W
    cdef const float* wp = NULL
    if values is not None:
        check_array(values, "values", np.float32, 1)
        if values.shape[0] != indices.shape[0]:
            raise ValueError(f"values: length {values.shape[0]}, indices {indices.shape[0]}")
        W = values
        if W.shape[0]:
            wp = &W[0]
    cdef const int[::1] I = indices
    cdef Py_ssize_t p
    for p in range(I.shape[0]):
        if not 0 <= I[p] < n_in:
            raise IndexError(f"indices: {I[p]} outside [0, {n_in})")
    cdef const int[::1] SX
    cdef const int* sp = NULL
    cdef long long ns = 0
    if seen is not None:
        check_array(seen, "seen", np.int32, 1)
        SX = seen
        ns = SX.shape[0]
        if ns:
            sp = &SX[0]
    cdef const float[:, ::1] M = matrix
    cdef float[::1] O = out
    cdef Py_ssize_t m = I.shape[0]
    if n == 0:
        return
    with nogil:
        recserve_rows_sum(&O[0], &M[0, 0], n, &I[0] if m else NULL, wp, m, n)
        if sp != NULL:
            nan_at(&O[0], sp, 0, ns, n)


def topk_row(scores, int k):
    """Top-k of one dense float32 row, NaN entries never selected: (items int32,
    scores float32), min(k, non-NaN) long, best first, ties by lower index."""
    check_array(scores, "scores", np.float32, 1)
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    cdef int n = <int> scores.shape[0]
    out_idx = np.empty(k, np.int32)
    out_val = np.empty(k, np.float32)
    if k == 0 or n == 0:
        return out_idx[:0], out_val[:0]
    cdef const float[::1] S = scores
    cdef int[::1] oi = out_idx
    cdef float[::1] ov = out_val
    cdef int m = 0
    cdef bint failed = False
    cdef unsigned char* mask
    cdef int* hi
    cdef float* hv
    with nogil:
        mask = <unsigned char*> calloc(n, 1)
        hi = <int*> malloc(k * sizeof(int))
        hv = <float*> malloc(k * sizeof(float))
        if mask == NULL or hi == NULL or hv == NULL:
            failed = True
        else:
            m = select_topk(&S[0], n, k, mask, NULL, 0, hi, hv, &oi[0], &ov[0])
        free(mask)
        free(hi)
        free(hv)
    if failed:
        raise MemoryError(f"topk_row: no scratch for {n} items")
    return out_idx[:m], out_val[:m]


cdef int gather_floor(const float* row, int n, int kk, int cap, float tv, int* ci,
                      float* cv, bint* cut) noexcept nogil:
    """Gather the entries of a row at or above the floor tv (NaN never) into
    ci / cv (cap >= kk + 16 slots): blocks of 8 with no entry there are
    skipped with one vector compare (most of them), the others gather
    branch-free (as select_gathered). A buffer about to fill is cut back to its
    kk best and the floor rises just above the kk-th best (entries later in
    the row lose its ties), so the scratch stays small whatever the row holds.
    Returns how many entries ci / cv hold; *cut is set when a cut reordered
    them (else they are in row order)."""
    cdef int a, j = 0, m = 0, end
    cdef float x
    cdef float below = nextafterf(tv, -INFINITY)  # x > below: x >= tv
    cdef bint skip = tv > -INFINITY  # -inf: every non-NaN entry, -inf ones too
    cut[0] = False
    while j < n:
        if skip and j + 8 <= n and not recserve_any_above(row + j, below):
            j = j + 8
            continue
        end = j + 8 if j + 8 <= n else n
        for a in range(j, end):  # NaN fails the comparison: never gathered
            x = row[a]
            ci[m] = a
            cv[m] = x
            m = m + (x >= tv)
        j = end
        if m > cap - 8:
            nth_best(ci, cv, m, kk - 1)
            cut[0] = True
            m = kk
            below = cv[kk - 1]
            tv = nextafterf(below, INFINITY)
            skip = True
    return m


cdef int keep_best(int* ci, float* cv, int m, int kk, float* tmp) noexcept nogil:
    """Cut m > kk gathered entries in row order (ci ascending) to the kk best,
    ties by lower index, in place and still in row order; returns kk. The
    kk-th best value comes from a selection on a copy of the values alone
    (nth_value), then one pass keeps the entries above it and its first ties:
    half the moves of nth_best on (id, value) pairs."""
    cdef int t, g = 0, need, j = 0
    cdef float x, v
    for t in range(m):
        tmp[t] = cv[t]
    v = nth_value(tmp, m, kk - 1)
    for t in range(m):
        g = g + (cv[t] > v)
    need = kk - g  # >= 1: v itself is among the kk best
    for t in range(m):
        x = cv[t]
        if x > v or (x == v and need > 0):
            need = need - (x == v)
            ci[j] = ci[t]
            cv[j] = x
            j = j + 1
    return j


cdef int gather_best(const float* row, int n, int kk, int cap, int* ci, float* cv,
                     float* tmp, float least) noexcept nogil:
    """The kk best entries >= least of a dense row (NaN never), unordered, into
    ci / cv (cap >= kk + 16 slots; tmp: cap floats of scratch); returns how
    many (min(kk, non-NaN entries >= least)). The kk-th best of an evenly
    spaced sample sets a floor about 2 kk entries reach; one branch-free pass
    gathers those, and one partial selection over them finds the kk best.
    When fewer than kk reach the floor every entry >= least is gathered
    instead. least = -inf: every entry; the smallest positive float: the
    entries > 0 only (blocks of 8 with none are skipped)."""
    cdef int r = 256 if n > 256 else n
    cdef int q = <int>((2 * <long long>kk * r) // n) + 1 if n > 0 else 1
    cdef int m
    cdef bint cut
    cdef float tv = least  # no sample (a short row): every entry >= least
    if q < r:
        tv = sample_floor(row, NULL, n, r, q)
        if not tv >= least:
            tv = least
    m = gather_floor(row, n, kk, cap, tv, ci, cv, &cut)
    if m < kk and tv > least:
        m = gather_floor(row, n, kk, cap, least, ci, cv, &cut)
    if m > kk:
        if cut:
            nth_best(ci, cv, m, kk - 1)
            m = kk
        else:
            m = keep_best(ci, cv, m, kk, tmp)
    return m


cdef int add_part(const int* ci, const float* cv, int m, double weight, double* total,
                  unsigned char* touched, int* listed, int nt) noexcept nogil:
    """One blend part (m candidates ci / cv): min-max normalised over them (all
    equal -> 1), weighted, added to `total`; first-touched items listed.
    Returns the new number listed."""
    cdef int t, item
    cdef double lo = cv[0], top = cv[0], v, span
    for t in range(1, m):
        if cv[t] < lo:
            lo = cv[t]
        if cv[t] > top:
            top = cv[t]
    span = top - lo
    for t in range(m):
        item = ci[t]
        v = (<double>cv[t] - lo) / span if top > lo else 1.0
        if not touched[item]:
            touched[item] = 1
            listed[nt] = item
            nt = nt + 1
        total[item] = total[item] + weight * v
    return nt


cdef int blend_rows_nogil(const float* S, int n_rows, int n, const double* weights,
                          const unsigned char* positive, int n_cand, int k, int cap, int* ci,
                          float* cv, float* tmp, double* total, unsigned char* touched,
                          int* listed, int* hi, double* hv, int* out_idx, double* out_val,
                          int* counts, const int* order, int n_order, const float* values,
                          const unsigned char* banned) noexcept nogil:
    """blend_dense's work; scratch total / touched zeroed on entry and on exit.
    With `order` (n_order item indices, best first), one more part after the
    rows, weighted weights[n_rows]: its first n_cand items not `banned`,
    scored values[item]."""
    cdef int c, j, m, t, nt = 0, size = 0, item
    cdef const float* row
    cdef double v
    cdef float least
    cdef float tiny = nextafterf(0.0, INFINITY)  # x >= tiny: x > 0
    if not tiny > 0:  # denormals read as 0 (DAZ, set by some fast-math library)
        tiny = FLT_MIN
    for c in range(n_rows):
        row = S + <long long>c * n
        least = tiny if positive != NULL and positive[c] else -INFINITY
        m = gather_best(row, n, n_cand, cap, ci, cv, tmp, least)
        counts[c] = m
        if m > 0:
            nt = add_part(ci, cv, m, weights[c], total, touched, listed, nt)
    if order != NULL:
        m = 0
        for t in range(n_order):
            if m == n_cand:
                break
            item = order[t]
            if 0 <= item < n and not banned[item]:
                ci[m] = item
                cv[m] = values[item]
                m = m + 1
        counts[n_rows] = m
        if m > 0:
            nt = add_part(ci, cv, m, weights[n_rows], total, touched, listed, nt)
    for t in range(nt):
        item = listed[t]
        v = total[item]
        if size < k:
            hi[size] = item
            hv[size] = v
            sift_up(hi, hv, size)
            size = size + 1
        elif worse(hv[0], hi[0], v, item):
            hi[0] = item
            hv[0] = v
            sift_down(hi, hv, size, 0)
        total[item] = 0.0
        touched[item] = 0
    m = size
    while size > 0:
        size = size - 1
        out_idx[size] = hi[0]
        out_val[size] = hv[0]
        hi[0] = hi[size]
        hv[0] = hv[size]
        sift_down(hi, hv, size, 0)
    return m


cdef struct BlendScratch:
    # blend_rows_nogil's buffers for one call
    int cap  # gather buffer: about 2 kk entries reach the sampled floor; a fuller one is cut back
    int* ci
    float* cv  # 2 cap: the gathered values, then gather_best's scratch
    int* listed
    int* hi
    double* hv
    unsigned char* ban  # n flags, zeroed; NULL without an order part


cdef bint take_scratch(BlendScratch* s, int n, int kk, int n_parts, int k,
                       bint ban) noexcept nogil:
    """Allocate s's buffers for n items, kk candidates in each of n_parts parts
    and k answers; False (nothing left allocated) when memory runs out."""
    s.cap = <int> min(3 * <long long> kk + 512, <long long> INT_MAX)
    cdef int n_listed = <int> min(<long long> n, <long long> n_parts * kk)
    s.ci = <int*> malloc(s.cap * sizeof(int))
    s.cv = <float*> malloc(2 * <size_t> s.cap * sizeof(float))
    s.listed = <int*> malloc(n_listed * sizeof(int))
    s.hi = <int*> malloc(k * sizeof(int))
    s.hv = <double*> malloc(k * sizeof(double))
    s.ban = <unsigned char*> calloc(n, 1) if ban else NULL
    if s.ci == NULL or s.cv == NULL or s.listed == NULL or s.hi == NULL or s.hv == NULL or (
        ban and s.ban == NULL
    ):
        give_scratch(s)
        return False
    return True


cdef void give_scratch(BlendScratch* s) noexcept nogil:
    free(s.ci)
    free(s.cv)
    free(s.listed)
    free(s.hi)
    free(s.hv)
    free(s.ban)
    s.ci = s.listed = s.hi = NULL
    s.cv = NULL
    s.hv = NULL
    s.ban = NULL


# Zeroed accumulators of blend_dense (float64 sums, touched flags) not in use, as
# long as the largest catalogue blended: allocating them per call cost more
# than the blend on large catalogues (fresh pages each call). A pool, not one
# per thread: the thread-pool server has dozens of threads, but only the calls
# inside the kernel at once (it releases the GIL) hold a pair. The kernel
# leaves them zeroed again. list.pop and list.append are atomic.
_blend_free = []


def _blend_accumulators(int n):
    try:
        acc = _blend_free.pop()
    except IndexError:
        acc = None
    if acc is None or acc[0].shape[0] < n:
        acc = (np.zeros(n, np.float64), np.zeros(n, np.uint8))
    return acc


def blend_dense(scores, weights, int n_cand, int k, positive=None, order=None, values=None,
                banned=None):
    """The hybrid blend of dense component rows (serving.blend.blend_rows's
    answer): row c's candidates are its n_cand best entries (NaN never, ties
    by lower index; where positive[c] is set, entries > 0 only: a
    neighbourhood row's items its evidence reached), min-max normalised over
    those candidates (all equal -> 1), weighted by weights[c] and summed per
    item in row order (float64); returns the k best (rows int32, sums
    float64), ties by lower row, and each row's number of candidates (int32;
    0: the row had no eligible entry).

    With `order` (int32 item indices, best first: popularity's order), one
    more part after the rows, weighted by weights' last entry: the first
    n_cand items of `order` not in `banned` (int32 indices), scored
    values[item] (float32, one per item): the same part as a dense row of
    `values`, NaN at `banned`, whose best entries are `order`'s (ties by
    lower index), without writing or scanning that row."""
    check_array(scores, "scores", np.float32, 2)
    check_array(weights, "weights", np.float64, 1)
    cdef int extra = 0 if order is None else 1
    if weights.shape[0] != scores.shape[0] + extra:
        raise ValueError(
            f"weights: {weights.shape[0]} entries for {scores.shape[0] + extra} parts")
    cdef const int[::1] O
    cdef const float[::1] V
    cdef const int[::1] B
    cdef const int* op = NULL
    cdef const float* vp = NULL
    cdef int n_order = 0, n_banned = 0
    if order is not None:
        check_array(order, "order", np.int32, 1)
        check_array(values, "values", np.float32, 1)
        if values.shape[0] != scores.shape[1]:
            raise ValueError(f"values: {values.shape[0]} entries for {scores.shape[1]} items")
        n_order = <int> order.shape[0]
        if n_order:
            O = order
            op = &O[0]
        if values.shape[0]:
            V = values
            vp = &V[0]
        if banned is not None:
            check_array(banned, "banned", np.int32, 1)
            n_banned = <int> banned.shape[0]
            if n_banned:
                B = banned
    cdef const unsigned char[::1] P
    cdef const unsigned char* pp = NULL
    if positive is not None:
        check_array(positive, "positive", np.uint8, 1)
        if positive.shape[0] != scores.shape[0]:
            raise ValueError(f"positive: {positive.shape[0]} entries for {scores.shape[0]} rows")
        if positive.shape[0]:
            P = positive
            pp = &P[0]
    if n_cand <= 0:
        raise ValueError(f"n_cand: must be positive, got {n_cand}")
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    cdef int c = <int> scores.shape[0]
    cdef int n = <int> scores.shape[1]
    out_idx = np.empty(k, np.int32)
    out_val = np.empty(k, np.float64)
    counts = np.zeros(c + extra, np.int32)
    if k == 0 or n == 0 or c + extra == 0:
        return out_idx[:0], out_val[:0], counts
    acc = _blend_accumulators(n)
    cdef double[::1] TT = acc[0]
    cdef unsigned char[::1] TO = acc[1]
    cdef int[::1] CN = counts
    cdef const float[:, ::1] S = scores
    cdef const double[::1] W = weights
    cdef int[::1] oi = out_idx
    cdef double[::1] ov = out_val
    cdef int kk = n_cand if n_cand < n else n
    cdef int m = 0, t, b
    cdef bint failed = False
    cdef BlendScratch bs
    cdef const float* sp = &S[0, 0] if c else NULL
    with nogil:
        if not take_scratch(&bs, n, kk, c + extra, k, extra):
            failed = True
        else:
            for t in range(n_banned):
                b = B[t]
                if 0 <= b < n:
                    bs.ban[b] = 1
            m = blend_rows_nogil(sp, c, n, &W[0], pp, kk, k, bs.cap, bs.ci, bs.cv,
                                 bs.cv + bs.cap, &TT[0], &TO[0], bs.listed, bs.hi, bs.hv,
                                 &oi[0], &ov[0], &CN[0], op if extra else NULL, n_order, vp,
                                 bs.ban)
            give_scratch(&bs)
    _blend_free.append(acc)  # zeroed again by the kernel (or never touched)
    if failed:
        raise MemoryError(f"blend_dense: no scratch for {n} items")
    return out_idx[:m], out_val[:m], counts


def prior_user(queries, Py_ssize_t user, vectors, double w_row, double w_pop, int n_cand,
               int k, order, values, seen_indptr=None, seen_indices=None, bias=None):
    """A known user's answer under a prior, in one call: dense_user's row
    (scratch, never returned) blended with popularity as blend_dense blends
    one row and its popular part, weighted (w_row, w_pop): the row's n_cand
    best entries, and the first n_cand items of `order` (int32, best first)
    scored values[item] (float32), each min-max normalised. The seen CSR's
    row `user` (when given) is neither the row's candidate nor popularity's.
    Returns the k best (rows int32, sums float64), ties by lower row, and the
    row's number of candidates (0: no eligible entry): blend_dense's answer
    for that row, without the row's round trip through Python or the banned
    items' array (a hybrid's default known-user call)."""
    cdef UserRow r = user_row(queries, user, vectors, seen_indptr, seen_indices, bias)
    check_array(order, "order", np.int32, 1)
    check_array(values, "values", np.float32, 1)
    if values.shape[0] != vectors.shape[0]:
        raise ValueError(f"values: {values.shape[0]} entries for {vectors.shape[0]} items")
    if n_cand <= 0:
        raise ValueError(f"n_cand: must be positive, got {n_cand}")
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    cdef int n = r.n
    out_idx = np.empty(k, np.int32)
    out_val = np.empty(k, np.float64)
    if k == 0 or n == 0:
        return out_idx[:0], out_val[:0], 0
    cdef const int[::1] O
    cdef const int* op = NULL
    cdef int n_order = <int> order.shape[0]
    if n_order:
        O = order
        op = &O[0]
    cdef const float[::1] V = values
    acc = _blend_accumulators(n)
    cdef double[::1] TT = acc[0]
    cdef unsigned char[::1] TO = acc[1]
    cdef int[::1] oi = out_idx
    cdef double[::1] ov = out_val
    cdef double w[2]
    w[0] = w_row
    w[1] = w_pop
    cdef int counts[2]
    counts[0] = 0
    cdef int kk = n_cand if n_cand < n else n
    cdef int m = 0
    cdef long long t
    cdef bint failed = False
    cdef BlendScratch bs
    cdef float* row
    with nogil:
        row = <float*> malloc(<size_t> n * sizeof(float))
        if row == NULL or not take_scratch(&bs, n, kk, 2, k, True):
            failed = True
        else:
            fill_user_row(&r, row)
            if r.seen != NULL:
                for t in range(r.a, r.b):
                    if 0 <= r.seen[t] < n:
                        bs.ban[r.seen[t]] = 1
            m = blend_rows_nogil(row, 1, n, w, NULL, kk, k, bs.cap, bs.ci, bs.cv,
                                 bs.cv + bs.cap, &TT[0], &TO[0], bs.listed, bs.hi, bs.hv,
                                 &oi[0], &ov[0], counts, op, n_order, &V[0], bs.ban)
            give_scratch(&bs)
        free(row)
    _blend_free.append(acc)  # zeroed again by the kernel (or never touched)
    if failed:
        raise MemoryError(f"prior_user: no scratch for {n} items")
    return out_idx[:m], out_val[:m], counts[0]
