"""The numba kernel of the decode path (attention/decode.py): split-K online softmax over chunks of
keys, all chunks in parallel (prange), merged by log-sum-exp. It runs where the compiled C kernel
(native/attend.c) does not (masks, float64, no compiled kernels), and the tests hold the two to
each other and to the reference. Imported only when first needed: numba takes ~0.3-0.6 s to
import, more than loading the default model."""

import math

import numpy as np

from .jit import CACHE, nb
from .kvformat_numba import load_rows
from .softmax import FASTMATH, online_softmax_row

KEY_TILE = 64  # keys scored per online-softmax step inside a chunk


@nb.njit(fastmath=FASTMATH, cache=CACHE, nogil=True, parallel=True)
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
                poisoned = False
                for c in range(C):
                    poisoned |= np.isnan(l_i[b, g, c, r])
                if poisoned:  # a NaN or +inf logit this row sees
                    for d in range(Dv):
                        o[d] = np.nan
                    lse[b, h, t] = np.nan
                    continue
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
