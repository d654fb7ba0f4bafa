"""Self-checks of the test fixtures, without selfattn: tests/tiny_gguf.py writes the tensors and
keys llama.cpp's converter writes for each architecture, and tests/arch_reference.py's float64
forwards are causal, use their sliding windows, soft-caps, RoPE variants and quantized weights,
agree with the older llama/qwen2 reference, and (when transformers is installed) with HF
transformers loading the same files (benchmarks/parity_arch.py)."""

import importlib.util
import os

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from .arch_reference import layer_rope, reference_logits
from .tiny_gguf import (ARCHS, KQUANT_SHAPE, QUANTIZABLE, RAW_BLOCK_TYPES, Q, make_weights,
                        matrices, permute, read_weights, reference_forward, unpermute,
                        write_gguf)

# What convert_hf_to_gguf.py writes, stated here independently of the writer.
LAYER_TENSORS = {
    "llama": "attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down",
    "qwen2": "attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down",
    "qwen3": "attn_norm attn_q attn_k attn_v attn_q_norm attn_k_norm attn_output ffn_norm "
             "ffn_gate ffn_up ffn_down",
    "gemma2": "attn_norm attn_q attn_k attn_v attn_output post_attention_norm ffn_norm ffn_gate "
              "ffn_up ffn_down post_ffw_norm",
    "gemma3": "attn_norm attn_q attn_k attn_v attn_q_norm attn_k_norm attn_output "
              "post_attention_norm ffn_norm ffn_gate ffn_up ffn_down post_ffw_norm",
    "phi3": "attn_norm attn_qkv attn_output ffn_norm ffn_up ffn_down",
}
TIED = {"gemma2", "gemma3"}  # no output.weight: the converters drop lm_head
COMMON_KEYS = ("block_count context_length embedding_length feed_forward_length "
               "attention.head_count attention.head_count_kv attention.layer_norm_rms_epsilon")
ARCH_KEYS = {
    "llama": "rope.freq_base vocab_size rope.dimension_count",
    "qwen2": "rope.freq_base",
    "qwen3": "rope.freq_base attention.key_length attention.value_length",
    "gemma2": "attention.key_length attention.value_length attention.sliding_window "
              "attn_logit_softcapping final_logit_softcapping",
    "gemma3": "rope.freq_base attention.key_length attention.value_length "
              "attention.sliding_window",
    "phi3": "rope.freq_base rope.scaling.original_context_length rope.dimension_count "
            "attention.sliding_window",
}
T = 24  # tokens: crosses the window of 8


def _tokens(cfg, n=T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg["vocab"], n)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    w, cfg = make_weights(np.random.default_rng(3), arch=request.param)
    path = tmp_path_factory.mktemp("arch") / f"{request.param}.gguf"
    held = write_gguf(path, w, cfg)
    return path, w, cfg, held


def _field(reader, key):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return v.tobytes().decode() if v.dtype == np.uint8 else v.tolist()[0]


def test_the_file_has_the_converters_tensors_and_keys(tiny):
    path, w, cfg, held = tiny
    arch, D = cfg["arch"], cfg["head_dim"]
    r = GGUFReader(str(path))
    layer = LAYER_TENSORS[arch].split()
    if arch == "qwen2":
        layer += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
    want = {"token_embd.weight", "output_norm.weight"} | (set() if arch in TIED else
                                                          {"output.weight"})
    want |= {f"blk.{i}.{n}" + ("" if n.endswith(".bias") else ".weight")
             for i in range(cfg["n_layers"]) for n in layer}
    assert {t.name for t in r.tensors} == want
    assert {t.tensor_type for t in r.tensors} == {Q.F32}
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}  # GGUF order: ne0 first
    H, H_kv, dim, ffn = cfg["n_heads"], cfg["n_kv_heads"], cfg["dim"], cfg["ffn"]
    assert shapes["token_embd.weight"] == (dim, cfg["vocab"])
    assert shapes["blk.0.attn_output.weight"] == (H * D, dim)
    if arch == "phi3":
        assert shapes["blk.0.attn_qkv.weight"] == (dim, (H + 2 * H_kv) * D)
        assert shapes["blk.0.ffn_up.weight"] == (dim, 2 * ffn)
    else:
        assert shapes["blk.0.attn_q.weight"] == (dim, H * D)
        assert shapes["blk.0.attn_k.weight"] == (dim, H_kv * D)
    if cfg["qk_norm"]:
        assert shapes["blk.0.attn_q_norm.weight"] == (D,)
    keys = {k for k in r.fields if not k.startswith(("GGUF.", "general.", "tokenizer."))}
    assert keys == {f"{arch}.{k}" for k in (COMMON_KEYS + " " + ARCH_KEYS[arch]).split()}
    assert _field(r, "general.architecture") == arch
    if f"{arch}.attention.key_length" in keys:
        assert _field(r, f"{arch}.attention.key_length") == D
    if arch in ("gemma2", "gemma3"):
        assert _field(r, f"{arch}.attention.sliding_window") == 8 and D * H != dim
    if arch == "gemma2":
        assert _field(r, "gemma2.attn_logit_softcapping") == cfg["attn_softcap"]
        assert _field(r, "gemma2.final_logit_softcapping") == cfg["final_softcap"]
    if arch == "phi3":
        assert _field(r, "phi3.rope.dimension_count") == cfg["rope_dim"] == 12 < D
        assert _field(r, "phi3.attention.sliding_window") == 0  # none
    if arch == "gemma3":
        assert _field(r, "gemma3.rope.freq_base") == 1e6
    # the weights read back are the ones written (llama: the permute undone)
    assert held.keys() == w.keys() and all(np.array_equal(held[k], w[k]) for k in w)


def test_llama_q_k_rows_are_stored_permuted(tmp_path):
    w, cfg = make_weights(np.random.default_rng(0), arch="llama")
    x = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    assert np.array_equal(unpermute(permute(x, 4), 4), x) and not np.array_equal(permute(x, 4), x)
    write_gguf(tmp_path / "l.gguf", w, cfg)
    raw = {t.name: np.array(t.data) for t in GGUFReader(str(tmp_path / "l.gguf")).tensors}
    assert np.array_equal(raw["blk.0.attn_q.weight"], permute(w["blk.0.attn_q"], 4))
    assert np.array_equal(raw["blk.1.attn_k.weight"], permute(w["blk.1.attn_k"], 2))
    # and a file written without the permute is a different model
    write_gguf(tmp_path / "u.gguf", w, dict(cfg, arch="qwen2", qkv_bias=False),
               arch_name="llama")
    wrong = read_weights(tmp_path / "u.gguf", cfg)
    assert np.abs(reference_logits(wrong, cfg, _tokens(cfg))
                  - reference_logits(w, cfg, _tokens(cfg))).max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_reference_is_the_older_llama_qwen2_one(arch):
    w, cfg = make_weights(np.random.default_rng(5), arch=arch)
    toks = _tokens(cfg, 30)
    np.testing.assert_allclose(reference_logits(w, cfg, toks), reference_forward(w, cfg, toks),
                               atol=1e-12, rtol=0)


def test_the_reference_is_causal_and_reads_the_file(tiny):
    path, w, cfg, held = tiny
    toks = _tokens(cfg)
    ref = reference_logits(w, cfg, toks)
    assert ref.shape == (T, cfg["vocab"]) and ref.dtype == np.float64
    changed = toks.copy()
    changed[15] = (changed[15] + 1) % cfg["vocab"]
    other = reference_logits(w, cfg, changed)
    np.testing.assert_array_equal(other[:15], ref[:15])
    assert np.abs(other[15:] - ref[15:]).min(axis=1).max() > 0 and \
        np.abs(other[-1] - ref[-1]).max() > 1e-3
    np.testing.assert_array_equal(reference_logits(path, cfg, toks), ref)


@pytest.mark.parametrize("arch,options", [("gemma2", {}), ("gemma3", {}),
                                          ("llama", dict(window=8)), ("phi3", dict(window=8))])
def test_the_sliding_window_is_used(arch, options):
    w, cfg = make_weights(np.random.default_rng(4), arch=arch, **options)
    assert cfg["window"] == 8
    toks = _tokens(cfg)
    ref = reference_logits(w, cfg, toks)
    wide = reference_logits(w, dict(cfg, window=64), toks)
    # query i sees keys i-7..i: the first 8 positions see everything either way
    np.testing.assert_allclose(ref[:8], wide[:8], atol=1e-12, rtol=0)
    assert np.abs(ref[8] - wide[8]).max() > 1e-4 and np.abs(ref[-1] - wide[-1]).max() > 1e-3
    if arch in ("llama", "phi3"):  # a window as long as the prompt is no window
        assert all(cfg["swa_layers"])
        np.testing.assert_allclose(wide, reference_logits(w, dict(cfg, window=None), toks),
                                   atol=1e-12, rtol=0)


def test_gemma_layer_patterns_and_rope_bases():
    _, g2 = make_weights(np.random.default_rng(0), arch="gemma2", n_layers=4)
    assert g2["swa_layers"] == [True, False, True, False]  # llama.cpp set_swa_pattern(2)
    w, g3 = make_weights(np.random.default_rng(0), arch="gemma3")
    assert g3["swa_layers"] == [True] * 5 + [False]  # set_swa_pattern(6): (i + 1) % 6 == 0
    assert [layer_rope(g3, i)[:2] for i in (0, 5)] == [(10000.0, 1.0), (1e6, 1.0)]
    _, g3s = make_weights(np.random.default_rng(0), arch="gemma3", rope_scale=8.0)
    assert [layer_rope(g3s, i)[:2] for i in (0, 5)] == [(10000.0, 1.0), (1e6, 8.0)]
    toks = _tokens(g3)
    ref = reference_logits(w, g3, toks)
    for changed in (dict(rope_scale=8.0), dict(theta_local=1e6), dict(theta=1e4)):
        assert np.abs(reference_logits(w, dict(g3, **changed), toks) - ref).max() > 1e-3


def test_gemma2_soft_caps_bound_and_change_the_output():
    w, cfg = make_weights(np.random.default_rng(2), arch="gemma2")
    toks = _tokens(cfg)
    ref = reference_logits(w, cfg, toks)
    assert np.abs(ref).max() <= cfg["final_softcap"]
    uncapped = reference_logits(w, dict(cfg, final_softcap=None), toks)
    assert np.abs(uncapped).max() > cfg["final_softcap"]  # the cap bites
    no_attn_cap = reference_logits(w, dict(cfg, attn_softcap=None), toks)
    assert np.abs(no_attn_cap - ref).max() > 1e-3


def test_arch_specific_parts_change_the_output():
    """Each switch the reference reads makes a difference on these models (so a model that
    ignored one could not match)."""
    toks = _tokens({"vocab": 265})
    for arch, change in [("qwen3", dict(qk_norm=False)), ("gemma3", dict(qk_norm=False)),
                         ("gemma2", dict(post_norms=False)), ("gemma2", dict(embed_scale=False)),
                         ("gemma2", dict(act="silu")), ("phi3", dict(rope_dim=16)),
                         ("qwen2", dict(qkv_bias=False))]:
        w, cfg = make_weights(np.random.default_rng(1), arch=arch)
        diff = np.abs(reference_logits(w, dict(cfg, **change), toks)
                      - reference_logits(w, cfg, toks)).max()
        assert diff > 1e-3, (arch, change)


def test_llama3_rope_factors_are_written_and_used(tmp_path):
    w, cfg = make_weights(np.random.default_rng(0), arch="llama", llama3=True)
    f = w["rope_freqs"]
    assert f.shape == (cfg["head_dim"] // 2,) and f[0] == 1.0 and f[-1] == 8.0
    assert ((f > 1) & (f < 8)).any()  # the smoothed band
    held = write_gguf(tmp_path / "l3.gguf", w, cfg)
    r = GGUFReader(str(tmp_path / "l3.gguf"))
    assert [t.tensor_type for t in r.tensors if t.name == "rope_freqs.weight"] == [Q.F32]
    toks = _tokens(cfg)
    plain = reference_logits(w, dict(cfg, llama3=None), toks)
    assert np.abs(reference_logits(held, cfg, toks) - plain).max() > 1e-3


def test_quantized_files_hold_the_values_the_reference_uses(tmp_path):
    w, cfg = make_weights(np.random.default_rng(6), arch="llama", **KQUANT_SHAPE)
    mats = matrices(w)
    assert all(w[n].shape[1] % 256 == 0 for n in mats)  # every row length: K-quant ready
    types = sorted(RAW_BLOCK_TYPES | QUANTIZABLE | {Q.F16}, key=lambda t: t.value)
    quant = {n: types[i % len(types)] for i, n in enumerate(mats)}
    path = tmp_path / "k.gguf"
    held = write_gguf(path, w, cfg, quant=quant)
    stored = {t.name.removesuffix(".weight"): t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert all(stored[n] == quant.get(n, Q.F32) for n in w)
    for n in mats:
        s, h = float(w[n].std()), held[n]
        assert h.shape == w[n].shape and np.isfinite(h).all()
        if quant[n] in RAW_BLOCK_TYPES:  # random blocks: other values, a similar spread
            assert 0.5 * s < h.std() < 2 * s and np.abs(h - w[n]).max() > s
        elif quant[n] == Q.F16:
            np.testing.assert_array_equal(h, w[n].astype(np.float16))
        else:  # gguf.quants' rounding of w (row by row, so the llama permute does not matter)
            np.testing.assert_array_equal(h, dequantize(quantize(w[n], quant[n]), quant[n]))
    assert write_gguf(tmp_path / "again.gguf", w, cfg, quant=quant).keys() == held.keys()
    assert all(np.array_equal(read_weights(tmp_path / "again.gguf", cfg)[n], held[n]) for n in w)
    toks = _tokens(cfg, 12)
    ref = reference_logits(held, cfg, toks)
    np.testing.assert_array_equal(reference_logits(path, cfg, toks), ref)
    assert np.isfinite(ref).all() and np.abs(ref - reference_logits(w, cfg, toks)).max() > 1e-2


def test_block_types_need_whole_blocks_per_row(tmp_path):
    w, cfg = make_weights(np.random.default_rng(0), arch="llama")  # rows of 64 and 96
    with pytest.raises(ValueError, match="not a multiple of Q4_K's block of 256"):
        write_gguf(tmp_path / "x.gguf", w, cfg, quant={"blk.0.attn_q": Q.Q4_K})
    held = write_gguf(tmp_path / "y.gguf", w, cfg, quant={"blk.0.attn_q": Q.IQ4_NL})  # 32
    assert held["blk.0.attn_q"].shape == w["blk.0.attn_q"].shape


def _parity_module():
    for name in ("torch", "transformers", "accelerate"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed: HF parity is benchmarks/parity_arch.py's job "
                        "(pip install transformers accelerate)")
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "parity_arch.py")
    spec = importlib.util.spec_from_file_location("parity_arch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", ["llama", "llama-llama3-rope", "mistral-window", "qwen2",
                                  "qwen3", "gemma2", "gemma3", "gemma3-linear-rope", "phi3",
                                  "phi3-window", "gemma3-kquants"])
def test_the_reference_matches_hf_transformers(case, tmp_path):
    parity = _parity_module()
    last, every, ours, same, _ = parity.compare(case, str(tmp_path))
    assert last < 1e-3 and every < 1e-3, (last, every)
    assert ours < 1e-3 and same == 24, (ours, same)  # selfattn's own forward, greedy tokens
