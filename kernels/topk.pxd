# Top-k selection shared by every scoring kernel (similarity and factorization
# models alike): one heap-based partial selection, deterministic tie-break
# (higher score first, then lower item index), NaN scores never selected.
# `mask` is per-thread scratch: a nonzero byte excludes that item.
# The heap, quickselect (nth_best), top-k buffer and dense-row primitives are
# defined here (inline) so every kernel that keeps its own candidates compiles
# them in place instead of calling across modules.

from libc.math cimport INFINITY, NAN


# Scores of a heap: float32 for model scores, float64 for blended sums.
ctypedef fused score_t:
    float
    double


cdef inline bint worse(score_t sa, int ia, score_t sb, int ib) noexcept nogil:
    """True when (sa, ia) ranks below (sb, ib): lower score, or equal score and higher index."""
    return sa < sb or (sa == sb and ia > ib)


cdef inline void sift_down(int* hi, score_t* hv, int size, int pos) noexcept nogil:
    cdef int child
    cdef int ti = hi[pos]
    cdef score_t tv = hv[pos]
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


cdef inline void sift_up(int* hi, score_t* hv, int pos) noexcept nogil:
    cdef int parent
    cdef int ti = hi[pos]
    cdef score_t tv = hv[pos]
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


cdef inline void swap_entries(int* ix, float* v, int a, int b) noexcept nogil:
    cdef int ti = ix[a]
    cdef float tv = v[a]
    ix[a] = ix[b]
    v[a] = v[b]
    ix[b] = ti
    v[b] = tv


cdef inline void nth_best(int* ix, float* v, int n, int kth) noexcept nogil:
    """Partial selection (quickselect, median-of-three pivot): afterwards
    position kth holds the (kth+1)-best entry, every entry before it ranks above
    it and every one after below. Entries are ordered as by `worse` (score, then
    lower index first); ids must be distinct, which makes the order total.

    The partition is Lomuto's without branches (every element is swapped with
    the boundary, which advances by the comparison's 0/1): on scores in no
    particular order a branching partition mispredicts every other element.
    """
    cdef int lo = 0, hi = n - 1, mid, a, store, xi, ti
    cdef float xv, tv, pv
    cdef int pi
    while hi > lo:
        mid = lo + (hi - lo) // 2
        if worse(v[lo], ix[lo], v[mid], ix[mid]):
            swap_entries(ix, v, lo, mid)
        if worse(v[lo], ix[lo], v[hi], ix[hi]):
            swap_entries(ix, v, lo, hi)
        if worse(v[mid], ix[mid], v[hi], ix[hi]):
            swap_entries(ix, v, mid, hi)
        swap_entries(ix, v, mid, hi)  # the median is the pivot, parked at hi
        pv = v[hi]
        pi = ix[hi]
        store = lo
        for a in range(lo, hi):
            xv = v[a]
            xi = ix[a]
            tv = v[store]
            ti = ix[store]
            v[store] = xv
            ix[store] = xi
            v[a] = tv
            ix[a] = ti
            store = store + ((xv > pv) | ((xv == pv) & (xi < pi)))
        swap_entries(ix, v, store, hi)
        if kth == store:
            return
        if kth < store:
            hi = store - 1
        else:
            lo = store + 1


cdef inline float nth_value(float* v, int n, int kth) noexcept nogil:
    """The (kth+1)-th largest of v[0..n) (no NaN; v is reordered): quickselect
    on the values alone, as nth_best without ids. Where only the value is
    needed (a sampled floor, a cut-off) this moves half the memory nth_best's
    (id, value) pairs do: 2.1 -> 0.9 us for a floor from 256 samples."""
    cdef int lo = 0, hi = n - 1, mid, a, store, eq
    cdef float x, t, pv
    while hi > lo:
        mid = lo + (hi - lo) // 2
        if v[lo] < v[mid]:
            t = v[lo]
            v[lo] = v[mid]
            v[mid] = t
        if v[lo] < v[hi]:
            t = v[lo]
            v[lo] = v[hi]
            v[hi] = t
        if v[mid] < v[hi]:
            t = v[mid]
            v[mid] = v[hi]
            v[hi] = t
        t = v[mid]  # the median is the pivot, parked at hi
        v[mid] = v[hi]
        v[hi] = t
        pv = t
        store = lo
        eq = 0
        for a in range(lo, hi):  # branch-free Lomuto, as nth_best
            x = v[a]
            v[a] = v[store]
            v[store] = x
            store = store + (x > pv)
            eq = eq + (x == pv)
        v[hi] = v[store]
        v[store] = pv
        if kth == store:
            return pv
        if kth < store:
            hi = store - 1
            continue
        lo = store + 1
        if eq:
            # Values equal to the pivot (without ids nothing orders them): moved
            # to the front of the lower part and settled at once; else a row of
            # ties (zeros in a sparse row) would shrink the range by one a pass.
            for a in range(lo, hi + 1):
                x = v[a]
                v[a] = v[lo]
                v[lo] = x
                lo = lo + (x == pv)
            if kth < lo:
                return pv
    return v[kth]


cdef inline float sample_floor(const float* row, const unsigned char* mask, int n, int r,
                               int q) noexcept nogil:
    """The q-th best of r (<= 256) evenly spaced entries of a row (entry
    floor(a n / r) for a < r; NaN, and entries with a nonzero mask byte when
    mask is not NULL, as -inf): a floor about q n / r entries reach. The
    positions are stepped with a remainder instead of one 64-bit division
    each, which cost more than the rest of the sample."""
    cdef float sv[256]
    cdef int a, step = n // r, rem = n % r, acc = 0, at = 0
    cdef float x
    for a in range(r):
        x = row[at]
        if mask != NULL and mask[at]:
            x = -INFINITY
        sv[a] = x if x == x else -INFINITY  # NaN ranks last
        at = at + step
        acc = acc + rem
        if acc >= r:
            acc = acc - r
            at = at + 1
    return nth_value(sv, r, q - 1)


cdef inline int buffer_offer(int* bi, float* bv, int size, int cap, int k, int item, float s,
                             float* floor_v, int* floor_i) noexcept nogil:
    """Append a candidate to a top-k buffer of `cap` (> k) slots; return the new size.

    The caller has checked that (s, item) beats the buffer's floor. A full
    buffer is cut back to its k best by one partial selection and the floor
    rises to the k-th best, so each offer costs O(1) amortised instead of a
    heap's log(k) sift with its unpredictable branches. Until the first cut
    the floor is (-inf, INT_MAX): every candidate enters.
    """
    bi[size] = item
    bv[size] = s
    size += 1
    if size == cap:
        nth_best(bi, bv, cap, k - 1)
        floor_v[0] = bv[k - 1]
        floor_i[0] = bi[k - 1]
        size = k
    return size


cdef inline int drain_best(int* ix, float* v, int size, int k, int* out_idx,
                           float* out_val) noexcept nogil:
    """Write the best min(size, k) of the `size` entries best-first into out_*
    (entries are reordered in place); return how many were written."""
    cdef int p
    cdef int a, b, ti
    cdef float tv
    if size > k:
        nth_best(ix, v, size, k - 1)
        size = k
    if size <= 128:
        # Insertion sort: about size^2/4 cheap, predictable moves, where a
        # heap sort pays ~2 size log(size) mispredicted comparisons.
        for a in range(size):
            ti = ix[a]
            tv = v[a]
            b = a
            while b > 0 and worse(v[b - 1], ix[b - 1], tv, ti):
                ix[b] = ix[b - 1]
                v[b] = v[b - 1]
                b -= 1
            ix[b] = ti
            v[b] = tv
        for a in range(size):
            out_idx[a] = ix[a]
            out_val[a] = v[a]
        return size
    p = size // 2 - 1
    while p >= 0:
        sift_down(ix, v, size, p)
        p -= 1
    return heap_drain(ix, v, size, out_idx, out_val)


cdef inline int best_of_row(const float* row, const int* ids, int n, int k, int* ci, float* cv,
                            int* out_idx, float* out_val) noexcept nogil:
    """Write the best min(valid, k) entries of a dense row best-first into out_*
    (ids[j] names entry j and breaks ties; NaN marks no entry); return how many.

    The k-th best score of an evenly spaced sample sets a floor that about 2k
    entries reach; one branch-free pass gathers those into the scratch ci/cv
    (n slots). If at least k were gathered the floor was not above the true
    k-th best, so the gathered entries hold the answer; otherwise every valid
    entry is gathered.
    """
    cdef int r = 256 if n > 256 else n
    cdef int q = <int>((2 * <long long>k * r) // n) + 1 if n > 0 else 1
    cdef int j, m = 0
    cdef float tv
    if q < r:
        tv = sample_floor(row, NULL, n, r, q)
        for j in range(n):  # NaN fails the comparison: never gathered
            ci[m] = ids[j]
            cv[m] = row[j]
            m = m + (row[j] >= tv)
    if m < k:
        m = 0
        for j in range(n):
            ci[m] = ids[j]
            cv[m] = row[j]
            m = m + (row[j] == row[j])
    return drain_best(ci, cv, m, k, out_idx, out_val)


cdef int select_topk(const float* scores, int n, int k, unsigned char* mask,
                     const int* cand, int n_cand,
                     int* heap_idx, float* heap_val,
                     int* out_idx, float* out_val) noexcept nogil

cdef int walk_ranked(const int* order, const float* scores, int n, int k,
                     unsigned char* mask, int* out_idx, float* out_val) noexcept nogil

cdef void mark(unsigned char* mask, const int* items, long long start, long long stop,
               int n, unsigned char value) noexcept nogil


cdef inline void nan_at(float* out, const int* items, long long start, long long stop,
                        int n) noexcept nogil:
    """out[items[start:stop]] = NaN (not eligible), ignoring out-of-range ids."""
    cdef long long j
    cdef int item
    cdef float nan = NAN
    for j in range(start, stop):
        item = items[j]
        if 0 <= item < n:
            out[item] = nan
