"""The spec for the compiled kernels' tests: the reference on the values a stored KV cache
decodes to."""

import numpy as np

from selfattn.attention import kvformat
from selfattn.attention.reference import attention_reference


def reference_on_stored(q: np.ndarray, k: np.ndarray, v: np.ndarray, S: int, band, softcap,
                        scale: float, fmt: str):
    """q (B, H, T, D); k, v (B, H_kv, S_max, row) stored rows of fmt, the first S used.
    Returns the reference's out and lse, and the decoded values vd (B, H_kv, S, Dv), whose
    largest magnitude sets the output tolerance."""
    D = q.shape[-1]
    Dv = D if fmt != "f32" else v.shape[-1]
    kd, vd = (kvformat.decode_rows(x[:, :, :S], fmt, x_d) for x, x_d in ((k, D), (v, Dv)))
    out, lse = attention_reference(q, kd, vd, band=band, mask=None, softcap=softcap, scale=scale)
    return out, lse, vd
