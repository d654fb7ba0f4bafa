"""Prefill path: blocked online softmax (FlashAttention-2, Dao 2023) on the CPU.

For each (batch, kv head, query block) task, the queries of all H/H_kv heads that share the kv head
are stacked into one (G*Tq, D) matrix, so each K/V block is read once per group (GQA/MQA for free).
Per key block of Sk keys: `s = q_blk @ k_blkᵀ` (BLAS), then one compiled pass applies soft-cap,
mask and band, updates the running max `m_i` and sum `l_i`, exponentiates in place and rescales
`acc`; then `acc += s @ v_blk` (BLAS). Extra memory is O(G*Tq*(Sk + D)) per worker, never T x S.
Key blocks wholly outside the band (causal, sliding window) are skipped, so causal costs half.

The matmuls run in OpenBLAS single-threaded; the tasks are spread over a pool of Python threads
(numpy's matmul and the compiled pass release the GIL), one per core. Limits: the whole K/V of a
head is read from wherever the caller keeps it; float16 is computed in float32.
"""

import math
import numba as nb
import numpy as np

from .softmax import FASTMATH, _exp_f32, _exp_f64, finalize
from .threads import blas_single_threaded, num_threads, pool

BLOCK_ROWS = 256  # rows (G * query block) per task: the score block is BLOCK_ROWS x BLOCK_KEYS
BLOCK_KEYS = 256


def _make_block_update(exp_fn):
    @nb.njit(fastmath=FASTMATH, cache=True, nogil=True)
    def block_update(s, m_i, l_i, acc, rows_per_head, qpos0, j0, left, right, softcap,
                     mask, has_mask, band, ibuf):
        """One key block of online softmax over the rows of `s` (R, nk), head-major rows.

        s holds q·k (already scaled) and is overwritten with exp(logit - m_i), ready for s @ v.
        """
        R, nk = s.shape
        ninf = s.dtype.type(-np.inf)
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
            if band:
                p = qpos0 + i
                lo = min(max(p - left - j0, 0), nk)
                hi = min(max(p + right - j0 + 1, lo), nk)
                for j in range(lo):
                    row[j] = ninf
                for j in range(hi, nk):
                    row[j] = ninf
            mx = ninf
            for j in range(nk):
                x = row[j]
                mx = x if x > mx else mx
            m_old = m_i[r]
            m_new = mx if mx > m_old else m_old
            if m_new == ninf:  # nothing visible yet in this row
                for j in range(nk):
                    row[j] = 0.0
                continue
            total = exp_fn(row, nk, m_new, ibuf)
            if m_old != m_new:
                alpha = math.exp(m_old - m_new)
                l_i[r] *= alpha
                for d in range(acc.shape[1]):
                    acc[r, d] *= alpha
                m_i[r] = m_new
            l_i[r] += total

    return block_update


_block_update = {np.dtype(np.float32): _make_block_update(_exp_f32),
                 np.dtype(np.float64): _make_block_update(_exp_f64)}


def flash_attention(q, k, v, band, mask, softcap, scale, block_rows=BLOCK_ROWS,
                    block_keys=BLOCK_KEYS):
    """q (B, H, T, D), k (B, H_kv, S, D), v (B, H_kv, S, Dv), float32 or float64, validated.

    band: (left, right) key offsets relative to each query's position S - T + i (None = open).
    mask: additive float array broadcast to (B, H, T, S), or None. softcap: float or 0.
    Returns out (B, H, T, Dv) and lse (B, H, T), both in q's dtype.
    """
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // H_kv
    dtype = q.dtype
    Tq = max(1, min(T, block_rows // G))
    Sk = max(1, min(S, block_keys))
    off = S - T
    left, right = band
    out = np.empty((B, H, T, Dv), dtype)
    lse = np.empty((B, H, T), dtype)
    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), (1, 1, 1), (0, 0, 0))
    update = _block_update[dtype]
    softcap = float(softcap or 0.0)

    def task(b, kvh, i0):
        i1 = min(T, i0 + Tq)
        tq = i1 - i0
        h0 = kvh * G
        qs = (q[b, h0:h0 + G, i0:i1] * scale).reshape(G * tq, D)  # pre-scaled, contiguous
        R = G * tq
        m_i = np.full(R, -np.inf, dtype)
        l_i = np.zeros(R, dtype)
        acc = np.zeros((R, Dv), dtype)
        s_buf = np.empty(R * Sk, dtype)
        pv = np.empty((R, Dv), dtype)
        ibuf = np.empty(Sk, np.int32)
        # keys any row of this block may see
        p0, p1 = off + i0, off + i1 - 1
        lo = 0 if left is None else max(0, p0 - left)
        hi = S - 1 if right is None else min(S - 1, p1 + right)
        lft = S + T if left is None else left
        rgt = S + T if right is None else right
        for j0 in range(lo - lo % Sk, hi + 1, Sk):
            j1 = min(S, j0 + Sk)
            nk = j1 - j0
            s = s_buf[:R * nk].reshape(R, nk)  # contiguous, so the compiled loops vectorize
            np.matmul(qs, k[b, kvh, j0:j1].T, out=s)
            # the band test is needed unless every (row, key) of the block is inside it
            needs_band = (j0 < p1 - lft) or (j1 - 1 > p0 + rgt)
            if mask is not None:
                mblk = mask[b, h0:h0 + G, i0:i1, j0:j1]
            else:
                mblk = dummy
            update(s, m_i, l_i, acc, tq, p0, j0, lft, rgt, softcap, mblk, mask is not None,
                   needs_band, ibuf)
            np.matmul(s, v[b, kvh, j0:j1], out=pv)
            acc += pv
        o, row_lse = finalize(acc, m_i, l_i)
        out[b, h0:h0 + G, i0:i1] = o.reshape(G, tq, Dv)
        lse[b, h0:h0 + G, i0:i1] = row_lse.reshape(G, tq)

    tasks = [(b, kvh, i0) for b in range(B) for kvh in range(H_kv) for i0 in range(0, T, Tq)]
    # costliest first (causal: late query blocks see more keys) for a balanced pool
    tasks.reverse()
    workers = min(num_threads(), len(tasks))
    flops = 4.0 * T * S * D * H
    if workers <= 1 or flops < 2e7:
        for t in tasks:
            task(*t)
    else:
        with blas_single_threaded():
            list(pool(workers).map(lambda t: task(*t), tasks))
    return out, lse
