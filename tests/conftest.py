import numpy as np
import pytest

# Tolerances, stated once. Each fast path is compared with the float64 reference on the same
# inputs (float16 inputs are exact in float64). Two parts:
# - a floor per dtype: `out` relative to max|v| (outputs are convex combinations of v's rows),
#   `lse` absolute. float16 is computed in float32 and rounded once to float16 (half an ulp is
#   4.9e-4 relative), so its `out` floor is float16's.
# - the rounding of the logits themselves: a D-term dot product in a precision with unit roundoff
#   u is off by at most ~D·u·Σ|q_d k_d| (Higham's γ_D), so both errors may grow with
#   cond = scale · max Σ_d |q_d||k_d|. That is the same bound any float32 kernel has.
TOLERANCE = {
    np.dtype(np.float64): dict(out=1e-12, lse=1e-12, u=2.0**-53),
    np.dtype(np.float32): dict(out=3e-6, lse=2e-6, u=2.0**-24),
    np.dtype(np.float16): dict(out=1e-3, lse=2e-6, u=2.0**-24),
}


def logit_condition(q, k, scale):
    """scale · max over (row, key) of Σ_d |q_d| |k_d|, GQA-aware."""
    q, k = np.abs(np.asarray(q, np.float64)), np.abs(np.asarray(k, np.float64))
    G = q.shape[1] // k.shape[1]
    return float(scale * (q @ np.repeat(k, G, axis=1).swapaxes(-1, -2)).max())


def assert_close_to_reference(out, lse, ref_out, ref_lse, q, k, v, scale, dtype):
    tol = TOLERANCE[np.dtype(dtype)]
    assert out.dtype == np.dtype(dtype)
    D = q.shape[-1]
    logit_err = (D + 4) * tol["u"] * logit_condition(q, k, scale)
    vmax = max(1.0, float(np.abs(np.asarray(v, np.float64)).max()))
    bound = vmax * (tol["out"] + 2 * logit_err)
    err = np.abs(out.astype(np.float64) - ref_out).max()
    assert err <= bound, f"out error {err:.3g} > {bound:.3g}"
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "rows with no key differ"
    fin = np.isfinite(ref_lse)
    if fin.any():
        lbound = tol["lse"] * max(1.0, float(np.abs(ref_lse[fin]).max())) + logit_err
        lerr = np.abs(lse[fin].astype(np.float64) - ref_lse[fin]).max()
        assert lerr <= lbound, f"lse error {lerr:.3g} > {lbound:.3g}"


@pytest.fixture(scope="session")
def cli_cache(tmp_path_factory):
    """An XDG_CACHE_HOME the CLI tests share: the roofline one of them measures (about ten
    seconds) is there for the others, which copy what they need."""
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _levels():
    """The compiled levels to run kernel tests at. Where the portable level is not the one in
    use (x86), it is left out: test_native.py's level test and tests/test_portable.py hold it to
    avx2's bits, and every kernel test a third time would add ~50 s to the suite."""
    from selfattn import native

    return [level for level in native.isas()
            if level != "generic" and (level != "portable" or native.isa() == "portable")]


@pytest.fixture(params=_levels() or [None])
def isa_level(request):
    """Each compiled level this CPU runs, in turn (widest first): a test module that uses this
    fixture for every test (pytestmark) holds every level's kernels to the same checks."""
    from selfattn import native

    if request.param is None:
        yield None
        return
    with native.using_isa(request.param):
        yield request.param
