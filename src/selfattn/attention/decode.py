"""Decode path: split-K attention for a few queries against a long K/V (flash-decoding).

With T small (one new token, or a handful in speculative decoding), attention is a matrix-vector
product: every key and value is read once and used for only G*T dot products, so the time is the
time to stream K and V from memory. A tiled prefill kernel parallelises over queries, which leaves
cores idle here; instead the keys of each (batch, kv head) are cut into chunks, the chunks run on
all cores at once, each keeps its own online-softmax state (`m_i`, `l_i`, `acc`),
and the chunks are merged by their log-sum-exp at the end (Dao et al., "Flash-Decoding", 2023).

When the compiled kernels are available (selfattn.native) and the call has no mask, the C kernel
(native/attend.c) runs; otherwise its numba twin, `decode_numba.decode_chunks`.

All G = H/H_kv query heads that share a kv head, and all T queries, are scored against a key while
it is in cache, so K/V cross the memory bus once per kv head, not once per query head.
"""

import numpy as np

from .. import native
from .threads import num_threads

MIN_CHUNK = 256  # keys per chunk at least, so per-chunk overhead stays small


def split_keys(span: int, heads: int) -> tuple[int, int]:
    """(keys per chunk, chunks) for `span` keys of each of `heads` (batch x kv head) groups: at
    least 8 tasks per core, so the cores stay balanced, and chunks of at least MIN_CHUNK keys."""
    want = max(1, -(-8 * num_threads() // heads))
    chunk = max(MIN_CHUNK, -(-span // want))
    return chunk, -(-span // chunk)


def decode_attention(q, k, v, S, band, mask, softcap, scale, fmt="f32"):
    """Same contract as `flash.flash_attention`; meant for T <= ~16 queries. k, v may be stored
    rows of a compact format (kvformat): they are decoded row by row inside the kernel."""
    from .kvformat import HALF_TABLE, format_code

    B, H, T, D = q.shape
    H_kv = k.shape[1]
    Dv = D if fmt != "f32" else v.shape[3]
    G = H // H_kv
    dtype = q.dtype
    left, right = band
    # keys any query may see: from the first query's lower edge to the last one's upper edge
    j_lo, j_hi = max(0, S - T - left), min(S - 1, S - 1 + right)
    out = np.empty((B, H, T, Dv), dtype)
    lse = np.empty((B, H, T), dtype)
    if j_hi < j_lo:  # no query sees any key
        out[:] = 0
        lse[:] = -np.inf
        return out, lse
    chunk, C = split_keys(j_hi - j_lo + 1, B * H_kv)
    qs = q.reshape(B, H_kv, G * T, D) * dtype.type(scale)
    if native.decode_supported(fmt, D, Dv, G * T, mask is not None, dtype) and \
            k.flags.c_contiguous and v.flags.c_contiguous:
        native.decode_attention(qs, k, v, fmt, S, T, j_lo, chunk, C, left, right,
                                float(softcap or 0.0), out, lse)
        return out, lse
    acc = np.empty((B, H_kv, C, G * T, Dv), dtype)
    m_i = np.empty((B, H_kv, C, G * T), dtype)
    l_i = np.empty((B, H_kv, C, G * T), dtype)
    if mask is None:
        m5 = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), (1, 1, 1, T, 1), (0,) * 5)
    else:
        m5 = mask.reshape(B, H_kv, G, T, S)  # splits an axis: a view, never a copy
    from . import jit
    from .decode_numba import decode_chunks
    from .threads import prepare_numba_threads

    prepare_numba_threads()
    with jit.parallel_lock:
        decode_chunks(qs, k, v, format_code(fmt), HALF_TABLE, S, j_lo, chunk, left, right,
                      float(softcap or 0.0), m5, mask is not None, acc, m_i, l_i, out, lse)
    return out, lse
