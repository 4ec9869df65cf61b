# OpenMP facts available whether or not the kernels were compiled with OpenMP.
# setup.py falls back to a serial build when the compiler lacks OpenMP; then
# these report one thread and prange runs serially. Also the prefetch hints the
# kernels share (no-ops on compilers without __builtin_prefetch).

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int recserve_max_threads(void) { return omp_get_max_threads(); }
    static int recserve_have_openmp(void) { return 1; }
    #else
    static int recserve_max_threads(void) { return 1; }
    static int recserve_have_openmp(void) { return 0; }
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
