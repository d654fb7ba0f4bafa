"""The quadratic wall, measured: attention time and peak memory as the sequence length doubles.

The reference builds the n x n score matrix (memory and time grow as n²); the flash path never
does (memory grows as n, time still as n² because every pair is scored). Each point is the
median of a few runs, after one untimed run that compiles and warms the caches.
"""

import time
from dataclasses import dataclass

import numpy as np

from ..attention import attention
from .memory import peak_memory


@dataclass
class WallPoint:
    n: int
    impl: str
    median_s: float
    peak_bytes: int  # extra memory during one call, measured
    pairs: int  # (query, key) pairs scored: n(n+1)/2 per head, causal
    gflops: float  # 4 · pairs · D · H over the median time


def _time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def quadratic_wall(ns, heads=1, kv_heads=1, dim=64, reference_max_n=4096, reps=3, seed=0):
    """Yield WallPoints for causal self-attention at each n, float32 inputs: flash at every n
    first, then the reference (up to reference_max_n). In that order because the reference's
    BLAS threads keep spinning for a while after each call and took the cores from a flash call
    timed right after one (the demo's 1024 row read 24 ms where the benchmark gives 13)."""
    for impl in ("flash", "reference"):
        for n in ns:
            if impl == "reference" and n > reference_max_n:
                continue
            rng = np.random.default_rng((seed, n))  # the same inputs for both
            q = rng.standard_normal((1, heads, n, dim), np.float32)
            k = rng.standard_normal((1, kv_heads, n, dim), np.float32)
            v = rng.standard_normal((1, kv_heads, n, dim), np.float32)
            pairs = heads * n * (n + 1) // 2
            call = lambda: attention(q, k, v, causal=True, impl=impl)  # noqa: E731
            t = _time(call, reps)
            with peak_memory() as peak:
                call()
            yield WallPoint(n, impl, t, peak.extra_bytes, pairs, 4.0 * pairs * dim / t / 1e9)
