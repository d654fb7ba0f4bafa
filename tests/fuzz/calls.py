"""Random attention calls, valid and not: each must be a ValueError naming what is wrong, or a
result equal to the reference's on the same arguments."""

import numpy as np

from selfattn import attention
from selfattn.attention import kvformat

# words a refusal may use to name the argument at fault
NAMES = ("q", "k", "v", "mask", "window", "softcap", "scale", "impl", "kv_len", "kv_format",
         "dtype", "H", "D", "shape", "batch", "dimension", "rank", "cache", "head dim")


def pick(rng, options):
    """One of options, as it is (rng.choice would turn a mixed list into a NumPy array)."""
    return options[int(rng.integers(len(options)))]


def _shape(rng, B, H, T, D):
    dims = [B, H, T, D]
    if rng.random() < 0.08:  # a zero or a negative-looking dimension
        dims[rng.integers(4)] = 0
    return tuple(dims) if rng.random() > 0.15 else tuple(dims[1:])


def random_call(rng: np.random.Generator) -> dict:
    """Keyword arguments for one attention call, roughly a third of them invalid somehow."""
    B, H_kv = int(rng.integers(1, 3)), int(pick(rng, [1, 2, 3]))
    G = int(pick(rng, [1, 2, 3]))
    T, S = int(rng.integers(1, 40)), int(rng.integers(1, 80))
    D = int(pick(rng, [8, 16, 32, 64]))
    dtype = pick(rng, [np.float32, np.float32, np.float64, np.float16, np.int32, np.complex64])
    bad = rng.random() < 0.35
    q = rng.standard_normal(_shape(rng, B, H_kv * G, T, D) if bad else (B, H_kv * G, T, D))
    k = rng.standard_normal((B, H_kv, S, D))
    v = rng.standard_normal((B, H_kv, S, D if rng.random() < 0.8 else D // 2 or 1))
    if q.ndim == 3:
        k, v = k[0], v[0]
    call = dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype))
    if bad and rng.random() < 0.3 and dtype is not np.complex64:  # mismatched dtype or shape
        call[pick(rng, ["k", "v"])] = call["k"][..., : max(D - 8, 1)].astype(np.float32)
    call["causal"] = bool(rng.random() < 0.6)
    r = rng.random()
    if r < 0.15:
        call["window"] = int(rng.integers(-2, S + 2))
    elif r < 0.25:
        call["window"] = (int(rng.integers(-2, S)), int(rng.integers(-2, S)))
    elif r < 0.28:
        call["window"] = pick(rng, [True, 2.5, "8", (1, 2, 3)])
    r = rng.random()
    if r < 0.15:
        call["softcap"] = pick(rng, [0.5, 30.0, 0.0, -1.0, float("nan"), float("inf"), True])
    r = rng.random()
    if r < 0.15:
        call["scale"] = pick(rng, [0.1, 1.0, float("nan"), float("inf"), True, "x"])
    if rng.random() < 0.15:
        shape = (call["q"].shape[:-1] + (S,)) if rng.random() < 0.8 else (T + 1, S)
        m = rng.random(shape) < 0.7
        call["mask"] = m if rng.random() < 0.5 else np.where(m, 0.0, -np.inf).astype(np.float32)
    if rng.random() < 0.1:
        call["kv_len"] = pick(rng, [0, 1, S // 2 + 1, S, S + 1, True, 2.0])
    if rng.random() < 0.05:
        call["impl"] = pick(rng, ["flash", "decode", "reference", "fast", None])
    if rng.random() < 0.15 and call["q"].dtype in (np.float32, np.float64, np.float16):
        fmt = pick(rng, ["f16", "q8_0", "q4_0", "q2_k"])
        if fmt in kvformat.FORMATS and D % 32 == 0 and v.shape[-1] == D and \
                call["k"].shape == call["v"].shape:
            call["k"] = kvformat.quantize(call["k"], fmt)
            call["v"] = kvformat.quantize(call["v"], fmt)
        call["kv_format"] = fmt
    return call


def check(call: dict) -> str:
    """'refused' or 'equal'; AssertionError when a refusal names nothing or a result differs."""
    try:
        out = attention(**call)
    except ValueError as e:
        message = str(e)
        assert any(name in message for name in NAMES), message
        assert "\n" not in message, message
        return "refused"
    want = attention(**dict(call, impl="reference"))
    tol = 2e-2 if call["q"].dtype == np.float16 else 1e-4
    np.testing.assert_allclose(out.astype(np.float64), want.astype(np.float64), rtol=tol,
                               atol=tol)
    return "equal"
