# Top-k selection shared by every scoring kernel (similarity and factorization
# models alike): one heap-based partial selection, deterministic tie-break
# (higher score first, then lower item index), NaN scores never selected.
# `mask` is per-thread scratch: a nonzero byte excludes that item.

cdef int select_topk(const float* scores, int n, int k, unsigned char* mask,
                     const int* cand, int n_cand,
                     int* heap_idx, float* heap_val,
                     int* out_idx, float* out_val) noexcept nogil

cdef int walk_ranked(const int* order, const float* scores, int n, int k,
                     unsigned char* mask, int* out_idx, float* out_val) noexcept nogil

cdef void mark(unsigned char* mask, const int* items, long long start, long long stop,
               int n, unsigned char value) noexcept nogil
