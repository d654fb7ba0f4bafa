"""The numba kernel of the prefill path (attention/flash.py): one (batch, kv head, query block)
task, its matmuls through numba's `np.dot` (SciPy's cython BLAS, single-threaded), so no Python
runs between key blocks. It takes masks and float64, which the C kernel (native/prefill.c) does
not, and runs everything when the compiled kernels are absent. Imported only when first needed."""

import math

import numpy as np

from .jit import CACHE, nb
from .kvformat_numba import load_rows
from .softmax import FASTMATH, online_softmax_row


@nb.njit(fastmath=FASTMATH, cache=CACHE, nogil=True)
def block_update(s, m_i, l_i, acc, rows_per_head, qpos0, j0, left, right, softcap,
                 mask, has_mask, band, ibuf):
    """One key block of online softmax over the rows of `s` (R, nk), head-major rows.

    s holds q·k (already scaled) and is overwritten with exp(logit - m_i), ready for s @ v.
    """
    R, nk = s.shape
    for r in range(R):
        row = s[r]
        g = r // rows_per_head
        i = r - g * rows_per_head
        if softcap > 0.0:
            for j in range(nk):
                row[j] = softcap * math.tanh(row[j] / softcap)
        if has_mask:
            mrow = mask[g, i]
            for j in range(nk):
                row[j] += mrow[j]
        lo, hi = 0, nk
        if band:
            p = qpos0 + i
            lo = min(max(p - left - j0, 0), nk)
            hi = min(max(p + right - j0 + 1, lo), nk)
        online_softmax_row(row, nk, lo, hi, r, m_i, l_i, acc, ibuf)


@nb.njit(fastmath=FASTMATH, cache=CACHE, nogil=True)
def flash_task(qs, kh, vh, code, table, rows_per_head, p0, p1, left, right, softcap, mask,
               has_mask, block_keys, out_rows, lse_rows):
    """All key blocks for one (batch, kv head, query block): rows of qs (R, D), head-major.

    kh (S, ·), vh (S, ·): this kv head's keys and values, float rows or a compact format decoded
    one key block at a time (kvformat.load_rows). Rows see keys p - left .. p + right for their
    position p in p0 .. p1. mask: additive (G, rows_per_head, S) view, if has_mask.
    Writes the normalised output rows (R, Dv) and their lse (R).
    """
    R, D = qs.shape
    S = kh.shape[0]
    Dv = out_rows.shape[1]
    dtype = qs.dtype
    m_i = np.full(R, -np.inf, dtype)
    l_i = np.zeros(R, dtype)
    acc = np.zeros((R, Dv), dtype)
    s_buf = np.empty(R * block_keys, dtype)
    pv = np.empty((R, Dv), dtype)
    ibuf = np.empty(block_keys, np.int32)
    kbuf = np.empty((block_keys, D), dtype)  # a compact key block decoded (unused for floats)
    vbuf = np.empty((block_keys, Dv), dtype)
    lo = max(0, p0 - left)
    hi = min(S - 1, p1 + right)
    for j0 in range(lo - lo % block_keys, hi + 1, block_keys):
        j1 = min(S, j0 + block_keys)
        nk = j1 - j0
        s = s_buf[:R * nk].reshape(R, nk)  # contiguous, so BLAS writes it and loops vectorize
        kt, kb = load_rows(kh, j0, nk, code, table, kbuf)
        np.dot(qs, kt[kb:kb + nk].T, s)
        # the band test is needed unless every (row, key) of the block is inside it
        needs_band = (j0 < p1 - left) or (j1 - 1 > p0 + right)
        mblk = mask[:, :, j0:j1] if has_mask else mask
        block_update(s, m_i, l_i, acc, rows_per_head, p0, j0, left, right, softcap, mblk,
                     has_mask, needs_band, ibuf)
        vt, vb = load_rows(vh, j0, nk, code, table, vbuf)
        np.dot(s, vt[vb:vb + nk], pv)
        acc += pv
    for r in range(R):
        if np.isnan(l_i[r]):  # a NaN or +inf logit this row sees
            for d in range(Dv):
                out_rows[r, d] = np.nan
            lse_rows[r] = np.nan
        elif l_i[r] > 0:
            inv = 1.0 / l_i[r]
            for d in range(Dv):
                out_rows[r, d] = acc[r, d] * inv
            lse_rows[r] = m_i[r] + math.log(l_i[r])
        else:  # no visible key
            for d in range(Dv):
                out_rows[r, d] = 0.0
            lse_rows[r] = -np.inf
