"""ModelArgs: a llama-family model's shape, from the GGUF metadata only."""

from dataclasses import dataclass

from ..errors import ModelError
from .gguf_file import field, tensor_index

ARCHITECTURES = ("llama", "qwen2")


@dataclass
class ModelArgs:
    arch: str
    n_layers: int
    dim: int  # residual stream width (embedding_length)
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int  # trained context
    rope_theta: float
    rope_dim: int  # leading dims of each head that RoPE rotates
    rope_scale: float = 1.0  # linear scaling: positions are divided by this
    rms_eps: float = 1e-5
    tied_embeddings: bool = False  # no output.weight: the LM head is token_embd
    sliding_window: int | None = None
    qkv_bias: bool = False  # qwen2
    rope_freq_factors: bool = False  # llama3-style per-frequency factors (rope_freqs.weight)
    name: str = ""

    @classmethod
    def from_gguf(cls, reader, path) -> "ModelArgs":
        arch = field(reader, "general.architecture")
        if arch not in ARCHITECTURES:
            raise ModelError(f"{path}: architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")

        def meta(key, default=None):
            value = field(reader, f"{arch}.{key}", default)
            if value is None:
                raise ModelError(f"{path}: metadata key '{arch}.{key}' is missing")
            return value

        tensors = tensor_index(reader)
        dim = int(meta("embedding_length"))
        n_heads = int(meta("attention.head_count"))
        head_dim = int(meta("attention.key_length", dim // n_heads))
        scaling = field(reader, f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ModelError(f"{path}: rope scaling {scaling!r} is not supported (none, linear)")
        tokens = field(reader, "tokenizer.ggml.tokens", None)
        vocab = int(meta("vocab_size", len(tokens) if tokens is not None else None))
        window = field(reader, f"{arch}.attention.sliding_window", None)
        return cls(
            arch=arch,
            n_layers=int(meta("block_count")),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(meta("feed_forward_length")),
            vocab_size=vocab,
            context_length=int(meta("context_length")),
            rope_theta=float(meta("rope.freq_base", 10000.0)),
            rope_dim=int(meta("rope.dimension_count", head_dim)),
            rope_scale=float(field(reader, f"{arch}.rope.scaling.factor", 1.0))
            if scaling == "linear" else 1.0,
            rms_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
            tied_embeddings="output.weight" not in tensors,
            sliding_window=int(window) if window else None,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            rope_freq_factors="rope_freqs.weight" in tensors,
            name=str(field(reader, "general.name", "")),
        )
