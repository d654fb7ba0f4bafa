"""Every fast path against the reference, over random shapes and every flag combination."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selfattn
from selfattn.attention import attention_reference
from selfattn.attention.api import _validate

from .conftest import assert_close_to_reference

SIZES = st.one_of(st.integers(1, 40), st.integers(41, 300), st.integers(301, 1100))


@st.composite
def problems(draw, max_t=None):
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    B = draw(st.integers(1, 2))
    H_kv = draw(st.sampled_from([1, 2, 3]))
    G = draw(st.sampled_from([1, 2, 4]))  # MHA, GQA; H_kv = 1 makes it MQA
    D = draw(st.sampled_from([32, 64, 80, 128]))
    Dv = draw(st.sampled_from([D, D, 48]))
    S = draw(SIZES)
    T = draw(st.integers(1, max_t)) if max_t else draw(st.one_of(st.just(S), SIZES))
    # bound the reference's T x S matrices so an example stays well under a second
    while B * H_kv * G * T * S > 3_000_000:
        S, T = max(1, S // 2), max(1, T // 2)
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, S + 3),
                            st.tuples(st.integers(0, S), st.integers(0, S))))
    softcap = draw(st.one_of(st.none(), st.floats(0.5, 30.0)))
    scale = draw(st.one_of(st.none(), st.floats(0.01, 1.0)))
    mask_kind = draw(st.sampled_from([None, "bool", "additive"]))
    mask_shape = draw(st.sampled_from([(T, S), (1, 1, T, S), (B, 1, T, S), (1, H_kv * G, 1, S),
                                       (B, H_kv * G, T, S)]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    amp = draw(st.sampled_from([1.0, 4.0]))  # larger logits stress the online max
    q = (rng.standard_normal((B, H_kv * G, T, D)) * amp).astype(dtype)
    k = rng.standard_normal((B, H_kv, S, D)).astype(dtype)
    v = rng.standard_normal((B, H_kv, S, Dv)).astype(dtype)
    mask = None
    if mask_kind == "bool":
        mask = rng.random(mask_shape) < 0.8
    elif mask_kind == "additive":
        mask = np.where(rng.random(mask_shape) < 0.8, rng.standard_normal(mask_shape), -np.inf)
    return q, k, v, dict(causal=causal, window=window, softcap=softcap, scale=scale, mask=mask)


def check(q, k, v, flags, impl):
    out, lse = selfattn.attention(q, k, v, impl=impl, return_lse=True, **flags)
    qq, kk, vv, band, mask, softcap, scale, _ = _validate(q, k, v, flags["causal"], flags["mask"],
                                                       flags["window"], flags["softcap"],
                                                       flags["scale"], impl)
    ref_out, ref_lse = attention_reference(qq, kk, vv, band=band, mask=mask, softcap=softcap,
                                           scale=scale)
    assert out.shape == ref_out.shape
    assert lse.dtype == (np.float64 if q.dtype == np.float64 else np.float32)
    assert_close_to_reference(out, lse, ref_out, ref_lse, qq, kk, v, scale, q.dtype)


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(problems())
def test_flash_matches_reference(problem):
    q, k, v, flags = problem
    check(q, k, v, flags, "flash")


@SETTINGS
@given(problems(max_t=16))
def test_decode_matches_reference(problem):
    q, k, v, flags = problem
    check(q, k, v, flags, "decode")


@SETTINGS
@given(problems())
def test_auto_matches_reference(problem):
    q, k, v, flags = problem
    check(q, k, v, flags, "auto")


@pytest.mark.parametrize("impl", ["flash", "decode"])
@pytest.mark.parametrize("T,S,D", [(1, 1, 32), (97, 97, 59), (16, 1025, 111), (1025, 1025, 64),
                                   (3, 4096, 128), (300, 2000, 80)])
def test_awkward_shapes(rng, impl, T, S, D):
    if impl == "decode" and T > 16:
        T = 16
    q = rng.standard_normal((1, 6, T, D)).astype(np.float32)
    k = rng.standard_normal((1, 2, S, D)).astype(np.float32)
    v = rng.standard_normal((1, 2, S, D)).astype(np.float32)
    check(q, k, v, dict(causal=True, window=None, softcap=None, scale=None, mask=None), impl)
