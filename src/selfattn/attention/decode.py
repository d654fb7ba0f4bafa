"""Decode path: split-K attention for a few queries against a long K/V (flash-decoding).

With T small (one new token, or a handful in speculative decoding), attention is a matrix-vector
product: every key and value is read once and used for only G*T dot products, so the time is the
time to stream K and V from memory. A tiled prefill kernel parallelises over queries, which leaves
cores idle here; instead the keys of each (batch, kv head) are cut into chunks, the chunks run on
all cores at once (numba prange), each keeps its own online-softmax state (`m_i`, `l_i`, `acc`),
and the chunks are merged by their log-sum-exp at the end (Dao et al., "Flash-Decoding", 2023).

When the compiled kernels are available (selfattn.native) and the call has no mask, the C twin of
`decode_chunks` (native/attend.c, AVX2) runs instead; this numba kernel is the fallback and the
tests hold the two to each other and to the reference.

All G = H/H_kv query heads that share a kv head, and all T queries, are scored against a key while
it is in cache, so K/V cross the memory bus once per kv head, not once per query head.
"""

import math

import numba as nb
import numpy as np

from .. import native
from .kvformat import load_rows
from .softmax import FASTMATH, online_softmax_row
from .threads import num_threads, prepare_numba_threads

KEY_TILE = 64  # keys scored per online-softmax step inside a chunk
MIN_CHUNK = 256  # keys per chunk at least, so per-chunk overhead stays small


@nb.njit(fastmath=FASTMATH, cache=True, nogil=True, parallel=True)
def decode_chunks(q, k, v, code, table, S, j_base, chunk, left, right, softcap, mask, has_mask,
                  acc, m_i, l_i, out, lse):
    """q (B, H_kv, R, D) pre-scaled, R = G*T rows (head-major); k, v (B, H_kv, S_max, ·) stored
    rows (float, or a compact format decoded a tile at a time by `load_rows`; code and table as in
    kvformat) of which the first S keys are used.

    Query t of T sits at position p = S - T + t and may see keys p - left .. p + right;
    mask is additive, (B, H_kv, G, T, S) (a broadcast view). Chunk c of C covers `chunk`
    keys from j_base + c * chunk; its state goes to acc (B, H_kv, C, R, Dv), m_i and l_i
    (B, H_kv, C, R); the merged result to out (B, H, T, Dv) and lse (B, H, T).
    """
    B, H_kv, R, D = q.shape
    Dv = acc.shape[4]
    C = acc.shape[2]
    T = mask.shape[3]
    ninf = q.dtype.type(-np.inf)
    n_tasks = B * H_kv * C
    for task in nb.prange(n_tasks):
        b = task // (H_kv * C)
        g = (task // C) % H_kv
        c = task % C
        j_start = j_base + c * chunk
        j_end = min(S, j_start + chunk)
        s = np.empty((R, KEY_TILE), q.dtype)
        ibuf = np.empty(KEY_TILE, np.int32)
        kbuf = np.empty((KEY_TILE, D), q.dtype)  # a compact tile decoded (unused for float rows)
        vbuf = np.empty((KEY_TILE, Dv), q.dtype)
        a = acc[b, g, c]
        mm = m_i[b, g, c]
        ll = l_i[b, g, c]
        for r in range(R):
            mm[r] = ninf
            ll[r] = 0.0
            for d in range(Dv):
                a[r, d] = 0.0
        for j0 in range(j_start, j_end, KEY_TILE):
            nk = min(KEY_TILE, j_end - j0)
            ktile, kbase = load_rows(k[b, g], j0, nk, code, table, kbuf)
            for jj in range(nk):
                krow = ktile[kbase + jj]
                for r in range(R):
                    dot = q.dtype.type(0.0)
                    for d in range(D):
                        dot += q[b, g, r, d] * krow[d]
                    s[r, jj] = dot
            any_seen = False
            for r in range(R):
                row = s[r]
                if softcap > 0.0:
                    for jj in range(nk):
                        row[jj] = softcap * math.tanh(row[jj] / softcap)
                if has_mask:
                    for jj in range(nk):
                        row[jj] += mask[b, g, r // T, r % T, j0 + jj]
                p = S - T + r % T
                lo = min(max(p - left - j0, 0), nk)
                hi = min(max(p + right - j0 + 1, lo), nk)
                if online_softmax_row(row, nk, lo, hi, r, mm, ll, a, ibuf):
                    any_seen = True
            if not any_seen:
                continue
            vtile, vbase = load_rows(v[b, g], j0, nk, code, table, vbuf)
            for jj in range(nk):
                vrow = vtile[vbase + jj]
                for r in range(R):
                    p = s[r, jj]
                    if p != 0.0:
                        for d in range(Dv):
                            a[r, d] += p * vrow[d]

    # merge the chunks by their log-sum-exp (serial: B * H_kv * R rows of C states)
    for b in range(B):
        for g in range(H_kv):
            for r in range(R):
                M = ninf
                for c in range(C):
                    M = max(M, m_i[b, g, c, r])
                h = g * (R // T) + r // T
                t = r % T
                o = out[b, h, t]
                for d in range(Dv):
                    o[d] = 0.0
                if M == ninf:
                    lse[b, h, t] = ninf
                    continue
                total = 0.0
                for c in range(C):
                    if l_i[b, g, c, r] > 0.0:
                        w = math.exp(m_i[b, g, c, r] - M)
                        total += w * l_i[b, g, c, r]
                        for d in range(Dv):
                            o[d] += w * acc[b, g, c, r, d]
                for d in range(Dv):
                    o[d] /= total
                lse[b, h, t] = M + math.log(total)


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
    prepare_numba_threads()
    decode_chunks(qs, k, v, format_code(fmt), HALF_TABLE, S, j_lo, chunk, left, right,
                  float(softcap or 0.0), m5, mask is not None, acc, m_i, l_i, out, lse)
    return out, lse
