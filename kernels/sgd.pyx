# Stochastic gradient descent kernels for two models. svd (explicit biased
# matrix factorization, what Surprise calls SVD): prediction mu + b_u + b_i +
# p_u . q_i, squared error with L2 on biases and factors, one update per
# rating. BPR (below) for implicit feedback. One thread is deterministic; more
# threads run Hogwild (lock-free, nondeterministic), which SGD tolerates on
# sparse data.
import numpy as np

from cython.parallel cimport prange
from libc.math cimport expf, sqrt
from scipy.linalg.cython_blas cimport dgemv, dsyrk
from scipy.linalg.cython_lapack cimport dposv

from .parallel cimport recserve_prefetch, resolve_threads

from .topk import check_array, check_rows


cdef extern from *:
    """
    /* Vector kernels for one SGD step. The pragmas ask for SIMD explicitly (a
       float reduction is otherwise never vectorised without fast-math); builds
       without OpenMP ignore them and stay correct. p (a user row) and q (an
       item row) never alias. */
    /* The svd step on a user row p and an item row q (both read before
       either is written, as in Surprise). */
    RS_INLINE void recserve_sgd_update(float *restrict p, float *restrict q, int f,
                                       float err, float lr, float reg) {
        #pragma omp simd
        for (int a = 0; a < f; a++) {
            float pf = p[a], qf = q[a];
            p[a] = pf + lr * (err * qf - reg * pf);
            q[a] = qf + lr * (err * pf - reg * qf);
        }
    }
    /* svd SGD over positions [lo, hi) of `order`; returns the sum of squared
       errors before each update. Built for AVX2/FMA and baseline
       (RECSERVE_CLONES): at 100 factors the step is a 100-float dot whose
       result the update waits for, so the dot's accumulators set the pace.
       Every line of the item row RECSERVE_SVD_AHEAD steps ahead is prefetched,
       and the user row when that step starts a new user (ratings come grouped
       by user, so the current user row stays in cache). */
    /* Every cache line of a factor row about to be updated. */
    RS_INLINE void recserve_prefetch_row(const float *row, int f) {
        for (int a = 0; a < f; a += 16) recserve_prefetch_write(row + a);
        recserve_prefetch_write(row + f - 1);
    }
    #define RECSERVE_SVD_AHEAD 8
    RECSERVE_CLONES
    static double recserve_svd_run(const int *U, const int *I, const float *R,
                                   const long long *O, long long lo, long long hi,
                                   float mu, float *bu, float *bi, float *P, float *Q,
                                   int f, float lr, float reg) {
        double sse = 0.0;
        for (long long k = lo; k < hi; k++) {
            long long o = O[k];
            int u = U[o], i = I[o];
            if (k + RECSERVE_SVD_AHEAD < hi) {
                long long o2 = O[k + RECSERVE_SVD_AHEAD];
                recserve_prefetch_row(Q + (long long)I[o2] * f, f);
                if (U[o2] != u) recserve_prefetch_row(P + (long long)U[o2] * f, f);
            }
            float *p = P + (long long)u * f, *q = Q + (long long)i * f;
            float err = R[o] - (mu + bu[u] + bi[i] + recserve_sdot(p, q, f));
            sse += (double)(err * err);
            bu[u] += lr * (err - reg * bu[u]);
            bi[i] += lr * (err - reg * bi[i]);
            recserve_sgd_update(p, q, f, err, lr, reg);
        }
        return sse;
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
    /* Whether item is in a sorted row of n ids: a binary search whose steps
       compile to conditional moves (a branchy search mispredicts about every
       other step on random negatives). */
    static inline int recserve_contains(const int *row, long long n, int item) {
        const int *base = row;
        long long len = n;
        if (n <= 0) return 0;
        while (len > 1) {
            long long half = len >> 1;
            base = (base[half] < item) ? base + half : base;
            len -= half;
        }
        base += (*base < item);  /* now the first id >= item, or the end */
        return base < row + n && *base == item;
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
    double recserve_svd_run(const int* U, const int* I, const float* R, const long long* O,
                            long long lo, long long hi, float mu, float* bu, float* bi,
                            float* P, float* Q, int f, float lr, float reg) noexcept nogil
    float recserve_bpr_dot(const float* p, const float* qi, const float* qj,
                           int f) noexcept nogil
    void recserve_bpr_update(float* p, float* qi, float* qj, int f, float z, float lr,
                             float reg, int items_too) noexcept nogil
    unsigned long long recserve_bounded(unsigned long long r,
                                        unsigned long long n) noexcept nogil
    bint recserve_contains(const int* row, long long n, int item) noexcept nogil
    void recserve_prefetch_row(const float* row, int f) noexcept nogil


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
    cdef int f = <int>P.shape[1], t
    cdef Py_ssize_t m = order.shape[0]
    cdef double sse = 0.0
    cdef int nt = resolve_threads(n_threads)
    if m == 0:
        return 0.0
    if nt > m:
        nt = <int>m
    # Each thread takes one contiguous slice of `order` (Hogwild: no locks).
    with nogil:
        for t in prange(nt, schedule="static", chunksize=1, num_threads=nt):
            sse += recserve_svd_run(
                &U[0], &I[0], &R[0], &O[0], m * t // nt, m * (t + 1) // nt,
                <float>mu, &BU[0], &BI[0], &PV[0, 0], &QV[0, 0], f, <float>lr, <float>reg,
            )
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


cdef inline unsigned long long thread_state(unsigned long long seed, int thread) noexcept nogil:
    """The starting state of one thread's stream: the seed and the thread id
    hashed together. SplitMix64 steps its state by a fixed increment, so
    states one increment apart (the obvious seed + thread * increment) give
    one stream shifted by a draw: the threads' samples would be correlated."""
    cdef unsigned long long s = seed ^ (<unsigned long long>(thread + 1) * 0xD1B54A32D192ED03ULL)
    splitmix64(&s)
    return splitmix64(&s)


cdef inline float bpr_update(float* p, float* qi, float* qj, float* bi, float* bj, int f,
                              float lr, float reg, bint items_too) noexcept nogil:
    """One BPR step; returns sigmoid(-(x_ui - x_uj)) (the gradient scale z)."""
    cdef float x = bi[0] - bj[0] + recserve_bpr_dot(p, qi, qj, f)
    cdef float z = 1.0 / (1.0 + expf(x))
    recserve_bpr_update(p, qi, qj, f, z, lr, reg, items_too)
    if items_too:
        bi[0] = bi[0] + lr * (z - reg * bi[0])
        bj[0] = bj[0] + lr * (-z - reg * bj[0])
    return z


cdef enum:
    # Steps between drawing a positive's position and reading it, and between
    # reading it (u, i and the negative j known) and the step itself: the
    # random reads of a step are prefetched that many steps ahead.
    AHEAD = 8
    RING = 16  # 2 * AHEAD slots, a power of two


cdef long long bpr_run(unsigned long long* state, const long long* ip, const int* ix,
                       const int* rows, long long nnz, int n_items, bint popular,
                       float* P, float* Q, float* B, int f, float lr, float reg,
                       bint items_too, long long count, int* out,
                       const int* pool=NULL, long long n_pool=0) noexcept nogil:
    """`count` BPR steps of one thread; returns how many were ranked correctly.

    Each step draws a positive (u, i) uniformly over the nonzeros and a
    negative j: uniform over items, redrawn while it is one of u's positives;
    or (popular, implicit's sampler) the item of another uniformly drawn
    nonzero, i.e. proportional to popularity, the step skipped when j is a
    positive (redrawing instead cost 0.01-0.015 of Recall@20 on ml-100k in a
    scratch build, 3 seeds: heavy users, whose draws hit positives most, got
    extra updates against popular items). A user who has every item is skipped, as is a uniform
    draw still positive after 1000 tries. With a pool (one user's run: the
    items that are not their positives, n_pool of them) j is drawn uniformly
    from it instead: the same distribution as redrawing, in one draw where
    the positives are most of the catalogue (none: every step skipped).

    The steps are software-pipelined: step t's positions are drawn at t -
    2 AHEAD (prefetching rows/ix there), u, i and j read at t - AHEAD
    (prefetching u's positives and the three factor rows), and the step runs
    at t. Each of these reads is random over arrays far larger than the
    caches on big data; done in sequence they stalled a step on every one.

    With out (count x 3 ints) the triples are recorded instead (-1 where a
    step is skipped) and nothing is updated: the same draws, for tests.
    """
    cdef long long pos[RING]
    cdef long long neg_pos[RING]
    cdef long long first[RING]
    cdef long long length[RING]
    cdef int users[RING]
    cdef int pos_items[RING]
    cdef int neg_items[RING]
    cdef long long s, t, n_u, correct = 0
    cdef int slot, u, i, j, tries
    cdef bint ok
    for s in range(count + 2 * AHEAD):
        if s < count:  # draw
            slot = s & (RING - 1)
            pos[slot] = <long long>recserve_bounded(splitmix64(state), <unsigned long long>nnz)
            recserve_prefetch(rows + pos[slot])
            recserve_prefetch(ix + pos[slot])
            if popular:
                neg_pos[slot] = <long long>recserve_bounded(splitmix64(state),
                                                            <unsigned long long>nnz)
                recserve_prefetch(ix + neg_pos[slot])
        t = s - AHEAD
        if 0 <= t < count:  # read
            slot = t & (RING - 1)
            u = rows[pos[slot]]
            users[slot] = u
            pos_items[slot] = ix[pos[slot]]
            if popular:
                neg_items[slot] = ix[neg_pos[slot]]
            elif pool != NULL:
                neg_items[slot] = pool[recserve_bounded(splitmix64(state),
                                                        <unsigned long long>n_pool)] \
                    if n_pool > 0 else -1
            else:
                neg_items[slot] = <int>recserve_bounded(splitmix64(state),
                                                        <unsigned long long>n_items)
            first[slot] = ip[u]
            length[slot] = ip[u + 1] - ip[u]
            recserve_prefetch(ix + first[slot] + length[slot] // 2)
            if out == NULL:
                recserve_prefetch_row(P + <Py_ssize_t>u * f, f)
                recserve_prefetch_row(Q + <Py_ssize_t>pos_items[slot] * f, f)
                if neg_items[slot] >= 0:
                    recserve_prefetch_row(Q + <Py_ssize_t>neg_items[slot] * f, f)
        t = s - 2 * AHEAD
        if t >= 0:  # step
            slot = t & (RING - 1)
            u = users[slot]
            i = pos_items[slot]
            j = neg_items[slot]
            n_u = length[slot]
            ok = n_u < n_items if pool == NULL else j >= 0
            tries = 0
            while ok and pool == NULL and recserve_contains(ix + first[slot], n_u, j):
                tries = tries + 1
                if popular or tries == 1000:
                    ok = False
                else:
                    j = <int>recserve_bounded(splitmix64(state), <unsigned long long>n_items)
            if out != NULL:
                if ok:
                    out[3 * t] = u
                    out[3 * t + 1] = i
                    out[3 * t + 2] = j
                continue
            if not ok:
                continue
            if bpr_update(P + <Py_ssize_t>u * f, Q + <Py_ssize_t>i * f, Q + <Py_ssize_t>j * f,
                          B + i, B + j, f, lr, reg, items_too) < 0.5:
                correct = correct + 1
    return correct


def bpr_epochs(indptr, indices, P, Q, bias, double lr, double reg, unsigned long long seed,
               int epochs=1, int n_threads=1, bint update_items=True,
               bint popular_negatives=False, on_epoch=None):
    """BPR epochs of nnz sampled triples each; updates P (and Q, bias) in place.

    indptr/indices: the users' positives (CSR, sorted item ids per row). Each
    step draws a positive (u, i) uniformly and a negative j uniformly among
    the items, redrawn while it is one of u's positives (a user who has every
    item is skipped); or, with popular_negatives, j proportional to
    popularity, and the step skipped when j is a positive. Each thread keeps
    one random stream over all epochs: one thread is deterministic for a given
    seed; more run Hogwild. All epochs run in one call so the inputs are
    checked once (a fold-in runs 50 epochs on one short row). on_epoch(epoch,
    correct), if given, is called after each epoch with the fraction of its
    steps whose triple was already ranked correctly; that of the last epoch
    is returned.
    """
    _check_bpr_factors(P, Q, bias, lr, reg, update_items)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    if indptr.shape[0] != P.shape[0] + 1:
        raise ValueError(f"indptr: expected {P.shape[0] + 1} entries (one row per user)")
    if indices.size and (indices.min() < 0 or indices.max() >= Q.shape[0]):
        raise ValueError(f"indices: item ids must lie in [0, {Q.shape[0]})")
    if epochs < 0:
        raise ValueError(f"epochs: must be >= 0, got {epochs}")
    cdef Py_ssize_t nnz = indices.shape[0]
    if nnz == 0 or epochs == 0:
        return 0.0
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
    cdef int f = <int>P.shape[1], n_items = <int>Q.shape[0], t, epoch
    cdef int nt = resolve_threads(n_threads)
    cdef float lr_f = <float>lr, reg_f = <float>reg
    cdef long long correct = 0
    # Thread share t takes steps [nnz t / nt, nnz (t + 1) / nt) of every epoch
    # with its own random stream, carried from one epoch to the next: the
    # result depends on the seed and n_threads, not on scheduling (beyond
    # Hogwild's races on shared rows when nt > 1).
    states = np.empty(nt, np.uint64)
    cdef unsigned long long[::1] S = states
    for t in range(nt):
        S[t] = thread_state(seed, t)
    for epoch in range(epochs):
        correct = 0
        with nogil:
            for t in prange(nt, schedule="static", chunksize=1, num_threads=nt):
                correct += bpr_run(&S[t], &ip[0], &ix[0], &rows[0], nnz, n_items,
                                   popular_negatives, &PV[0, 0], q0, b0, f, lr_f, reg_f,
                                   update_items, nnz * (t + 1) // nt - nnz * t // nt, NULL)
        if on_epoch is not None:
            on_epoch(epoch, correct / <double>nnz)
    return correct / <double>nnz


def _fold_in_pool(items, int n_items):
    """(pooled, pool, n_pool) for one user's positives `items`: past half the
    catalogue, their negatives are drawn from the other items directly
    (redrawing took ~n_items / n_rest tries a step: a history of all but one
    of 2,500 items took 2.7 s to fold in). pool: int32, never empty (a
    placeholder when n_pool is 0 or not pooled)."""
    if 2 * items.shape[0] <= n_items:  # the usual short history: no sort needed
        return False, np.zeros(1, np.int32), 0
    distinct = np.unique(items)
    if 2 * distinct.shape[0] <= n_items:
        return False, np.zeros(1, np.int32), 0
    neg = np.setdiff1d(np.arange(n_items, dtype=np.int32), distinct, assume_unique=True)
    if neg.size == 0:
        return True, np.zeros(1, np.int32), 0
    return True, np.ascontiguousarray(neg, np.int32), neg.shape[0]


def bpr_fold_in(items, Q, bias, double lr, double reg, unsigned long long seed, int epochs,
                start=None):
    """One new user's BPR factors from their positives, items frozen: what
    bpr_epochs(indptr=[0, n], items, p, Q, bias, ..., n_threads=1,
    update_items=False) leaves in a zero-initialised p, bit for bit (the same
    random stream and steps), in one nogil call. A fold-in runs 50 epochs of
    a ten-item row; through bpr_epochs each epoch entered an OpenMP region
    and the call set up row maps, which cost more than the steps.
    items: sorted int32 ids in [0, n_items) (a repeat counts twice, as in
    bpr_epochs). Where the distinct positives are more than half the
    catalogue, negatives are drawn from the other items directly: the same
    distribution, another random stream than bpr_epochs'. start: float32 (f,) factors to continue from instead of
    zeros (a known user's trained factors: bpr_epochs on a p holding them).
    Returns float32 (f,)."""
    check_array(items, "items", np.int32, 1)
    check_array(Q, "Q", np.float32, 2)
    p = np.zeros((1, Q.shape[1]), np.float32)
    if start is not None:
        check_array(start, "start", np.float32, 1)
        if start.shape[0] != Q.shape[1]:
            raise ValueError(f"start: expected {Q.shape[1]} factors, got {start.shape[0]}")
        p[0] = start
    _check_bpr_factors(p, Q, bias, lr, reg, False)
    cdef Py_ssize_t nnz = items.shape[0], e
    cdef const int[::1] ix = items
    cdef int n_items = <int>Q.shape[0], prev = -1
    for e in range(nnz):  # one pass instead of three numpy reductions
        if ix[e] < 0 or ix[e] >= n_items:
            raise ValueError(f"items: item ids must lie in [0, {n_items}), got {ix[e]}")
        if ix[e] < prev:
            raise ValueError("items: must be sorted (ascending)")
        prev = ix[e]
    if epochs < 0:
        raise ValueError(f"epochs: must be >= 0, got {epochs}")
    if nnz == 0 or epochs == 0:
        return p[0]
    pooled, neg, n_pool_ = _fold_in_pool(items, n_items)
    cdef const int[::1] NV = neg
    cdef long long n_pool = n_pool_
    cdef const int* pool_p = &NV[0] if pooled else NULL
    cdef long long ip[2]
    ip[0] = 0
    ip[1] = nnz
    rows = np.zeros(nnz, np.int32)
    cdef const int[::1] R = rows
    cdef float[:, ::1] PV = p
    cdef const float[:, ::1] QV = Q
    cdef const float[::1] B = bias
    cdef int f = <int>Q.shape[1], epoch
    cdef float lr_f = <float>lr, reg_f = <float>reg
    cdef unsigned long long state = thread_state(seed, 0)
    with nogil:
        for epoch in range(epochs):
            bpr_run(&state, &ip[0], &ix[0], &R[0], nnz, n_items, False, &PV[0, 0],
                    <float*>&QV[0, 0], <float*>&B[0], f, lr_f, reg_f, False, nnz, NULL,
                    pool_p, n_pool)
    return p[0]


def _check_bpr_factors(P, Q, bias, double lr, double reg, bint update_items):
    """The factor arrays and step sizes of a BPR update, checked before nogil code."""
    for name, arr, dim in (("P", P, 2), ("Q", Q, 2), ("bias", bias, 1)):
        check_array(arr, name, np.float32, dim)
        written = name == "P" or update_items
        if written and not arr.flags.writeable:
            raise ValueError(f"{name}: must be writeable (updated in place)")
    if P.shape[1] != Q.shape[1] or bias.shape[0] != Q.shape[0]:
        raise ValueError("P and Q need the same factors, bias one entry per item")
    if lr <= 0 or reg < 0:
        raise ValueError(f"lr must be > 0 and reg >= 0, got lr={lr}, reg={reg}")


def bpr_apply(users, pos_items, neg_items, P, Q, bias, double lr, double reg):
    """Apply given (u, i, j) triples in order (no sampling): the exact BPR step,
    for tests and for replaying a sample. Checked as bpr_epochs is, and every
    user and item id must lie in P's and Q's rows."""
    _check_bpr_factors(P, Q, bias, lr, reg, True)
    for name, arr, rows in (("users", users, P.shape[0]), ("pos_items", pos_items, Q.shape[0]),
                            ("neg_items", neg_items, Q.shape[0])):
        check_array(arr, name, np.int32, 1)
        if arr.shape[0] != users.shape[0]:
            raise ValueError(f"{name}: length {arr.shape[0]}, expected {users.shape[0]} (users)")
        if arr.size and (arr.min() < 0 or arr.max() >= rows):
            raise ValueError(f"{name}: ids must lie in [0, {rows})")
    cdef Py_ssize_t n = users.shape[0], s
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
               bint popular_negatives=False, int thread=0, bint fold_in=False):
    """n triples (u, i, j) as thread `thread` of bpr_epochs draws them, from
    the start of its first epoch, for this seed; skipped draws are returned as
    -1. fold_in: as bpr_fold_in draws them for one row (its negatives pool).
    For tests and inspection."""
    if thread < 0:
        raise ValueError(f"thread: must be >= 0, got {thread}")
    if n_items <= 0 or n < 0:
        raise ValueError(f"n_items must be > 0 and n >= 0, got {n_items} and {n}")
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    check_rows(indptr, indices, indptr.shape[0] - 1, "positives")
    row_of = np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int32), np.diff(indptr))
    out = np.full((n, 3), -1, np.int32)
    cdef const long long[::1] ip = indptr
    cdef const int[::1] ix = indices
    cdef const int[::1] rows = row_of
    cdef int[:, ::1] o = out
    cdef unsigned long long state = thread_state(seed, thread)
    cdef long long nnz = indices.shape[0]
    if fold_in and (indptr.shape[0] != 2 or popular_negatives):
        raise ValueError("fold_in: one row of positives, uniform negatives")
    pooled, neg, n_pool_ = _fold_in_pool(indices, n_items) if fold_in else (False, None, 0)
    cdef const int[::1] NV = neg if pooled else np.zeros(1, np.int32)
    cdef long long n_pool = n_pool_
    cdef const int* pool_p = &NV[0] if pooled else NULL
    if nnz == 0 or n == 0:
        return out
    with nogil:
        bpr_run(&state, &ip[0], &ix[0], &rows[0], nnz, n_items, popular_negatives, NULL,
                NULL, NULL, 0, 0.0, 0.0, False, n, &o[0, 0], pool_p, n_pool)
    return out


cdef bint cholesky_lower(double* A, int f) noexcept nogil:
    """In place: A (f x f, row-major, lower triangle read) = L L^T, L written
    to the lower triangle. False when A is not positive definite."""
    cdef int a, b, c
    cdef double acc
    for a in range(f):
        for b in range(a + 1):
            acc = A[a * f + b]
            for c in range(b):
                acc -= A[a * f + c] * A[b * f + c]
            if a == b:
                if acc <= 0.0:
                    return False
                A[a * f + a] = sqrt(acc)
            else:
                A[a * f + b] = acc / A[b * f + b]
    return True


cdef enum:
    GRAM_CHUNK = 512  # rows gathered per rank-k update


cdef void gram_z(const float[:, ::1] QV, const int[::1] IV, int n, int f1, double* zbuf,
                 double* K, const double* t, double* x) noexcept nogil:
    """K (f1 x f1, row-major, lower triangle) += sum over the n rows of z z^T
    and, when t is not NULL, x (f1,) += sum of z t_i; z_i = [1, Q[IV[i]]].
    The rows are gathered GRAM_CHUNK at a time into zbuf (GRAM_CHUNK x f1,
    float64; bounded whatever the history's length), each chunk one rank-k
    update (dsyrk; C order's lower triangle is BLAS's upper one) and one
    dgemv. A power user's primal system (5,000 ratings, 100 factors) took
    19 ms by the scalar loop this replaced."""
    cdef int i, a, k, start
    cdef const float* q
    cdef double* z
    cdef double one = 1.0
    cdef int inc = 1
    cdef char upper = b"U"
    cdef char notrans = b"N"
    start = 0
    while start < n:
        k = min(<int>GRAM_CHUNK, n - start)
        for i in range(k):
            q = &QV[IV[start + i], 0]
            z = zbuf + <Py_ssize_t>i * f1
            z[0] = 1.0
            for a in range(1, f1):
                z[a] = q[a - 1]
        dsyrk(&upper, &notrans, &f1, &k, &one, zbuf, &f1, &one, K, &f1)
        if t != NULL:
            # (BLAS's declarations take no const: it only reads t)
            dgemv(&notrans, &f1, &k, &one, zbuf, &f1, <double*> (t + start), &inc, &one, x, &inc)
        start += k


def _ridge_inputs(Q, bias, items, ratings):
    """The checks ridge_user and ridge_pull share: Q float32 (rows, f), bias
    float32 one per row, int32 items inside Q's rows, one rating each (a 1-d
    array). Returns the ratings as contiguous float64."""
    check_array(Q, "Q", np.float32, 2)
    check_array(bias, "bias", np.float32, 1)
    check_array(items, "items", np.int32, 1)
    if not isinstance(ratings, np.ndarray) or ratings.ndim != 1:
        raise TypeError("ratings: expected a 1-d numpy array")
    ratings = np.ascontiguousarray(ratings, dtype=np.float64)
    if ratings.shape[0] != items.shape[0]:
        raise ValueError(f"ratings: length {ratings.shape[0]}, expected {items.shape[0]} (items)")
    if bias.shape[0] != Q.shape[0]:
        raise ValueError(f"bias: length {bias.shape[0]}, expected {Q.shape[0]} (Q's rows)")
    cdef const int[::1] IV = items
    cdef int rows = <int>Q.shape[0]
    cdef Py_ssize_t i
    for i in range(IV.shape[0]):
        if not 0 <= IV[i] < rows:
            raise ValueError(f"items: {IV[i]} outside [0, {rows})")
    return ratings


def ridge_user(Q, bias, double mu, items, ratings, double reg, extra=None):
    """Biased MF's fold-in for one user: w = [b_u, p_u] minimising
    sum (r - mu - b_i - b_u - q_i.p)^2 + reg n (b_u^2 + |p|^2) over the n
    rated `items`, z_i = [1, q_i]. With reg > 0 and fewer ratings than f + 1
    unknowns (a cold request's history) through the n x n dual system
    (Z Z^T + reg n I) a = t, w = Z^T a; otherwise the primal
    (Z^T Z + reg n I) w = Z^T t; both built by BLAS and solved by LAPACK's
    Cholesky (dposv) in float64, in one call without numpy's temporaries
    (bench/bench_foldin.py: 0.3-0.75 of numpy's time from 10 to 20,000 ratings).
    extra: float64 (f + 1,) added to the right-hand side, (Z^T Z + s I) w =
    Z^T t + e (a known user's update from their trained w); the dual solves
    it as (Z Z^T + s I) a = t - Z e / s, w = Z^T a + e / s (Woodbury).
    items: int32 ids (rows of Q and bias), ratings: float32 or float64.
    Returns float64 (f + 1,); ValueError when the system is not positive
    definite (reg 0 with too few ratings)."""
    ratings = _ridge_inputs(Q, bias, items, ratings)
    if reg < 0:
        raise ValueError(f"reg: must be >= 0, got {reg}")
    cdef bint has_extra = extra is not None
    if has_extra:
        check_array(extra, "extra", np.float64, 1)
        if extra.shape[0] != Q.shape[1] + 1:
            raise ValueError(f"extra: length {extra.shape[0]}, expected {Q.shape[1] + 1}")
    else:
        extra = np.zeros(1, np.float64)
    cdef const double[::1] EV = extra
    cdef const float[:, ::1] QV = Q
    cdef const float[::1] BV = bias
    cdef const int[::1] IV = items
    cdef const double[::1] RV = ratings
    cdef int n = <int>items.shape[0], f1 = <int>Q.shape[1] + 1, i, a
    cdef double shift = reg * (n if n > 0 else 1), acc
    cdef bint dual = shift > 0 and 0 < n < f1
    cdef int m = n if dual else f1
    sys_ = np.zeros((m, m), np.float64)
    rhs = np.zeros(m, np.float64)
    w = np.zeros(f1, np.float64)
    t = np.empty(max(n, 1), np.float64)
    # The rows z_i gathered in float64: all n for the dual (n < f + 1), else
    # GRAM_CHUNK at a time.
    zb = np.empty((n if dual else min(max(n, 1), GRAM_CHUNK)) * f1, np.float64)
    cdef double[:, ::1] K = sys_
    cdef double[::1] X = rhs
    cdef double[::1] W = w
    cdef double[::1] T = t
    cdef double* kp = &K[0, 0]
    cdef double[::1] ZB = zb
    cdef double* zp = &ZB[0]
    cdef double* z
    cdef const float* q
    cdef double one = 1.0, zero = 0.0
    cdef int inc = 1, nrhs = 1, info = 0
    cdef char upper = b"U"
    cdef char notrans = b"N"
    cdef char trans = b"T"
    with nogil:
        for i in range(n):
            T[i] = RV[i] - mu - BV[IV[i]]
            if has_extra and dual:  # t - Z e / s
                acc = EV[0]
                for a in range(1, f1):
                    acc = acc + QV[IV[i], a - 1] * EV[a]
                T[i] -= acc / shift
        if dual:
            # K = Z Z^T + shift I, X = t. Z (n x f1, C order) is BLAS's Z^T
            # (f1 x n), so Z Z^T is its transposed rank-f1 update; C order's
            # lower triangle is BLAS's upper one (here and in dposv).
            for i in range(n):
                q = &QV[IV[i], 0]
                z = zp + <Py_ssize_t>i * f1
                z[0] = 1.0
                for a in range(1, f1):
                    z[a] = q[a - 1]
            dsyrk(&upper, &trans, &n, &f1, &one, zp, &f1, &zero, kp, &n)
            for i in range(n):
                K[i, i] += shift
                X[i] = T[i]
        else:
            # K = Z^T Z + shift I (lower triangle), X = Z^T t (+ e)
            gram_z(QV, IV, n, f1, zp, kp, &T[0], &X[0])
            for a in range(f1):
                K[a, a] += shift
                if has_extra:
                    X[a] += EV[a]
        dposv(&upper, &m, &nrhs, kp, &m, &X[0], &m, &info)
        if info == 0:
            if dual:
                # w = Z^T a (+ e / s)
                dgemv(&notrans, &f1, &n, &one, zp, &f1, &X[0], &inc, &zero, &W[0], &inc)
                if has_extra:
                    for a in range(f1):
                        W[a] += EV[a] / shift
            else:
                for a in range(f1):
                    W[a] = X[a]
    if info != 0:
        raise ValueError("the fold-in system is not positive definite (raise reg)")
    return w


def ridge_pull(Q, bias, double mu, items, ratings, w, double reg):
    """Z^T (Z w - t) + reg n w over the n rated `items` (z_i = [1, q_i],
    t_i = r_i - mu - b_i; n counts as 1 when 0): at w, the half gradient of
    the objective ridge_user minimises, (Z^T Z + reg n I) w - Z^T t. A known
    user's update puts it, at their trained w, on the right-hand side of
    ridge_user (extra). One pass, no numpy temporaries (numpy's gather,
    products and sums cost ~70 us on a 100-factor row of 50 ratings).
    items: int32, ratings: float32 or float64 (used as given: clip first),
    w: float64 (f + 1,). Returns float64 (f + 1,)."""
    ratings = _ridge_inputs(Q, bias, items, ratings)
    check_array(w, "w", np.float64, 1)
    if w.shape[0] != Q.shape[1] + 1:
        raise ValueError(f"w: length {w.shape[0]}, expected {Q.shape[1] + 1}")
    cdef const float[:, ::1] QV = Q
    cdef const float[::1] BV = bias
    cdef const int[::1] IV = items
    cdef const double[::1] RV = ratings
    cdef const double[::1] WV = w
    cdef int n = <int>items.shape[0], f1 = <int>Q.shape[1] + 1, i, a
    out = np.zeros(f1, np.float64)
    cdef double[::1] O = out
    cdef double r, shift = reg * (n if n > 0 else 1)
    cdef const float* q
    with nogil:
        for i in range(n):
            q = &QV[IV[i], 0]
            r = WV[0] - (RV[i] - mu - BV[IV[i]])
            for a in range(1, f1):
                r = r + q[a - 1] * WV[a]
            O[0] += r
            for a in range(1, f1):
                O[a] += r * q[a - 1]
        for a in range(f1):
            O[a] += shift * WV[a]
    return out


def predictive_quad(Q, seen, items, double reg):
    """z_j^T A^-1 z_j for each item j, z = [1, q] (float64), where A = sum over
    the seen items of z z^T + reg * max(len(seen), 1) * I: the quadratic form
    of Bayesian MF's predictive std for one user, by one Cholesky factor and a
    forward substitution per item, without numpy's per-call overhead.
    Returns float64 (len(items),); raises LinAlgError-like ValueError when A
    is not positive definite (reg 0 with too few ratings)."""
    check_array(Q, "Q", np.float32, 2)
    check_array(seen, "seen", np.int32, 1)
    check_array(items, "items", np.int64, 1)
    cdef Py_ssize_t n_items = Q.shape[0]
    cdef int f = <int> Q.shape[1] + 1
    cdef const float[:, ::1] QV = Q
    cdef const int[::1] S = seen
    cdef const long long[::1] I = items
    cdef Py_ssize_t t
    for t in range(S.shape[0]):
        if not 0 <= S[t] < n_items:
            raise IndexError(f"seen: {S[t]} outside [0, {n_items})")
    for t in range(I.shape[0]):
        if not 0 <= I[t] < n_items:
            raise IndexError(f"items: {I[t]} outside [0, {n_items})")
    L = np.zeros((f, f), np.float64)
    out = np.empty(I.shape[0], np.float64)
    z = np.empty(f, np.float64)
    cdef double[:, ::1] A = L
    cdef double[::1] O = out
    cdef double[::1] Z = z
    zb = np.empty(min(max(S.shape[0], 1), GRAM_CHUNK) * f, np.float64)
    cdef double[::1] ZB = zb
    cdef double* zp = &ZB[0]
    cdef int a, c
    cdef double acc, shift = reg * (S.shape[0] if S.shape[0] > 0 else 1)
    cdef bint ok = True
    with nogil:
        gram_z(QV, S, <int>S.shape[0], f, zp, &A[0, 0], NULL, NULL)  # lower triangle
        for a in range(f):
            A[a, a] += shift
        ok = cholesky_lower(&A[0, 0], f)
        if ok:
            for t in range(I.shape[0]):
                # Solve L y = z; the quad form is |y|^2.
                acc = 0.0
                for a in range(f):
                    Z[a] = (1.0 if a == 0 else QV[I[t], a - 1])
                    for c in range(a):
                        Z[a] -= A[a, c] * Z[c]
                    Z[a] /= A[a, a]
                    acc += Z[a] * Z[a]
                O[t] = acc
    if not ok:
        raise ValueError("A: not positive definite (raise reg)")
    return out
