"""gemma3: five sliding-window layers to one global, local layers on RoPE base 10,000 and global
ones on the file's base (and its linear scaling), RMSNorm over each head of q and k, GeGLU,
norms before and after attention and the FFN, embeddings scaled by sqrt(dim), no soft-cap."""

import math

from .gemma2 import attn_scale, sliding_pattern


def configure(m) -> dict:
    n_layers, dim = m.require("block_count"), m.require("embedding_length")
    n_heads = m.require("attention.head_count")
    head_dim = m.get("attention.key_length", dim // max(n_heads, 1), int)
    return dict(
        sliding_layers=sliding_pattern(m, n_layers, 6), rope_theta_local=10000.0,
        qk_norm=True, post_norms=True, activation="gelu_tanh", embed_scale=math.sqrt(dim),
        attn_scale=attn_scale(n_layers, dim, n_heads, head_dim, 62),
        rms_eps=m.get("attention.layer_norm_rms_epsilon", 1e-6, float),
    )
