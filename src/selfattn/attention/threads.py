"""How many cores the kernels use, and the thread pool the prefill path runs on."""

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}
_threads: int | None = None
_controller = None
_numba_threads: int | None = None  # what numba's pool was last sized to by us


def num_threads() -> int:
    """Cores the kernels may use: `set_num_threads`, else the cores this process may run on
    (read once: a decode step asks ~150 times)."""
    global _threads
    if _threads is None:
        _threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    return _threads


def set_num_threads(n: int) -> None:
    """Limit selfattn's kernels to n threads (the numba layer included: now if numba is loaded,
    else when its first kernel runs, so that setting a count does not import it)."""
    global _threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    _threads = n
    if "numba" in sys.modules:
        prepare_numba_threads()


def prepare_numba_threads():
    """Before the first parallel numba launch: make its OpenMP workers sleep, not spin, when idle.

    Spinning workers (libgomp's default) steal the cores from OpenBLAS's threads, and OpenBLAS's
    spinning threads steal them back, which made a model's decode step 10x slower. Set here,
    at the last moment, so that a process that never runs our decode path (a torch peer in a
    benchmark) keeps its own OpenMP settings. A user's OMP_WAIT_POLICY wins. Then numba's pool
    gets set_num_threads' count (numba.set_num_threads starts that pool: the setting comes first).
    """
    global _numba_threads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if _threads is not None and _numba_threads != _threads:
        from .jit import nb

        nb.set_num_threads(min(_threads, nb.config.NUMBA_NUM_THREADS))
        _numba_threads = _threads


def _in_child():
    """A forked child inherits the pools without their threads: new ones on first use."""
    global _lock, _pools
    _lock, _pools = threading.Lock(), {}


os.register_at_fork(after_in_child=_in_child)


def pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="selfattn")
        return _pools[workers]


@contextlib.contextmanager
def blas_single_threaded():
    """BLAS at one thread while our own threads each run a share of the matmuls."""
    global _controller
    if _controller is None:
        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls this BLAS: limit it too)
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
