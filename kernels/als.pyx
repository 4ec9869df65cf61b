# Implicit-feedback ALS (Hu, Koren & Volinsky 2008) solves, one row at a time:
#   (YtY + reg I + sum_i (c_i - 1) y_i y_i^T) x = sum_i c_i y_i
# over the row's nonzeros i with confidences c_i (the matrix values; 1 + alpha r
# is applied by the caller). Exact solves use a Cholesky factorisation in double
# precision (float32 LAPACK); the CG solver runs a few warm-started conjugate-gradient steps that
# never form the f x f matrix (Takacs, Pilaszy & Tikk 2011); vector work goes
# through SciPy's BLAS/LAPACK (cython_blas, nogil). The same row solve
# trains users, trains items and folds in new users, so a folded-in user equals
# the trained one.
import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt

from libc.math cimport sqrt as csqrt
from scipy.linalg.cython_blas cimport saxpy, sdot, sscal, ssymv, ssyr, ssyrk
from scipy.linalg.cython_lapack cimport sposv

from kernels.parallel cimport threads_for

from kernels.topk import check_array, check_rows


cdef int CHUNK = 64  # items per rank-k update in solve_exact


cdef void solve_exact(const long long* ip, const int* ix, const float* c, Py_ssize_t row,
                      const float* Y, const float* G, int f, float* A, float* b,
                      float* Z, float* out) noexcept nogil:
    """x = (G + sum (c - 1) y y^T)^-1 sum c y, by Cholesky (sposv).

    The sum of outer products goes through ssyrk on chunks of CHUNK items
    (rows sqrt(c - 1) y): level-3 BLAS instead of one rank-1 update per item.
    Items with c < 1 (negative feedback) take a rank-1 ssyr. Fold-in runs this
    same routine, so a folded-in user reproduces the trained vector.
    """
    cdef long long p
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
        for a in range(f):
            b[a] += conf * y[a]
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
    sposv(&lower, &nn, &one, A, &nn, b, &nn, &info)
    if info == 0:
        for a in range(f):
            out[a] = b[a]


cdef void solve_cg(const long long* ip, const int* ix, const float* c, Py_ssize_t row,
                   const float* Y, const float* G, int f, int steps, float* r,
                   float* pv, float* Ap, float* x) noexcept nogil:
    """`steps` CG iterations on x in place, float32 BLAS, never forming the row's matrix."""
    cdef long long q
    cdef int it, one = 1, nn = f
    cdef float conf, s, alpha, rs_old, rs_new, beta, minus_one = -1.0, zero = 0.0
    cdef float one_f = 1.0
    cdef const float* y
    cdef char upper = b"U"
    # r = b - A x = sum c y - G x - sum (c - 1)(y . x) y
    ssymv(&upper, &nn, &minus_one, <float*>G, &nn, x, &one, &zero, r, &one)
    for q in range(ip[row], ip[row + 1]):
        conf = c[q]
        y = Y + <Py_ssize_t>ix[q] * f
        s = conf - (conf - 1.0) * sdot(&nn, <float*>y, &one, x, &one)
        saxpy(&nn, &s, <float*>y, &one, r, &one)
    for it in range(f):
        pv[it] = r[it]
    rs_old = sdot(&nn, r, &one, r, &one)
    for it in range(steps):
        if rs_old < 1e-20:
            break
        ssymv(&upper, &nn, &one_f, <float*>G, &nn, pv, &one, &zero, Ap, &one)
        for q in range(ip[row], ip[row + 1]):
            conf = c[q]
            y = Y + <Py_ssize_t>ix[q] * f
            s = (conf - 1.0) * sdot(&nn, <float*>y, &one, pv, &one)
            saxpy(&nn, &s, <float*>y, &one, Ap, &one)
        s = sdot(&nn, pv, &one, Ap, &one)
        if s <= 0:
            break
        alpha = rs_old / s
        saxpy(&nn, &alpha, pv, &one, x, &one)
        alpha = -alpha
        saxpy(&nn, &alpha, Ap, &one, r, &one)
        rs_new = sdot(&nn, r, &one, r, &one)
        beta = rs_new / rs_old
        sscal(&nn, &beta, pv, &one)
        saxpy(&nn, &one_f, r, &one, pv, &one)
        rs_old = rs_new


def gram(Y, double regularization=0.0):
    """YtY + regularization * I in float64 (the part every row solve shares)."""
    check_array(Y, "Y", np.float32, 2)
    G = Y.T.astype(np.float64) @ Y.astype(np.float64)
    G[np.diag_indices_from(G)] += regularization
    return np.ascontiguousarray(G)


def solve_rows(indptr, indices, confidence, Y, X, double regularization,
               int cg_steps=0, rows=None, G=None, int n_threads=0):
    """Update X[rows] (all rows by default) in place from confidences and fixed Y.

    indptr/indices/confidence: CSR (rows x items), confidence = 1 + alpha r.
    cg_steps <= 0 solves exactly (Cholesky); otherwise that many CG steps,
    warm-started from X. G (YtY + reg I) may be passed to share it between
    calls (fold-in). Rows with no nonzeros get the all-zero solution.
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
                solve_exact(ip, ix, c, row, &Yv[0, 0], &G32v[0, 0], f, w32, w32 + f * f,
                            w32 + f * f + f, &Xv[row, 0])
            else:
                w32 = w32 + f * f + f + CHUNK * f
                solve_cg(ip, ix, c, row, &Yv[0, 0], &G32v[0, 0], f, cg_steps, w32, w32 + f,
                         w32 + 2 * f, &Xv[row, 0])
    return X
