"""`attention`: one signature, validated once, dispatched to the reference or a fast path.

Conventions (the same as FlashAttention >= 2.1 and MLX):
- q (B, H, T, D) or (H, T, D); k (B, H_kv, S, D); v (B, H_kv, S, D_v); H a multiple of H_kv.
- Query i of T sits at key position S - T + i: with a KV cache of S keys and T new queries, the
  queries are the last T positions ("bottom-right" causal alignment).
- `causal`: query at position p sees keys <= p. `window=w` (int): keys p-w+1 .. p. `window=(l, r)`:
  keys p-l .. p+r. All visibility rules, and `mask`, are combined (a key must pass all of them).
- `kv_len`: k and v may be a preallocated cache of which only the first kv_len keys are valid
  (FlashAttention's `cache_seqlens`); then S = kv_len everywhere above, and nothing past it is read.
- A row that sees no key returns 0 (and lse -inf).
"""

import numbers

import numpy as np

from .decode import decode_attention
from .flash import flash_attention
from .reference import attention_reference
from .reference import attention_weights as _reference_weights

IMPLS = ("auto", "reference", "flash", "decode")
DECODE_MAX_T = 16  # "auto" sends T <= this to the split-K decode path
_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _as_array(x, name):
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)  # torch CPU tensors, memoryviews, ... (a view when possible)
    except Exception as e:  # noqa: BLE001 - report what the caller passed, whatever failed
        raise ValueError(f"{name}: cannot be read as an array ({type(x).__name__}): {e}") from e


def _check_window(window):
    """-> (left, right) with None for an open side."""
    if window is None:
        return None, None
    if isinstance(window, numbers.Integral) and not isinstance(window, bool):
        if window < 1:
            raise ValueError(f"window must be >= 1 (keys a query sees, itself included), got {window}")
        return int(window) - 1, 0
    if isinstance(window, (tuple, list)) and len(window) == 2:
        sides = []
        for side, name in zip(window, ("left", "right")):
            if side is None or (isinstance(side, numbers.Integral) and side == -1):
                sides.append(None)  # FlashAttention writes an open side as -1
            elif isinstance(side, numbers.Integral) and not isinstance(side, bool) and side >= 0:
                sides.append(int(side))
            else:
                raise ValueError(f"window {name} side must be an int >= 0 (or -1/None for "
                                 f"unbounded), got {side!r}")
        return sides[0], sides[1]
    raise ValueError(f"window must be an int >= 1 or a pair (left, right), got {window!r}")


def _validate(q, k, v, causal, mask, window, softcap, scale, impl, kv_len=None):
    q, k, v = _as_array(q, "q"), _as_array(k, "k"), _as_array(v, "v")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be (B, H, T, D) or (H, T, D), got shape {q.shape}")
    if k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"q, k, v must have the same rank: q {q.shape}, k {k.shape}, v {v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be float16, float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    batched = q.ndim == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
    B, H, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must agree on (B, H_kv, S): k {k.shape}, v {v.shape}")
    if k.shape[3] != D:
        raise ValueError(f"q and k must share the head dim D: q {q.shape}, k {k.shape}")
    H_kv = k.shape[1]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"H ({H}) must be a multiple of H_kv ({H_kv}): q {q.shape}, k {k.shape}")
    if min(q.shape) == 0 or min(k.shape) == 0 or min(v.shape) == 0:
        raise ValueError(f"empty dimension: q {q.shape}, k {k.shape}, v {v.shape}")
    S = k.shape[2]
    if kv_len is not None:
        if not isinstance(kv_len, numbers.Integral) or isinstance(kv_len, bool) or \
                not 1 <= kv_len <= S:
            raise ValueError(f"kv_len must be an int in 1 .. S = {S} (k {k.shape}), got {kv_len!r}")
        S = int(kv_len)

    left, right = _check_window(window)
    if causal:
        right = 0 if right is None else min(right, 0)

    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or \
                not np.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be a finite number > 0, got {softcap!r}")
        softcap = float(softcap)
    if scale is None:
        scale = 1.0 / np.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or \
            not np.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")

    if mask is not None:
        mask = _as_array(mask, "mask")
        target = (B, H, T, S) if batched else (H, T, S)
        try:
            fits = np.broadcast_shapes(mask.shape, target) == target
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to "
                             f"{'(B, H, T, S)' if batched else '(H, T, S)'} = {target}")
        if mask.dtype != bool and mask.dtype.kind != "f":
            raise ValueError(f"mask must be bool (True = may attend) or an additive float, got "
                             f"{mask.dtype}")
        if mask.dtype.kind == "f" and (np.isnan(mask).any() or np.isposinf(mask).any()):
            raise ValueError("additive mask must not contain NaN or +inf")
    return q, k, v, (left, right), mask, softcap, float(scale), S


def attention(q, k, v, *, causal=False, mask=None, window=None, softcap=None, scale=None,
              return_lse=False, impl="auto", kv_len=None, kv_format=None):
    """Exact scaled dot-product attention; see the module docstring for the conventions.

    Returns out (B, H, T, D_v) in q's dtype (no B axis if q had none), and with return_lse also
    lse (B, H, T): the log-sum-exp of each row's scaled logits, float32 (float64 for float64 q).
    float16 is computed in float32; float64 in float64.

    kv_format ("f16", "q8_0", "q4_0"): k and v are a compact KV cache, rows stored as
    `selfattn.attention.kvformat` describes ((B, H_kv, S, row items) uint16 or uint8, D_v = D).
    The decode and flash paths read them in place, decoding one key block at a time inside the
    kernel; the reference widens the kv_len visible rows to float32 first.
    """
    if kv_format not in (None, "f32"):
        return _attention_compact(q, k, v, causal=causal, mask=mask, window=window,
                                  softcap=softcap, scale=scale, return_lse=return_lse, impl=impl,
                                  kv_len=kv_len, kv_format=kv_format)
    batched = _as_array(q, "q").ndim == 4
    q, k, v, band, mask, softcap, scale, S = _validate(q, k, v, causal, mask, window, softcap,
                                                       scale, impl, kv_len)
    in_dtype = q.dtype
    if impl == "auto":
        impl = "decode" if q.shape[2] <= DECODE_MAX_T else "flash"

    if impl == "reference":
        out, lse = attention_reference(q, k[:, :, :S], v[:, :, :S], band=band, mask=mask,
                                       softcap=softcap, scale=scale)
    else:
        work = np.float64 if in_dtype == np.float64 else np.float32
        out, lse = _run_kernel(impl, q, k, v, S, band, mask, softcap, scale, work)
    return _finish(out, lse, in_dtype, np.float64 if in_dtype == np.float64 else np.float32,
                   batched, return_lse)


def _run_kernel(impl, q, k, v, S, band, mask, softcap, scale, work, fmt="f32"):
    """The decode or flash kernel on validated 4-d input. A contiguous cache is used in place
    (S says how much of it is valid); anything else has its first S keys copied to contiguous, so
    the compiled loops see unit strides. Compact rows (fmt) keep their stored dtype."""
    q = np.ascontiguousarray(q, work)
    k, v = (np.ascontiguousarray(x if x.flags.c_contiguous else x[:, :, :S],
                                 work if fmt == "f32" else None) for x in (k, v))
    B, H, T, _ = q.shape
    if mask is not None:
        if mask.dtype == bool:
            mask = np.where(mask, work(0), work(-np.inf))
        mask = np.broadcast_to(mask.astype(work, copy=False), (B, H, T, S))
    kernel = decode_attention if impl == "decode" else flash_attention
    edges = tuple(S + T if e is None else e for e in band)  # an open side: past every key
    return kernel(q, k, v, S, edges, mask, softcap, scale, fmt=fmt)


def _finish(out, lse, out_dtype, lse_dtype, batched, return_lse):
    out = out.astype(out_dtype, copy=False)
    lse = lse.astype(lse_dtype, copy=False)
    if not batched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _attention_compact(q, k, v, *, kv_format, impl, kv_len, return_lse, **flags):
    from . import kvformat

    q, k, v = _as_array(q, "q"), _as_array(k, "k"), _as_array(v, "v")
    if kv_format not in kvformat.FORMATS:
        raise ValueError(f"kv_format must be one of {kvformat.FORMATS}, got {kv_format!r}")
    if q.ndim not in (3, 4) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"q, k, v must be (B, H, T, D) / (B, H_kv, S, row) or without B: "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    D = q.shape[-1]
    items, dtype = kvformat.row_shape(kv_format, D)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != dtype or x.shape[-1] != items:
            raise ValueError(f"{name}: a {kv_format} cache of head dim {D} has rows of {items} "
                             f"{dtype}, got {x.dtype} {x.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape: k {k.shape}, v {v.shape}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype must be float16, float32 or float64, got {q.dtype}")
    # validate everything else against zero-byte float stand-ins of the decoded shapes
    proxy = np.broadcast_to(np.zeros((), q.dtype), k.shape[:-1] + (D,))
    T = q.shape[-2]
    chosen = impl if impl != "auto" else ("decode" if T <= DECODE_MAX_T else "flash")
    if chosen == "reference":  # the spec reads the decoded values
        S = _validate(q, proxy, proxy, flags["causal"], flags["mask"], flags["window"],
                      flags["softcap"], flags["scale"], impl, kv_len)[-1]
        wide = [kvformat.decode_rows(x[..., :S, :], kv_format, D) for x in (k, v)]
        # compact rows are float32 values, so the query is too (as on the kernels' path)
        got = attention(q.astype(np.float32, copy=False), *wide, impl=chosen,
                        return_lse=return_lse, **flags)
        out = got[0] if return_lse else got
        out = out.astype(q.dtype, copy=False)
        return (out, got[1]) if return_lse else out
    batched = q.ndim == 4
    q4, _, _, band, mask, softcap, scale, S = _validate(q, proxy, proxy, flags["causal"],
                                                        flags["mask"], flags["window"],
                                                        flags["softcap"], flags["scale"], impl,
                                                        kv_len)
    k4, v4 = (x if batched else x[None] for x in (k, v))
    # compact rows decode to float32, so the work is float32 whatever q's dtype
    out, lse = _run_kernel(chosen, q4, k4, v4, S, band, mask, softcap, scale, np.float32,
                           kv_format)
    return _finish(out, lse, q4.dtype, np.float32, batched, return_lse)


def decode_cached(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_len: int, window,
                  kv_format: str, softcap: float | None = None,
                  scale: float | None = None) -> np.ndarray:
    """Causal attention of T <= DECODE_MAX_T queries q (B, H, T, D) float32 over the first kv_len
    keys of a KV cache k, v (B, H_kv, S_max, row) that the caller built and so knows valid (the
    model's KVCache): `attention`'s decode path without its argument checks, which cost more than
    the kernel at small depths. window: None or an int (keys p-w+1 .. p); scale None:
    1/sqrt(D)."""
    band = (None if window is None else window - 1, 0)
    scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else float(scale)
    out, _ = _run_kernel("decode", q, k, v, kv_len, band, None, softcap, scale, np.float32,
                         kv_format)
    return out


def warmup(kv_formats=("f32",)):
    """Compile (or load from numba's cache) the kernels for float32 now, and the decode kernel for
    each compact KV format asked for, not in the first timed call: a fresh process spends ~0.1-1 s
    per kernel on that (and ~10 s the very first time, when numba compiles and caches it)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 40, 32), np.float32)
    kv = rng.standard_normal((1, 1, 40, 32), np.float32)
    attention(q, kv, kv, causal=True, impl="flash")
    attention(q[:, :, -1:], kv, kv, causal=True, impl="decode")
    for fmt in kv_formats:
        if fmt != "f32":
            from .kvformat import quantize

            stored = quantize(kv, fmt)
            attention(q[:, :, -1:], stored, stored, causal=True, kv_format=fmt)
            attention(q, stored, stored, causal=True, kv_format=fmt)


def attention_weights(q, k, *, causal=False, mask=None, window=None, softcap=None, scale=None,
                      kv_len=None):
    """The attention matrix softmax(q kᵀ · scale + mask) itself: (B, H, T, S) float64, rows
    summing to 1 (0 where a row sees no key). Same arguments and conventions as `attention`.

    It is computed by the reference and costs B·H·T·S·8 bytes: for looking at, not for speed.
    """
    batched = _as_array(q, "q").ndim == 4
    q, k, _, band, mask, softcap, scale, S = _validate(q, k, k, causal, mask, window, softcap,
                                                       scale, "reference", kv_len)
    p, _, _ = _reference_weights(q, k[:, :, :S], band=band, mask=mask, softcap=softcap,
                                 scale=scale)
    return p if batched else p[0]
