"""This machine's limits: float32 FLOP/s (the FMA units' peak, and what a BLAS matmul sustains)
and memory read bandwidth.

FMA peak: registers-only chains of fused multiply-adds on the compiled kernels' threads
(native/peak.c): the ceiling no float32 kernel passes (None without the compiled kernels).
Matmul: NumPy's BLAS on square float32 matrices, best of a few runs (the sustained peak, not an
average with warm-up): what a well-tuned kernel with real loads and stores reaches.
Bandwidth: a compiled, vectorized sum over an array much larger than the last-level cache, split
across threads: the access pattern of decode, which streams K, V and the weights once per token;
the better of two readers (numba's, and native/peak.c's on the kernels' own pool).
Each is measured with one thread and with all threads, best of REPS runs, with its spread (how
far the median run fell below the best). A roofline that contradicts itself (all threads below
one, a matmul above the FMA peak, a spread over MAX_SPREAD: a busy machine) is measured again
once; if it still does, it is kept with `warnings`, which every command that uses it repeats.
"""

import datetime
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np

log = logging.getLogger(__name__)

REPS = 5
MAX_SPREAD = 0.20
_parallel_sum = None


def _numba_sum():
    """numba's reader, compiled on first use (importing numba costs ~0.5 s: only when measuring)."""
    global _parallel_sum
    if _parallel_sum is None:
        from ..attention.jit import CACHE, nb

        @nb.njit(parallel=True, fastmath=True, cache=CACHE, nogil=True)
        def parallel_sum(x):
            """Sum of x in blocks of 16 Ki floats spread over the threads (vectorized loops)."""
            block = 16384
            n_blocks = x.shape[0] // block
            partial = np.zeros(n_blocks, np.float32)
            for p in nb.prange(n_blocks):
                total = np.float32(0.0)
                for i in range(p * block, (p + 1) * block):
                    total += x[i]
                partial[p] = total
            return partial.sum()
        _parallel_sum = parallel_sum
    return _parallel_sum


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
    spread: dict = field(default_factory=dict)  # figure -> (best - median) / best of its runs
    reps: int = REPS


def peak_gflops(roofline: dict) -> float:
    """The FLOP/s ceiling every efficiency and 'of roofline' figure is a share of: the FMA peak
    (no float32 kernel passes it), or the BLAS matmul's where the compiled kernels are not built."""
    return roofline.get("fma_gflops") or roofline["matmul_gflops"]


def best_and_spread(rates: list) -> tuple[float, float]:
    """The best of several runs' rates (higher is better) and how far their median fell below it."""
    best = max(rates)
    return best, (best - statistics.median(rates)) / best


def blas_description() -> str:
    from threadpoolctl import threadpool_info

    libs = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')} kernel, "
            f"{i.get('num_threads')} threads)" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    return "; ".join(libs) or "unknown BLAS"


def _times(fn, reps) -> list:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def matmul_gflops(n=2048, reps=REPS, threads=None, samples=False):
    """NumPy's BLAS on (n, n) float32 matrices: the best run's GFLOP/s (samples: every run's)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        a @ a
        rates = [2.0 * n**3 / t / 1e9 for t in _times(lambda: a @ a, reps)]
    return rates if samples else max(rates)


def read_gbs(nbytes=512 << 20, reps=REPS, threads=None, samples=False):
    """The better of numba's reader and the compiled one (when built): the best pass's GB/s
    (samples: every pass of the better reader)."""
    from .. import native
    from ..attention import jit
    from ..attention.jit import nb

    parallel_sum = _numba_sum()
    x = np.ones(nbytes // 4, np.float32)
    threads = threads or nb.config.NUMBA_NUM_THREADS
    with jit.parallel_lock:
        old = nb.get_num_threads()
        nb.set_num_threads(min(threads, nb.config.NUMBA_NUM_THREADS))
        try:
            parallel_sum(x)
            rates = [nbytes / t / 1e9 for t in _times(lambda: parallel_sum(x), reps)]
        finally:
            nb.set_num_threads(old)
    del x
    if native.available():
        compiled = native.read_gbs(threads, nbytes, reps, samples=True)
        if max(compiled) > max(rates):
            rates = compiled
    return rates if samples else max(rates)


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
    for name, spread in (r.spread or {}).items():
        if spread > MAX_SPREAD:
            found.append(f"{name.replace('_', ' ')}: the median of {r.reps} runs is "
                         f"{100 * spread:.0f}% below the best (over {100 * MAX_SPREAD:.0f}%: "
                         "the machine was busy)")
    return found


def age(date: str, now: datetime.datetime | None = None) -> str:
    """How long ago an ISO date was: '3 h ago', '12 days ago'."""
    then = datetime.datetime.fromisoformat(date)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    s = max(0.0, (now - then).total_seconds())
    for unit, length in (("day", 86400), ("h", 3600), ("min", 60)):
        if s >= length:
            n = round(s / length)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''} ago"
    return "just now"


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
    for attempt in range(2):
        # BLAS last: OpenBLAS's threads spin for a while after a matmul, and an FMA loop or a
        # reader run then on the same cores read 40% low (a 336 GFLOP/s peak measured at 194)
        runs = {}
        if native.available():
            runs["fma_gflops"] = native.fma_gflops(threads, reps=REPS, samples=True)
            runs["fma_gflops_1t"] = native.fma_gflops(1, reps=REPS, samples=True)
        runs["read_gbs"] = read_gbs(threads=threads, samples=True)
        runs["read_gbs_1t"] = read_gbs(threads=1, samples=True)
        runs["matmul_gflops"] = matmul_gflops(threads=threads, samples=True)
        runs["matmul_gflops_1t"] = matmul_gflops(threads=1, samples=True)
        best = {k: best_and_spread(v) for k, v in runs.items()}
        r = Roofline(fma_gflops=best["fma_gflops"][0] if "fma_gflops" in best else None,
                     fma_gflops_1t=best["fma_gflops_1t"][0] if "fma_gflops_1t" in best else None,
                     matmul_gflops=best["matmul_gflops"][0],
                     matmul_gflops_1t=best["matmul_gflops_1t"][0], read_gbs=best["read_gbs"][0],
                     read_gbs_1t=best["read_gbs_1t"][0], threads=threads, blas=blas_description(),
                     isa=native.isa(), warnings=[],
                     spread={k: round(v[1], 4) for k, v in best.items()})
        r.warnings = contradictions(r)
        if not r.warnings:
            break
        log.warning("roofline contradicts itself (%s): %s", "measuring again" if attempt == 0
                    else "kept with a warning", "; ".join(r.warnings))
    log.info("roofline: %s", asdict(r))
    return r
