"""The compiled kernels (selfattn.native) against their plain twins: the block matmul against a
float64 product with gguf's dequantized matrix, the C decode kernel against the numba one and the
reference, the small ops against NumPy, and a model whose matrices are Q4_1 / Q8_0 against a
float64 forward over the same dequantized weights."""

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from selfattn import native
from selfattn.attention import kvformat, threads
from selfattn.attention.decode import decode_attention
from selfattn.attention.decode_numba import decode_chunks
from selfattn.attention.flash import flash_attention

from .spec import assert_matches_twin_and_spec, reference_on_stored, stored_inputs

# every test at each instruction-set level this CPU runs
pytestmark = [pytest.mark.skipif(not native.available(),
                                 reason="compiled kernels not built or CPU without AVX2/FMA/F16C"),
              pytest.mark.usefixtures("isa_level")]

TYPES = {Q.F32: native.F32, Q.F16: native.F16, Q.Q4_0: native.Q4_0, Q.Q4_1: native.Q4_1,
         Q.Q8_0: native.Q8_0}


def packed(w: np.ndarray, qtype) -> tuple[native.PackedMatrix, np.ndarray]:
    """w (rows, cols) in GGUF type qtype -> (PackedMatrix, the float32 values it holds)."""
    if qtype == Q.F32:
        data = w.astype(np.float32)
    elif qtype == Q.F16:
        data = w.astype(np.float16)
    else:
        data = quantize(w, qtype)
    values = dequantize(data.view(np.uint8) if qtype not in (Q.F32, Q.F16) else data, qtype)
    return native.PackedMatrix(data, TYPES[qtype], w.shape[1]), values.reshape(w.shape)


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("rows,cols", [(1, 32), (17, 64), (96, 576), (40, 1536)])
def test_block_matmul_equals_the_dequantized_product(qtype, rows, cols):
    rng = np.random.default_rng(rows * cols)
    pm, values = packed(rng.standard_normal((rows, cols), np.float32), qtype)
    for T in (1, 2, 5, 16):
        x = rng.standard_normal((T, cols), np.float32)
        ref = x.astype(np.float64) @ values.T.astype(np.float64)
        y = native.matmul(x, pm)
        assert y.shape == (T, rows) and y.dtype == np.float32
        # float32 sums of `cols` products: relative to the sum of magnitudes
        bound = cols * 2.0**-24 * (np.abs(x) @ np.abs(values).T) + 1e-30
        assert (np.abs(y - ref) <= 2 * bound).all()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16])
def test_block_rows_decode_exactly(qtype):
    rng = np.random.default_rng(1)
    pm, values = packed(rng.standard_normal((50, 96), np.float32), qtype)
    idx = np.array([0, 7, 49, 7])
    np.testing.assert_array_equal(pm.rows_f32(idx), values[idx])
    with pytest.raises(ValueError):
        pm.rows_f32(np.array([50]))


def test_matmul_refuses_bad_input():
    pm, _ = packed(np.ones((4, 64), np.float32), Q.Q8_0)
    for x in (np.ones((1, 32), np.float32), np.ones((17, 64), np.float32),
              np.ones(64, np.float32)):
        with pytest.raises(ValueError):
            native.matmul(x, pm)
    with pytest.raises(ValueError, match="multiple of 32"):
        native.PackedMatrix(np.zeros((2, 34), np.uint8), native.Q8_0, 33)
    with pytest.raises(ValueError, match="do not hold"):
        native.PackedMatrix(np.zeros((2, 30), np.uint8), native.Q8_0, 32)


def _numba_decode(q, k, v, S, band, softcap, scale, fmt):
    """The numba kernel alone (no dispatch), for comparison."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    Dv = D if fmt != "f32" else v.shape[3]
    G = H // H_kv
    left, right = band
    j_lo = max(0, S - T - left)
    span = min(S - 1, S - 1 + right) - j_lo + 1
    chunk, C = 256, -(-span // 256)
    out = np.empty((B, H, T, Dv), np.float32)
    lse = np.empty((B, H, T), np.float32)
    m5 = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (1, 1, 1, T, 1), (0,) * 5)
    decode_chunks(q.reshape(B, H_kv, G * T, D) * np.float32(scale), k, v,
                  kvformat.format_code(fmt), kvformat.HALF_TABLE, S, j_lo, chunk, left, right,
                  float(softcap or 0.0), m5, False, np.empty((B, H_kv, C, G * T, Dv), np.float32),
                  np.empty((B, H_kv, C, G * T), np.float32),
                  np.empty((B, H_kv, C, G * T), np.float32), out, lse)
    return out, lse


DECODE_CASES = [  # H, H_kv, D, Dv, S, T, band, softcap
    (9, 3, 64, 64, 1000, 1, (1000, 0), None),  # SmolLM2's heads, causal
    (32, 8, 128, 128, 700, 3, (699, 0), None),  # Llama-3-8B's, a few queries
    (4, 1, 32, 32, 33, 16, (5, 0), None),  # MQA, sliding window, T = 16
    (4, 2, 64, 64, 300, 2, (40, 20), 15.0),  # a two-sided band with soft-capping
    (2, 2, 96, 96, 1, 1, (1, 0), None),  # one key
    (4, 2, 64, 80, 257, 4, (257, 0), None),  # Dv != D (float32 rows only), a partial tile
    (4, 2, 40, 40, 129, 1, (129, 0), None),  # D not a multiple of 32 (float32 rows only)
]


@pytest.mark.parametrize("fmt,H,H_kv,D,Dv,S,T,band,softcap", [
    (fmt, *case) for fmt in kvformat.FORMATS for case in DECODE_CASES
    if fmt == "f32" or (case[2] == case[3] and case[2] % 32 == 0)])
def test_c_decode_kernel_equals_numba_kernel_and_reference(fmt, H, H_kv, D, Dv, S, T, band,
                                                           softcap):
    q, k, v = stored_inputs(S + T, 1, H, H_kv, T, S, D, Dv, fmt)
    scale = 1 / np.sqrt(D)
    out, lse = decode_attention(q, k, v, S, band, None, softcap, scale, fmt)
    twin = _numba_decode(q, k, v, S, band, softcap, scale, fmt)
    assert_matches_twin_and_spec(out, lse, twin, q, k, v, S, band, softcap, scale, fmt)


def test_c_decode_kernel_rows_that_see_nothing():
    """A band that leaves early queries with no key: zeros and -inf, as the reference."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 3, 32), np.float32)
    k = rng.standard_normal((1, 1, 10, 32), np.float32)
    out, lse = decode_attention(q, k, k, 10, (-3, 30), None, None, 0.2, "f32")  # keys p+3 ..
    assert np.isneginf(lse[..., -3:]).all() and (out[..., -3:, :] == 0).all()
    assert np.isfinite(lse[..., :-3]).all()


@pytest.mark.parametrize("fmt", kvformat.FORMATS)
def test_c_decode_kernel_logits_far_apart(fmt):
    """Logits spread over hundreds, rising along the keys, so that each tile's largest score sits
    late in the tile and past the running maximum: a maximum taken over part of a tile, or an
    exponent taken of a positive difference, overflows to inf (and NaN) here."""
    rng = np.random.default_rng(11)
    S, D = 300, 64
    k = rng.standard_normal((1, 1, S, D), np.float32)
    k[..., 0] = np.linspace(-1.0, 1.0, S, dtype=np.float32) * 40  # logit of key j ~ q0 * k[j, 0]
    q = np.zeros((1, 3, 1, D), np.float32)
    q[0, :, 0, 0] = [30.0, -30.0, 10.0]
    ks = kvformat.quantize(k, fmt)
    v = kvformat.quantize(rng.standard_normal((1, 1, S, D), np.float32), fmt)
    out, lse = decode_attention(q, ks, v, S, (S, 0), None, None, 1.0, fmt)
    spec_out, spec_lse, vd = reference_on_stored(q, ks, v, S, (S, 0), None, 1.0, fmt)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, spec_out, atol=3e-6 * np.abs(vd).max())
    np.testing.assert_allclose(lse, spec_lse, rtol=1e-6)


@pytest.mark.parametrize("fmt", kvformat.FORMATS)
def test_c_decode_kernel_chunks_of_several_tiles(fmt):
    """Chunks of 2,500 keys: tiles of 1,024 keys and a partial one, each read in sub-blocks, the
    online-softmax state carried from tile to tile; eight rows (two groups of four for float
    rows, groups of 3, 3 and 2 for compact ones)."""
    rng = np.random.default_rng(21)
    S, T, H, H_kv, D = 5000, 2, 8, 2, 64
    q = rng.standard_normal((1, H, T, D), np.float32)
    k, v = (kvformat.quantize(rng.standard_normal((1, H_kv, S, D), np.float32), fmt)
            for _ in range(2))
    out = np.empty((1, H, T, D), np.float32)
    lse = np.empty((1, H, T), np.float32)
    qs = q.reshape(1, H_kv, H // H_kv * T, D) * np.float32(0.125)
    native.decode_attention(qs, k, v, fmt, S, T, 0, 2500, 2, S, 0, 20.0, out, lse)
    spec_out, spec_lse, vd = reference_on_stored(q, k, v, S, (S, 0), 20.0, 0.125, fmt)
    np.testing.assert_allclose(out, spec_out, atol=3e-6 * np.abs(vd).max())
    np.testing.assert_allclose(lse, spec_lse, atol=2e-5)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_results_do_not_depend_on_the_thread_count(n):
    rng = np.random.default_rng(9)
    pm, _ = packed(rng.standard_normal((300, 256), np.float32), Q.Q4_1)
    x = rng.standard_normal((2, 256), np.float32)
    q = rng.standard_normal((1, 8, 1, 64), np.float32)
    k = rng.standard_normal((1, 2, 3000, 64), np.float32)
    before = threads.num_threads()
    try:
        threads.set_num_threads(1)
        y1, a1 = native.matmul(x, pm), decode_attention(q, k, k, 3000, (3000, 0), None, None,
                                                        0.125, "f32")[0]
        threads.set_num_threads(n)
        yn, an = native.matmul(x, pm), decode_attention(q, k, k, 3000, (3000, 0), None, None,
                                                        0.125, "f32")[0]
    finally:
        threads.set_num_threads(before)
    np.testing.assert_array_equal(y1, yn)  # rows are whole tasks: the same sums in any order
    np.testing.assert_allclose(a1, an, atol=1e-6)


@pytest.mark.parametrize("fmt", ["f16", "q8_0", "q4_0"])
def test_quantize_rows_equals_kvformat_bit_for_bit(fmt):
    """The compiled cache writer against kvformat.quantize (ggml's rounding): values over twelve
    decades, blocks of zeros, ties for the largest magnitude (q4_0 takes the first), exact halves
    (round half away from zero), subnormal halves for the scale, and rows written at an offset
    with the rest of the cache left alone."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        T, H, D = int(rng.integers(1, 18)), int(rng.integers(1, 5)), int(rng.choice([32, 64, 128]))
        x = (rng.standard_normal((T, H, D)) * 10.0 ** rng.uniform(-9, 3)).astype(np.float32)
        if trial % 4 == 0:
            x[:, :, :32] = 0.0
        if trial % 5 == 0:
            x[..., 3] = -np.abs(x).max()
            x[..., 9] = np.abs(x).max()
        if trial % 6 == 0:  # q8_0: d = 1, values k + 0.5 are ties
            x[..., :32] = np.arange(-16, 16, dtype=np.float32) + 0.5
            x[..., 31] = 127.0
        items, dtype = kvformat.row_shape(fmt, D)
        pos, S = int(rng.integers(0, 5)), T + 9
        fill = np.frombuffer(rng.bytes(H * S * items * dtype.itemsize), dtype).reshape(1, H, S, items)
        got, want = fill.copy(), fill.copy()
        native.quantize_rows(x, got, pos, fmt)
        want[0, :, pos:pos + T] = kvformat.quantize(x.transpose(1, 0, 2), fmt)
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (fmt, trial)
    with pytest.raises(ValueError):
        native.quantize_rows(np.zeros((2, 1, 32), np.float32), np.zeros((1, 1, 2, 34), np.uint8), 1, "q8_0")


def test_small_ops_equal_their_numpy_twins():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 576), np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    np.testing.assert_allclose(native.rmsnorm(x, w, 1e-5), x / np.sqrt(ms + 1e-5) * w,
                               rtol=1e-5, atol=1e-6)
    gu = rng.standard_normal((2, 2 * 1000), np.float32) * 10  # past exp's range on both sides
    gate, up = gu[:, :1000].astype(np.float64), gu[:, 1000:].astype(np.float64)
    np.testing.assert_allclose(native.swiglu(gu), gate / (1 + np.exp(-gate)) * up, rtol=1e-5,
                               atol=1e-6)
    T, heads, D, half, pos = 2, 3, 64, 24, 5  # rope_dim 48 < D: the tail stays as it is
    ang = rng.uniform(0, 6, (pos + T, half))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    v = rng.standard_normal((T, heads, D), np.float32)
    got = native.rope(v.copy(), cos, sin, pos)
    c, s = cos[pos:, None, :], sin[pos:, None, :]
    want = v.copy()
    want[..., :half] = v[..., :half] * c - v[..., half:2 * half] * s
    want[..., half:2 * half] = v[..., half:2 * half] * c + v[..., :half] * s
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q4_0])
def test_a_block_quantized_model_decodes_on_the_file_blocks(tmp_path, qtype):
    """Every matrix stored in qtype: prompts decode tiles of the blocks for BLAS, decode steps
    multiply the blocks; both match a float64 forward over the dequantized weights."""
    from selfattn.cache import KVCache
    from selfattn.model.transformer import Transformer
    from .tiny_gguf import make_weights, reference_forward, write_gguf

    w, cfg = make_weights(np.random.default_rng(4), n_layers=2, dim=64, ffn=96)
    mats = [n for n in w if not n.endswith(("norm", ".bias"))]
    path = tmp_path / "blocks.gguf"
    write_gguf(path, w, cfg, quant={n: qtype for n in mats})
    deq = dict(w)
    for n in mats:
        deq[n] = dequantize(quantize(w[n], qtype), qtype).reshape(w[n].shape)
    m = Transformer.load(path)
    assert all(lin.packed is not None for layer in m.weights.layers for lin in layer.linears)
    assert m.weights.output.packed is not None
    tokens = np.random.default_rng(6).integers(0, cfg["vocab"], 14)
    ref = reference_forward(deq, cfg, tokens)
    cache = KVCache.for_model(m.args, 32)
    np.testing.assert_allclose(m.forward(tokens[:10], cache, 0), ref[9], atol=2e-4)
    for i in range(10, 14):  # one token at a time: the packed path
        np.testing.assert_allclose(m.forward(tokens[i:i + 1], cache, i), ref[i], atol=2e-4)


# a layer's matrices in several types (as a Q4_K_M file's Q4_K and Q6_K)
MIXED = {"attn_k": Q.Q4_0, "attn_v": Q.F16, "ffn_up": Q.Q4_1, "ffn_gate": Q.F16}


@pytest.mark.parametrize("arch,window,mixed", [("llama", None, False), ("qwen2", None, False),
                                               ("llama", 6, False), ("llama", None, True)])
@pytest.mark.parametrize("kv", ["f32", "f16", "q8_0", "q4_0"])
def test_compiled_layer_step_is_the_per_kernel_path_bit_for_bit(tmp_path, arch, window, mixed, kv):
    """A decode step through native.layer_step (one C call a layer) against the same step with
    every kernel called from Python (an observer forces that path): the logits and the cache
    are the same bits, with qkv biases (qwen2), a sliding window, every KV type, and a layer's
    matrices in several types."""
    import dataclasses

    from selfattn.cache import KVCache
    from selfattn.model.transformer import Transformer
    from .tiny_gguf import make_weights, write_gguf

    w, cfg = make_weights(np.random.default_rng(8), arch=arch, n_layers=2, dim=128, ffn=96)
    path = tmp_path / "step.gguf"
    quant = {n: Q.Q8_0 for n in w if not n.endswith(("norm", ".bias"))}
    if mixed:
        quant.update({n: MIXED[n.split(".")[-1]] for n in quant if n.split(".")[-1] in MIXED})
    write_gguf(path, w, cfg, quant=quant)
    m = Transformer.load(path, kv)
    assert len({lin.packed.fmt for lin in m.weights.layers[0].linears}) == (4 if mixed else 1)
    m.args = dataclasses.replace(m.args, sliding_window=window)
    m._step_layers = None
    caches = [KVCache.for_model(m.args, 40, kv) for _ in range(2)]
    assert m.step_layers(caches[0]) is not None
    tokens = np.random.default_rng(9).integers(0, cfg["vocab"], 20)
    for c in caches:
        m.forward(tokens[:12], c, 0)
    for i in range(12, 20):
        fast = m.forward(tokens[i:i + 1], caches[0], i)
        slow = m.forward(tokens[i:i + 1], caches[1], i, observe=lambda *args: None)
        np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(caches[0].k, caches[1].k)
    np.testing.assert_array_equal(caches[0].v, caches[1].v)


@pytest.mark.parametrize("kv", ["f32", "q8_0"])
def test_batched_compiled_step_gives_each_sequence_its_bits(tmp_path, kv):
    """forward_batch on a plain llama model (one C call for every layer and all B sequences) gives
    each sequence, at its own depth, the logits and cache rows it gets stepping alone, bit for bit."""
    from selfattn.cache import KVCache
    from selfattn.model.transformer import Transformer
    from .tiny_gguf import make_weights, write_gguf

    w, cfg = make_weights(np.random.default_rng(12), arch="llama", n_layers=2, dim=128, ffn=96)
    path = tmp_path / "batch.gguf"
    write_gguf(path, w, cfg, quant={n: Q.Q4_1 for n in w if not n.endswith(("norm", ".bias"))})
    m = Transformer.load(path, kv)
    rng = np.random.default_rng(13)
    prompts = [rng.integers(0, cfg["vocab"], n) for n in (3, 11, 7)]
    alone = [KVCache.for_model(m.args, 40, kv) for _ in prompts]
    batch = [KVCache.for_model(m.args, 40, kv) for _ in prompts]
    assert m.step_layers(batch[0]) is not None
    for p, a, b in zip(prompts, alone, batch):
        m.forward(p, a, 0)
        m.forward(p, b, 0)
    tokens = rng.integers(0, cfg["vocab"], (4, len(prompts)))
    for step in tokens:
        got = m.forward_batch(step, batch)
        for j, c in enumerate(alone):
            np.testing.assert_array_equal(got[j], m.forward(step[j:j + 1], c, c.length))
    for a, b in zip(alone, batch):
        assert a.length == b.length
        np.testing.assert_array_equal(a.k[:, :, :, :a.length], b.k[:, :, :, :b.length])
        np.testing.assert_array_equal(a.v[:, :, :, :a.length], b.v[:, :, :, :b.length])


def test_layer_step_refuses_bad_input():
    def q8(rows, cols):
        return native.PackedMatrix(np.zeros((rows, cols // 32 * 34), np.uint8), native.Q8_0, cols)

    norms = (np.ones(64, np.float32),) * 2 + (None,)
    mats = [q8(64, 64), q8(32, 64), q8(32, 64), q8(64, 64), q8(64, 64), q8(64, 64), q8(64, 64)]
    sizes = (64, 2, 1, 32, 64, 16, 1e-5, 0.17)
    cache = np.zeros((1, 1, 8, 34), np.uint8)
    table = np.zeros((8, 16), np.float32)
    with pytest.raises(ValueError, match="w_q"):  # 1 row where 64 are needed
        native.StepLayer(*norms, q8(1, 64), *mats[1:], *sizes)
    layer = native.StepLayer(*norms, *mats, *sizes)

    def step(x, *seqs):
        return native.layer_step(x, [layer], table, table, [native.StepSeq(*s) for s in seqs])

    other = np.zeros_like(cache)
    step(np.zeros((2, 64), np.float32), (cache, cache.copy(), "q8_0", 3, 5, 0, 4, 1),
         (other, other.copy(), "q8_0", 6, 8, 0, 7, 1))
    with pytest.raises(ValueError, match="position"):  # position past the cache
        step(np.zeros((1, 64), np.float32), (cache, cache.copy(), "q8_0", 8, 5, 0, 256, 1))
    with pytest.raises(ValueError, match="x: "):  # two sequences, one row of x
        step(np.zeros((1, 64), np.float32), (cache, cache.copy(), "q8_0", 3, 5, 0, 4, 1),
             (other, other.copy(), "q8_0", 3, 5, 0, 4, 1))
    with pytest.raises(ValueError, match="a cache of its own"):
        step(np.zeros((2, 64), np.float32), (cache, other, "q8_0", 3, 5, 0, 4, 1),
             (cache, other.copy(), "q8_0", 3, 5, 0, 4, 1))
    with pytest.raises(ValueError, match="1 to 16 sequences"):
        step(np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match="k: "):  # two layers, one layer's cache
        native.layer_step(np.zeros((1, 64), np.float32), [layer, layer], table, table,
                          [native.StepSeq(cache, cache.copy(), "q8_0", 3, 5, 0, 4, 1)])
    with pytest.raises(ValueError, match="chunks outside"):
        step(np.zeros((1, 64), np.float32), (cache, cache.copy(), "q8_0", 3, 5, 0, 4, 2))


def test_kernels_work_in_a_forked_child():
    """The pool's workers do not survive fork(): a child must not wait for them."""
    import multiprocessing

    rng = np.random.default_rng(11)
    pm, values = packed(rng.standard_normal((64, 64), np.float32), Q.Q8_0)
    x = rng.standard_normal((1, 64), np.float32)
    want = native.matmul(x, pm)  # the parent's pool is started
    with multiprocessing.get_context("fork").Pool(1) as p:
        got = p.apply_async(native.matmul, (x, pm)).get(timeout=60)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("iters", [0, 1, 1000, 1001])
def test_fma_peak_loop_runs_every_step_of_every_chain(iters):
    """The roofline's FMA peak counts tasks x iters x 12 FMAs of lanes() lanes: each task's chain
    sum is the closed form of that many steps (one step fewer or more moves it by ~1.5e-4), over
    that many lanes."""
    sums = np.full(3, np.nan, np.float32)
    mod = native._module()
    mod.fma_loop(iters, 3, sums)
    m, c = np.float64(np.float32(0.999999)), np.float64(np.float32(1e-3))
    a0 = np.arange(1, 13, dtype=np.float64)
    want = mod.lanes() * (a0 * m**iters + c * (1 - m**iters) / (1 - m)).sum()
    np.testing.assert_allclose(sums, want, rtol=2e-6)


def test_fma_peak_is_measured_and_refuses_bad_input():
    assert native.fma_gflops(1, seconds=0.01, reps=2) > 0.5
    with pytest.raises(ValueError, match="n_threads"):
        native.fma_gflops(0)
    with pytest.raises(ValueError, match="sums"):
        native._module().fma_loop(10, 4, np.zeros(3, np.float32))


def test_touch_pages_reads_a_mapping_and_changes_nothing(tmp_path):
    import mmap

    path = tmp_path / "blob"
    data = np.random.default_rng(3).integers(0, 256, 3 * 4096 + 17, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    for readers in (1, 3, 16, 40):
        assert native.touch_pages(m, readers)
    with memoryview(m) as whole, whole[5:] as tail:  # an unaligned start, a short last page
        assert native.touch_pages(tail, 4)
        assert native.touch_pages(tail[:0], 2)
    assert m[:] == data.tobytes()
    with pytest.raises(ValueError):
        native.touch_pages(m, 0)
    m.close()


@pytest.mark.skipif(len(native.isas()) < 3, reason="one compiled level runs on this CPU: nothing "
                    "to compare it with")
@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
def test_every_level_gives_the_same_bits(fmt):
    """The levels' copies of the kernels (vec.h's vectors of 8 and 16 lanes, the AVX2 sources
    compiled with AVX-512 as well) do the same IEEE operations in the same order: prefill, decode
    and the prompt gemm give the same bits at every level this CPU runs. The loops that differ,
    AVX-512's rows of a few-token matmul (16-lane blocks), sum in another order and are held to a
    float32 dot product's bound here and in test_native_formats.py."""
    rng = np.random.default_rng(21)
    q, k, v = stored_inputs(3, 1, 8, 2, 200, 300, 64, 64, fmt)
    pm, _ = packed(rng.standard_normal((200, 576), np.float32), Q.Q4_0)
    x = rng.standard_normal((3, 576), np.float32)
    xg = rng.standard_normal((70, 576), np.float32)
    results, products = {}, {}
    for level in native.isas()[:-1]:
        with native.using_isa(level):
            results[level] = (*flash_attention(q, k, v, 300, (300, 0), None, 30.0, 0.125, fmt=fmt),
                              *decode_attention(q[:, :, -2:], k, v, 300, (300, 0), None, None,
                                                0.125, fmt),
                              native.gemm(xg, pm))
            products[level] = native.matmul(x, pm)
    first, *rest = results.values()
    for other in rest:
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a, b)
    w = pm.dequantize().astype(np.float64)
    bound = 8 * w.shape[1] * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    for y in products.values():
        assert (np.abs(y - x.astype(np.float64) @ w.T) <= bound).all()


DECODE_SHAPES = [(4, 4, 1, 64), (4, 2, 1, 64), (9, 3, 1, 64), (32, 8, 1, 128), (6, 1, 1, 80),
                 (3, 1, 1, 72), (8, 1, 2, 96), (5, 1, 3, 256), (8, 1, 1, 128)]


@pytest.mark.skipif(len(native.isas()) < 3, reason="one compiled level runs on this CPU: nothing "
                    "to compare it with")
@pytest.mark.parametrize("fmt,H,H_kv,T,D", [(f, *shape) for f in ("f32", "f16", "q8_0", "q4_0")
                                            for shape in DECODE_SHAPES
                                            if f in ("f32", "f16") or shape[3] % 32 == 0])
def test_decode_gives_the_same_bits_at_every_level(fmt, H, H_kv, T, D):
    """AVX-512's decode keeps each lane's operations and order: the same bits as the 8-lane code,
    for float rows (two keys a register for the scores, 16 values of d for the values, 16
    exponentials at once) and compact rows (four query rows a group where AVX2 takes three and
    one), for groups of 1-4 rows and several groups, head dims that are and are not a multiple
    of 16, with a window and a soft-cap, and key counts that leave a ragged last step."""
    q, k, v = stored_inputs(5, 1, H, H_kv, T, 1037, D, D, fmt)
    results = {}
    for level in native.isas()[:-1]:
        with native.using_isa(level):
            results[level] = (*decode_attention(q, k, v, 1037, (1037, 0), None, None, 0.125, fmt),
                              *decode_attention(q, k, v, 1037, (300, 0), None, 20.0, 0.125, fmt))
    first, *rest = results.values()
    for other in rest:
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a, b)


def test_the_level_can_be_forced_and_a_wrong_one_is_named(tmp_path):
    """SELFATTN_ISA picks the level in a new process; a level this CPU lacks, or a misspelt one,
    is an error that names it."""
    import subprocess
    import sys

    def run(level):
        code = "from selfattn import native; print(native.isa(), native.available())"
        env = {**os.environ, "SELFATTN_ISA": level}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)

    for level in native.isas():
        r = run(level)
        assert r.returncode == 0 and r.stdout.split() == [level, str(level != "generic")], r.stderr
    r = run("avx3")
    assert r.returncode != 0 and "SELFATTN_ISA='avx3'" in r.stderr
    cli = subprocess.run([sys.executable, "-m", "selfattn.cli", "generate", "Hi", "--max-tokens",
                          "1"], env={**os.environ, "SELFATTN_ISA": "avx3"}, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 2 and "SELFATTN_ISA='avx3'" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and "Traceback" not in cli.stderr
    missing = [level for level in native.LEVELS if level not in native.isas()]
    if missing:
        r = run(missing[0])
        assert r.returncode != 0 and f"SELFATTN_ISA={missing[0]}" in r.stderr
