"""qwen3: the llama block with an RMSNorm over each head of q and of k before RoPE
(attn_q_norm, attn_k_norm: head_dim weights), no biases; rows stored unpermuted."""


def configure(m) -> dict:
    return dict(qk_norm=True)
