"""qwen2: the llama block with biases on q, k and v; rows stored unpermuted."""


def configure(m) -> dict:
    return dict(qkv_bias="blk.0.attn_q.bias" in m.tensors)
