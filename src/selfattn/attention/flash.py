"""Prefill path: blocked online softmax (FlashAttention-2, Dao 2023) on the CPU.

For each (batch, kv head, query block) task, the queries of all H/H_kv heads that share the kv head
are stacked into one (G*Tq, D) matrix, so each K/V block is read once per group (GQA/MQA for free).
Per key block of Sk keys: `s = q_blk @ k_blkᵀ` (BLAS), then one compiled pass applies soft-cap,
mask and band, updates the running max `m_i` and sum `l_i`, exponentiates in place and rescales
`acc`; then `acc += s @ v_blk` (BLAS). Extra memory is O(G*Tq*(Sk + D)) per worker, never T x S.
Key blocks wholly outside the band (causal, sliding window) are skipped, so causal costs half.

One compiled call (flash_numba.flash_task) runs a whole task: the matmuls go to BLAS through
numba's `np.dot` (SciPy's cython BLAS, single-threaded), so no Python runs between blocks. The tasks are spread over a pool
of Python threads, one per core (the compiled call releases the GIL). float16 is computed in
float32.

When the compiled kernels are available (selfattn.native) and the call has no mask, its C twin
(native/prefill.c: the same algorithm in AVX2 register tiles, 1.0-2.3x SDPA where this one runs
0.8-1.8x, docs/performance.md) takes float32 and float16 queries; this kernel stays for masks and
float64, and the tests hold the two to each other and to the reference.
"""

import numpy as np

from .. import native
from .threads import blas_single_threaded, num_threads, pool

BLOCK_ROWS = 512  # rows (G * query block) per task: the score block is BLOCK_ROWS x BLOCK_KEYS
BLOCK_KEYS = 256  # (512 x 256 float32 = 512 KiB: sized by a sweep on a 2-core AVX2 machine)
MIN_TASKS_PER_CORE = 4  # smaller query blocks for short prompts, so every core gets work


def flash_attention(q, k, v, S, band, mask, softcap, scale, block_rows=BLOCK_ROWS,
                    block_keys=BLOCK_KEYS, fmt="f32", compiled=True):
    """q (B, H, T, D), k (B, H_kv, S_max, D), v (B, H_kv, S_max, Dv), float32 or float64,
    validated and contiguous; the first S keys are used. With fmt (f16, q8_0, q4_0), k and v are
    stored rows of a compact cache (kvformat), decoded a key block at a time; then Dv = D.

    band: (left, right) ints: query i, at position p = S - T + i, sees keys p - left .. p + right.
    mask: additive float array broadcast to (B, H, T, S), or None. softcap: float or 0.
    Returns out (B, H, T, Dv) and lse (B, H, T), both in q's dtype.

    float32 queries without a mask go to the C kernel (native/prefill.c) when it is available and
    `compiled`; everything else (and compiled=False, for comparing the two) to the numba kernel.
    """
    from .kvformat import HALF_TABLE, format_code

    B, H, T, D = q.shape
    H_kv = k.shape[1]
    Dv = v.shape[3] if fmt == "f32" else D
    left, right = band
    if compiled and native.flash_supported(fmt, D, Dv, mask is not None, q.dtype) and \
            k.flags.c_contiguous and v.flags.c_contiguous:
        out = np.empty((B, H, T, Dv), np.float32)
        lse = np.empty((B, H, T), np.float32)
        native.flash_attention(q, k, v, fmt, S, left, right, scale, float(softcap or 0.0), out,
                               lse)
        return out, lse
    from .flash_numba import flash_task

    code = format_code(fmt)
    G = H // H_kv
    dtype = q.dtype
    Tq = max(1, min(T, block_rows // G))
    # short prompts: shrink the query block (not below 16 rows) until each core has a few tasks
    per_head = -(-MIN_TASKS_PER_CORE * num_threads() // (B * H_kv))
    Tq = max(min(Tq, 16), min(Tq, -(-T // per_head)))
    Sk = max(1, min(S, block_keys))
    off = S - T
    out = np.empty((B, H, T, Dv), dtype)
    lse = np.empty((B, H, T), dtype)
    no_mask = np.broadcast_to(np.zeros(1, dtype), (1, 1, 1))
    softcap = float(softcap or 0.0)

    def task(b, kvh, i0):
        i1 = min(T, i0 + Tq)
        tq = i1 - i0
        h0 = kvh * G
        qs = (q[b, h0:h0 + G, i0:i1] * dtype.type(scale)).reshape(G * tq, D)  # pre-scaled copy
        o = np.empty((G * tq, Dv), dtype)
        row_lse = np.empty(G * tq, dtype)
        m = no_mask if mask is None else mask[b, h0:h0 + G, i0:i1]
        flash_task(qs, k[b, kvh, :S], v[b, kvh, :S], code, HALF_TABLE, tq, off + i0, off + i1 - 1,
                   left, right, softcap, m, mask is not None, Sk, o, row_lse)
        out[b, h0:h0 + G, i0:i1] = o.reshape(G, tq, Dv)
        lse[b, h0:h0 + G, i0:i1] = row_lse.reshape(G, tq)

    tasks = [(b, kvh, i0) for b in range(B) for kvh in range(H_kv) for i0 in range(0, T, Tq)]
    tasks.reverse()  # costliest first (causal: late query blocks see more keys): a balanced pool
    workers = min(num_threads(), len(tasks))
    with blas_single_threaded():  # our threads split the work; BLAS must not split it again
        if workers <= 1 or 4.0 * T * S * D * H < 2e7:
            for t in tasks:
                task(*t)
        else:
            list(pool(workers).map(lambda t: task(*t), tasks))
    return out, lse
