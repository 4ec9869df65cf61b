# Implicit-feedback ALS (Hu, Koren & Volinsky 2008) solves, one row at a time:
#   (YtY + reg I + sum_i (c_i - 1) y_i y_i^T) x = sum_i c_i y_i
# over the row's nonzeros i with confidences c_i (the matrix values; 1 + alpha r
# is applied by the caller). Exact solves use a Cholesky factorisation in double
# precision; the CG solver runs a few warm-started conjugate-gradient steps that
# never form the f x f matrix (Takacs, Pilaszy & Tikk 2011). The same row solve
# trains users, trains items and folds in new users, so a folded-in user equals
# the trained one.
import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt

from kernels.parallel cimport resolve_threads

from kernels.topk import check_array, check_rows


cdef int cholesky_solve(double* A, double* b, int f) noexcept nogil:
    """Solve A x = b in place (x overwrites b; A's lower triangle is destroyed).
    Returns 0, or -1 when A is not positive definite."""
    cdef int i, j, c
    cdef double s
    for j in range(f):
        s = A[j * f + j]
        for c in range(j):
            s -= A[j * f + c] * A[j * f + c]
        if s <= 0:
            return -1
        A[j * f + j] = sqrt(s)
        for i in range(j + 1, f):
            s = A[i * f + j]
            for c in range(j):
                s -= A[i * f + c] * A[j * f + c]
            A[i * f + j] = s / A[j * f + j]
    for i in range(f):  # L y = b
        s = b[i]
        for c in range(i):
            s -= A[i * f + c] * b[c]
        b[i] = s / A[i * f + i]
    for i in range(f - 1, -1, -1):  # L^T x = y
        s = b[i]
        for c in range(i + 1, f):
            s -= A[c * f + i] * b[c]
        b[i] = s / A[i * f + i]
    return 0


cdef void solve_exact(const long long* ip, const int* ix, const float* c, Py_ssize_t row,
                      const float* Y, const double* G, int f, double* A, double* b,
                      float* out) noexcept nogil:
    cdef long long p
    cdef int a, e, item
    cdef double conf, ya
    cdef const float* y
    for a in range(f * f):
        A[a] = G[a]
    for a in range(f):
        b[a] = 0.0
    for p in range(ip[row], ip[row + 1]):
        item = ix[p]
        conf = c[p]
        y = Y + <Py_ssize_t>item * f
        for a in range(f):
            ya = y[a]
            b[a] += conf * ya
            ya = (conf - 1.0) * ya
            for e in range(a + 1):
                A[a * f + e] += ya * y[e]
    if cholesky_solve(A, b, f) == 0:
        for a in range(f):
            out[a] = <float>b[a]


cdef void solve_cg(const long long* ip, const int* ix, const float* c, Py_ssize_t row,
                   const float* Y, const double* G, int f, int steps, double* r,
                   double* pv, double* Ap, double* x, float* out) noexcept nogil:
    cdef long long q
    cdef int a, e, item, it
    cdef double conf, yx, rs_old, rs_new, alpha, s
    cdef const float* y
    for a in range(f):
        x[a] = out[a]
    # r = b - A x = sum c y - G x - sum (c - 1)(y . x) y
    for a in range(f):
        s = 0.0
        for e in range(f):
            s += G[a * f + e] * x[e]
        r[a] = -s
    for q in range(ip[row], ip[row + 1]):
        item = ix[q]
        conf = c[q]
        y = Y + <Py_ssize_t>item * f
        yx = 0.0
        for a in range(f):
            yx += y[a] * x[a]
        s = conf - (conf - 1.0) * yx
        for a in range(f):
            r[a] += s * y[a]
    rs_old = 0.0
    for a in range(f):
        pv[a] = r[a]
        rs_old += r[a] * r[a]
    for it in range(steps):
        if rs_old < 1e-20:
            break
        for a in range(f):
            s = 0.0
            for e in range(f):
                s += G[a * f + e] * pv[e]
            Ap[a] = s
        for q in range(ip[row], ip[row + 1]):
            item = ix[q]
            conf = c[q]
            y = Y + <Py_ssize_t>item * f
            yx = 0.0
            for a in range(f):
                yx += y[a] * pv[a]
            yx *= conf - 1.0
            for a in range(f):
                Ap[a] += yx * y[a]
        s = 0.0
        for a in range(f):
            s += pv[a] * Ap[a]
        if s <= 0:
            break
        alpha = rs_old / s
        rs_new = 0.0
        for a in range(f):
            x[a] += alpha * pv[a]
            r[a] -= alpha * Ap[a]
            rs_new += r[a] * r[a]
        for a in range(f):
            pv[a] = r[a] + (rs_new / rs_old) * pv[a]
        rs_old = rs_new
    for a in range(f):
        out[a] = <float>x[a]


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
        G = gram(Y, regularization)
    else:
        G = check_array(G, "G", np.float64, 2)
        if G.shape != (f, f):
            raise ValueError(f"G: expected shape ({f}, {f}), got {G.shape}")
    todo = (np.arange(X.shape[0], dtype=np.int64) if rows is None
            else np.ascontiguousarray(rows, dtype=np.int64))
    if todo.size and (todo.min() < 0 or todo.max() >= X.shape[0]):
        raise ValueError(f"rows: must lie in [0, {X.shape[0]})")
    cdef int nt = resolve_threads(n_threads)
    scratch = np.empty((nt, f * f + 4 * f), np.float64)
    cdef const long long[::1] ipv = indptr
    cdef const int[::1] ixv = indices
    cdef const float[::1] cv = confidence
    cdef const float[:, ::1] Yv = Y
    cdef float[:, ::1] Xv = X
    cdef const double[:, ::1] Gv = G
    cdef const long long[::1] tv = todo
    cdef double[:, ::1] S = scratch
    cdef Py_ssize_t n = todo.shape[0], k, row
    cdef int t, a
    cdef bint exact = cg_steps <= 0
    cdef long long empty_ptr = 0
    cdef const long long* ip = &ipv[0]
    cdef const int* ix = &ixv[0] if ixv.shape[0] else NULL
    cdef const float* c = &cv[0] if cv.shape[0] else NULL
    cdef double* w
    if n == 0 or f == 0:
        return X
    with nogil, parallel(num_threads=nt):
        for k in prange(n, schedule="dynamic", chunksize=64):
            t = threadid()
            row = tv[k]
            w = &S[t, 0]
            if ip[row + 1] == ip[row]:
                for a in range(f):
                    Xv[row, a] = 0.0
            elif exact:
                solve_exact(ip, ix, c, row, &Yv[0, 0], &Gv[0, 0], f, w, w + f * f,
                            &Xv[row, 0])
            else:
                solve_cg(ip, ix, c, row, &Yv[0, 0], &Gv[0, 0], f, cg_steps, w + f * f,
                         w + f * f + f, w + f * f + 2 * f, w + f * f + 3 * f, &Xv[row, 0])
    return X
