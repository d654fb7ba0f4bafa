"""numba as selfattn's kernels use it, configured before their first use.

- Compiled kernels are cached in the user's cache folder ($XDG_CACHE_HOME or ~/.cache, then
  selfattn/numba), never beside the installed package: a read-only install works for any user.
  Where no folder is writable the kernels compile in each process (`CACHE` False) rather than
  fail at import.
- The threading layer is numba's own `workqueue`. On Linux `omp` is GNU OpenMP, which kills a
  forked child once the parent has run a parallel kernel; workqueue survives fork but aborts on
  two parallel launches at once, so every launch holds `parallel_lock`.
A user's NUMBA_CACHE_DIR or NUMBA_THREADING_LAYER wins.
"""

import os
import threading


def _cache_dir() -> str | None:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "selfattn", "numba")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


_user_layer = "NUMBA_THREADING_LAYER" in os.environ
_dir = _cache_dir()
CACHE = _dir is not None
if CACHE:
    os.environ.setdefault("NUMBA_CACHE_DIR", _dir)
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

import numba as nb  # noqa: E402  (after the settings above)

if CACHE:  # numba may have been imported before us: its config is read when a kernel is made
    nb.config.CACHE_DIR = _dir
if not _user_layer:
    nb.config.THREADING_LAYER = "workqueue"

parallel_lock = threading.Lock()


def _new_lock_in_child():
    global parallel_lock
    parallel_lock = threading.Lock()


os.register_at_fork(before=lambda: parallel_lock.acquire(),
                    after_in_parent=lambda: parallel_lock.release(),
                    after_in_child=_new_lock_in_child)
