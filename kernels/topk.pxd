# Top-k selection shared by every scoring kernel (similarity and factorization
# models alike): one heap-based partial selection, deterministic tie-break
# (higher score first, then lower item index), NaN scores never selected.
# `mask` is per-thread scratch: a nonzero byte excludes that item.
# The heap primitives are defined here (inline) so every kernel that keeps
# its own heaps compiles them in place instead of calling across modules.

cdef inline bint worse(float sa, int ia, float sb, int ib) noexcept nogil:
    """True when (sa, ia) ranks below (sb, ib): lower score, or equal score and higher index."""
    return sa < sb or (sa == sb and ia > ib)


cdef inline void sift_down(int* hi, float* hv, int size, int pos) noexcept nogil:
    cdef int child
    cdef int ti = hi[pos]
    cdef float tv = hv[pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and worse(hv[child + 1], hi[child + 1], hv[child], hi[child]):
            child += 1
        if worse(hv[child], hi[child], tv, ti):
            hi[pos] = hi[child]
            hv[pos] = hv[child]
            pos = child
        else:
            break
    hi[pos] = ti
    hv[pos] = tv


cdef inline void sift_up(int* hi, float* hv, int pos) noexcept nogil:
    cdef int parent
    cdef int ti = hi[pos]
    cdef float tv = hv[pos]
    while pos > 0:
        parent = (pos - 1) // 2
        if worse(tv, ti, hv[parent], hi[parent]):
            hi[pos] = hi[parent]
            hv[pos] = hv[parent]
            pos = parent
        else:
            break
    hi[pos] = ti
    hv[pos] = tv


cdef inline int heap_offer(int* hi, float* hv, int size, int k, int item, float s) noexcept nogil:
    """Offer one candidate to a heap holding the `size` best so far; return the new size."""
    if size < k:
        hi[size] = item
        hv[size] = s
        sift_up(hi, hv, size)
        return size + 1
    if worse(hv[0], hi[0], s, item):
        hi[0] = item
        hv[0] = s
        sift_down(hi, hv, size, 0)
    return size


cdef inline int heap_drain(int* hi, float* hv, int size, int* out_idx, float* out_val) noexcept nogil:
    """Write the heap's items best-first into out_*; return how many."""
    cdef int m = size
    while size > 0:
        size -= 1
        out_idx[size] = hi[0]
        out_val[size] = hv[0]
        hi[0] = hi[size]
        hv[0] = hv[size]
        sift_down(hi, hv, size, 0)
    return m


cdef int select_topk(const float* scores, int n, int k, unsigned char* mask,
                     const int* cand, int n_cand,
                     int* heap_idx, float* heap_val,
                     int* out_idx, float* out_val) noexcept nogil

cdef int walk_ranked(const int* order, const float* scores, int n, int k,
                     unsigned char* mask, int* out_idx, float* out_val) noexcept nogil

cdef void mark(unsigned char* mask, const int* items, long long start, long long stop,
               int n, unsigned char value) noexcept nogil
