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


def stored_inputs(seed: int, B: int, H: int, H_kv: int, T: int, S: int, D: int, Dv: int, fmt: str):
    """q (B, H, T, D) float32 and K, V caches of fmt (B, H_kv, S + 5, ...): five stored rows past
    the S a kernel may read, so reading one too many would change the result."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, T, D), np.float32)
    k = kvformat.quantize(rng.standard_normal((B, H_kv, S + 5, D), np.float32), fmt)
    v = kvformat.quantize(rng.standard_normal((B, H_kv, S + 5, Dv), np.float32), fmt)
    return q, k, v


def assert_matches_twin_and_spec(out, lse, twin, q, k, v, S, band, softcap, scale, fmt):
    """A compiled kernel's (out, lse) against its twin's (the numba kernel: the same algorithm,
    so tight tolerances) and against the reference on the decoded rows."""
    np.testing.assert_allclose(out, twin[0], atol=2e-6, rtol=2e-5)
    np.testing.assert_allclose(lse, twin[1], atol=2e-5, rtol=2e-6)
    spec_out, spec_lse, vd = reference_on_stored(q, k, v, S, band, softcap, scale, fmt)
    np.testing.assert_allclose(out, spec_out, atol=3e-6 * np.abs(vd).max())
    np.testing.assert_allclose(lse, spec_lse, atol=2e-5)
