"""Non-finite input follows one convention (attention/reference.py) on every path: a row that sees
a NaN or +inf logit is NaN (out and lse); rows that do not see it are untouched; a NaN value a row
sees reaches its output."""

import numpy as np
import pytest

from selfattn import attention, native
from selfattn.attention import kvformat

rng = np.random.default_rng(17)
B, H, H_kv, T, S, D = 1, 4, 2, 24, 300, 32

# (name, attention keyword arguments, dtype): the compiled kernels, the numba ones, compact KV
PATHS = [
    ("flash", dict(impl="flash"), np.float32),
    ("flash numba (float64)", dict(impl="flash"), np.float64),
    ("flash numba (mask)", dict(impl="flash", mask=np.ones((T, S), bool)), np.float32),
    ("decode", dict(impl="decode"), np.float32),
    ("decode numba (float64)", dict(impl="decode"), np.float64),
    ("decode numba (mask)", dict(impl="decode", mask=np.ones((T, S), bool)), np.float32),
    ("decode q8_0 cache", dict(impl="decode", kv_format="q8_0"), np.float32),
    ("flash f16 cache", dict(impl="flash", kv_format="f16"), np.float32),
]


def _inputs():
    q = rng.standard_normal((B, H, T, D))
    k = rng.standard_normal((B, H_kv, S, D))
    v = rng.standard_normal((B, H_kv, S, D))
    return q, k, v


def _poison_query(q, k, v):
    q[0, 1, 5, 7] = np.nan  # row 5 of head 1
    return "rows", [(1, 5)]


def _inf_logit(q, k, v):
    q[0, 2, :, 3] = np.abs(q[0, 2, :, 3])
    q[0, 3, :, 3] = -np.abs(q[0, 3, :, 3])
    k[0, 1, 290, 3] = np.inf  # kv head 1 (query heads 2, 3): +inf for head 2, -inf for head 3
    return "from key", 290


def _nan_key(q, k, v):
    k[0, 0, 285, 0] = np.nan  # kv head 0: query heads 0 and 1
    return "from key", 285


def _nan_key_before_the_window(q, k, v):
    k[0, 0, 10, 0] = np.nan  # window 64: no query (positions 276 .. 299) sees key 10
    return "window", None


def _nan_value(q, k, v):
    v[0, 1, 280, 2] = np.nan
    return "value", 280


CASES = [_poison_query, _inf_logit, _nan_key, _nan_key_before_the_window, _nan_value]


def _run(q, k, v, kwargs, dtype, window):
    kwargs = dict(kwargs)
    fmt = kwargs.get("kv_format")
    if fmt:
        k, v = kvformat.quantize(k, fmt), kvformat.quantize(v, fmt)
    else:
        k, v = k.astype(dtype), v.astype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        out, lse = attention(q.astype(dtype), k, v, causal=True, window=window, return_lse=True,
                             **kwargs)
        ref, ref_lse = attention(q.astype(dtype), k, v, causal=True, window=window,
                                 return_lse=True, **dict(kwargs, impl="reference"))
    return out, lse, ref, ref_lse


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[1:])
@pytest.mark.parametrize("name, kwargs, dtype", PATHS, ids=[p[0] for p in PATHS])
def test_every_path_follows_the_convention(case, name, kwargs, dtype):
    if "numba" not in name and not native.available():
        pytest.skip("the compiled kernels are not built")
    q, k, v = _inputs()
    what, where = case(q, k, v)
    window = 64 if what == "window" else None
    out, lse, ref, ref_lse = _run(q, k, v, kwargs, dtype, window)
    nan_rows = np.isnan(ref).any(-1)
    # the reference itself: exactly the rows that see the poison
    pos = np.arange(S - T, S)
    if what == "rows":
        want = np.zeros((B, H, T), bool)
        for h, t in where:
            want[0, h, t] = True
    elif what == "from key":
        want = np.zeros((B, H, T), bool)
        heads = [2] if case is _inf_logit else [0, 1]  # head 3 sees -inf there: a zero weight
        for h in heads:
            want[0, h] = pos >= where
    elif what == "window":
        want = np.zeros((B, H, T), bool)
    else:  # a NaN value: NaN for the rows that see it; the other rows of its kv head may read
        # it with weight 0 inside a tile (0 * NaN is NaN), which the convention leaves open
        seen = np.zeros((B, H, T), bool)
        seen[0, 2:4] = pos >= where
        if "kv_format" in kwargs:  # ggml's q8_0 / q4_0 rounding stores a NaN as a finite
            seen = nan_rows        # value: the reference reads the same rows
        for got in (ref, out):
            rows = np.isnan(got).any(-1)
            assert rows[seen].all() and not rows[0, :2].any(), name
        assert np.isfinite(lse).all() and np.isfinite(ref_lse).all()
        return
    if "kv_format" in kwargs:  # a quantized block holding inf or NaN decodes to several: as
        want = nan_rows         # the reference reads the same stored rows, it decides
    np.testing.assert_array_equal(nan_rows, want)
    np.testing.assert_array_equal(np.isnan(ref_lse), want)
    # every path: the same NaN rows, the same values elsewhere
    np.testing.assert_array_equal(np.isnan(out).any(-1), want, err_msg=name)
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse), err_msg=name)
    tol = 1e-4 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(out[~want], ref[~want], rtol=tol, atol=tol, err_msg=name)
