"""Properties that hold whatever the shapes: causality, GQA, merge, empty rows, conventions."""

import warnings

import numpy as np
import pytest

import selfattn
from selfattn.attention import attention_reference

IMPLS = ["reference", "flash", "decode"]


def qkv(rng, B=1, H=4, H_kv=2, T=40, S=40, D=32, dtype=np.float32):
    return (rng.standard_normal((B, H, T, D)).astype(dtype),
            rng.standard_normal((B, H_kv, S, D)).astype(dtype),
            rng.standard_normal((B, H_kv, S, D)).astype(dtype))


@pytest.mark.parametrize("impl", ["flash", "reference"])
def test_causal_row_ignores_later_tokens(rng, impl):
    q, k, v = qkv(rng, T=700, S=700)
    out = selfattn.attention(q, k, v, causal=True, impl=impl)
    p = 333  # change everything after position p
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for x in (q2, k2, v2):
        x[:, :, p + 1:] = rng.standard_normal(x[:, :, p + 1:].shape)
    out2 = selfattn.attention(q2, k2, v2, causal=True, impl=impl)
    np.testing.assert_array_equal(out[:, :, :p + 1], out2[:, :, :p + 1])
    assert not np.allclose(out[:, :, p + 1:], out2[:, :, p + 1:])


def test_decode_causal_ignores_keys_past_the_queries(rng):
    # bottom-right alignment: with T < S the queries are the last T positions; a cache of S keys
    # followed by garbage beyond S is not what is passed, so test the rule directly instead:
    # query i (of T) sees exactly keys 0 .. S - T + i.
    q, k, v = qkv(rng, T=5, S=50)
    out = selfattn.attention(q, k, v, causal=True, impl="decode")
    for i in range(5):
        visible = 50 - 5 + i + 1
        row = selfattn.attention(q[:, :, i:i + 1], k[:, :, :visible], v[:, :, :visible],
                                 impl="decode")
        np.testing.assert_allclose(out[:, :, i:i + 1], row, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_bottom_right_alignment(rng, impl):
    """Causal with T < S equals the last T rows of causal T = S."""
    q, k, v = qkv(rng, T=64, S=64)
    full = selfattn.attention(q, k, v, causal=True, impl="reference")
    tail = selfattn.attention(q[:, :, -9:], k, v, causal=True, impl=impl)
    np.testing.assert_allclose(tail, full[:, :, -9:], atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_gqa_equals_repeated_kv(rng, impl):
    q, k, v = qkv(rng, H=8, H_kv=2, T=13 if impl == "decode" else 77, S=300)
    gqa = selfattn.attention(q, k, v, causal=True, impl=impl)
    mha = selfattn.attention(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1), causal=True,
                             impl=impl)
    np.testing.assert_allclose(gqa, mha, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_of_two_halves_is_the_whole(rng, impl):
    q, k, v = qkv(rng, T=7 if impl == "decode" else 90, S=301)
    whole, whole_lse = selfattn.attention(q, k, v, impl=impl, return_lse=True)
    halves = [selfattn.attention(q, k[:, :, sl], v[:, :, sl], impl=impl, return_lse=True)
              for sl in (slice(0, 123), slice(123, None))]
    out, lse = selfattn.merge(halves)
    np.testing.assert_allclose(out, whole, atol=2e-6)
    np.testing.assert_allclose(lse, whole_lse, atol=2e-6)


def test_merge_with_a_part_that_saw_nothing(rng):
    q, k, v = qkv(rng, T=3, S=20)
    seen = selfattn.attention(q, k, v, return_lse=True)
    none = selfattn.attention(q, k, v, mask=np.zeros((3, 20), bool), return_lse=True)
    out, lse = selfattn.merge([none, seen])
    np.testing.assert_allclose(out, seen[0], atol=1e-7)
    out, lse = selfattn.merge([none, none])
    assert (out == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_row_is_zero_without_warnings(rng, impl):
    q, k, v = qkv(rng, T=6, S=33)
    mask = np.ones((6, 33), bool)
    mask[2] = False
    additive = np.where(mask, 0.0, -np.inf)
    for m in (mask, additive):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, lse = selfattn.attention(q, k, v, mask=m, impl=impl, return_lse=True)
        assert (out[:, :, 2] == 0).all() and np.isneginf(lse[:, :, 2]).all()
        assert np.isfinite(out).all() and np.isfinite(lse[:, :, [0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_window_int_is_mistral_sliding_window(rng, impl):
    q, k, v = qkv(rng, T=16, S=50)
    out = selfattn.attention(q, k, v, causal=True, window=4, impl=impl)
    pos = np.arange(34, 50)[:, None]
    j = np.arange(50)[None, :]
    mask = (j <= pos) & (j > pos - 4)
    ref = selfattn.attention(q, k, v, mask=mask, impl="reference")
    np.testing.assert_allclose(out, ref, atol=2e-6)


def test_three_d_inputs_and_strided_views(rng):
    q, k, v = qkv(rng, B=1, T=20, S=30)
    out4 = selfattn.attention(q, k, v, causal=True)
    out3 = selfattn.attention(q[0], k[0], v[0], causal=True)
    assert out3.shape == out4.shape[1:]
    np.testing.assert_array_equal(out3, out4[0])
    # (B, T, H, D) storage, viewed as (B, H, T, D): not contiguous, still accepted
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(selfattn.attention(qt, k, v, causal=True), out4, atol=1e-7)


def test_float16_output_dtype_and_float64_precision(rng):
    q, k, v = qkv(rng, T=30, S=30, dtype=np.float64)
    ref, _ = attention_reference(q, k, v, band=(None, 0))
    for impl in ("flash", "decode"):
        out = selfattn.attention(q[:, :, -16:], k, v, causal=True, impl=impl)
        np.testing.assert_allclose(out, ref[:, :, -16:], atol=1e-13)
    half = selfattn.attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16))
    assert half.dtype == np.float16


def test_torch_tensor_inputs(rng):
    torch = pytest.importorskip("torch")  # a peer for benchmarks, not a dependency
    q, k, v = qkv(rng, T=10, S=10)
    out = selfattn.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                             causal=True)
    np.testing.assert_array_equal(out, selfattn.attention(q, k, v, causal=True))


def test_against_torch_sdpa_when_available(rng):
    torch = pytest.importorskip("torch")
    q, k, v = qkv(rng, H=6, H_kv=2, T=50, S=50)
    expect = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), is_causal=True,
        enable_gqa=True).numpy()
    np.testing.assert_allclose(selfattn.attention(q, k, v, causal=True), expect, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_len_reads_only_the_valid_part_of_a_cache(rng, impl):
    q, k, v = qkv(rng, T=9, S=200)
    cache_k = np.full((1, 2, 512, 32), np.nan, np.float32)  # garbage past kv_len must not leak
    cache_v = np.full((1, 2, 512, 32), np.nan, np.float32)
    cache_k[:, :, :200], cache_v[:, :, :200] = k, v
    expect = selfattn.attention(q, k, v, causal=True, impl=impl)
    got = selfattn.attention(q, cache_k, cache_v, causal=True, impl=impl, kv_len=200)
    np.testing.assert_array_equal(got, expect)
