"""Online-softmax pieces shared by the flash (prefill) and split-K (decode) kernels.

`exp_inplace` is a float32 exp that LLVM can vectorize: libm's `expf` is a call per element
and does not vectorize (about 2.5 ns an element here, against 0.6 for this one). Range reduction
as in Cephes/ggml: x = n ln2 + r with |r| <= ln2/2 (ln2 split in a high and a low part), e^r by a
degree-7 Taylor polynomial, 2^n built from its exponent bits; measured relative error <= 3e-7
(a few float32 ulp; tests/test_softmax.py holds it to 4e-7). Inputs are <= 0 (scores minus the
row maximum); below -87.3 the result is 0, where the true value is a denormal that cannot change
a row sum >= 1, and -inf (a masked key) gives exactly 0.

For float64 the kernels use `math.exp` instead (`exp_inplace` picks), so float64 stays exact.

Online-softmax state per query row follows FlashAttention-2's names: `m_i` (running maximum of the
scaled logits), `l_i` (running sum of exp(logit - m_i)), `acc` (running sum of exp(...) * v).
"""

import math

import numpy as np

from .jit import CACHE, nb

# fastmath without 'nnan'/'ninf': masked logits are -inf and must stay so; 'reassoc' lets LLVM
# vectorize the row sums.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_LOWEST = np.float32(-87.3)
_C = [np.float32(1.0 / math.factorial(i)) for i in range(8)]
_C2, _C3, _C4, _C5, _C6, _C7 = _C[2], _C[3], _C[4], _C[5], _C[6], _C[7]
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)


@nb.njit(fastmath=FASTMATH, cache=CACHE, nogil=True)
def _exp_f32(x, n, shift, ibuf):
    """x[:n] <- exp(x[:n] - shift) in place; returns the sum. ibuf: int32 scratch of >= n."""
    fbuf = ibuf.view(np.float32)
    for j in range(n):
        t0 = x[j] - shift
        t = max(t0, _LOWEST)
        ki = np.int32(t * _LOG2E - _HALF)  # round to nearest: t <= 0, and int() truncates
        k = np.float32(ki)
        r = t - k * _LN2_HI - k * _LN2_LO
        p = _C7
        p = p * r + _C6
        p = p * r + _C5
        p = p * r + _C4
        p = p * r + _C3
        p = p * r + _C2
        p = p * r + _ONE
        p = p * r + _ONE
        x[j] = p
        ibuf[j] = ((ki + 127) << 23) if t0 >= _LOWEST else 0  # -inf (masked) -> 0.0
    total = np.float32(0.0)
    for j in range(n):
        e = x[j] * fbuf[j]
        x[j] = e
        total += e
    return total


@nb.njit(fastmath=FASTMATH, cache=CACHE, nogil=True)
def _exp_f64(x, n, shift, ibuf):
    """float64 twin of `_exp_f32` using libm's exp (exactness over speed)."""
    total = 0.0
    for j in range(n):
        e = math.exp(x[j] - shift)
        x[j] = e
        total += e
    return total


def exp_inplace(x, n, shift, ibuf):
    """x[:n] <- exp(x[:n] - shift), returns the sum: the fast float32 exp, or libm's for float64.

    Called from compiled code only; the overload below picks by dtype at compile time."""
    raise NotImplementedError("exp_inplace runs inside numba-compiled kernels")


@nb.extending.overload(exp_inplace)
def _exp_inplace_by_dtype(x, n, shift, ibuf):
    if x.dtype == nb.types.float32:
        return lambda x, n, shift, ibuf: _exp_f32(x, n, shift, ibuf)
    return lambda x, n, shift, ibuf: _exp_f64(x, n, shift, ibuf)


@nb.njit(fastmath=FASTMATH, cache=CACHE, nogil=True, inline="always")  # inlined into the kernels
def online_softmax_row(row, nk, lo, hi, r, m_i, l_i, acc, ibuf):
    """One key block of online softmax for query row r, in place.

    row[:nk] holds the row's scaled (soft-capped, masked) logits for the block; keys outside
    lo .. hi-1 are set to -inf first (the causal / window band). Then m_i[r] (running max),
    l_i[r] (running sum) and acc[r] (running output) are brought up to date, and row[:nk] becomes
    exp(logit - m_i[r]), ready to be multiplied with the block's values. Returns False, with
    row[:nk] zeroed, if the row has seen no key yet, or if a logit it sees is NaN or +inf: then
    l_i[r] becomes NaN, and stays NaN, and the row's output is NaN (reference.py).
    """
    ninf = row.dtype.type(-np.inf)
    for j in range(lo, hi):
        if not row[j] < np.inf:  # NaN or +inf
            l_i[r] = np.nan
            for i in range(nk):
                row[i] = 0.0
            return False
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
    if m_new == ninf:
        for j in range(nk):
            row[j] = 0.0
        return False
    total = exp_inplace(row, nk, m_new, ibuf)
    if m_old != m_new:
        alpha = math.exp(m_old - m_new)
        l_i[r] *= alpha
        for d in range(acc.shape[1]):
            acc[r, d] *= alpha
        m_i[r] = m_new
    l_i[r] += total
    return True
