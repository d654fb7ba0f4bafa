"""The specification: attention as the formula reads, in float64, with the T x S matrix built.

    logits = (q kᵀ) · scale                               (B, H, T, S)
    logits = c · tanh(logits / c)                         if softcap c
    logits = logits + mask  (additive), or -inf where a boolean mask is False
    logits = -inf outside the band of key positions       (causal, window)
    out    = softmax(logits) v,  lse = log Σ_j exp(logits_j)

Query i of T sits at key position S - T + i (bottom-right alignment), so a causal query sees keys
0 .. S - T + i. A row that sees no key gives out = 0 and lse = -inf.

Non-finite input, one convention for every implementation: a row whose visible logits (after
scale, soft-cap and mask; keys it does not see are -inf) hold a NaN or a +inf - a NaN or
infinite query, a NaN key, a product that overflows - gives out = NaN and lse = NaN: softmax is
undefined there, and a NaN says so where zeros or a finite guess would hide it. A NaN or infinite
value of a key a row sees reaches its output as IEEE arithmetic carries it (NaN).

Every fast path is tested against this function. It costs O(B·H·T·S) memory: it is the spec, not
a kernel.
"""

import numpy as np


def band_mask(T: int, S: int, left, right) -> np.ndarray:
    """(T, S) bool: key j is visible from query i iff pos - left <= j <= pos + right, pos = S-T+i.

    left / right of None mean unbounded on that side (causal is right = 0).
    """
    pos = np.arange(S - T, S)[:, None]
    j = np.arange(S)[None, :]
    ok = np.ones((T, S), bool)
    if left is not None:
        ok &= j >= pos - left
    if right is not None:
        ok &= j <= pos + right
    return ok


def attention_weights(q, k, *, band=(None, None), mask=None, softcap=None, scale=None):
    """The attention matrix itself: softmax of the masked, scaled logits, (B, H, T, S) float64.

    Arguments as `attention_reference`. Returns (p, m, l): p normalized (rows sum to 1, a row
    that sees no key is all zeros, a row with a NaN or +inf logit all NaN), and each row's max
    logit m and unnormalized sum l (B, H, T, 1; l NaN for those rows) from which lse = m + log l.
    """
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    k = np.repeat(k, H // H_kv, axis=1)  # GQA: query head h uses kv head h // (H / H_kv)
    scale = 1.0 / np.sqrt(D) if scale is None else scale

    logits = (q @ k.swapaxes(-1, -2)) * scale
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    visible = np.broadcast_to(band_mask(T, S, *band), logits.shape)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            visible = visible & mask
        else:
            logits = logits + mask
    logits = np.where(visible, logits, -np.inf)
    undefined = ~(logits < np.inf).all(axis=-1, keepdims=True)  # a visible NaN or +inf
    logits = np.where(undefined, -np.inf, logits)

    m = logits.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # rows with nothing visible
    p = np.exp(logits - m)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(l > 0, p / l, 0.0)
    p = np.where(undefined, np.nan, p)
    l = np.where(undefined, np.nan, l)
    return p, m, l


def attention_reference(q, k, v, *, band=(None, None), mask=None, softcap=None, scale=None):
    """q (B, H, T, D), k (B, H_kv, S, D), v (B, H_kv, S, Dv) -> out (B, H, T, Dv), lse (B, H, T).

    band: (left, right) as in `band_mask`. mask: bool (True = may attend) or additive float,
    broadcastable to (B, H, T, S). Computed and returned in float64.
    """
    p, m, l = attention_weights(q, k, band=band, mask=mask, softcap=softcap, scale=scale)
    v = np.asarray(v, np.float64)
    v = np.repeat(v, q.shape[1] // v.shape[1], axis=1)
    out = p @ v
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(np.isnan(l), np.nan, np.where(l > 0, m + np.log(l), -np.inf))[..., 0]
    return out, lse
