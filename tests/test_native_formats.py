"""The compiled kernels on every weight type selfattn.formats marks `kernels` (f32, f16, bf16, the
32-value block types, the 256-value K-quants, IQ4): stored rows decode to exactly gguf-py's
dequantize (bit for bit), the matmul is within float32 rounding of a float64 product over those
values, the thread count does not change a decoded bit, bad arguments are refused, the one-layer
step takes seven matrices of mixed types, and the formats table agrees with gguf's."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from selfattn import formats, native
from selfattn.attention import threads

# every test at each instruction-set level this CPU runs
pytestmark = [pytest.mark.skipif(not native.available(),
                                 reason="compiled kernels not built or CPU without AVX2/FMA/F16C"),
              pytest.mark.usefixtures("isa_level")]

KERNEL_FORMATS = [f for f in formats.FORMATS if f.kernels]
NAMES = [f.name for f in KERNEL_FORMATS]

# byte offsets of the f16 fields (scales d, mins m / dmin) in a block: ggml's layouts
HALF_FIELDS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0],
               "iq4_nl": [0], "q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2],
               "q6_k": [208], "iq4_xs": [0]}
F16_MAX, F16_TINY = 65504.0, 2.0**-24  # the largest f16, the smallest subnormal


def float_values(f, n, rng, huge):
    """n finite values of a float type as its stored bytes, some of them zero, subnormal, and
    (huge) near the type's largest (a product with them overflows float32)."""
    x = rng.standard_normal(n).astype(np.float32)
    special = {"f32": [0.0, -0.0, 1e-42, -3e38, 3e38], "f16": [0.0, -0.0, F16_TINY, -F16_MAX, F16_MAX],
               "bf16": [0.0, -0.0, 1e-40, -3e38, 3e38]}[f.name][:5 if huge else 3]
    idx = rng.choice(n, min(n, len(special)), replace=False)
    x[idx] = special[:len(idx)]
    if f.name == "f32":
        return x.view(np.uint8)
    if f.name == "f16":
        return x.astype(np.float16).view(np.uint8)
    return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # bf16: the top half


def random_rows(f, rows, cols, rng, huge=True):
    """(rows, row_bytes) uint8: random blocks of type f, the f16 fields set to finite values
    (mostly normal * 0.01; some blocks with every field 0, some with the largest f16 of either
    sign, some with the smallest subnormal)."""
    if f.block == 1:
        return float_values(f, rows * cols, rng, huge).reshape(rows, -1)
    n = rows * cols // f.block
    b = rng.integers(0, 256, (n, f.block_bytes), dtype=np.uint8)
    kind = rng.integers(0, 8, n)  # 0: zero, 1: huge, 2: tiny, else normal * 0.01
    for o in HALF_FIELDS[f.name]:
        h = (rng.standard_normal(n) * 0.01).astype(np.float32)
        h[kind == 0] = 0.0
        h[kind == 1] = F16_MAX * rng.choice([-1.0, 1.0], (kind == 1).sum())
        h[kind == 2] = F16_TINY
        b[:, o:o + 2] = h.astype(np.float16).view(np.uint8).reshape(n, 2)
    return b.reshape(rows, -1)


def gguf_values(f, data, rows, cols):
    """what gguf-py's dequantize gives for the stored rows: (rows, cols) float32"""
    out = dequantize(np.ascontiguousarray(data), Q(f.type_id)).reshape(rows, cols)
    assert out.dtype == np.float32
    return out


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def cols_of(f, blocks):
    """a row of `blocks` blocks (float types: 8 values a block here, and one odd width)"""
    return blocks * f.block if f.block > 1 else blocks * 8 + (blocks > 2)


@pytest.fixture
def restore_threads():
    n = threads.num_threads()
    yield
    threads.set_num_threads(n)


@pytest.mark.parametrize("blocks", [1, 2, 37])
@pytest.mark.parametrize("name", NAMES)
def test_stored_rows_decode_to_gguf_values_bit_for_bit(name, blocks):
    f = formats.by_name(name)
    rng = np.random.default_rng([f.type_id, blocks])
    rows, cols = 9, cols_of(f, blocks)
    data = random_rows(f, rows, cols, rng)
    want = gguf_values(f, data, rows, cols)
    pm = native.PackedMatrix(data, f.type_id, cols)
    assert same_bits(pm.dequantize(), want)
    assert same_bits(pm.dequantize(2, 7), want[2:7])
    assert pm.dequantize(4, 4).shape == (0, cols)
    out = np.full((3, cols), np.nan, np.float32)
    assert pm.dequantize(6, 9, out=out) is out and same_bits(out, want[6:])
    idx = np.array([8, 0, 3, 3, 5])
    assert same_bits(pm.rows_f32(idx), want[idx])


@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("name", NAMES)
def test_matmul_is_within_float32_rounding_of_the_exact_product(name, T):
    f = formats.by_name(name)
    rng = np.random.default_rng([f.type_id, T, 1])
    for rows, blocks in ((1, 1), (5, 2), (70, 16 if f.block == 256 else 64)):
        cols = cols_of(f, blocks)
        data = random_rows(f, rows, cols, rng, huge=False)
        w = gguf_values(f, data, rows, cols).astype(np.float64)
        x = rng.standard_normal((T, cols)).astype(np.float32)
        y = native.matmul(x, native.PackedMatrix(data, f.type_id, cols))
        assert y.shape == (T, rows) and y.dtype == np.float32
        ref = x.astype(np.float64) @ w.T
        bound = 8 * cols * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
        assert (np.abs(y - ref) <= bound).all(), np.abs(y - ref).max()


@pytest.mark.parametrize("name", NAMES)
def test_matvecs_gives_each_row_the_bits_it_gets_alone(name):
    """Several sequences' decode steps in one call: row t of the product is what matmul of row t
    alone gives, bit for bit, while the joint matmul sums in another order."""
    f = formats.by_name(name)
    rng = np.random.default_rng([f.type_id, 5])
    rows, cols = 70, cols_of(f, 16 if f.block == 256 else 64)
    pm = native.PackedMatrix(random_rows(f, rows, cols, rng, huge=False), f.type_id, cols)
    x = rng.standard_normal((native.MAX_T, cols)).astype(np.float32)
    for T in (1, 2, 3, 5, 7, native.MAX_T):  # groups of dot_rows rows, and every remainder
        y = native.matvecs(x[:T], pm)
        assert all(same_bits(y[t], native.matmul(x[t:t + 1], pm)[0]) for t in range(T)), T


@pytest.mark.parametrize("name", NAMES)
def test_a_few_token_prompt_is_the_arithmetic_of_as_many_decode_steps(name):
    """A Linear takes prompts of up to FEW_PASSES x dot_rows tokens through matvecs (4 a pass at
    avx512, 2 below): each row is what that token alone gives, bit for bit; one more token takes
    the GEMM, within float32 rounding of the same product."""
    from selfattn.model.linear import FEW_PASSES, Linear

    f = formats.by_name(name)
    rng = np.random.default_rng([f.type_id, 7])
    rows, cols = 37, cols_of(f, 2 if f.block == 256 else 16)
    lin = Linear(native.PackedMatrix(random_rows(f, rows, cols, rng, huge=False), f.type_id, cols))
    few = FEW_PASSES * native.dot_rows()
    assert few == (8 if native.isa() == "avx512" else 4)
    x = rng.standard_normal((few + 1, cols)).astype(np.float32)
    alone = np.concatenate([lin(x[t:t + 1]) for t in range(few + 1)])
    assert same_bits(lin(x[:few]), alone[:few])
    assert same_bits(lin(x[:few + 1]), native.gemm(x[:few + 1], lin.packed))


@pytest.mark.parametrize("name", NAMES)
def test_the_prompt_gemm_is_within_float32_rounding_of_the_exact_product(name):
    """native.gemm (tiles decoded, then a register-blocked product) over row counts that are not
    multiples of its 6-row kernel or 96-row tasks, widths with a partial 256-column tile, and
    token counts past its 16-token groups and 512-token passes."""
    f = formats.by_name(name)
    rng = np.random.default_rng([f.type_id, 2])
    for rows, blocks, T in ((1, 1, 1), (7, 9 if f.block == 32 else 3, 17), (101, 2, 40),
                            (13, 1, 530)):
        cols = cols_of(f, blocks * (8 if f.block == 1 else 1))
        data = random_rows(f, rows, cols, rng, huge=False)
        w = gguf_values(f, data, rows, cols).astype(np.float64)
        x = rng.standard_normal((T, cols)).astype(np.float32)
        y = native.gemm(x, native.PackedMatrix(data, f.type_id, cols))
        assert y.shape == (T, rows) and y.dtype == np.float32
        ref = x.astype(np.float64) @ w.T
        bound = 8 * cols * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
        assert (np.abs(y - ref) <= bound).all(), (rows, cols, T, np.abs(y - ref).max())


@pytest.mark.parametrize("name", NAMES)
def test_the_thread_count_does_not_change_a_decoded_bit(name, restore_threads):
    f = formats.by_name(name)
    rng = np.random.default_rng(f.type_id)
    rows, cols = 300, cols_of(f, 4 if f.block == 256 else 64)  # many tasks of a few rows
    data = random_rows(f, rows, cols, rng)
    pm = native.PackedMatrix(data, f.type_id, cols)
    idx = rng.integers(0, rows, 500)
    got = {}
    for n in (1, 2, 3):
        threads.set_num_threads(n)
        got[n] = pm.dequantize(), pm.rows_f32(idx)
    want = gguf_values(f, data, rows, cols)
    for full, gathered in got.values():
        assert same_bits(full, want) and same_bits(gathered, want[idx])


def test_a_read_only_memmap_is_used_in_place(tmp_path):
    f = formats.by_name("q4_k")
    data = random_rows(f, 4, 512, np.random.default_rng(3))
    path = tmp_path / "w.bin"
    data.tofile(path)
    mm = np.memmap(path, np.uint8, "r", shape=data.shape)
    pm = native.PackedMatrix(mm, f.type_id, 512)
    assert np.shares_memory(pm.data, mm) and not pm.data.flags.writeable
    assert same_bits(pm.dequantize(), gguf_values(f, data, 4, 512))
    x = np.ones((1, 512), np.float32)
    np.testing.assert_allclose(native.matmul(x, pm)[0], pm.dequantize().sum(1), rtol=1e-4)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.PackedMatrix(np.asfortranarray(np.zeros((4, 288), np.uint8)), f.type_id, 512)


@pytest.mark.parametrize("name", NAMES)
def test_bad_sizes_and_types_are_refused(name):
    f = formats.by_name(name)
    cols = cols_of(f, 2)
    data = random_rows(f, 3, cols, np.random.default_rng(0))
    if f.block > 1:
        with pytest.raises(ValueError, match=f"multiple of {f.block}"):
            native.PackedMatrix(data, f.type_id, cols + f.block // 2)
    with pytest.raises(ValueError, match="do not hold"):
        native.PackedMatrix(np.ascontiguousarray(data[:, :-1]), f.type_id, cols)
    with pytest.raises(ValueError, match="do not hold"):
        native.PackedMatrix(data, f.type_id, cols * 2)
    pm = native.PackedMatrix(data, f.type_id, cols)
    with pytest.raises(ValueError):
        pm.dequantize(2, 4)
    with pytest.raises(ValueError):
        pm.rows_f32(np.array([3]))
    with pytest.raises(ValueError):
        pm.rows_f32(np.array([-1]))
    # the compiled entries check again what the wrapper checked
    mod = native._module()
    x, y, out = np.ones(2 * cols, np.float32), np.empty(6, np.float32), np.empty((3, cols), np.float32)
    rb = pm.row_bytes
    bad = [(f.type_id, cols, rb + 1), (f.type_id, cols + 1, rb), (f.type_id, 2 * cols, rb)]
    if f.block > 1:
        bad.append((f.type_id, cols - f.block // 2, rb))
    for fmt in (9, 15, 31, 99, -1):  # q8_1, q8_k: formats the kernels do not read
        bad.append((fmt, cols, rb))
    for fmt, c, b in bad:
        with pytest.raises(ValueError):
            mod.matmul(pm.data, fmt, 2, c, b, x, 1, y)
        with pytest.raises(ValueError):
            mod.gemm(pm.data, fmt, 2, c, b, x, 1, y)
        with pytest.raises(ValueError):
            mod.dequant_range(pm.data, fmt, c, b, 0, 1, out)
        with pytest.raises(ValueError):
            mod.dequant_rows(pm.data, fmt, c, b, np.zeros(1, np.int64), out)
    for T in (0, native.MAX_T + 1):
        with pytest.raises(ValueError):
            mod.matmul(pm.data, f.type_id, 3, cols, rb, np.ones(20 * cols, np.float32), T,
                       np.empty(60, np.float32))
    with pytest.raises(ValueError):  # rows past the matrix
        mod.dequant_range(pm.data, f.type_id, cols, rb, 1, 4, out)
    with pytest.raises(ValueError):  # no rows of x
        mod.gemm(pm.data, f.type_id, 3, cols, rb, x, 0, y)
    with pytest.raises(ValueError, match="x must be"):
        native.gemm(np.ones((2, cols + 1), np.float32), pm)


@pytest.mark.parametrize("type_id", [9, 15, 16, 24, 39, 1000])
def test_types_the_kernels_do_not_read_are_refused(type_id):
    with pytest.raises(ValueError, match="unsupported weight type"):
        native.PackedMatrix(np.zeros((2, 64), np.uint8), type_id, 256)


def test_the_formats_table_agrees_with_gguf_and_the_compiled_table():
    known = {int(t) for t in GGML_QUANT_SIZES}
    both = [f for f in formats.FORMATS if f.type_id in known]
    assert len(both) == len(formats.FORMATS)  # every format we list, gguf knows
    for f in both:
        assert (f.block, f.block_bytes) == GGML_QUANT_SIZES[Q(f.type_id)], f.name
        assert f.name == Q(f.type_id).name.lower()
    mod = native._module()
    for t in range(-1, 64):
        f = formats.BY_ID.get(t)
        want = (f.block, f.block_bytes) if f is not None and f.kernels else (0, 0)
        assert mod.block_size(t) == want, t
    assert native.KV_CODES == {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean() + eps) * w


def _rope(v, c, s, half):  # v (heads, D): the halves of the first 2·half values rotated
    out = v.copy()
    out[:, :half] = v[:, :half] * c - v[:, half:2 * half] * s
    out[:, half:2 * half] = v[:, half:2 * half] * c + v[:, :half] * s
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_layer_step_takes_seven_matrices_of_mixed_types(bias):
    """A Q4_K_M-like layer (Q4_K q, k, o, gate, up; Q6_K v, down) through native.layer_step
    against a float64 step over the dequantized matrices."""
    rng = np.random.default_rng(21)
    dim, H, H_kv, D, ffn, half, eps, pos, S_max = 256, 4, 2, 64, 512, 16, 1e-5, 9, 16
    q_dim, kv_dim = H * D, H_kv * D
    shapes = {"q": (q_dim, dim), "k": (kv_dim, dim), "v": (kv_dim, dim), "o": (dim, q_dim),
              "gate": (ffn, dim), "up": (ffn, dim), "down": (dim, ffn)}
    mats, w = {}, {}
    for name, (rows, cols) in shapes.items():
        f = formats.by_name("q6_k" if name in ("v", "down") else "q4_k")
        data = random_rows(f, rows, cols, rng)
        blocks = data.reshape(-1, f.block_bytes)  # sane scales only: a layer's values stay small
        for o in HALF_FIELDS[f.name]:
            blocks[:, o:o + 2] = (rng.uniform(0.5, 1.5, len(blocks)) * 0.02 / np.sqrt(cols)) \
                .astype(np.float16).view(np.uint8).reshape(-1, 2)
        mats[name] = native.PackedMatrix(data, f.type_id, cols)
        w[name] = mats[name].dequantize().astype(np.float64)
    attn_norm = rng.uniform(0.5, 1.5, dim).astype(np.float32)
    ffn_norm = rng.uniform(0.5, 1.5, dim).astype(np.float32)
    b_qkv = rng.standard_normal(q_dim + 2 * kv_dim).astype(np.float32) * 0.1 if bias else None
    scale = 1 / np.sqrt(D)
    layer = native.StepLayer(attn_norm, ffn_norm, b_qkv, *mats.values(), dim, H, H_kv, D, ffn,
                             half, eps, scale)
    ang = rng.uniform(0, 6, (pos + 1, half))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    k = np.zeros((1, H_kv, S_max, D), np.float32)
    v = np.zeros_like(k)
    k[0, :, :pos] = rng.standard_normal((H_kv, pos, D))
    v[0, :, :pos] = rng.standard_normal((H_kv, pos, D))
    x0 = rng.standard_normal(dim).astype(np.float32)

    x = x0.astype(np.float64)  # the float64 step
    h = _rms(x, attn_norm, eps)
    qkv = np.concatenate([w["q"] @ h, w["k"] @ h, w["v"] @ h]) + (0 if b_qkv is None else b_qkv)
    qh = _rope(qkv[:q_dim].reshape(H, D), cos[pos], sin[pos], half)
    kh = _rope(qkv[q_dim:q_dim + kv_dim].reshape(H_kv, D), cos[pos], sin[pos], half)
    vh = qkv[q_dim + kv_dim:].reshape(H_kv, D)
    keys = np.concatenate([k[0, :, :pos], kh[:, None]], axis=1)  # (H_kv, pos + 1, D)
    vals = np.concatenate([v[0, :, :pos], vh[:, None]], axis=1)
    o = np.empty((H, D))
    for i in range(H):
        s = keys[i // (H // H_kv)] @ qh[i] * scale
        p = np.exp(s - s.max())
        o[i] = p @ vals[i // (H // H_kv)] / p.sum()
    x = x + w["o"] @ o.reshape(-1)
    h = _rms(x, ffn_norm, eps)
    g, u = w["gate"] @ h, w["up"] @ h
    want = x + w["down"] @ (g / (1 + np.exp(-g)) * u)

    got = x0.copy()
    attn_s, mat_s, step_s = native.layer_step(got[None], [layer], cos, sin,
                                              [native.StepSeq(k, v, "f32", pos, pos + 2, 0, pos + 1, 1)])
    assert 0.0 < attn_s and 0.0 < mat_s and attn_s + mat_s <= step_s
    np.testing.assert_allclose(k[0, :, pos], kh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v[0, :, pos], vh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_step_layer_refuses_wrong_matrices():
    f = formats.by_name("q4_k")
    rng = np.random.default_rng(0)

    def pm(rows, cols):
        return native.PackedMatrix(random_rows(f, rows, cols, rng), f.type_id, cols)

    dim, H, H_kv, D, ffn = 256, 4, 2, 64, 256
    ok = [pm(256, 256), pm(128, 256), pm(128, 256), pm(256, 256), pm(256, 256), pm(256, 256),
          pm(256, 256)]
    norms = (np.ones(dim, np.float32), np.ones(dim, np.float32), None)
    native.StepLayer(*norms, *ok, dim, H, H_kv, D, ffn, 16, 1e-5, 0.125)
    for i, name in enumerate(["w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down"]):
        bad = list(ok)
        bad[i] = pm(512, 256)
        with pytest.raises(ValueError, match=name):
            native.StepLayer(*norms, *bad, dim, H, H_kv, D, ffn, 16, 1e-5, 0.125)
    with pytest.raises(ValueError, match="b_qkv"):
        native.StepLayer(norms[0], norms[1], np.ones(3, np.float32), *ok, dim, H, H_kv, D, ffn,
                         16, 1e-5, 0.125)


def test_the_compiled_layer_step_checks_each_matrix_again():
    """The C entry refuses a matrix whose bytes are not its rows, naming it, whatever the
    wrapper let through."""
    f = formats.by_name("q4_k")
    dim, H, H_kv, D, ffn = 256, 2, 1, 128, 256

    def rows(n, cols=dim, fmt=f):
        return np.zeros((n, fmt.row_bytes(cols)), np.uint8)

    mats = [rows(H * D), rows(H_kv * D), rows(H_kv * D), rows(dim, H * D), rows(ffn), rows(ffn),
            rows(dim, ffn)]
    cache = np.zeros((1, H_kv, 8, D), np.float32)
    table = np.zeros((8, 16), np.float32)

    def call(mats, fmts):
        weights = [part for m, t in zip(mats, fmts) for part in (m, t)]
        mod = native._module()
        layer = mod.step_layer(np.ones(dim, np.float32), np.ones(dim, np.float32), None, *weights,
                               dim, H, H_kv, D, ffn, 16, 1e-5, 0.1)
        mod.layer_step(np.zeros(dim, np.float32), (layer,), table, table,
                       ((cache, cache.copy(), 0, 8, 4 * D, 3, 5, 0, 4, 1),))

    call(mats, [f.type_id] * 7)
    names = ["w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down"]
    for i, name in enumerate(names):
        bad = list(mats)
        bad[i] = mats[i][1:]  # a row short
        with pytest.raises(ValueError, match=name):
            call(bad, [f.type_id] * 7)
        fmts = [f.type_id] * 7
        fmts[i] = formats.by_name("q6_k").type_id  # bytes of the wrong type
        with pytest.raises(ValueError, match=name):
            call(mats, fmts)
        fmts[i] = 9  # a type the kernels do not read
        with pytest.raises(ValueError, match=name):
            call(mats, fmts)
