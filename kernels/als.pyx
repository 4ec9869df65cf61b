# Implicit-feedback ALS (Hu, Koren & Volinsky 2008) solves, one row at a time:
#   (YtY + reg I + sum_i (c_i - 1) y_i y_i^T) x = sum_i p_i c_i y_i
# over the row's nonzeros i, given as signed confidences s_i: c_i = |s_i| (the
# caller applies 1 + alpha |r|) and the preference p_i = 1 when s_i > 0, 0 when
# s_i < 0 (negative feedback, a dislike: as implicit and Spark MLlib fit it). Exact solves form the row's f x f matrix with
# level-3 BLAS and factor it by Cholesky (float32, SciPy's cython_blas and
# cython_lapack, nogil). The CG solver runs a few warm-started
# conjugate-gradient steps that never form it (Takacs, Pilaszy & Tikk 2011), in
# C loops below. Training ends with an exact user pass, and fold-in runs that
# same exact solve, so a folded-in user equals the trained one.
import numpy as np

from cython.parallel cimport parallel, prange, threadid

from libc.math cimport sqrt as csqrt
from libc.stdlib cimport free, malloc
from scipy.linalg.cython_blas cimport dgemm, dsyr, dsyrk, ssyr, ssyrk
from scipy.linalg.cython_lapack cimport dposv, sposv

from .parallel cimport threads_for

from .topk import check_array, check_rows


cdef int CHUNK = 64  # items per rank-k update in solve_exact


cdef extern from *:
    """
    /* The CG row solve in C: its per-nonzero work is a dot product and an
       axpy over f floats, twice per step. As BLAS calls (what implicit does)
       the call overhead outweighed the arithmetic at 32-64 factors; here they
       are fused loops the compiler vectorises, built twice on x86-64 Linux
       with GCC (AVX2/FMA and baseline, picked at load time) since the wheel
       targets baseline x86-64 (RECSERVE_CLONES, kernels/parallel.pxd). G is
       the full symmetric f x f matrix, so G v is a sum of its rows scaled by
       v: no horizontal sums. */
    RS_INLINE void recserve_saxpy(float s, const float *restrict a, float *restrict b, int f) {
        #pragma omp simd
        for (int k = 0; k < f; k++) b[k] += s * a[k];
    }

    /* out = A v = G v + shift v + sum over the row's nonzeros of (c - 1)(y . v) y;
       with residual, out = b - A v instead, where b = sum p c y. A nonzero is a
       signed confidence s: c = |s|, p = (s > 0). G is symmetric, so G v is a
       sum of its rows scaled by v: no horizontal sums. */
    RS_INLINE void recserve_apply(const long long *ip, const int *ix, const float *c,
                                  long long row, const float *Y, const float *G, int f,
                                  float shift, const float *restrict v, float *restrict out,
                                  int residual) {
        for (int k = 0; k < f; k++) out[k] = 0.0f;
        for (int b = 0; b < f; b++) recserve_saxpy(v[b], G + (long long)b * f, out, f);
        if (shift != 0.0f) recserve_saxpy(shift, v, out, f);
        if (residual)
            for (int k = 0; k < f; k++) out[k] = -out[k];
        long long end = ip[row + 1];
        for (long long q = ip[row]; q < end; q++) {
            const float *y = Y + (long long)ix[q] * f;
            if (q + 2 < end) recserve_prefetch_keep(Y + (long long)ix[q + 2] * f);
            float s = c[q], conf = s < 0.0f ? -s : s, d = recserve_sdot(y, v, f);
            float pc = s > 0.0f ? conf : 0.0f;
            recserve_saxpy(residual ? pc - (conf - 1.0f) * d : (conf - 1.0f) * d, y, out, f);
        }
    }

    /* `steps` CG iterations on x in place (Takacs et al.): r = b - A x, then
       the usual updates with A p computed from G and the row's nonzeros, never
       forming A. Stops early on a vanishing residual or a non-positive
       curvature (A is SPD, so only from rounding). wreg > 0: ALS-WR, the row's
       penalty wreg times its positive nonzeros (at least 1), G holding one. */
    RECSERVE_CLONES
    static void recserve_cg_row(const long long *ip, const int *ix, const float *c,
                                long long row, const float *Y, const float *G, int f,
                                int steps, float wreg, float *restrict r, float *restrict p,
                                float *restrict Ap, float *restrict x) {
        float shift = 0.0f;
        if (wreg > 0.0f) {
            long long pos = 0;
            for (long long q = ip[row]; q < ip[row + 1]; q++) pos += c[q] > 0.0f;
            shift = wreg * (float)((pos > 1 ? pos : 1) - 1);
        }
        recserve_apply(ip, ix, c, row, Y, G, f, shift, x, r, 1);
        for (int k = 0; k < f; k++) p[k] = r[k];
        float rs_old = recserve_sdot(r, r, f);
        for (int it = 0; it < steps; it++) {
            if (rs_old < 1e-20f) break;
            recserve_apply(ip, ix, c, row, Y, G, f, shift, p, Ap, 0);
            float curv = recserve_sdot(p, Ap, f);
            if (curv <= 0.0f) break;
            float alpha = rs_old / curv;
            recserve_saxpy(alpha, p, x, f);
            recserve_saxpy(-alpha, Ap, r, f);
            float rs_new = recserve_sdot(r, r, f);
            float beta = rs_new / rs_old;
            for (int k = 0; k < f; k++) p[k] = r[k] + beta * p[k];
            rs_old = rs_new;
        }
    }
    """
    void recserve_cg_row(const long long* ip, const int* ix, const float* c, long long row,
                         const float* Y, const float* G, int f, int steps, float wreg,
                         float* r, float* p, float* Ap, float* x) noexcept nogil


cdef void solve_exact(const long long* ip, const int* ix, const float* c, Py_ssize_t row,
                      const float* Y, const float* G, int f, float wreg, float* A, float* b,
                      float* Z, float* out) noexcept nogil:
    """x = (G + sum (c - 1) y y^T)^-1 sum p c y, by Cholesky (sposv), from
    signed confidences s (c = |s|, p = 1 when s > 0, else 0). wreg > 0: ALS-WR
    (Zhou et al. 2008; Spark MLlib's ALS), the row's penalty wreg times its
    number of positive nonzeros (at least 1): G holds one, the rest is added.

    The sum of outer products goes through ssyrk on chunks of CHUNK items
    (rows sqrt(c - 1) y): level-3 BLAS instead of one rank-1 update per item.
    Items with c < 1 (weighted below an unseen item) take a rank-1 ssyr.
    Fold-in runs this same routine, so a folded-in user reproduces the
    trained vector.
    """
    cdef long long p, pos = 0
    cdef int a, one = 1, info = 0, nn = f, m = 0
    cdef float conf, w, one_f = 1.0
    cdef const float* y
    cdef char lower = b"L"
    cdef char notrans = b"N"
    for a in range(f * f):
        A[a] = G[a]
    for a in range(f):
        b[a] = 0.0
    for p in range(ip[row], ip[row + 1]):
        conf = c[p]
        y = Y + <Py_ssize_t>ix[p] * f
        if conf > 0:
            pos = pos + 1
            for a in range(f):
                b[a] += conf * y[a]
        else:
            conf = -conf  # a dislike: preference 0, weight |s|
        w = conf - 1.0
        if w >= 0:
            w = <float>csqrt(w)
            for a in range(f):
                Z[m * f + a] = w * y[a]
            m = m + 1
            if m == CHUNK:
                ssyrk(&lower, &notrans, &nn, &m, &one_f, Z, &nn, &one_f, A, &nn)
                m = 0
        else:
            ssyr(&lower, &nn, &w, <float*>y, &one, A, &nn)
    if m > 0:
        ssyrk(&lower, &notrans, &nn, &m, &one_f, Z, &nn, &one_f, A, &nn)
    if wreg > 0 and pos > 1:
        for a in range(f):
            A[a * f + a] += wreg * <float>(pos - 1)
    sposv(&lower, &nn, &one, A, &nn, b, &nn, &info)
    if info == 0:
        for a in range(f):
            out[a] = b[a]



def _history_inputs(indices, confidence, Y, G, gdtype) -> int:
    """The checks of a one-history call (solve_row, contributions): int32 item
    ids inside Y's rows, one float32 confidence each, G f x f of `gdtype`.
    Returns f."""
    check_array(Y, "Y", np.float32, 2)
    check_array(G, "G", gdtype, 2)
    check_array(indices, "indices", np.int32, 1)
    check_array(confidence, "confidence", np.float32, 1)
    cdef int f = <int>Y.shape[1]
    if G.shape[0] != f or G.shape[1] != f:
        raise ValueError(f"G: expected shape ({f}, {f}), got {G.shape}")
    if confidence.shape[0] != indices.shape[0]:
        raise ValueError("confidence: one value per nonzero")
    cdef const int[::1] ixv = indices
    cdef Py_ssize_t p, n_items = Y.shape[0]
    for p in range(ixv.shape[0]):
        if not 0 <= ixv[p] < n_items:
            raise ValueError(f"indices: item ids must lie in [0, {n_items})")
    return f


def solve_row(indices, confidence, Y, G32, out, double weighted_reg=0.0):
    """One history's exact factors (solve_rows' Cholesky path for one row, the
    same arithmetic) into `out` (f float32, zeroed first: it stays 0 for an
    empty history or a failed factorisation, as solve_rows leaves a zeroed X).
    A serving fold-in calls this: solve_rows' batch set-up (index checks by
    numpy reductions, the float32 copy of G, thread scratch, an OpenMP region)
    cost 15 us of its 38 on a ten-item history. G32: YtY + reg I, float32.
    weighted_reg: reg for ALS-WR (solve_rows' weighted), else 0."""
    cdef int f = _history_inputs(indices, confidence, Y, G32, np.float32)
    check_array(out, "out", np.float32, 1)
    if out.shape[0] != f:
        raise ValueError(f"out: expected {f} entries, got {out.shape[0]}")
    cdef const int[::1] ixv = indices
    cdef Py_ssize_t n = ixv.shape[0]
    cdef float[::1] O = out
    cdef int a
    for a in range(f):
        O[a] = 0.0
    if n == 0 or f == 0:
        return out
    cdef const float[::1] cv = confidence
    cdef const float[:, ::1] Yv = Y
    cdef const float[:, ::1] Gv = G32
    cdef long long ip[2]
    ip[0] = 0
    ip[1] = n
    cdef float* w
    with nogil:
        w = <float*> malloc((f * f + f + CHUNK * f) * sizeof(float))
        if w != NULL:
            solve_exact(ip, &ixv[0], &cv[0], 0, &Yv[0, 0], &Gv[0, 0], f, <float>weighted_reg,
                        w, w + f * f, w + f * f + f, &O[0])
            free(w)
    if w == NULL:
        raise MemoryError("solve_row: no scratch")
    return out


def contributions(indices, confidence, Y, G, items, double weighted_reg=0.0):
    """What each history item gives each of `items` in a folded-in user's score:
    score_j = y_j . A^-1 sum_i p_i c_i y_i splits into p_i c_i y_j . A^-1 y_i,
    A = G + sum_i (c_i - 1) y_i y_i^T (+ the ALS-WR penalty with weighted_reg,
    as solve_exact), over the history's signed confidences (c = |s|, p = s > 0).
    A by one rank-k update (dsyrk), one Cholesky in float64 with every item as
    a right-hand side (dposv), the products by one dgemm, reading only the
    rows involved: an answer's explanations (numpy's products and solve took
    157-181 us on quickstart users, 64 factors, k 10; this 97-103 us).
    indices int32 (n), confidence float32 (n), Y float32 (items x f), G float64
    (f x f: YtY + reg I), items int64 (m). Returns float64 (n, m); zeros when
    A is not positive definite."""
    cdef int f = _history_inputs(indices, confidence, Y, G, np.float64)
    check_array(items, "items", np.int64, 1)
    cdef Py_ssize_t n = indices.shape[0], m = items.shape[0], i, j
    if m and (items.min() < 0 or items.max() >= Y.shape[0]):
        raise ValueError(f"items: ids must lie in [0, {Y.shape[0]})")
    cdef const int[::1] ix = indices
    cdef const long long[::1] it = items
    out = np.zeros((n, m), np.float64)
    if n == 0 or m == 0 or f == 0:
        return out
    a_mat = np.array(G, np.float64, order="C")
    rhs = np.empty((m, f), np.float64)  # column-major f x m: one item per row here
    hist = np.empty((n, f), np.float64)  # column-major f x n: the history's y_i
    scaled = np.empty((n, f), np.float64)  # sqrt(c_i - 1) y_i
    cdef double[:, ::1] A = a_mat
    cdef double[:, ::1] B = rhs
    cdef double[:, ::1] H = hist
    cdef double[:, ::1] Z = scaled
    cdef double[:, ::1] O = out
    cdef const float[::1] cv = confidence
    cdef const float[:, ::1] Yv = Y
    cdef const float* y
    cdef int a, info = 0, nn = f, mm = <int>m, k = 0, nh = <int>n, one = 1
    cdef long long pos = 0
    cdef double w, pc, zero = 0.0, one_d = 1.0
    cdef char lower = b"L"
    cdef char notrans = b"N"
    cdef char trans = b"T"
    with nogil:
        # A = G + sum (c_i - 1) y_i y_i^T: one rank-k update (dsyrk) over the
        # rows with c >= 1, a rank-1 one (dsyr) for any below. G is symmetric,
        # so C order's upper triangle is LAPACK's lower one.
        for i in range(n):
            y = &Yv[ix[i], 0]
            for a in range(f):
                H[i, a] = y[a]
            w = (cv[i] if cv[i] > 0 else -cv[i]) - 1.0
            if cv[i] > 0:
                pos = pos + 1
            if w >= 0:
                w = csqrt(w)
                for a in range(f):
                    Z[k, a] = w * H[i, a]
                k = k + 1
            else:
                dsyr(&lower, &nn, &w, &H[i, 0], &one, &A[0, 0], &nn)
        if k > 0:
            dsyrk(&lower, &notrans, &nn, &k, &one_d, &Z[0, 0], &nn, &one_d, &A[0, 0], &nn)
        if weighted_reg > 0 and pos > 1:
            for a in range(f):
                A[a, a] += weighted_reg * (pos - 1)
        for j in range(m):
            y = &Yv[it[j], 0]
            for a in range(f):
                B[j, a] = y[a]
        dposv(&lower, &nn, &mm, &A[0, 0], &nn, &B[0, 0], &nn, &info)
        if info == 0:
            # out (n x m, C order) = H (n x f) . X (f x m): column-major, the
            # m x n product X^T H^T; then each row times p_i c_i.
            dgemm(&trans, &notrans, &mm, &nh, &nn, &one_d, &B[0, 0], &nn, &H[0, 0], &nn,
                  &zero, &O[0, 0], &mm)
            for i in range(n):
                pc = cv[i] if cv[i] > 0 else 0.0  # a dislike weighs in A, gives nothing
                for j in range(m):
                    O[i, j] = pc * O[i, j]
    return out


def gram(Y, double regularization=0.0):
    """YtY + regularization * I in float64 (the part every row solve shares)."""
    check_array(Y, "Y", np.float32, 2)
    G = Y.T.astype(np.float64) @ Y.astype(np.float64)
    G[np.diag_indices_from(G)] += regularization
    return np.ascontiguousarray(G)


def solve_rows(indptr, indices, confidence, Y, X, double regularization,
               int cg_steps=0, rows=None, G=None, int n_threads=0, bint weighted=False):
    """Update X[rows] (all rows by default) in place from confidences and fixed Y.

    indptr/indices/confidence: CSR (rows x items) of signed confidences:
    +(1 + alpha r) for a positive value r, -(1 + alpha |r|) for a negative one.
    cg_steps <= 0 solves exactly (Cholesky); otherwise that many CG steps,
    warm-started from X. G (YtY + reg I) may be passed to share it between
    calls (fold-in). Rows with no nonzeros get the all-zero solution.
    weighted: ALS-WR (Zhou et al. 2008; Spark MLlib's ALS): a row's penalty is
    regularization times its number of positive nonzeros (at least 1).
    """
    check_array(Y, "Y", np.float32, 2)
    check_array(X, "X", np.float32, 2)
    if not X.flags.writeable:
        raise ValueError("X: must be writeable (it is updated in place)")
    cdef int f = <int>Y.shape[1]
    if X.shape[1] != f:
        raise ValueError(f"X: has {X.shape[1]} factors, Y has {f}")
    if regularization < 0:
        raise ValueError(f"regularization: must be >= 0, got {regularization}")
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    confidence = np.ascontiguousarray(confidence, dtype=np.float32)
    check_rows(indptr, indices, X.shape[0], "rows")
    if indices.size and (indices.min() < 0 or indices.max() >= Y.shape[0]):
        raise ValueError(f"indices: item ids must lie in [0, {Y.shape[0]})")
    if confidence.shape[0] != indices.shape[0]:
        raise ValueError("confidence: one value per nonzero")
    if G is None:
        # The kernels read YtY in float32: one float32 syrk (numpy turns Y.T @ Y
        # into one), 6x faster than gram()'s float64 product on 100k x 64.
        G32 = np.ascontiguousarray(Y.T @ Y)
        G32[np.diag_indices_from(G32)] += np.float32(regularization)
    else:
        G = check_array(G, "G", np.float64, 2)
        if G.shape != (f, f):
            raise ValueError(f"G: expected shape ({f}, {f}), got {G.shape}")
        G32 = np.ascontiguousarray(G, dtype=np.float32)
    todo = (np.arange(X.shape[0], dtype=np.int64) if rows is None
            else np.ascontiguousarray(rows, dtype=np.int64))
    if todo.size and (todo.min() < 0 or todo.max() >= X.shape[0]):
        raise ValueError(f"rows: must lie in [0, {X.shape[0]})")
    cdef int nt = threads_for(n_threads, todo.shape[0])
    scratch32 = np.empty((nt, f * f + f + CHUNK * f + 3 * f), np.float32)
    cdef const long long[::1] ipv = indptr
    cdef const int[::1] ixv = indices
    cdef const float[::1] cv = confidence
    cdef const float[:, ::1] Yv = Y
    cdef float[:, ::1] Xv = X
    cdef const long long[::1] tv = todo
    cdef float[:, ::1] S32 = scratch32
    cdef const float[:, ::1] G32v = G32
    cdef Py_ssize_t n = todo.shape[0], k, row
    cdef int t, a
    cdef bint exact = cg_steps <= 0
    cdef float wreg = <float>regularization if weighted else 0.0
    cdef long long empty_ptr = 0
    cdef const long long* ip = &ipv[0]
    cdef const int* ix = &ixv[0] if ixv.shape[0] else NULL
    cdef const float* c = &cv[0] if cv.shape[0] else NULL
    cdef float* w32
    if n == 0 or f == 0:
        return X
    with nogil, parallel(num_threads=nt):
        for k in prange(n, schedule="dynamic", chunksize=64):
            t = threadid()
            row = tv[k]
            w32 = &S32[t, 0]
            if ip[row + 1] == ip[row]:
                for a in range(f):
                    Xv[row, a] = 0.0
            elif exact:
                solve_exact(ip, ix, c, row, &Yv[0, 0], &G32v[0, 0], f, wreg, w32,
                            w32 + f * f, w32 + f * f + f, &Xv[row, 0])
            else:
                w32 = w32 + f * f + f + CHUNK * f
                recserve_cg_row(ip, ix, c, row, &Yv[0, 0], &G32v[0, 0], f, cg_steps, wreg, w32,
                                w32 + f, w32 + 2 * f, &Xv[row, 0])
    return X
