"""Cache sizes and the memory they need: one arithmetic for the runner, the guard and the planner."""

import mmap

import numpy as np

from .. import formats

# bits per cached value, widest first (ggml's q8_0 and q4_0: blocks of 32 values with one f16
# scale, so 34 and 18 bytes per 32 values: 8.5 and 4.5 bits)
KV_BITS = {name: formats.BY_NAME[name].bits_per_weight for name in formats.KV_TYPES}


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, positions: int,
                   kv_dtype: str = "f32") -> int:
    """Bytes of K and V for `positions` positions of every layer: 2·L·H_kv·D·positions·bits/8."""
    if kv_dtype not in KV_BITS:
        raise ValueError(f"kv dtype must be one of {', '.join(KV_BITS)}, got {kv_dtype!r}")
    return int(2 * n_layers * n_kv_heads * head_dim * positions * KV_BITS[kv_dtype] / 8)


def available_memory() -> int | None:
    """Bytes the OS says can be allocated without swapping (MemAvailable), if it says."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(n_layers: int, n_kv_heads: int, head_dim: int, positions: int, kv_dtype: str,
               reserve: int = 0):
    """ContextError, before anything is allocated, when a cache of this size does not fit the
    memory available now (less `reserve` bytes kept for other buffers). The message names the
    largest context that fits with this KV type and with each smaller one."""
    from ..errors import ContextError

    need = kv_cache_bytes(n_layers, n_kv_heads, head_dim, positions, kv_dtype)
    free = available_memory()
    if free is None or need <= free - reserve:
        return
    room = max(free - reserve, 0)

    def fits(kind):
        per_position = kv_cache_bytes(n_layers, n_kv_heads, head_dim, 1, kind)
        return room // per_position

    smaller = [f"{kind}: {fits(kind):,}" for kind in KV_BITS if KV_BITS[kind] < KV_BITS[kv_dtype]]
    raise ContextError(
        f"a {kv_dtype} KV cache for {positions:,} positions needs {need / 2**30:.2f} GiB, "
        f"{room / 2**30:.2f} GiB is available: at most {fits(kv_dtype):,} positions fit with "
        f"{kv_dtype}" + (f" (smaller KV types: {', '.join(smaller)})" if smaller else ""))


def aligned_zeros(shape, dtype) -> np.ndarray:
    """Zeros for a KV cache, from an anonymous mapping: page-aligned (NumPy's large arrays start
    16 bytes into a cache line, so half the 32-byte loads of a float32 row would straddle two; the
    compiled decode kernel measured 26 against 32 ns a key and kv head, one core, keys in cache),
    and in 4 KiB pages that become resident only as positions are written. NumPy asks for huge
    pages on large arrays; a cache for 8,192 positions of the default model (360 MiB) then took
    1.3 s to fault in on its first write (the kernel compacting memory for 2 MiB pages), against
    ~0.5 us a 4 KiB page as positions arrive; decode at depth 4,096 read K/V as fast either way."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype, count=count).reshape(shape)
