# OpenMP facts available whether or not the kernels were compiled with OpenMP.
# setup.py falls back to a serial build when the compiler lacks OpenMP; then
# these report one thread and prange runs serially. Also the C helpers the
# kernels share: prefetch hints (no-ops on compilers without
# __builtin_prefetch), the AVX2/baseline clone attribute and a vector dot.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static inline int recserve_max_threads(void) { return omp_get_max_threads(); }
    static inline int recserve_have_openmp(void) { return 1; }
    #else
    static inline int recserve_max_threads(void) { return 1; }
    static inline int recserve_have_openmp(void) { return 0; }
    #endif
    #if defined(__GNUC__) || defined(__clang__)
    #define recserve_prefetch(p) __builtin_prefetch((p), 0, 1)
    #define recserve_prefetch_keep(p) __builtin_prefetch((p), 0, 3)
    #define recserve_prefetch_write(p) __builtin_prefetch((p), 1, 3)
    #else
    #define recserve_prefetch(p) ((void)0)
    #define recserve_prefetch_keep(p) ((void)0)
    #define recserve_prefetch_write(p) ((void)0)
    #endif
    /* Hot loops built twice on x86-64 Linux with GCC: for AVX2/FMA and for
       baseline x86-64, picked at load time (the wheel targets baseline, and
       GCC vectorises a float reduction only with explicit accumulators). */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define RECSERVE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
    #else
    #define RECSERVE_CLONES
    #endif
    /* The helpers must be inlined into each clone to be built for its target. */
    #if defined(__GNUC__) || defined(__clang__)
    #define RS_INLINE static inline __attribute__((always_inline))
    #else
    #define RS_INLINE static inline
    #endif

    /* a . b. With GCC/Clang vector types: four 8-float accumulators, so the
       multiply-adds do not wait on each other (one accumulator, what a simd
       reduction gives without -ffast-math, made 16 of them wait in a row at
       128 factors). */
    #if defined(__GNUC__) || defined(__clang__)
    typedef float rs_v8 __attribute__((vector_size(32), aligned(4)));
    RS_INLINE float recserve_sdot(const float *restrict a, const float *restrict b, int f) {
        rs_v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        int k = 0;
        for (; k + 32 <= f; k += 32) {
            s0 += *(const rs_v8 *)(a + k) * *(const rs_v8 *)(b + k);
            s1 += *(const rs_v8 *)(a + k + 8) * *(const rs_v8 *)(b + k + 8);
            s2 += *(const rs_v8 *)(a + k + 16) * *(const rs_v8 *)(b + k + 16);
            s3 += *(const rs_v8 *)(a + k + 24) * *(const rs_v8 *)(b + k + 24);
        }
        for (; k + 8 <= f; k += 8) s0 += *(const rs_v8 *)(a + k) * *(const rs_v8 *)(b + k);
        rs_v8 t = (s0 + s1) + (s2 + s3);
        float s = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
        for (; k < f; k++) s += a[k] * b[k];
        return s;
    }
    #else
    RS_INLINE float recserve_sdot(const float *restrict a, const float *restrict b, int f) {
        float s = 0.0f;
        for (int k = 0; k < f; k++) s += a[k] * b[k];
        return s;
    }
    #endif

    """
    int recserve_max_threads() noexcept nogil
    int recserve_have_openmp() noexcept nogil
    # Read soon, once (a random row of a large array).
    void recserve_prefetch(const void* p) noexcept nogil
    # Read soon and again after (rows a CG solve reads at every step).
    void recserve_prefetch_keep(const void* p) noexcept nogil
    # Read and written soon (factor rows an SGD step updates).
    void recserve_prefetch_write(const void* p) noexcept nogil


cdef inline int resolve_threads(int requested) noexcept nogil:
    """Threads to use: `requested` when positive, else OpenMP's default."""
    if requested > 0:
        return requested
    return recserve_max_threads()


cdef inline int threads_for(int requested, Py_ssize_t rows) noexcept nogil:
    """resolve_threads capped at the number of rows: a one-row call (a single
    serving request) then runs on one thread instead of waking a whole team."""
    cdef int nt = resolve_threads(requested)
    if rows < nt:
        nt = <int> rows if rows > 0 else 1
    return nt
