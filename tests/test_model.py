"""The model runner on a tiny random GGUF written by the tests: loading, forward, cache, errors."""

import numpy as np
import pytest

from selfattn.cache import KVCache
from selfattn.errors import ContextError, ModelError
from selfattn.model import Transformer, Sampler, Tokenizer, generate
from selfattn.model.gguf_file import open_gguf
from selfattn.model.transformer import unpermute

from .tiny_gguf import SPECIAL, make_weights, permute, reference_forward, write_gguf


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    rng = np.random.default_rng(7)
    w, cfg = make_weights(rng, arch=request.param)
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    write_gguf(path, w, cfg)
    return path, w, cfg


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    np.testing.assert_array_equal(unpermute(permute(w, 4), 4), w)
    assert not np.array_equal(permute(w, 4), w)


def test_config_from_metadata(tiny):
    path, w, cfg = tiny
    m = Transformer.load(path)
    a = m.args
    assert (a.arch, a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim) == \
        (cfg["arch"], 2, 64, 4, 2, 16, 96)
    assert a.tied_embeddings is False and a.qkv_bias == (cfg["arch"] == "qwen2")
    assert a.context_length == 256 and a.rope_theta == 10000.0


def test_forward_matches_float64_reference(tiny):
    path, w, cfg = tiny
    m = Transformer.load(path)
    tokens = np.random.default_rng(0).integers(0, cfg["vocab"], 37)
    logits = m.forward(tokens, KVCache.for_model(m.args, 64), 0, all_logits=True)
    ref = reference_forward(w, cfg, tokens)
    np.testing.assert_allclose(logits, ref, atol=2e-4, rtol=0)


def test_a_wrong_permutation_would_be_caught(tmp_path):
    # the test above can fail: a llama file written without llama.cpp's permute gives other logits
    w, cfg = make_weights(np.random.default_rng(7), arch="llama")
    bad = tmp_path / "unpermuted.gguf"
    write_gguf(bad, w, dict(cfg, arch="qwen2"), arch_name="llama")
    m = Transformer.load(bad)
    tokens = np.arange(5, 25)
    logits = m.forward(tokens, KVCache.for_model(m.args, 32), 0, all_logits=True)
    assert np.abs(logits - reference_forward(w, cfg, tokens)).max() > 1e-2


def test_cached_equals_uncached(tiny):
    path, w, cfg = tiny
    m = Transformer.load(path)
    tokens = np.random.default_rng(1).integers(0, cfg["vocab"], 45)
    full = m.forward(tokens, KVCache.for_model(m.args, 64), 0, all_logits=True)
    cache = KVCache.for_model(m.args, 64)
    m.forward(tokens[:30], cache, 0)  # prefill (flash path)
    for i in range(30, 45):  # one token at a time (decode path)
        step = m.forward(tokens[i:i + 1], cache, cache.length)
        np.testing.assert_allclose(step, full[i], atol=2e-5, rtol=0)
    # and chunked prefill: 10 + 20 tokens
    cache = KVCache.for_model(m.args, 64)
    m.forward(tokens[:10], cache, 0)
    np.testing.assert_allclose(m.forward(tokens[10:30], cache, 10), full[29], atol=2e-5)


@pytest.mark.parametrize("quant", [None, "Q8_0", "Q4_K"])
def test_a_batched_step_is_each_sequence_alone_bit_for_bit(tmp_path, quant):
    """forward_batch: three sequences at different depths, one token each, in one call; each
    row of logits and each cache is what a one-token forward on that cache alone gives."""
    from gguf import GGMLQuantizationType as Q

    w, cfg = make_weights(np.random.default_rng(3), dim=256, ffn=256, n_heads=4, n_kv_heads=2)
    mats = [n for n in w if not n.endswith(("norm", ".bias"))]
    path = tmp_path / "batch.gguf"
    write_gguf(path, w, cfg, quant=quant and {n: getattr(Q, quant) for n in mats})
    m = Transformer.load(path)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, cfg["vocab"], n) for n in (5, 17, 9)]
    pairs = []
    for p in prompts:
        a, b = KVCache.for_model(m.args, 40), KVCache.for_model(m.args, 40)
        m.forward(p, a, 0)
        m.forward(p, b, 0)
        pairs.append((a, b))
    for step in range(4):
        ids = rng.integers(0, cfg["vocab"], 3)
        batched = m.forward_batch(ids, [a for a, _ in pairs])
        for i, (a, b) in enumerate(pairs):
            alone = m.forward(ids[i:i + 1], b, b.length)
            np.testing.assert_array_equal(batched[i], alone)
            assert a.length == b.length
            np.testing.assert_array_equal(a.k, b.k)
    with pytest.raises(ValueError, match="cache of its own"):
        m.forward_batch([1, 2], [pairs[0][0], pairs[0][0]])


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K", "mixed"])
def test_prompts_of_several_sequences_at_once_are_each_alone_bit_for_bit(tmp_path, quant):
    """forward_prompts: three sequences' prompt chunks (one of them after cached tokens) in one
    call; each row of logits and each cache is what `forward` of that chunk alone gives, where
    prompts_join says so (matrices as blocks, every chunk past the one-token loops)."""
    from gguf import GGMLQuantizationType as Q

    from selfattn import native
    from selfattn.model.linear import FEW_PASSES

    if not native.available():
        pytest.skip("forward_prompts' bits need the compiled GEMM (BLAS rows depend on the call)")
    w, cfg = make_weights(np.random.default_rng(5), dim=256, ffn=256, n_heads=4, n_kv_heads=2)
    mats = [n for n in w if not n.endswith(("norm", ".bias"))]
    types = {"Q8_0": [Q.Q8_0], "Q4_K": [Q.Q4_K], "mixed": [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q4_0]}[quant]
    path = tmp_path / "prompts.gguf"
    write_gguf(path, w, cfg, quant={n: types[i % len(types)] for i, n in enumerate(mats)})
    m = Transformer.load(path)
    few = FEW_PASSES * native.dot_rows()
    rng = np.random.default_rng(6)
    lengths = (few + 1, 23, few + 5)
    chunks = [rng.integers(0, cfg["vocab"], n) for n in lengths]
    assert m.prompts_join(lengths) and not m.prompts_join((few, 23))
    joint, alone = [KVCache.for_model(m.args, 64) for _ in lengths], \
        [KVCache.for_model(m.args, 64) for _ in lengths]
    history = rng.integers(0, cfg["vocab"], 11)  # the second sequence already holds 11 tokens
    m.forward(history, joint[1], 0)
    m.forward(history, alone[1], 0)
    logits = m.forward_prompts(chunks, joint)
    for i, ids in enumerate(chunks):
        np.testing.assert_array_equal(logits[i], m.forward(ids, alone[i], alone[i].length))
        assert joint[i].length == alone[i].length
        np.testing.assert_array_equal(joint[i].k, alone[i].k)
        np.testing.assert_array_equal(joint[i].v, alone[i].v)
    with pytest.raises(ValueError, match="cache of its own"):
        m.forward_prompts(chunks[:2], [joint[0], joint[0]])
    with pytest.raises(ValueError, match="at least one token"):
        m.forward_prompts([chunks[0], []], [joint[0], joint[2]])


def test_q8_0_tensors_dequantize(tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(3)
    w, cfg = make_weights(rng, arch="llama")
    path = tmp_path / "q8.gguf"
    write_gguf(path, w, cfg, q8_names={"blk.0.ffn_up", "token_embd"})
    m = Transformer.load(path)
    q8 = GGMLQuantizationType.Q8_0
    expect = dequantize(quantize(w["blk.0.ffn_up"], q8), q8)
    up = m.weights.layers[0].w_up
    np.testing.assert_array_equal(up.rows(np.arange(cfg["ffn"])), expect)


def test_generation_greedy_is_deterministic_and_stops(tiny):
    path, w, cfg = tiny
    m = Transformer.load(path)
    prompt = [5, 6, 7, 8]
    runs = [generate(m, prompt, 12, Sampler(), KVCache.for_model(m.args, 32)).token_ids
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 12
    ref = reference_forward(w, cfg, np.array(prompt))
    assert runs[0][0] == int(np.argmax(ref[-1]))
    seeded = [generate(m, prompt, 8, Sampler(temperature=1.0, top_k=20, top_p=0.9, seed=3),
                       KVCache.for_model(m.args, 32)).token_ids for _ in range(2)]
    assert seeded[0] == seeded[1]
    stats = generate(m, prompt, 100, Sampler(), KVCache.for_model(m.args, 10))
    assert stats.stop_reason == "context_full" and stats.generated_tokens == 7


def test_context_overflow_is_an_error(tiny):
    path, w, cfg = tiny
    m = Transformer.load(path)
    with pytest.raises(ContextError, match="do not fit a context of 8"):
        m.forward(np.arange(9), KVCache.for_model(m.args, 8), 0)


def test_tokenizer_from_gguf_round_trips(tiny):
    path, w, cfg = tiny
    tok = Tokenizer.from_gguf(open_gguf(path), path)
    for text in ["the cat sat", "naïve café 東京 🙂", "  two  spaces\nand a tab\t", ""]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == SPECIAL.index("<|im_start|>") and ids[-1] == SPECIAL.index("<|im_end|>")
    assert tok.encode(" the") == [len(tok.pieces) - 4]  # the merge "Ġthe"
    chat = tok.render_chat([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("problem,expect", [
    ("not_gguf", "not a GGUF file"),
    ("truncated", "runs past the end of the file|truncated"),
    ("missing_tensor", "tensor 'blk.1.ffn_down.weight' is missing"),
    ("bad_arch", "architecture 'gpt2' is not supported"),
    ("no_file", "no such file"),
])
def test_bad_files_give_one_clear_error(tmp_path, problem, expect):
    rng = np.random.default_rng(0)
    w, cfg = make_weights(rng)
    path = tmp_path / "m.gguf"
    if problem == "not_gguf":
        path.write_text("hello")
    elif problem == "truncated":
        write_gguf(path, w, cfg)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif problem == "missing_tensor":
        write_gguf(path, w, cfg, drop={"blk.1.ffn_down"})
    elif problem == "bad_arch":
        write_gguf(path, w, cfg, arch_name="gpt2")
    elif problem == "no_file":
        path = tmp_path / "absent.gguf"
    with pytest.raises(ModelError, match=expect) as err:
        Transformer.load(path)
    assert str(path) in str(err.value)


def test_a_cache_larger_than_memory_is_refused_before_allocating(tiny):
    path, w, cfg = tiny
    m = Transformer.load(path)
    with pytest.raises(ContextError, match=r"needs .* GiB, .* GiB is available: at most \d+"):
        KVCache.for_model(m.args, 10**12)


def test_where_the_time_went(tiny):
    """generate's Timings: every part timed where it runs, none negative, together no more than
    the phase's wall time; the work counted exactly (2 FLOPs a weight and token, each matrix read
    once a forward call, each cached K and V row once a step)."""
    from selfattn.measure.breakdown import PARTS, breakdown

    path, _, _ = tiny
    m = Transformer.load(path)
    a, w = m.args, m.weights
    prompt, n = list(range(5, 25)), 6
    stats = generate(m, prompt, n, Sampler(), KVCache.for_model(a, 64, "f16"))
    pre, dec = stats.prompt_timings, stats.decode_timings
    mats = [mat for L in w.layers for mat in L.linears]
    params, nbytes = sum(x.shape[0] * x.shape[1] for x in mats), sum(x.nbytes for x in mats)
    head = w.output.shape[0] * w.output.shape[1]
    assert pre.forward_calls == 1 and dec.forward_calls == n - 1
    assert pre.matmul_flops == 2.0 * (len(prompt) * params + head)
    assert dec.matmul_flops == (n - 1) * 2.0 * (params + head)
    assert dec.weight_bytes == (n - 1) * (nbytes + w.output.nbytes)
    assert pre.attention_flops == 4.0 * a.head_dim * pre.attention_pairs
    row = 2 * a.head_dim  # an f16 row
    keys = sum(len(prompt) + i + 1 for i in range(n - 1)) * a.n_layers
    assert dec.kv_bytes == keys * a.n_kv_heads * 2 * row and pre.kv_bytes == 0
    roofline = {"fma_gflops": 100.0, "matmul_gflops": 50.0, "read_gbs": 10.0}
    for t, wall, decode in ((pre, stats.ttft_s, False), (dec, stats.decode_s, True)):
        parts = (t.matmul_s, t.attention_s, t.ops_s, t.sampling_s)
        assert all(p > 0 for p in parts) and sum(parts) <= t.forward_s + t.sampling_s <= wall
        rows = breakdown(t, wall, decode, roofline)
        assert [r["part"] for r in rows] == list(PARTS)
        assert sum(r["seconds"] for r in rows) == pytest.approx(wall)
        assert sum(r["share"] for r in rows) == pytest.approx(1.0)
        mm = rows[0]
        want = (t.weight_bytes / t.matmul_s / 10e9 if decode
                else t.matmul_flops / t.matmul_s / 100e9)
        assert mm["roofline_fraction"] == pytest.approx(want)
        assert rows[2]["roofline_fraction"] is None and rows[4]["roofline_fraction"] is None
    assert breakdown(pre, stats.ttft_s, False)[0]["roofline_fraction"] is None
    with pytest.raises(ValueError, match="wall time"):
        breakdown(pre, 0.0, False)
