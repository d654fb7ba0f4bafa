"""How many cores selfattn's kernels use: the one setting the compiled kernels (native/) and the
attention layer above them both read, so that the bottom layer imports nothing from above."""

import os

_threads: int | None = None
_listeners = []  # called with the new count after set_num_threads (attention.threads: numba)


def num_threads() -> int:
    """Cores the kernels may use: `set_num_threads`, else the cores this process may run on
    (read once: a decode step asks ~150 times)."""
    global _threads
    if _threads is None:
        _threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    return _threads


def set_num_threads(n: int) -> None:
    """Limit selfattn's kernels to n threads."""
    global _threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    _threads = n
    for listener in _listeners:
        listener(n)


def on_set_num_threads(listener) -> None:
    """listener(n) runs after every set_num_threads(n)."""
    _listeners.append(listener)
