"""The vectorizable float32 exp the kernels use, against NumPy's float64 exp."""

import numba as nb
import numpy as np

from selfattn.attention.softmax import exp_inplace

from .conftest import TOLERANCE


@nb.njit
def _run(x, shift):
    ibuf = np.empty(x.shape[0], np.int32)
    return exp_inplace(x, x.shape[0], shift, ibuf)


def test_exp_f32_accuracy_and_masked_zeros():
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.random(100_000) * 87.0, [0.0, -1e-7, -87.0, -88.0, -1e30, -np.inf]])
    x = x.astype(np.float32)
    y = x.copy()
    total = _run(y, np.float32(0.0))
    ref = np.exp(x.astype(np.float64))
    big = ref > 1e-37
    assert (np.abs(y[big] - ref[big]) / ref[big]).max() <= 4e-7
    assert y[-1] == 0.0 and y[-2] == 0.0 and y[-3] == 0.0  # -inf, -1e30, below the cutoff
    assert abs(total - ref.sum()) <= 1e-6 * ref.sum()


def test_exp_f64_within_an_ulp_or_two():
    # float64 goes to the C library's exp; NumPy's own (AVX-512 where the CPU has it) may differ
    # from it by an ulp, so the two are compared within float64's bound, never bit for bit
    x = -np.linspace(0, 700, 1001)
    y = x.copy()
    _run(y, 0.0)
    ref = np.exp(x)
    assert y[0] == 1.0
    assert (np.abs(y - ref) <= 2 * TOLERANCE[np.dtype(np.float64)]["u"] * ref).all()
