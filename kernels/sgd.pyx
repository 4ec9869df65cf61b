# Stochastic gradient descent kernels for two models. svd (explicit biased
# matrix factorization, what Surprise calls SVD): prediction mu + b_u + b_i +
# p_u . q_i, squared error with L2 on biases and factors, one update per
# rating. BPR (below) for implicit feedback. One thread is deterministic; more
# threads run Hogwild (lock-free, nondeterministic), which SGD tolerates on
# sparse data.
import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.math cimport exp

from kernels.parallel cimport resolve_threads

from kernels.topk import check_array, check_rows


cdef extern from *:
    """
    /* Vector kernels for one SGD step. The pragmas ask for SIMD explicitly (a
       float reduction is otherwise never vectorised without fast-math); builds
       without OpenMP ignore them and stay correct. p (a user row) and q (an
       item row) never alias. */
    static inline float recserve_dot(const float *restrict x, const float *restrict y,
                                     int f) {
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (int a = 0; a < f; a++) s += x[a] * y[a];
        return s;
    }
    static inline void recserve_sgd_update(float *restrict p, float *restrict q, int f,
                                           float err, float lr, float reg) {
        #pragma omp simd
        for (int a = 0; a < f; a++) {
            float pf = p[a], qf = q[a];
            p[a] = pf + lr * (err * qf - reg * pf);
            q[a] = qf + lr * (err * pf - reg * qf);
        }
    }
    /* BPR: p . (qi - qj), and the step on all three rows (i != j always:
       the negative is never a positive). */
    static inline float recserve_bpr_dot(const float *restrict p, const float *restrict qi,
                                         const float *restrict qj, int f) {
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (int a = 0; a < f; a++) s += p[a] * (qi[a] - qj[a]);
        return s;
    }
    static inline void recserve_bpr_update(float *restrict p, float *restrict qi,
                                           float *restrict qj, int f, float z, float lr,
                                           float reg, int items_too) {
        if (items_too) {
            #pragma omp simd
            for (int a = 0; a < f; a++) {
                float pf = p[a], qif = qi[a], qjf = qj[a];
                p[a] = pf + lr * (z * (qif - qjf) - reg * pf);
                qi[a] = qif + lr * (z * pf - reg * qif);
                qj[a] = qjf + lr * (-z * pf - reg * qjf);
            }
        } else {
            #pragma omp simd
            for (int a = 0; a < f; a++)
                p[a] = p[a] + lr * (z * (qi[a] - qj[a]) - reg * p[a]);
        }
    }
    /* A uniform draw in [0, n) from 64 random bits: Lemire's multiply-shift
       where the compiler has 128-bit integers (a 64-bit modulo costs ~40
       cycles, twice per BPR step). */
    static inline unsigned long long recserve_bounded(unsigned long long r,
                                                      unsigned long long n) {
    #ifdef __SIZEOF_INT128__
        return (unsigned long long)(((unsigned __int128)r * n) >> 64);
    #else
        return r % n;
    #endif
    }
    """
    float recserve_dot(const float* x, const float* y, int f) noexcept nogil
    void recserve_sgd_update(float* p, float* q, int f, float err, float lr,
                             float reg) noexcept nogil
    float recserve_bpr_dot(const float* p, const float* qi, const float* qj,
                           int f) noexcept nogil
    void recserve_bpr_update(float* p, float* qi, float* qj, int f, float z, float lr,
                             float reg, int items_too) noexcept nogil
    unsigned long long recserve_bounded(unsigned long long r,
                                        unsigned long long n) noexcept nogil


def svd_epoch(users, items, ratings, order, double mu, bu, bi, P, Q, double lr, double reg,
              int n_threads=1):
    """One epoch over the ratings in `order`; updates bu, bi, P, Q in place.

    users/items: int32 dense ids, ratings: float32, order: int64 positions.
    Returns the sum of squared errors seen before each update.
    """
    check_array(users, "users", np.int32, 1)
    check_array(items, "items", np.int32, 1)
    check_array(ratings, "ratings", np.float32, 1)
    check_array(order, "order", np.int64, 1)
    for name, arr, dim in (("bu", bu, 1), ("bi", bi, 1), ("P", P, 2), ("Q", Q, 2)):
        check_array(arr, name, np.float32, dim)
        if not arr.flags.writeable:
            raise ValueError(f"{name}: must be writeable (updated in place)")
    cdef Py_ssize_t n = ratings.shape[0]
    if users.shape[0] != n or items.shape[0] != n:
        raise ValueError("users, items and ratings must have the same length")
    if P.shape[1] != Q.shape[1]:
        raise ValueError(f"P has {P.shape[1]} factors, Q has {Q.shape[1]}")
    if P.shape[0] != bu.shape[0] or Q.shape[0] != bi.shape[0]:
        raise ValueError("bu must have one entry per row of P, bi per row of Q")
    if n and (users.min() < 0 or users.max() >= P.shape[0]):
        raise ValueError(f"users: ids must lie in [0, {P.shape[0]})")
    if n and (items.min() < 0 or items.max() >= Q.shape[0]):
        raise ValueError(f"items: ids must lie in [0, {Q.shape[0]})")
    if order.shape[0] and (order.min() < 0 or order.max() >= n):
        raise ValueError(f"order: positions must lie in [0, {n})")
    if lr <= 0 or reg < 0:
        raise ValueError(f"lr must be > 0 and reg >= 0, got lr={lr}, reg={reg}")
    cdef const int[::1] U = users
    cdef const int[::1] I = items
    cdef const float[::1] R = ratings
    cdef const long long[::1] O = order
    cdef float[::1] BU = bu
    cdef float[::1] BI = bi
    cdef float[:, ::1] PV = P
    cdef float[:, ::1] QV = Q
    cdef int f = <int>P.shape[1], u, i
    cdef Py_ssize_t k, m = order.shape[0]
    cdef double sse = 0.0
    cdef float err, lr_f = <float>lr, reg_f = <float>reg, mu_f = <float>mu
    cdef float* pu
    cdef float* qi
    cdef int nt = resolve_threads(n_threads)
    if m == 0:
        return 0.0
    with nogil:
        for k in prange(m, schedule="static", num_threads=nt):
            u = U[O[k]]
            i = I[O[k]]
            pu = &PV[u, 0]
            qi = &QV[i, 0]
            err = R[O[k]] - (mu_f + BU[u] + BI[i] + recserve_dot(pu, qi, f))
            sse += err * err
            BU[u] = BU[u] + lr_f * (err - reg_f * BU[u])
            BI[i] = BI[i] + lr_f * (err - reg_f * BI[i])
            recserve_sgd_update(pu, qi, f, err, lr_f, reg_f)
    return sse


# ---------------------------------------------------------------------------
# BPR (Rendle et al. 2009): maximise ln sigmoid(x_ui - x_uj) over triples of a
# user, a positive item and a sampled negative, with x = p_u . q + b.

cdef inline unsigned long long splitmix64(unsigned long long* state) noexcept nogil:
    cdef unsigned long long z
    state[0] += 0x9E3779B97F4A7C15ULL
    z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline bint is_positive(const int* row, long long n, int item) noexcept nogil:
    """Binary search in a user's sorted item ids."""
    cdef long long lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if row[mid] < item:
            lo = mid + 1
        else:
            hi = mid
    return lo < n and row[lo] == item


cdef inline int draw_negative(unsigned long long* state, const int* ix, long long nnz,
                              int n_items, bint popular) noexcept nogil:
    """A candidate negative: uniform over items, or (popular) the item of a
    uniformly drawn interaction, i.e. proportional to item popularity."""
    if popular:
        return ix[<long long>recserve_bounded(splitmix64(state), <unsigned long long>nnz)]
    return <int>recserve_bounded(splitmix64(state), <unsigned long long>n_items)


cdef inline bint sample_triple(unsigned long long* state, const long long* ip, const int* ix,
                               const int* rows, long long nnz, int n_items, bint popular,
                               int* u, int* i, int* j) noexcept nogil:
    """Draw (u, i) uniformly among the positives and a negative j (uniform or
    popularity-proportional), redrawn while it is one of u's positives. False
    when u has every item (or 1000 redraws all hit positives): step skipped."""
    cdef long long pos = <long long>recserve_bounded(splitmix64(state), <unsigned long long>nnz)
    cdef int tries = 0
    u[0] = rows[pos]
    i[0] = ix[pos]
    if ip[u[0] + 1] - ip[u[0]] >= n_items:
        return False
    j[0] = draw_negative(state, ix, nnz, n_items, popular)
    while is_positive(ix + ip[u[0]], ip[u[0] + 1] - ip[u[0]], j[0]):
        tries = tries + 1
        if tries == 1000:
            return False
        j[0] = draw_negative(state, ix, nnz, n_items, popular)
    return True


cdef inline double bpr_update(float* p, float* qi, float* qj, float* bi, float* bj, int f,
                              float lr, float reg, bint items_too) noexcept nogil:
    """One BPR step; returns sigmoid(-(x_ui - x_uj)) (the gradient scale z)."""
    cdef double x = bi[0] - bj[0] + recserve_bpr_dot(p, qi, qj, f)
    cdef float z = <float>(1.0 / (1.0 + exp(x)))
    recserve_bpr_update(p, qi, qj, f, z, lr, reg, items_too)
    if items_too:
        bi[0] = bi[0] + lr * (z - reg * bi[0])
        bj[0] = bj[0] + lr * (-z - reg * bj[0])
    return z


def bpr_epoch(indptr, indices, P, Q, bias, double lr, double reg, unsigned long long seed,
              int n_threads=1, bint update_items=True, bint popular_negatives=False):
    """One BPR epoch of nnz sampled triples; updates P (and Q, bias) in place.

    indptr/indices: the users' positives (CSR, sorted item ids per row). Each
    step draws a positive (u, i) uniformly and a negative j uniformly among
    the items (or, with popular_negatives, proportionally to popularity),
    redrawn while it is one of u's positives (a user who has every item is
    skipped). One thread is deterministic for a given seed; more run
    Hogwild. Returns the fraction of steps whose triple was ranked correctly.
    """
    for name, arr, dim in (("P", P, 2), ("Q", Q, 2), ("bias", bias, 1)):
        check_array(arr, name, np.float32, dim)
        written = name == "P" or update_items
        if written and not arr.flags.writeable:
            raise ValueError(f"{name}: must be writeable (updated in place)")
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    if indptr.shape[0] != P.shape[0] + 1:
        raise ValueError(f"indptr: expected {P.shape[0] + 1} entries (one row per user)")
    if P.shape[1] != Q.shape[1] or bias.shape[0] != Q.shape[0]:
        raise ValueError("P and Q need the same factors, bias one entry per item")
    if indices.size and (indices.min() < 0 or indices.max() >= Q.shape[0]):
        raise ValueError(f"indices: item ids must lie in [0, {Q.shape[0]})")
    if lr <= 0 or reg < 0:
        raise ValueError(f"lr must be > 0 and reg >= 0, got lr={lr}, reg={reg}")
    cdef Py_ssize_t nnz = indices.shape[0]
    # Row of every nonzero, to draw positives uniformly over all (u, i) pairs.
    row_of = np.repeat(np.arange(P.shape[0], dtype=np.int32), np.diff(indptr))
    cdef const long long[::1] ip = indptr
    cdef const int[::1] ix = indices
    cdef const int[::1] rows = row_of
    cdef float[:, ::1] PV = P
    # Items are read through const views (they may be a read-only memory map
    # when update_items is False) and only written when update_items is True.
    cdef const float[:, ::1] QV = Q
    cdef const float[::1] B = bias
    cdef float* q0 = <float*>&QV[0, 0]
    cdef float* b0 = <float*>&B[0]
    cdef int f = <int>P.shape[1], n_items = <int>Q.shape[0], u, i, j
    cdef int nt = resolve_threads(n_threads)
    cdef Py_ssize_t s, k
    cdef float lr_f = <float>lr, reg_f = <float>reg
    cdef double correct = 0.0
    cdef unsigned long long state
    if nnz == 0:
        return 0.0
    with nogil, parallel(num_threads=nt):
        state = seed * 0x100000001B3ULL + <unsigned long long>threadid() * 0x9E3779B97F4A7C15ULL
        for s in prange(nnz, schedule="static"):
            if not sample_triple(&state, &ip[0], &ix[0], &rows[0], nnz, n_items,
                                 popular_negatives, &u, &i, &j):
                continue
            if bpr_update(&PV[u, 0], q0 + <Py_ssize_t>i * f, q0 + <Py_ssize_t>j * f,
                          b0 + i, b0 + j, f, lr_f, reg_f, update_items) < 0.5:
                correct += 1.0
    return correct / nnz


def bpr_apply(users, pos_items, neg_items, P, Q, bias, double lr, double reg):
    """Apply given (u, i, j) triples in order (no sampling): the exact BPR step,
    for tests and for replaying a sample."""
    cdef Py_ssize_t n = users.shape[0], s
    check_array(users, "users", np.int32, 1)
    check_array(pos_items, "pos_items", np.int32, 1)
    check_array(neg_items, "neg_items", np.int32, 1)
    cdef const int[::1] U = users
    cdef const int[::1] I = pos_items
    cdef const int[::1] J = neg_items
    cdef float[:, ::1] PV = P
    cdef float[:, ::1] QV = Q
    cdef float[::1] B = bias
    cdef int f = <int>P.shape[1]
    with nogil:
        for s in range(n):
            bpr_update(&PV[U[s], 0], &QV[I[s], 0], &QV[J[s], 0], &B[I[s]], &B[J[s]], f,
                       <float>lr, <float>reg, True)


def bpr_sample(indptr, indices, int n_items, Py_ssize_t n, unsigned long long seed,
               bint popular_negatives=False):
    """n triples (u, i, j) from the sampler bpr_epoch uses (one thread, same seed
    convention); skipped draws are returned as -1. For tests and inspection."""
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    check_rows(indptr, indices, indptr.shape[0] - 1, "positives")
    row_of = np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int32), np.diff(indptr))
    out = np.full((n, 3), -1, np.int32)
    cdef const long long[::1] ip = indptr
    cdef const int[::1] ix = indices
    cdef const int[::1] rows = row_of
    cdef int[:, ::1] o = out
    cdef unsigned long long state = seed * 0x100000001B3ULL
    cdef long long nnz = indices.shape[0]
    cdef Py_ssize_t s
    cdef int u, i, j
    if nnz == 0:
        return out
    with nogil:
        for s in range(n):
            if sample_triple(&state, &ip[0], &ix[0], &rows[0], nnz, n_items,
                             popular_negatives, &u, &i, &j):
                o[s, 0] = u
                o[s, 1] = i
                o[s, 2] = j
    return out
