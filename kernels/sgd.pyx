# Stochastic gradient descent for explicit biased matrix factorization (the
# model Surprise calls SVD): prediction mu + b_u + b_i + p_u . q_i, squared
# error with L2 on biases and factors, one update per rating. One thread is
# deterministic (the caller's order); more threads run Hogwild (lock-free,
# nondeterministic), which SGD tolerates on sparse data.
import numpy as np

from cython.parallel cimport prange

from kernels.parallel cimport resolve_threads

from kernels.topk import check_array


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
    """
    float recserve_dot(const float* x, const float* y, int f) noexcept nogil
    void recserve_sgd_update(float* p, float* q, int f, float err, float lr,
                             float reg) noexcept nogil


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
