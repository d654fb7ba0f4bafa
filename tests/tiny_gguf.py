"""A tiny random-weight llama-family GGUF written with gguf.GGUFWriter, and a plain float64
NumPy forward of the same model written from the Hugging Face definition (q/k rows in HF order,
RoPE rotating halves) — independent of selfattn's loader, which must undo llama.cpp's permute."""

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

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


def permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf permute (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def make_weights(rng, arch="llama", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn=96,
                 vocab=len(TOKENS)):
    D = dim // n_heads
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    w = {"token_embd": r(vocab, dim), "output_norm": 1 + r(dim), "output": r(vocab, dim)}
    for i in range(n_layers):
        w[f"blk.{i}.attn_norm"] = 1 + r(dim)
        w[f"blk.{i}.attn_q"] = r(n_heads * D, dim)
        w[f"blk.{i}.attn_k"] = r(n_kv_heads * D, dim)
        w[f"blk.{i}.attn_v"] = r(n_kv_heads * D, dim)
        w[f"blk.{i}.attn_output"] = r(dim, n_heads * D)
        w[f"blk.{i}.ffn_norm"] = 1 + r(dim)
        w[f"blk.{i}.ffn_gate"] = r(ffn, dim)
        w[f"blk.{i}.ffn_up"] = r(ffn, dim)
        w[f"blk.{i}.ffn_down"] = r(dim, ffn)
        if arch == "qwen2":
            w[f"blk.{i}.attn_q.bias"] = r(n_heads * D)
            w[f"blk.{i}.attn_k.bias"] = r(n_kv_heads * D)
            w[f"blk.{i}.attn_v.bias"] = r(n_kv_heads * D)
    cfg = dict(arch=arch, n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
               ffn=ffn, vocab=vocab, theta=10000.0, eps=1e-5, ctx=256)
    return w, cfg


def write_gguf(path, w, cfg, q8_names=(), drop=(), arch_name=None, quant=None):
    """HF-layout weights -> a GGUF file as llama.cpp's converter would write it. Tensors named in
    q8_names are stored as Q8_0; quant maps other names to a GGMLQuantizationType."""
    quant = dict(quant or {})
    quant.update({name: GGMLQuantizationType.Q8_0 for name in q8_names})
    arch = arch_name or cfg["arch"]
    g = GGUFWriter(str(path), arch)
    g.add_block_count(cfg["n_layers"])
    g.add_context_length(cfg["ctx"])
    g.add_embedding_length(cfg["dim"])
    g.add_feed_forward_length(cfg["ffn"])
    g.add_head_count(cfg["n_heads"])
    g.add_head_count_kv(cfg["n_kv_heads"])
    g.add_rope_freq_base(cfg["theta"])
    g.add_layer_norm_rms_eps(cfg["eps"])
    g.add_vocab_size(cfg["vocab"])
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
        if name in quant:
            g.add_tensor(full, quantize(t, quant[name]), raw_dtype=quant[name])
        else:
            g.add_tensor(full, t)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


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
