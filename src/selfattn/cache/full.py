"""KV cache: preallocated per layer for the whole context, written in place by position.

Layout (layers, 1, H_kv, max_len, row): each layer's K (and V) is one contiguous
(1, H_kv, max_len, row) array of stored rows, float32 (row = D) or a compact format (f16, q8_0,
q4_0: see `selfattn.attention.kvformat`), which `selfattn.attention(..., kv_len=n, kv_format=..)`
reads in place. New K/V are quantized as they are written (ggml's rounding). The memory guard
counts the whole cache (`nbytes`), but its pages become resident only as positions are written:
a page of 4 KiB holds 16 float32 rows of D = 64, so a decode step faults in a page per kv head and
layer every 16 tokens (~0.5 us each).
"""

import numpy as np

from ..attention import attention, kvformat
from ..attention.api import DECODE_MAX_T, decode_cached
from ..errors import ContextError
from .memory import aligned_zeros, check_fits


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 kv_dtype: str = "f32"):
        if max_len < 1:
            raise ContextError(f"context length must be >= 1, got {max_len}")
        items, dtype = kvformat.row_shape(kv_dtype, head_dim)
        check_fits(n_layers, n_kv_heads, head_dim, max_len, kv_dtype)
        shape = (n_layers, 1, n_kv_heads, max_len, items)
        self.k = aligned_zeros(shape, dtype)
        self.v = aligned_zeros(shape, dtype)
        self.kv_dtype, self.head_dim = kv_dtype, head_dim
        self.max_len = max_len
        self.max_chunk = max_len  # tokens one forward call may add
        self.length = 0  # positions 0 .. length-1 hold valid K/V
        self.written = 0  # positions ever written: their pages are resident (a cache started over
        # from position 0 keeps the pages of its longest content)

    @classmethod
    def for_model(cls, args, max_len: int, kv_dtype: str = "f32") -> "KVCache":
        return cls(args.n_layers, args.n_kv_heads, args.head_dim, max_len, kv_dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def resident_bytes(self) -> int:
        """Bytes of the positions ever written (what the cache holds in memory)."""
        return self.nbytes // self.max_len * self.written

    def copy_prefix(self, src: "KVCache", n: int):
        """Positions 0 .. n-1 of src (a cache of the same shape and type) into this one, which
        then holds those n positions."""
        if src.k.shape != self.k.shape or src.kv_dtype != self.kv_dtype or not 0 <= n <= src.length:
            raise ValueError(f"copy_prefix: {n} positions of a {src.kv_dtype} cache "
                             f"{src.k.shape} holding {src.length} into a {self.kv_dtype} one "
                             f"{self.k.shape}")
        self.k[:, :, :, :n] = src.k[:, :, :, :n]
        self.v[:, :, :, :n] = src.v[:, :, :, :n]
        self.length, self.written = n, max(self.written, n)

    def reserve(self, pos: int, T: int):
        if pos > self.length:
            raise ContextError(f"cannot write at position {pos}: the cache holds {self.length}")
        if pos + T > self.max_len:
            raise ContextError(f"{pos + T} tokens do not fit a context of {self.max_len} "
                               "(a larger context, or a shorter prompt)")

    def write(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray):
        """k, v (T, H_kv, D) at positions pos .. pos+T-1; returns this layer's stored K, V."""
        kvformat.write_rows(k, self.k[layer], pos, self.kv_dtype)
        kvformat.write_rows(v, self.v[layer], pos, self.kv_dtype)
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, pos: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
               window, rotate=None, softcap=None, scale=None) -> np.ndarray:
        """Write k, v (T, H_kv, D) at pos and return causal attention of q (1, H, T, D) over
        positions 0 .. pos+T-1 (window: the layer's sliding window, or None; softcap and scale
        as `selfattn.attention` takes them)."""
        k_all, v_all = self.write(layer, pos, k, v)
        if q.shape[2] <= DECODE_MAX_T:
            return decode_cached(q, k_all, v_all, pos + k.shape[0], window, self.kv_dtype,
                                 softcap, scale)
        return attention(q, k_all, v_all, causal=True, window=window, kv_len=pos + k.shape[0],
                         kv_format=self.kv_dtype, softcap=softcap, scale=scale)

    def keys_seen(self, positions: np.ndarray, window) -> np.ndarray:
        """Keys a causal query at each position attends to (per head and layer)."""
        seen = positions + 1
        return seen if window is None else np.minimum(seen, window)

    def decoded_keys(self, layer: int, kv_len: int) -> np.ndarray:
        """This layer's first kv_len keys as float32 (1, H_kv, kv_len, D)."""
        return kvformat.decode_rows(self.k[layer][:, :, :kv_len], self.kv_dtype, self.head_dim)

    def commit(self, pos: int, T: int):
        self.length = pos + T
        self.written = max(self.written, self.length)
