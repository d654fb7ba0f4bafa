"""Tiny random-weight GGUF files written with gguf.GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py writes them, for the architectures llama, qwen2, qwen3, gemma2, gemma3 and
phi3, and plain float64 NumPy forwards of the same models written from the Hugging Face
definitions (q/k rows in HF order, RoPE rotating halves) -- independent of selfattn's loader,
which must undo llama.cpp's permute. reference_forward / streaming_reference below cover
llama/qwen2; tests/arch_reference.py's reference_logits covers all six.

Weights are kept in a dict of float32 arrays named like the GGUF tensors without ".weight"
("blk.0.attn_q", "blk.0.attn_q.bias", "output_norm"), each in Hugging Face layout (out, in) and
with llama's q/k rows in HF order; write_gguf applies the converter's permute for llama and
returns the weights the file actually holds (dequantized, unpermuted), which is what a float64
reference must be run on when tensors are stored quantized."""

import zlib

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, RopeScalingType
from gguf.quants import dequantize, quantize

# a byte-level BPE vocabulary: the 256 byte symbols, a few merges, and control tokens
_BYTES = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(0xA1, 0xAD)] \
    + [chr(c) for c in range(0xAE, 0x100)]
_n = 0
_BYTE_SYMBOLS = {}
for b in range(256):
    if chr(b) in _BYTES:
        _BYTE_SYMBOLS[b] = chr(b)
    else:
        _BYTE_SYMBOLS[b] = chr(256 + _n)
        _n += 1
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIAL + [_BYTE_SYMBOLS[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


Q = GGMLQuantizationType
ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

# Each architecture's specifics, in one table (what llama.cpp's converter and graph do, see the
# comments): the defaults make_weights puts into cfg. Every key is explained in make_weights.
ARCH_SPECS = {
    # LlamaModel: q/k rows permuted to adjacent RoPE pairs (llama.cpp rope type NORM);
    # llama.vocab_size and llama.rope.dimension_count written; rope_freqs.weight for llama3 RoPE
    "llama": dict(n_layers=2, theta=10000.0, eps=1e-5),
    # Qwen2Model: q/k/v biases, NEOX RoPE
    "qwen2": dict(n_layers=2, theta=10000.0, eps=1e-5, qkv_bias=True),
    # Qwen3Model: per-head RMSNorm of q and k (size head_dim) before RoPE, head_dim != dim/heads
    "qwen3": dict(n_layers=2, head_dim=32, theta=1e6, eps=1e-6, qk_norm=True),
    # Gemma2Model: norms stored +1, post norms, GeGLU(tanh), sqrt(dim) embedding scale, tied
    # output, soft-caps, layer i sliding when i % 2 == 0 (llama.cpp set_swa_pattern(2)), no
    # rope.freq_base key (10000 default)
    "gemma2": dict(n_layers=2, head_dim=32, theta=10000.0, eps=1e-6, window=8, swa_period=2,
                   attn_softcap=5.0, final_softcap=6.0, post_norms=True, embed_scale=True,
                   tied=True, act="gelu_tanh"),
    # Gemma3Model: as gemma2 without soft-caps, plus q/k norms; layer i sliding when
    # i % 6 < 5 (set_swa_pattern(6)); sliding layers on RoPE base 10000 unscaled, global layers
    # on rope.freq_base with the optional linear rope.scaling.factor
    "gemma3": dict(n_layers=6, head_dim=32, theta=1e6, theta_local=10000.0, eps=1e-6, window=8,
                   swa_period=6, qk_norm=True, post_norms=True, embed_scale=True, tied=True,
                   act="gelu_tanh"),
    # Phi3MiniModel: fused attn_qkv (q, k, v rows) and ffn_up (gate rows, then up rows), NEOX
    # RoPE on the first rope.dimension_count dims of each head (partial rotary)
    "phi3": dict(n_layers=2, theta=10000.0, eps=1e-5, partial_rotary=0.75, fused=True),
}
SHARED_DEFAULTS = dict(theta_local=None, rope_scale=None, window=None, swa_period=None,
                       attn_softcap=None, final_softcap=None, qkv_bias=False, qk_norm=False,
                       post_norms=False, embed_scale=False, tied=False, act="silu", fused=False,
                       llama3=None, ctx=256, name=None, partial_rotary=1.0)
# llama3 RoPE parameters used when make_weights(llama3=True): original context 64 puts the
# tiny model's 8 frequencies in all three branches (kept, smoothed, divided by the factor)
LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
# a shape whose every matrix row (the GGUF ne0: the input dim) is a multiple of 256, for K-quants
KQUANT_SHAPE = dict(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn=512, std=0.1)
# block types gguf.quants can quantize; the others are written as random blocks (random_blocks)
QUANTIZABLE = {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16}
RAW_BLOCK_TYPES = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS}
# byte offsets of the float16 scale fields (d, and dmin where there is one) inside one block
_F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
               Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}


def permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf permute (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def unpermute(w, n_heads):
    """The inverse of permute (GGUF llama q/k rows -> HF rotate-half order)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def llama3_rope_factors(cfg):
    """rope_freqs.weight as LlamaModel.generate_extra_tensors computes it: per frequency pair the
    divisor of the inverse frequency (1 high, `factor` low, smoothed between)."""
    p = cfg["llama3"]
    d = cfg["rope_dim"]
    freqs = 1.0 / cfg["theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d)
    low_wavelen = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wavelen = p["original_max_position_embeddings"] / p["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) \
                / (p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(out, np.float32)


def make_weights(rng, arch="llama", n_layers=None, dim=64, n_heads=4, n_kv_heads=2, ffn=96,
                 vocab=len(TOKENS), head_dim=None, std=0.2, **options):
    """Random HF-layout weights and the cfg describing them -> (w, cfg).

    cfg keys: arch, n_layers, dim, n_heads, n_kv_heads, head_dim, rope_dim (rotated dims of a
    head), ffn, vocab, theta (RoPE base; of the global layers for gemma3), theta_local (gemma3's
    sliding layers, else None), rope_scale (linear RoPE factor: positions / factor; global layers
    only for gemma3), eps, ctx, window (sliding window in tokens, None = none: key j is seen from
    query i when 0 <= i - j < window), swa_layers (per layer: does the window apply), attn_softcap
    and final_softcap (cap * tanh(x / cap) of attention scores / logits, or None), qkv_bias,
    qk_norm, post_norms, embed_scale (x * sqrt(dim)), tied (no output.weight: logits use
    token_embd), act ("silu" or "gelu_tanh"), fused (phi3's attn_qkv and gate+up ffn_up),
    llama3 (the llama3 rope_scaling parameters, or None; the file then holds rope_freqs.weight),
    name (general.name, or None). Options override the table's defaults (ARCH_SPECS); llama3=True
    uses LLAMA3_ROPE; partial_rotary (phi3 0.75) gives rope_dim as Phi3MiniModel does unless
    rope_dim is passed. Matrices are N(0, std); norm weights are drawn around 1 and used as they are: that is also Gemma's
    convention in GGUF files (the converter stores 1 + w)."""
    spec = dict(SHARED_DEFAULTS, **ARCH_SPECS[arch])
    unknown = set(options) - set(spec) - {"rope_dim"}
    if unknown:
        raise TypeError(f"unknown make_weights options {sorted(unknown)}")
    spec.update(options)
    if spec["llama3"] is True:
        spec["llama3"] = dict(LLAMA3_ROPE)
    n_layers = n_layers or spec.pop("n_layers")
    spec.pop("n_layers", None)
    D = head_dim or spec.pop("head_dim", None) or dim // n_heads
    spec.pop("head_dim", None)
    period = spec.pop("swa_period")
    window = spec["window"]
    swa = [window is not None and (period is None or i % period < period - 1)
           for i in range(n_layers)]
    partial = spec.pop("partial_rotary")  # Phi3MiniModel: int(factor * n_embd) // n_head
    rope_dim = spec.pop("rope_dim", None) or \
        (D if partial == 1.0 else int(partial * dim) // n_heads)
    cfg = dict(arch=arch, n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
               head_dim=D, rope_dim=rope_dim, ffn=ffn, vocab=vocab, swa_layers=swa, **spec)

    r = lambda *s: (rng.standard_normal(s) * std).astype(np.float32)  # noqa: E731
    w = {"token_embd": r(vocab, dim), "output_norm": 1 + r(dim)}
    if not cfg["tied"]:
        w["output"] = r(vocab, dim)
    for i in range(n_layers):
        p = f"blk.{i}."
        w[p + "attn_norm"] = 1 + r(dim)
        q, k, v = r(n_heads * D, dim), r(n_kv_heads * D, dim), r(n_kv_heads * D, dim)
        if cfg["fused"]:
            w[p + "attn_qkv"] = np.concatenate([q, k, v])
        else:
            w[p + "attn_q"], w[p + "attn_k"], w[p + "attn_v"] = q, k, v
        w[p + "attn_output"] = r(dim, n_heads * D)
        w[p + "ffn_norm"] = 1 + r(dim)
        gate, up = r(ffn, dim), r(ffn, dim)
        if cfg["fused"]:
            w[p + "ffn_up"] = np.concatenate([gate, up])
        else:
            w[p + "ffn_gate"], w[p + "ffn_up"] = gate, up
        w[p + "ffn_down"] = r(dim, ffn)
        if cfg["qkv_bias"]:
            w[p + "attn_q.bias"] = r(n_heads * D)
            w[p + "attn_k.bias"] = r(n_kv_heads * D)
            w[p + "attn_v.bias"] = r(n_kv_heads * D)
        if cfg["qk_norm"]:
            w[p + "attn_q_norm"] = 1 + r(D)
            w[p + "attn_k_norm"] = 1 + r(D)
        if cfg["post_norms"]:
            w[p + "post_attention_norm"] = 1 + r(dim)
            w[p + "post_ffw_norm"] = 1 + r(dim)
    if cfg["llama3"]:
        w["rope_freqs"] = llama3_rope_factors(cfg)
    return w, cfg


def matrices(w):
    """The names of the 2-D tensors (the ones a quantized file stores in blocks)."""
    return [n for n, t in w.items() if t.ndim == 2]


def random_blocks(rng, qtype, t):
    """Random blocks of qtype for a tensor shaped like t (rows, row length): random bytes with
    the float16 scales set so the dequantized values have about t's standard deviation
    (each block's scale times a factor in [0.5, 1.5]). -> uint8 (rows, bytes per row)."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = t.shape
    n = rows * cols // block
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)

    def set_scales(values):
        for off in _F16_FIELDS[qtype]:
            raw[:, off:off + 2] = values.astype(np.float16).view(np.uint8).reshape(n, 2)

    set_scales(np.ones(n))
    spread = dequantize(raw, qtype).std()
    set_scales(float(t.std()) / spread * rng.uniform(0.5, 1.5, n))
    return raw.reshape(rows, cols // block * size)


def _write_metadata(g, cfg):
    """The keys convert_hf_to_gguf.py writes for cfg's architecture (arch-specific parts from
    LlamaModel, Qwen2Model/Qwen3Model, Gemma2Model, Gemma3Model, Phi3MiniModel)."""
    arch = cfg["arch"]
    D = cfg["head_dim"]
    if cfg.get("name"):
        g.add_name(cfg["name"])
    g.add_block_count(cfg["n_layers"])
    g.add_context_length(cfg["ctx"])
    g.add_embedding_length(cfg["dim"])
    g.add_feed_forward_length(cfg["ffn"])
    g.add_head_count(cfg["n_heads"])
    g.add_head_count_kv(cfg["n_kv_heads"])
    if arch != "gemma2":  # Gemma2Model writes no rope.freq_base: llama.cpp's default 10000
        g.add_rope_freq_base(cfg["theta"])
    elif cfg["theta"] != 10000.0:
        raise ValueError("a gemma2 file has no rope.freq_base key: its base is 10000")
    g.add_layer_norm_rms_eps(cfg["eps"])
    if arch in ("qwen3", "gemma2", "gemma3") or D != cfg["dim"] // cfg["n_heads"]:
        g.add_key_length(D)  # written when the HF config has head_dim
        g.add_value_length(D)
    if cfg["rope_scale"]:
        g.add_rope_scaling_type(RopeScalingType.LINEAR)
        g.add_rope_scaling_factor(cfg["rope_scale"])
    if arch == "llama":
        g.add_vocab_size(cfg["vocab"])
        g.add_rope_dimension_count(cfg["rope_dim"])
    if arch == "phi3":
        g.add_rope_scaling_orig_ctx_len(cfg["ctx"])
        g.add_rope_dimension_count(cfg["rope_dim"])
        g.add_sliding_window(cfg["window"] or 0)  # 0 when the HF config has none
    elif cfg["window"]:
        g.add_sliding_window(cfg["window"])
    if cfg["attn_softcap"]:
        g.add_attn_logit_softcapping(cfg["attn_softcap"])
    if cfg["final_softcap"]:
        g.add_final_logit_softcapping(cfg["final_softcap"])


def write_gguf(path, w, cfg, q8_names=(), drop=(), arch_name=None, quant=None, seed=0):
    """HF-layout weights -> a GGUF file as llama.cpp's converter would write it. Tensors named in
    q8_names are stored as Q8_0; quant maps other names to a GGMLQuantizationType: F16, and the
    types in QUANTIZABLE through gguf.quants.quantize, the RAW_BLOCK_TYPES as random blocks
    (random_blocks, seeded from seed and the name), whose values are not w's. 1-D tensors stay
    F32. -> the weights the file holds, as read back by read_weights (run references on these)."""
    quant = dict(quant or {})
    quant.update({name: Q.Q8_0 for name in q8_names})
    arch = arch_name or cfg["arch"]
    g = GGUFWriter(str(path), arch)
    _write_metadata(g, cfg)
    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre("default")
    g.add_token_list(TOKENS)
    g.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
    g.add_token_merges(MERGES)
    g.add_bos_token_id(1)
    g.add_eos_token_id(2)
    g.add_add_bos_token(False)
    g.add_chat_template(TEMPLATE)
    for name, t in w.items():
        if name in drop:
            continue
        if cfg["arch"] == "llama" and name.endswith(("attn_q", "attn_k")):
            heads = cfg["n_heads"] if name.endswith("attn_q") else cfg["n_kv_heads"]
            t = permute(t, heads)
        full = name if name.endswith(".bias") else name + ".weight"
        qtype = quant.get(name, Q.F32)
        if qtype == Q.F32:
            g.add_tensor(full, np.ascontiguousarray(t, np.float32))
        elif t.ndim != 2:
            raise ValueError(f"{name}: only matrices are stored quantized")
        elif qtype == Q.F16:
            g.add_tensor(full, t.astype(np.float16))
        elif t.shape[1] % GGML_QUANT_SIZES[qtype][0]:
            raise ValueError(f"{name}: row length {t.shape[1]} is not a multiple of "
                             f"{qtype.name}'s block of {GGML_QUANT_SIZES[qtype][0]}")
        elif qtype in QUANTIZABLE:
            g.add_tensor(full, quantize(t, qtype), raw_dtype=qtype)
        elif qtype in RAW_BLOCK_TYPES:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            g.add_tensor(full, random_blocks(rng, qtype, t), raw_dtype=qtype)
        else:
            raise ValueError(f"{name}: {qtype.name} is not supported here")
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return read_weights(path, cfg)


def read_weights(path, cfg):
    """The float32 weights a GGUF file holds (gguf.GGUFReader + gguf.quants.dequantize), named
    and laid out like make_weights' (llama q/k rows unpermuted back to HF order)."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        a = np.array(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        name = t.name.removesuffix(".weight")
        if cfg["arch"] == "llama" and name.endswith(("attn_q", "attn_k")):
            a = unpermute(a, cfg["n_heads"] if name.endswith("attn_q") else cfg["n_kv_heads"])
        out[name] = a
    return out


def _attention_input(w, cfg, x, p):
    """rmsnorm, then q, k, v (+ qwen2 biases) of layer prefix p, float64 rows."""
    h = _rmsnorm(x, w[p + "attn_norm"], cfg["eps"])
    q, k, v = h @ w[p + "attn_q"].T, h @ w[p + "attn_k"].T, h @ w[p + "attn_v"].T
    if cfg["arch"] == "qwen2":
        q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
    return q, k, v


def _rmsnorm(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _ffn_block(w, cfg, x, p):
    """x + SwiGLU(rmsnorm(x)) of layer prefix p."""
    h = _rmsnorm(x, w[p + "ffn_norm"], cfg["eps"])
    g, u = h @ w[p + "ffn_gate"].T, h @ w[p + "ffn_up"].T
    return x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down"].T


def tiny_model_file(tmp_path_factory, seed, **shape):
    """Write a tiny random llama GGUF; -> (path, reader, weights, cfg)."""
    from selfattn.model.gguf_file import open_gguf

    w, cfg = make_weights(np.random.default_rng(seed), **shape)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, w, cfg)
    return path, open_gguf(path), w, cfg


def reference_forward(w, cfg, tokens):
    """Plain float64 forward over all tokens at positions 0..T-1 -> logits (T, vocab)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    T = len(tokens)
    H, H_kv, dim = cfg["n_heads"], cfg["n_kv_heads"], cfg["dim"]
    D = dim // H
    inv = 1.0 / cfg["theta"] ** (np.arange(0, D, 2) / D)
    ang = np.outer(np.arange(T), inv)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):  # (T, heads, D), rotate halves
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    x = w["token_embd"][tokens]
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        q, k, v = _attention_input(w, cfg, x, p)
        q, k, v = rope(q.reshape(T, H, D)), rope(k.reshape(T, H_kv, D)), v.reshape(T, H_kv, D)
        out = np.zeros((T, H, D))
        for hh in range(H):
            kh = hh // (H // H_kv)
            s = q[:, hh] @ k[:, kh].T / np.sqrt(D)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            p_ = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (p_ / p_.sum(-1, keepdims=True)) @ v[:, kh]
        x = _ffn_block(w, cfg, x + out.reshape(T, H * D) @ w[p + "attn_output"].T, p)
    return _rmsnorm(x, w["output_norm"], cfg["eps"]) @ w["output"].T


def streaming_reference(w, cfg, tokens, sinks, window):
    """StreamingLLM done literally, token by token, in float64: each layer caches the un-rotated
    K/V of the first `sinks` tokens and of the last `window` (the current one included); every
    step rotates the cached keys by their slot in the cache and the query by its own slot
    (Xiao et al. 2023, section 3.2). -> logits (T, vocab)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    H, H_kv, dim = cfg["n_heads"], cfg["n_kv_heads"], cfg["dim"]
    D = dim // H
    inv = 1.0 / cfg["theta"] ** (np.arange(0, D, 2) / D)

    def rope(x, positions):  # x (n, heads, D)
        ang = np.outer(positions, inv)
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    caches = [([], []) for _ in range(cfg["n_layers"])]
    out = []
    for tok in tokens:
        x = w["token_embd"][tok]
        for i in range(cfg["n_layers"]):
            p = f"blk.{i}."
            q, k, v = _attention_input(w, cfg, x, p)
            ks, vs = caches[i]
            ks.append(k.reshape(H_kv, D))
            vs.append(v.reshape(H_kv, D))
            if len(ks) > sinks + window:  # evict the oldest non-sink token
                del ks[sinks], vs[sinks]
            n = len(ks)
            K = rope(np.stack(ks), np.arange(n))  # (n, H_kv, D) at their slots
            V = np.stack(vs)
            qr = rope(q.reshape(1, H, D), np.array([n - 1]))[0]
            o = np.zeros((H, D))
            for hh in range(H):
                kh = hh // (H // H_kv)
                s = K[:, kh] @ qr[hh] / np.sqrt(D)
                e = np.exp(s - s.max())
                o[hh] = (e / e.sum()) @ V[:, kh]
            x = _ffn_block(w, cfg, x + o.reshape(H * D) @ w[p + "attn_output"].T, p)
        out.append(_rmsnorm(x, w["output_norm"], cfg["eps"]) @ w["output"].T)
    return np.array(out)
