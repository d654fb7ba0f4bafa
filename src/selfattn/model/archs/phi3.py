"""phi3: q, k and v in one fused attn_qkv tensor, gate and up in one ffn_up tensor (gate
first); rows unpermuted, RoPE on the first rope.dimension_count dims of each head. The 128k
variants' long/short RoPE factors are not supported (refused by the loader)."""


def configure(m) -> dict:
    return dict(fused_qkv=True, fused_gate_up=True)
