"""gemma2: sliding-window and global layers alternating (even layers slide), soft-capped
attention logits and final logits, RMSNorm before and after attention and the FFN, GeGLU,
embeddings scaled by sqrt(dim). The file's norm weights already hold Gemma's 1 + w.
Queries are scaled by 1/sqrt(head_dim), except the 27B model's 1/sqrt(dim / heads) (its
query_pre_attn_scalar, which the file does not store: llama.cpp tells it by its 46 layers)."""

import math


def attn_scale(n_layers, dim, n_heads, head_dim, big_layers):
    return 1 / math.sqrt(dim / n_heads if n_layers == big_layers else head_dim)


def sliding_pattern(m, n_layers, every):
    """Per layer, whether it has the window: the file's pattern if given, else every `every`-th
    layer is global (layer i slides when i % every < every - 1, as llama.cpp)."""
    pattern = m.get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return tuple(bool(p) for p in pattern)
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        every = pattern
    return tuple(i % every < every - 1 for i in range(n_layers))


def configure(m) -> dict:
    n_layers, dim = m.require("block_count"), m.require("embedding_length")
    n_heads = m.require("attention.head_count")
    head_dim = m.get("attention.key_length", dim // max(n_heads, 1), int)
    return dict(
        sliding_layers=sliding_pattern(m, n_layers, 2),
        post_norms=True, activation="gelu_tanh", embed_scale=math.sqrt(dim),
        attn_scale=attn_scale(n_layers, dim, n_heads, head_dim, 46),
        attn_softcap=m.get("attn_logit_softcapping", None, float) or None,
        final_softcap=m.get("final_logit_softcapping", None, float) or None,
        rms_eps=m.get("attention.layer_norm_rms_epsilon", 1e-6, float),
    )
