"""A cache that never fills: StreamingLLM's attention sinks plus a sliding window of recent tokens.

`sink:S,window:W` keeps the first S tokens of the stream and the last W (the current one
included); `window:W` is the same with S = 0 (a ring of the last W tokens). Memory is fixed:
S + W - 1 + chunk positions per layer, whatever the length of the stream.

Positions follow Xiao et al. (2023, "Efficient Streaming Language Models with Attention Sinks"):
inside the cache, tokens sit at consecutive positions, so a recent key keeps its true distance to
the query and a sink sits at distance min(t, S + W - 1) - s from query t. With RoPE, attention
depends on distances only, so no cached key is ever re-rotated:
- the recent keys are cached at their true positions and attended with a causal band of width W
  (`selfattn.attention(..., window=W)` over the recent region),
- the sinks are attended by the query rotated back by t - min(t, S + W - 1) positions,
and the two parts are combined exactly by their log-sum-exp (`selfattn.merge`). A chunk of many
queries therefore gives, for every query, what token-by-token StreamingLLM gives it.
"""

import sys

import numpy as np

from ..attention import attention, kvformat, merge
from ..errors import ContextError
from .memory import aligned_zeros, check_fits


class StreamingCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, sinks: int, window: int,
                 chunk: int = 512, kv_dtype: str = "f32"):
        if sinks < 0 or window < 1 or chunk < 1:
            raise ContextError(f"need sinks >= 0, window >= 1, chunk >= 1; got {sinks}, {window}, "
                               f"{chunk}")
        items, dtype = kvformat.row_shape(kv_dtype, head_dim)
        recent = window - 1 + chunk
        check_fits(n_layers, n_kv_heads, head_dim, sinks + recent, kv_dtype)
        sink_shape = (n_layers, 1, n_kv_heads, max(sinks, 1), items)
        recent_shape = (n_layers, 1, n_kv_heads, recent, items)
        self.k_sink, self.v_sink = aligned_zeros(sink_shape, dtype), aligned_zeros(sink_shape, dtype)
        self.k_recent = aligned_zeros(recent_shape, dtype)
        self.v_recent = aligned_zeros(recent_shape, dtype)
        self.sinks, self.window, self.max_chunk = sinks, window, chunk
        self.kv_dtype, self.head_dim = kv_dtype, head_dim
        self.length = 0  # tokens seen (the next token's true position)
        self.held = 0  # recent tokens held, oldest first, at slots 0 .. held-1
        self.max_len = sys.maxsize  # never full

    @classmethod
    def for_model(cls, args, sinks: int, window: int, chunk: int = 512,
                  kv_dtype: str = "f32") -> "StreamingCache":
        return cls(args.n_layers, args.n_kv_heads, args.head_dim, sinks, window, chunk, kv_dtype)

    @property
    def nbytes(self) -> int:
        n = self.k_recent.nbytes + self.v_recent.nbytes
        return n + (self.k_sink.nbytes + self.v_sink.nbytes if self.sinks else 0)

    def reserve(self, pos: int, T: int):
        if pos != self.length:
            raise ContextError(f"a streaming cache takes tokens in order: next position is "
                               f"{self.length}, got {pos}")
        if T > self.max_chunk:
            raise ContextError(f"{T} tokens at once; this cache takes chunks of at most "
                               f"{self.max_chunk}")

    def attend(self, layer: int, pos: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
               window, rotate, softcap=None, scale=None) -> np.ndarray:
        """q (1, H, T, D) at true positions pos ..; k, v (T, H_kv, D). rotate(q, delta) turns q
        by delta[t] positions (RoPE). softcap, scale: as `selfattn.attention`. Returns
        (1, H, T, D)."""
        S, W, T = self.sinks, self.window, k.shape[0]
        fmt = self.kv_dtype
        n_new_sinks = max(0, min(S - pos, T))
        if n_new_sinks:
            rows = slice(pos, pos + n_new_sinks)
            self.k_sink[layer, 0, :, rows] = kvformat.quantize(
                k[:n_new_sinks].transpose(1, 0, 2), fmt)
            self.v_sink[layer, 0, :, rows] = kvformat.quantize(
                v[:n_new_sinks].transpose(1, 0, 2), fmt)
        t_recent = T - n_new_sinks
        parts = []
        if t_recent:
            at = slice(self.held, self.held + t_recent)
            self.k_recent[layer, 0, :, at] = kvformat.quantize(
                k[n_new_sinks:].transpose(1, 0, 2), fmt)
            self.v_recent[layer, 0, :, at] = kvformat.quantize(
                v[n_new_sinks:].transpose(1, 0, 2), fmt)
            band = W if window is None else min(W, window)
            parts.append(attention(q, self.k_recent[layer], self.v_recent[layer], causal=True,
                                   window=band, kv_len=self.held + t_recent, return_lse=True,
                                   kv_format=fmt, softcap=softcap, scale=scale))
        n_sinks = min(S, pos + T)
        if n_sinks:
            t = pos + np.arange(T)
            delta = np.minimum(t, S + W - 1) - t  # <= 0: sinks seen from a fixed distance
            qs = rotate(q, delta) if delta.any() else q
            mask = None
            if pos < S:  # the sinks' own queries: causal among them
                mask = np.arange(n_sinks)[None, :] <= t[:, None]  # (T, n_sinks)
            parts.append(attention(qs, self.k_sink[layer], self.v_sink[layer], mask=mask,
                                   kv_len=n_sinks, return_lse=True, kv_format=fmt,
                                   softcap=softcap, scale=scale))
        out, _ = merge(parts) if len(parts) > 1 else parts[0]
        return out

    def keys_seen(self, positions: np.ndarray, window) -> np.ndarray:
        """Keys a query at each position attends to: its sinks and its band of recent tokens."""
        band = self.window if window is None else min(self.window, window)
        sinks = np.minimum(positions + 1, self.sinks)
        return sinks + np.clip(positions + 1 - self.sinks, 0, band)

    def decoded_keys(self, layer: int, kv_len: int):
        raise ValueError("recording attention weights needs a full cache (--context-policy full)")

    def commit(self, pos: int, T: int):
        n_new_sinks = max(0, min(self.sinks - pos, T))
        self.held += T - n_new_sinks
        keep = self.window - 1
        if self.held > keep:  # drop the oldest: the last W-1 tokens move to the front
            start = self.held - keep
            for arr in (self.k_recent, self.v_recent):
                arr[:, :, :, :keep] = arr[:, :, :, start:self.held].copy()
            self.held = keep
        self.length = pos + T
