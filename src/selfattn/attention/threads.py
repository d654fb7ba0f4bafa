"""The thread pool the prefill path runs on, numba's and BLAS's threads, and (from selfattn.runtime)
how many cores the kernels use."""

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from .. import runtime
from ..runtime import num_threads, set_num_threads  # noqa: F401  (re-exported)

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}
_controller = None
_numba_threads: int | None = None  # what numba's pool was last sized to by us


def _numba_follows(n: int) -> None:
    """set_num_threads reaches the numba layer now if numba is loaded, else when its first
    kernel runs, so that setting a count does not import it."""
    if "numba" in sys.modules:
        prepare_numba_threads()


runtime.on_set_num_threads(_numba_follows)


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
    n = runtime._threads
    if n is not None and _numba_threads != n:
        from .jit import nb

        nb.set_num_threads(min(n, nb.config.NUMBA_NUM_THREADS))
        _numba_threads = n


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
