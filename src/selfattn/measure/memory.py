"""Peak memory of a block of code, measured, not assumed.

Linux keeps a high-water mark of the process's resident memory (VmHWM) and lets a process reset
it by writing "5" to /proc/self/clear_refs. `peak_memory` resets it, runs the block, and reports
how far the peak rose above the resident size at the start: every allocation counts, NumPy's,
numba's, BLAS's and the threads' alike, but memory the allocator kept from an earlier call and
hands out again does not raise it. tracemalloc runs alongside: it sees every NumPy allocation,
reused or not (but not numba's). The larger of the two is reported, with its name in `method`.
"""

import contextlib
import tracemalloc
from dataclasses import dataclass

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass
class Peak:
    extra_bytes: int = 0  # peak during the block minus resident size before it
    method: str = ""


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in {_STATUS}")


def rss_peak_supported() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory():
    """with peak_memory() as p: ...  then p.extra_bytes and p.method.

    Two instruments, and the larger reading wins: the process's resident high-water mark
    ('rss', every allocation, but blind to memory the allocator reuses from an earlier call) and
    tracemalloc (NumPy's allocations, reused or not; blind to numba's and BLAS's own).
    """
    peak = Peak()
    rss = rss_peak_supported()  # also resets the high-water mark
    before_rss = _status_kib("VmRSS") if rss else 0
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before_tm, _ = tracemalloc.get_traced_memory()
    try:
        yield peak
    finally:
        _, top = tracemalloc.get_traced_memory()
        if started:
            tracemalloc.stop()
        readings = {"tracemalloc": max(0, top - before_tm)}
        if rss:
            readings["rss"] = max(0, _status_kib("VmHWM") - before_rss) * 1024
        peak.method = max(readings, key=readings.get)
        peak.extra_bytes = readings[peak.method]
