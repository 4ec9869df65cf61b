# OpenMP facts available whether or not the kernels were compiled with OpenMP.
# setup.py falls back to a serial build when the compiler lacks OpenMP; then
# these report one thread and prange runs serially.

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
    """
    int recserve_max_threads() noexcept nogil
    int recserve_have_openmp() noexcept nogil


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
