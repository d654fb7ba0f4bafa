"""This machine's limits: float32 FLOP/s (the FMA units' peak, and what a BLAS matmul sustains)
and memory read bandwidth.

FMA peak: registers-only chains of fused multiply-adds on the compiled kernels' threads
(native/peak.c): the ceiling no float32 kernel passes (None without the compiled kernels).
Matmul: NumPy's BLAS on square float32 matrices, best of a few runs (the sustained peak, not an
average with warm-up): what a well-tuned kernel with real loads and stores reaches.
Bandwidth: a compiled, vectorized sum over an array much larger than the last-level cache, split
across threads: the access pattern of decode, which streams K, V and the weights once per token;
the better of two readers (numba's, and native/peak.c's on the kernels' own pool).
Each is measured with one thread and with all threads, best of several runs. A roofline that
contradicts itself (all threads below one, a matmul above the FMA peak) is measured again once;
if it still does, it is kept with `warnings`, which every command that uses it repeats.
"""

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..attention import jit
from ..attention.jit import CACHE, nb

log = logging.getLogger(__name__)


@nb.njit(parallel=True, fastmath=True, cache=CACHE, nogil=True)
def _parallel_sum(x):
    """Sum of x in blocks of 16 Ki floats spread over the threads (vectorized inner loops)."""
    block = 16384
    n_blocks = x.shape[0] // block
    partial = np.zeros(n_blocks, np.float32)
    for p in nb.prange(n_blocks):
        total = np.float32(0.0)
        for i in range(p * block, (p + 1) * block):
            total += x[i]
        partial[p] = total
    return partial.sum()


@dataclass
class Roofline:
    fma_gflops: float | None  # all threads; None without the compiled kernels
    fma_gflops_1t: float | None
    matmul_gflops: float  # all threads
    matmul_gflops_1t: float
    read_gbs: float  # all threads
    read_gbs_1t: float
    threads: int
    blas: str  # which BLAS and kernel ran the matmul
    isa: str  # the compiled kernels' instruction-set level (native.isa()): the FMA peak's width
    warnings: list  # contradictions that survived a second measurement


def blas_description() -> str:
    from threadpoolctl import threadpool_info

    libs = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')} kernel, "
            f"{i.get('num_threads')} threads)" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    return "; ".join(libs) or "unknown BLAS"


def _best(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_gflops(n=2048, reps=5, threads=None) -> float:
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        a @ a
        t = _best(lambda: a @ a, reps)
    return 2.0 * n**3 / t / 1e9


def read_gbs(nbytes=512 << 20, reps=5, threads=None) -> float:
    """The better of numba's reader and the compiled one (when built)."""
    from .. import native

    x = np.ones(nbytes // 4, np.float32)
    threads = threads or nb.config.NUMBA_NUM_THREADS
    with jit.parallel_lock:
        old = nb.get_num_threads()
        nb.set_num_threads(min(threads, nb.config.NUMBA_NUM_THREADS))
        try:
            _parallel_sum(x)
            t = _best(lambda: _parallel_sum(x), reps)
        finally:
            nb.set_num_threads(old)
    del x
    gbs = nbytes / t / 1e9
    if native.available():
        gbs = max(gbs, native.read_gbs(threads, nbytes, reps))
    return gbs


def contradictions(r: "Roofline") -> list[str]:
    """What cannot be right in a roofline (a busy moment during the measurement, usually)."""
    found = []
    if r.threads > 1 and r.read_gbs < r.read_gbs_1t:
        found.append(f"read bandwidth on {r.threads} threads ({r.read_gbs:.1f} GB/s) is below "
                     f"one thread's ({r.read_gbs_1t:.1f})")
    if r.threads > 1 and r.matmul_gflops < r.matmul_gflops_1t:
        found.append(f"matmul on {r.threads} threads ({r.matmul_gflops:.0f} GFLOP/s) is below "
                     f"one thread's ({r.matmul_gflops_1t:.0f})")
    if r.fma_gflops is not None and r.matmul_gflops > r.fma_gflops:
        found.append(f"matmul ({r.matmul_gflops:.0f} GFLOP/s) is above the FMA peak "
                     f"({r.fma_gflops:.0f})")
    return found


def load_or_measure(refresh: bool = False) -> tuple[dict, bool]:
    """This machine's roofline as a dict (with 'date' and 'cpu'), from the cache unless refresh
    or none is stored; -> (roofline, measured_now)."""
    from . import store

    if not refresh:
        stored = store.load("roofline")
        # a record from before a field was added, or of another level, is measured again
        if (stored is not None and all(f in stored for f in Roofline.__dataclass_fields__)
                and stored["isa"] == _level()):
            return stored, False
    record = dict(asdict(measure()), cpu=store.cpu_name())
    store.save("roofline", record)
    return store.load("roofline") or record, True


def _level() -> str:
    from .. import native

    return native.isa()


def measure(threads=None) -> Roofline:
    from .. import native
    from ..runtime import num_threads

    threads = threads or num_threads()
    fma = native.fma_gflops if native.available() else (lambda n: None)
    for attempt in range(2):
        # BLAS last: OpenBLAS's threads spin for a while after a matmul, and an FMA loop or a
        # reader run then on the same cores read 40% low (a 336 GFLOP/s peak measured at 194)
        fma_all, fma_1 = fma(threads), fma(1)
        read_all, read_1 = read_gbs(threads=threads), read_gbs(threads=1)
        r = Roofline(fma_gflops=fma_all, fma_gflops_1t=fma_1,
                     matmul_gflops=matmul_gflops(threads=threads),
                     matmul_gflops_1t=matmul_gflops(threads=1), read_gbs=read_all,
                     read_gbs_1t=read_1, threads=threads, blas=blas_description(),
                     isa=native.isa(), warnings=[])
        r.warnings = contradictions(r)
        if not r.warnings:
            break
        log.warning("roofline contradicts itself (%s): %s", "measuring again" if attempt == 0
                    else "kept with a warning", "; ".join(r.warnings))
    log.info("roofline: %s", asdict(r))
    return r
