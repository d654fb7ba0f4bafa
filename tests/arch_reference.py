"""A plain float64 NumPy forward for every architecture tiny_gguf writes (llama, qwen2, qwen3,
gemma2, gemma3, phi3), written from the Hugging Face modeling code (modeling_llama / qwen2 /
qwen3 / gemma2 / gemma3 / phi3): the full n x n score matrix with causal and sliding-window
masks, GQA by repeating kv heads, RoPE rotating halves on HF-layout q/k rows. It shares no code
with selfattn. The per-architecture switches come from cfg (see tiny_gguf.make_weights):

  qkv_bias     q/k/v biases (qwen2)                       HF Qwen2Attention
  qk_norm      RMSNorm of each q and k head before RoPE   HF Qwen3Attention / Gemma3Attention
  fused        attn_qkv = [q; k; v] rows, ffn_up = [gate; up] rows  HF Phi3Attention / Phi3MLP
  rope_dim     RoPE on a head's first rope_dim dims only (partial)  HF Phi3 apply_rotary_pos_emb
  rope_freqs   (tensor, llama3) inverse frequencies divided by it   HF _compute_llama3_parameters
  rope_scale   linear RoPE: positions / factor (gemma3: global layers)   HF linear rope
  theta_local  RoPE base of gemma3's sliding layers (10000, unscaled)    HF Gemma3RotaryEmbedding
  window, swa_layers  key j visible from query i iff 0 <= i - j < window HF sliding_window_overlay
  attn_softcap cap * tanh(scores / cap), scores already scaled           HF gemma2 eager_attention
  post_norms   RMSNorm of the attention and FFN outputs before the residual adds (gemma)
  act          silu (SwiGLU) or gelu_tanh (GeGLU: gelu_pytorch_tanh)
  embed_scale  embeddings times sqrt(dim) (gemma)
  tied         logits from token_embd (gemma: no output.weight)
  final_softcap  cap * tanh(logits / cap) (gemma2)

Norm weights are used as stored: Gemma's (1 + w) is already in the GGUF (convert_hf_to_gguf.py
adds 1 to every Gemma2/Gemma3 "norm.weight", q/k norms included). The attention scale is
1/sqrt(head_dim) for every architecture: llama.cpp scales gemma's queries by
1/sqrt(attention.key_length) (1/sqrt(n_embd/n_head) only for the 27B sizes, picked by layer
count), which equals HF's query_pre_attn_scalar**-0.5 whenever query_pre_attn_scalar == head_dim."""

import numpy as np


def _rmsnorm(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _silu(x):
    return x / (1 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _softcap(x, cap):
    return x if not cap else cap * np.tanh(x / cap)


def layer_rope(cfg, i):
    """(base, linear factor, sliding) of layer i."""
    sliding = bool(cfg["window"]) and bool(cfg["swa_layers"][i])
    if sliding and cfg.get("theta_local"):
        return cfg["theta_local"], 1.0, True  # gemma3's local layers
    return cfg["theta"], cfg.get("rope_scale") or 1.0, sliding


def _rope(x, positions, cfg, base, factor, freq_divisors):
    """HF rotate-half RoPE on the first rope_dim dims of each head of x (T, heads, D)."""
    d = cfg["rope_dim"]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    if freq_divisors is not None:
        inv = inv / freq_divisors
    ang = np.outer(positions / factor, inv)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2, rest = x[..., :d // 2], x[..., d // 2:d], x[..., d:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def _qkv(w, cfg, h, p):
    H, H_kv, D = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    if cfg["fused"]:
        qkv = h @ w[p + "attn_qkv"].T
        q, k, v = np.split(qkv, [H * D, H * D + H_kv * D], axis=-1)
    else:
        q, k, v = h @ w[p + "attn_q"].T, h @ w[p + "attn_k"].T, h @ w[p + "attn_v"].T
    if cfg["qkv_bias"]:
        q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
    T = h.shape[0]
    return q.reshape(T, H, D), k.reshape(T, H_kv, D), v.reshape(T, H_kv, D)


def _attention(q, k, v, cfg, sliding):
    """softmax(mask(softcap(q k^T / sqrt(D)))) v over all heads, kv heads repeated (GQA)."""
    T, H, D = q.shape
    G = H // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
    s = _softcap(s, cfg.get("attn_softcap"))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = j <= i
    if sliding:
        visible &= i - j < cfg["window"]
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, H * D)


def _ffn(w, cfg, h, p):
    if cfg["fused"]:
        gate, up = np.split(h @ w[p + "ffn_up"].T, 2, axis=-1)
    else:
        gate, up = h @ w[p + "ffn_gate"].T, h @ w[p + "ffn_up"].T
    act = _gelu_tanh if cfg["act"] == "gelu_tanh" else _silu
    return (act(gate) * up) @ w[p + "ffn_down"].T


_FLAGS = dict(theta_local=None, rope_scale=None, window=None, attn_softcap=None,
              final_softcap=None, qk_norm=False, post_norms=False,
              embed_scale=False, tied=False, act="silu", fused=False, llama3=None)


def _complete(cfg):
    """cfg with the switches an older cfg (llama/qwen2 only) lacks at their defaults."""
    c = dict(_FLAGS, **cfg)
    c.setdefault("qkv_bias", cfg["arch"] == "qwen2")
    c.setdefault("head_dim", c["dim"] // c["n_heads"])
    c.setdefault("rope_dim", c["head_dim"])
    c.setdefault("swa_layers", [bool(c["window"])] * c["n_layers"])
    return c


def reference_logits(path_or_weights, cfg, tokens):
    """Float64 logits (T, vocab) of tokens at positions 0..T-1. path_or_weights: a GGUF path (its
    weights read back through gguf, dequantized) or a make_weights-style dict."""
    if isinstance(path_or_weights, dict):
        w = path_or_weights
    else:
        from .tiny_gguf import read_weights

        w = read_weights(path_or_weights, cfg)
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    cfg = _complete(cfg)
    tokens = np.asarray(tokens)
    T, eps = len(tokens), cfg["eps"]
    positions = np.arange(T, dtype=np.float64)
    divisors = w["rope_freqs"] if cfg.get("llama3") else None
    x = w["token_embd"][tokens]
    if cfg["embed_scale"]:
        x = x * np.sqrt(cfg["dim"])
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        base, factor, sliding = layer_rope(cfg, i)
        q, k, v = _qkv(w, cfg, _rmsnorm(x, w[p + "attn_norm"], eps), p)
        if cfg["qk_norm"]:
            q, k = _rmsnorm(q, w[p + "attn_q_norm"], eps), _rmsnorm(k, w[p + "attn_k_norm"], eps)
        q = _rope(q, positions, cfg, base, factor, divisors)
        k = _rope(k, positions, cfg, base, factor, divisors)
        o = _attention(q, k, v, cfg, sliding) @ w[p + "attn_output"].T
        if cfg["post_norms"]:
            o = _rmsnorm(o, w[p + "post_attention_norm"], eps)
        x = x + o
        f = _ffn(w, cfg, _rmsnorm(x, w[p + "ffn_norm"], eps), p)
        if cfg["post_norms"]:
            f = _rmsnorm(f, w[p + "post_ffw_norm"], eps)
        x = x + f
    out = w["token_embd"] if cfg["tied"] else w["output"]
    logits = _rmsnorm(x, w["output_norm"], eps) @ out.T
    return _softcap(logits, cfg.get("final_softcap"))
