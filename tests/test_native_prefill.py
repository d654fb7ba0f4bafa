"""The C prefill kernel (native/prefill.c) against the numba + BLAS flash kernel it replaces for
unmasked float32 queries, and against the reference (the spec) on the decoded K/V values: every
KV format, GQA/MQA, T != S, causal and sliding windows, two-sided bands, soft-capping, D_v != D,
head dims that are not multiples of 8, partial query blocks and key tiles."""

import numpy as np
import pytest

from selfattn import native
from selfattn.attention import kvformat, threads
from selfattn.attention.flash import flash_attention
from selfattn.attention.reference import attention_reference

from .spec import assert_matches_twin_and_spec, stored_inputs

# every test at each instruction-set level this CPU runs
pytestmark = [pytest.mark.skipif(not native.available(),
                                 reason="compiled kernels not built or CPU without AVX2/FMA/F16C"),
              pytest.mark.usefixtures("isa_level")]

CASES = [  # B, H, H_kv, D, Dv, S, T, band, softcap
    (1, 9, 3, 64, 64, 300, 300, (300, 0), None),  # SmolLM2's heads, causal prefill
    (1, 32, 8, 128, 128, 700, 100, (699, 0), None),  # Llama-3-8B's, a chunk after a cached prefix
    (2, 4, 1, 32, 32, 200, 200, (16, 0), None),  # MQA, batch of two, sliding window of 17
    (1, 4, 2, 64, 64, 300, 150, (40, 20), 15.0),  # a two-sided band with soft-capping
    (1, 2, 2, 96, 96, 1, 1, (1, 0), None),  # one key, one query
    (1, 4, 2, 64, 80, 257, 130, (257, 0), None),  # Dv != D (float32 rows only), partial tiles
    (1, 4, 2, 40, 40, 129, 70, (129, 0), None),  # D not a multiple of 32 (f32 and f16 rows)
    (1, 3, 1, 20, 12, 90, 90, (90, 90), None),  # D, Dv not multiples of 8, no band (f32)
    (1, 2, 1, 32, 32, 4096, 2048, (4096, 0), None),  # a long prompt: 128 queries a task
]


def _supported(fmt, D, Dv):
    return fmt == "f32" or (D == Dv and D % (8 if fmt == "f16" else 32) == 0)


@pytest.mark.parametrize("fmt,B,H,H_kv,D,Dv,S,T,band,softcap", [
    (fmt, *case) for fmt in kvformat.FORMATS for case in CASES if _supported(fmt, case[3], case[4])])
def test_c_prefill_kernel_equals_numba_kernel_and_reference(fmt, B, H, H_kv, D, Dv, S, T, band,
                                                            softcap):
    assert native.flash_supported(fmt, D, Dv, False, np.float32)
    q, k, v = stored_inputs(S + T + D, B, H, H_kv, T, S, D, Dv, fmt)
    scale = 1 / np.sqrt(D)
    out, lse = flash_attention(q, k, v, S, band, None, softcap, scale, fmt=fmt)
    twin = flash_attention(q, k, v, S, band, None, softcap, scale, fmt=fmt, compiled=False)
    assert_matches_twin_and_spec(out, lse, twin, q, k, v, S, band, softcap, scale, fmt)


def test_c_prefill_rows_that_see_nothing():
    """More queries than keys (the first ones sit before key 0) and a band that starts past the
    query: those rows are zeros with lse -inf, the others finite, as in the reference."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 90, 32), np.float32)
    k = rng.standard_normal((1, 1, 20, 32), np.float32)
    for band in ((20, 0), (-3, 30)):  # causal; keys p+3 .. p+30
        out, lse = flash_attention(q, k, k, 20, band, None, None, 0.2)
        spec_out, spec_lse = attention_reference(q, k, k, band=band, mask=None, softcap=None,
                                                 scale=0.2)
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(spec_lse))
        assert np.isneginf(lse).any() and np.isfinite(lse).any()
        assert (out[np.isneginf(lse)] == 0).all()
        np.testing.assert_allclose(out, spec_out, atol=2e-6)


def test_c_prefill_logits_far_apart():
    """Logits spread over hundreds and rising along the keys, so every tile raises the running
    maximum: an exponent of a positive difference, or a rescale skipped, overflows or drifts."""
    rng = np.random.default_rng(11)
    S, D = 300, 64
    k = rng.standard_normal((1, 1, S, D), np.float32)
    k[..., 0] = np.linspace(-1.0, 1.0, S, dtype=np.float32) * 40
    q = np.zeros((1, 3, S, D), np.float32)
    q[0, :, :, 0] = np.array([30.0, -30.0, 10.0], np.float32)[:, None]
    v = rng.standard_normal((1, 1, S, D), np.float32)
    out, lse = flash_attention(q, k, v, S, (S, 0), None, None, 1.0)
    spec_out, spec_lse = attention_reference(q, k, v, band=(S, 0), mask=None, softcap=None,
                                             scale=1.0)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, spec_out, atol=3e-6 * np.abs(v).max())
    np.testing.assert_allclose(lse, spec_lse, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_c_prefill_does_not_depend_on_the_thread_count(n):
    """A task is a whole block of queries: the same sums in any order, bit for bit."""
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 8, 200, 64), np.float32)
    k = rng.standard_normal((1, 2, 200, 64), np.float32)
    before = threads.num_threads()
    try:
        threads.set_num_threads(1)
        one = flash_attention(q, k, k, 200, (200, 0), None, None, 0.125)
        threads.set_num_threads(n)
        many = flash_attention(q, k, k, 200, (200, 0), None, None, 0.125)
    finally:
        threads.set_num_threads(before)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


def test_c_prefill_refuses_what_it_does_not_take():
    """Shapes outside the kernel go to the numba kernel (flash_supported), and the entry point
    itself refuses them rather than reading past a buffer."""
    assert not native.flash_supported("f32", 64, 64, True, np.float32)  # a mask
    assert not native.flash_supported("f32", 64, 64, False, np.float64)
    assert not native.flash_supported("q8_0", 40, 40, False, np.float32)  # not whole blocks
    assert not native.flash_supported("f32", 512, 64, False, np.float32)  # D > MAX_DIM
    q = np.zeros((1, 2, 4, 32), np.float32)
    k = np.zeros((1, 1, 4, 32), np.float32)
    out, lse = np.empty((1, 2, 4, 32), np.float32), np.empty((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="unsupported shapes"):
        native.flash_attention(q, k, k, "f32", 5, 4, 0, 1.0, 0.0, out, lse)  # S > S_max
    with pytest.raises(ValueError, match="bytes"):
        native.flash_attention(q, k, k[:, :, :2], "f32", 4, 4, 0, 1.0, 0.0, out, lse)
