"""Combine attention computed over disjoint key sets into the attention over their union.

If out_i = softmax(logits_i) v_i over key set K_i and lse_i = log Σ_{j∈K_i} exp(logit_j), then
over K = ∪ K_i:  lse = log Σ_i exp(lse_i),  out = Σ_i exp(lse_i - lse) out_i.
This is what split-K decoding and ring attention are built on.
"""

import numpy as np


def merge(parts):
    """parts: iterable of (out (..., T, Dv), lse (..., T)) -> (out, lse) over all their keys.

    out keeps the dtype of the first part; lse is float32 (float64 if the outs are float64).
    Rows that no part saw stay 0 / -inf.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge needs at least one (out, lse) pair")
    outs, lses = [], []
    for n, part in enumerate(parts):
        if not isinstance(part, (tuple, list)) or len(part) != 2:
            raise ValueError(f"part {n} must be an (out, lse) pair, got {type(part).__name__}")
        out, lse = part
        out, lse = np.asarray(out), np.asarray(lse)
        if out.shape[:-1] != lse.shape:
            raise ValueError(f"part {n}: out {out.shape} and lse {lse.shape} disagree "
                             "(lse must be out's shape without the last axis)")
        if outs and (out.shape != outs[0].shape):
            raise ValueError(f"part {n}: out shape {out.shape} differs from part 0's "
                             f"{outs[0].shape}")
        outs.append(out)
        lses.append(lse)
    dtype = outs[0].dtype
    work = np.float64 if dtype == np.float64 else np.float32
    out, lse = merge_stacked(np.stack([x.astype(work) for x in outs]),
                             np.stack([x.astype(work) for x in lses]))
    return out.astype(dtype, copy=False), lse


def merge_stacked(out, lse, axis=0):
    """The merge over `axis` of stacked parts: out (..., P, ..., T, Dv), lse the same less Dv."""
    M = lse.max(axis=axis, keepdims=True)
    finite = np.isfinite(M)
    w = np.where(finite, np.exp(lse - np.where(finite, M, 0)), 0)  # parts that saw nothing -> 0
    total = w.sum(axis=axis)
    seen = total > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        merged = np.where(seen[..., None],
                          (w[..., None] * out).sum(axis=axis) / np.where(seen, total, 1)[..., None],
                          0)
        merged_lse = np.where(seen, np.squeeze(M, axis) + np.log(np.where(seen, total, 1)), -np.inf)
    return merged.astype(out.dtype, copy=False), merged_lse.astype(lse.dtype, copy=False)
