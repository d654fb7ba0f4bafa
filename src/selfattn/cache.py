"""KV cache: preallocated per layer for the whole context, written in place by position.

Layout (layers, 1, H_kv, max_len, D): each layer's K (and V) is one contiguous
(1, H_kv, max_len, D) array, which `selfattn.attention(..., kv_len=n)` reads in place. The memory
is touched when the cache is made, so it is resident from the start (`nbytes` is what it takes)
and no page faults land in the middle of a timed forward pass.
"""

import numpy as np

from .errors import ContextError


KV_BITS = {"f32": 32.0, "f16": 16.0, "q8_0": 8.5, "q4_0": 4.5}  # bits per cached value (ggml's
# q8_0 and q4_0: blocks of 32 values with one f16 scale, so 34 and 18 bytes per 32 values)


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


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype=np.float32):
        if max_len < 1:
            raise ContextError(f"context length must be >= 1, got {max_len}")
        shape = (n_layers, 1, n_kv_heads, max_len, head_dim)
        kind = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}[np.dtype(dtype)]
        need = kv_cache_bytes(n_layers, n_kv_heads, head_dim, max_len, kind)
        free = available_memory()
        if free is not None and need > free:
            per_position = need // max_len
            raise ContextError(f"a KV cache for {max_len} positions needs {need / 2**30:.2f} GiB, "
                               f"{free / 2**30:.2f} GiB is available: at most "
                               f"{free // per_position} positions fit")
        self.k = np.empty(shape, dtype)
        self.v = np.empty(shape, dtype)
        self.k.fill(0)
        self.v.fill(0)
        self.max_len = max_len
        self.length = 0  # positions 0 .. length-1 hold valid K/V

    @classmethod
    def for_model(cls, args, max_len: int) -> "KVCache":
        return cls(args.n_layers, args.n_kv_heads, args.head_dim, max_len)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reserve(self, pos: int, T: int):
        if pos > self.length:
            raise ContextError(f"cannot write at position {pos}: the cache holds {self.length}")
        if pos + T > self.max_len:
            raise ContextError(f"{pos + T} tokens do not fit a context of {self.max_len} "
                               "(a larger context, or a shorter prompt)")

    def write(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray):
        """k, v (T, H_kv, D) at positions pos .. pos+T-1; returns this layer's full K, V."""
        T = k.shape[0]
        self.k[layer, 0, :, pos:pos + T] = k.transpose(1, 0, 2)
        self.v[layer, 0, :, pos:pos + T] = v.transpose(1, 0, 2)
        return self.k[layer], self.v[layer]

    def commit(self, pos: int, T: int):
        self.length = pos + T
