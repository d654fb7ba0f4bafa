"""The flash path's extra memory is O(blocks), measured at T = S = 16,384 (score matrix: 1 GiB)."""

import numpy as np

import selfattn
from selfattn.measure.memory import peak_memory

MiB = 2**20


def test_instrument_sees_an_n_squared_allocation(rng):
    # the instrument must be able to fail: the reference's 2048 x 2048 float64 scores are 32 MiB
    n = 2048
    q = rng.standard_normal((1, 1, n, 64)).astype(np.float32)
    with peak_memory() as peak:
        selfattn.attention(q, q, q, causal=True, impl="reference")
    assert peak.extra_bytes > 32 * MiB, peak


def test_flash_prefill_peak_memory_at_16k(rng):
    n = 16384
    q, k, v = (rng.standard_normal((1, 1, n, 64)).astype(np.float32) for _ in range(3))
    small = slice(0, 1024)
    selfattn.attention(q[:, :, small], k[:, :, small], v[:, :, small], causal=True)  # compile, pools
    with peak_memory() as peak:
        out = selfattn.attention(q, k, v, causal=True, impl="flash")
    assert out.shape == (1, 1, n, 64)
    # includes the 4 MiB output; the T x S scores alone would be 1024 MiB
    assert peak.extra_bytes < 64 * MiB, peak
