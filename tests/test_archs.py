"""Every architecture selfattn runs, loaded from a small random-weight GGUF file written the way
llama.cpp's converter writes it (tests/tiny_gguf.py), against a plain float64 forward of the same
weights written from the Hugging Face definitions (tests/arch_reference.py): a prompt's logits at
every position, the same tokens decoded one step at a time over the KV cache, and the weights
stored in every weight type the kernels read."""

import json

import numpy as np
import pytest

from selfattn import native
from selfattn.cache import KVCache
from selfattn.errors import ModelError
from selfattn.model import ModelArgs, Transformer
from selfattn.model.gguf_file import open_gguf

from .arch_reference import reference_logits
from .tiny_gguf import ARCHS, KQUANT_SHAPE, Q, make_weights, write_gguf

T = 24  # prompt tokens: past the sliding windows (8) of gemma2/gemma3 and the mistral case
VARIANTS = [(a, {}) for a in ARCHS] + [
    ("llama", dict(llama3=True)), ("llama", dict(window=8)), ("gemma3", dict(rope_scale=8.0)),
    ("phi3", dict(window=8))]


def _tokens(cfg, n=T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg["vocab"], n)


def _assert_logits_close(got, ref):
    """float32 forward vs float64: within a few float32 ulps of the logits' scale."""
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= 2e-4 * scale, f"max |logit error| {err:.3g} (logit scale {scale:.3g})"


def _model_file(tmp_path, arch, options, quant=None, shape=None):
    w, cfg = make_weights(np.random.default_rng(7), arch=arch, **(shape or {}), **options)
    path = tmp_path / f"{arch}.gguf"
    held = write_gguf(path, w, cfg, quant=quant)
    return path, cfg, held


@pytest.mark.parametrize("arch,options", VARIANTS, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_prompt_and_decode_match_the_float64_reference(tmp_path, arch, options):
    path, cfg, held = _model_file(tmp_path, arch, options)
    m = Transformer.load(path)
    tokens = _tokens(cfg)
    ref = reference_logits(held, cfg, tokens)
    got = m.forward(tokens, KVCache.for_model(m.args, T), 0, all_logits=True)
    _assert_logits_close(got, ref)
    cache = KVCache.for_model(m.args, T)  # the same tokens: a short prompt, then one at a time
    m.forward(tokens[:3], cache, 0)
    for t in range(3, T):
        _assert_logits_close(m.forward(tokens[t:t + 1], cache, t), ref[t])


@pytest.mark.parametrize("arch", ARCHS)
def test_k_quant_weights_run_in_place(tmp_path, arch):
    """Every matrix in a different weight type (K-quants, IQ4, the 32-blocks, BF16, F16): the
    model holds the file's blocks and matches the reference on what the file holds."""
    types = ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS",
             "Q4_0", "Q4_1", "BF16", "F16"]
    w, cfg = make_weights(np.random.default_rng(11), arch=arch, **KQUANT_SHAPE)
    names = sorted(n for n, x in w.items() if x.ndim == 2)
    quant = {n: Q[types[i % len(types)]] for i, n in enumerate(names)}
    path = tmp_path / f"{arch}-k.gguf"
    held = write_gguf(path, w, cfg, quant=quant)
    m = Transformer.load(path)
    tokens = _tokens(cfg, 12)
    ref = reference_logits(held, cfg, tokens)
    _assert_logits_close(m.forward(tokens, KVCache.for_model(m.args, 12), 0, all_logits=True), ref)
    cache = KVCache.for_model(m.args, 12)
    m.forward(tokens[:6], cache, 0)  # avx512: through matvecs; avx2: the tiled GEMM
    for t in range(6, 12):
        _assert_logits_close(m.forward(tokens[t:t + 1], cache, t), ref[t])
    if native.available():
        mats = [lin for L in m.weights.layers for lin in L.linears]
        assert all(lin.packed is not None for lin in mats)
        assert all(lin.f32 is None for lin in mats)


def test_architecture_switches_reach_the_model(tmp_path):
    path, cfg, _ = _model_file(tmp_path, "gemma3", {})
    a = ModelArgs.from_gguf(open_gguf(path), path)
    assert a.window(0) == 8 and a.window(5) is None and a.qk_norm and a.post_norms
    assert a.rope_base(0) == (10000.0, 1.0) and a.rope_base(5)[0] == cfg["theta"]
    path, cfg, _ = _model_file(tmp_path, "gemma2", {})
    a = ModelArgs.from_gguf(open_gguf(path), path)
    assert [a.window(i) for i in range(2)] == [8, None] and a.attn_softcap == 5.0
    assert a.final_softcap == 6.0 and a.activation == "gelu_tanh"


@pytest.mark.parametrize("key,value,expect", [
    ("attention.head_count_kv", 3, "cannot share"),
    ("rope.dimension_count", 0xFFFFFFFF, "rope dimension"),
    ("attention.head_count", 0, "head_count"),
    ("embedding_length", 0, "embedding_length|dim = 0"),
    ("block_count", 10**7, "n_layers"),
])
def test_impossible_shapes_are_refused_before_loading(tmp_path, key, value, expect):
    from gguf import GGUFReader, GGUFWriter

    path, cfg, _ = _model_file(tmp_path, "llama", {})
    src = GGUFReader(str(path))
    bad = tmp_path / "bad.gguf"
    g = GGUFWriter(str(bad), "llama")
    for f in src.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.name == f"llama.{key}":
            g.add_uint32(f.name, value) if value >= 0 else None
            continue
        g.add_key_value(f.name, f.contents(), f.types[0],
                        f.types[-1] if len(f.types) > 1 else None)
    for t in src.tensors:
        g.add_tensor(t.name, np.asarray(t.data), raw_shape=tuple(reversed(
            [int(n) for n in t.shape])), raw_dtype=t.tensor_type)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    with pytest.raises(ModelError, match=expect):
        ModelArgs.from_gguf(open_gguf(bad), bad)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "selfattn.cli", *args], capture_output=True,
                          text=True, timeout=600)


def _one_line_error(r, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_an_architecture_selfattn_cannot_run_is_planned_and_refused(tmp_path):
    """A file of another architecture with the shared shape keys: `plan` answers and says it
    cannot run it; `generate` refuses it in one line naming the file and the architecture."""
    w, cfg = make_weights(np.random.default_rng(7), arch="llama")
    path = tmp_path / "other.gguf"
    write_gguf(path, w, cfg, arch_name="starcoder2")
    r = _cli("plan", "--model", str(path), "--ctx", "64", "--hardware", "rtx-4090", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["runnable"] is False and "starcoder2" in doc["cannot_run"]
    assert doc["weights_bytes"] > 0 and doc["kv_cache_bytes"] > 0
    r = _cli("plan", "--model", str(path), "--ctx", "64", "--hardware", "rtx-4090")
    assert r.returncode == 0 and "cannot run architecture 'starcoder2'" in r.stdout
    _one_line_error(_cli("generate", "hi", "--model", str(path), "--max-tokens", "1"),
                    str(path), "starcoder2", "llama")


def test_a_weight_type_selfattn_cannot_run_is_named_with_the_supported_ones(tmp_path):
    from gguf import GGUFReader, GGUFWriter

    path, cfg, _ = _model_file(tmp_path, "llama", {}, shape=KQUANT_SHAPE)
    src = GGUFReader(str(path))
    bad = tmp_path / "iq2.gguf"
    g = GGUFWriter(str(bad), "llama")
    for f in src.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            g.add_key_value(f.name, f.contents(), f.types[0],
                            f.types[-1] if len(f.types) > 1 else None)
    rng = np.random.default_rng(3)
    for t in src.tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))
        data, qtype = np.asarray(t.data), t.tensor_type
        if t.name == "blk.0.ffn_up.weight":  # IQ2_XXS: 66 bytes per 256 values
            qtype = Q.IQ2_XXS
            shape = (shape[0], shape[1] // 256 * 66)  # a block type's raw shape is in bytes
            data = rng.integers(0, 256, shape, dtype=np.uint8)
        g.add_tensor(t.name, data, raw_shape=shape, raw_dtype=qtype)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    with pytest.raises(ModelError, match="blk.0.ffn_up.weight.*IQ2_XXS.*Q4_K"):
        Transformer.load(bad)
    r = _cli("plan", "--model", str(bad), "--ctx", "64", "--hardware", "this", "--json")
    assert r.returncode == 0, r.stderr
    assert "IQ2_XXS" in json.loads(r.stdout)["cannot_run"]
    _one_line_error(_cli("generate", "hi", "--model", str(bad), "--max-tokens", "1"),
                    str(bad), "IQ2_XXS", "Q6_K")


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_perplexity_bench_and_plan_work_for_every_architecture(tmp_path, arch):
    """The instruments on each architecture: inspect's weights are a softmax over the keys each
    layer's window lets in; perplexity (windows and a sink + window stream) is finite; bench
    runs llama-bench's tests; the planner counts exactly the bytes the loaded model holds."""
    from selfattn.inspect.record import record_attention
    from selfattn.measure import bench
    from selfattn.model import perplexity
    from selfattn.plan import ModelShape

    path, cfg, _ = _model_file(tmp_path, arch, {})
    reader = open_gguf(path)
    m = Transformer.from_reader(reader, path)
    tokens = _tokens(cfg, 20)
    layers = list(range(m.args.n_layers))
    rec = record_attention(m, tokens, [str(t) for t in tokens], layers, [0])
    w = rec.weights  # (layers, heads, n, n)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    i, j = np.indices((20, 20))
    for li in layers:
        window = m.args.window(li)
        allowed = (j <= i) & ((i - j < window) if window else True)
        assert np.all(w[li, 0][~allowed] == 0), (arch, li, window)
        assert np.all(w[li, 0][allowed] > 0)
    ids = _tokens(cfg, 64, seed=1)
    for result in (perplexity.windows(m, ids, 16), perplexity.stream(m, ids, 2, 12)):
        assert np.isfinite(result.ppl) and result.ppl > 1
    shape = ModelShape.from_gguf(reader, path)
    roofline = {"matmul_gflops": 100.0, "read_gbs": 20.0, "cpu": "test", "threads": 2}
    recs = bench.run_bench(m, shape, roofline, p=8, n=2, depths=(0, 12), reps=1)
    assert [r.test for r in recs][:2] == ["pp8", "tg2"]
    assert all(s > 0 for r in recs for s in r.samples_ns)
    assert shape.cannot_run is None and shape.held_bytes == m.weight_bytes
