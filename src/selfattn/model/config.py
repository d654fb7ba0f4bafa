"""ModelArgs: a decoder-only transformer's shape and variant, from the GGUF metadata only.

The metadata keys every architecture shares are read here; what an architecture adds or reads
differently lives in its own small file under `archs/` (one table entry each in ARCHS).
"""

from dataclasses import dataclass

from ..errors import ModelError
from .gguf_file import field, tensor_index

LIMITS = dict(n_layers=4096, dim=1 << 17, n_heads=4096, head_dim=4096, ffn_dim=1 << 20,
              vocab_size=1 << 24, context_length=1 << 27)  # beyond any published model


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
    sliding_window: int | None = None  # the window of the layers that have one
    # per layer, whether it has the window (None: every layer alike, as sliding_window says)
    sliding_layers: tuple | None = None
    rope_theta_local: float | None = None  # sliding layers' own RoPE base (gemma3)
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (qwen3, gemma3)
    post_norms: bool = False  # RMSNorm after attention and after the FFN too (gemma2, gemma3)
    activation: str = "silu"  # the FFN gate's: silu (SwiGLU) or gelu_tanh (GeGLU)
    embed_scale: float = 1.0  # embeddings multiplied by this (gemma: sqrt(dim))
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_softcap: float | None = None  # logits -> c·tanh(logits/c) (gemma2)
    final_softcap: float | None = None
    fused_qkv: bool = False  # one attn_qkv tensor (phi3)
    fused_gate_up: bool = False  # ffn_up holds gate then up (phi3)
    permuted_qk: bool = False  # llama.cpp's converter permuted q/k rows (llama)
    rope_freq_factors: bool = False  # llama3-style per-frequency factors (rope_freqs.weight)
    name: str = ""

    def window(self, layer: int) -> int | None:
        """Layer's sliding window (keys p-w+1 .. p), or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is None or self.sliding_layers[layer]:
            return self.sliding_window
        return None

    @property
    def uniform_window(self) -> bool:
        return self.sliding_layers is None or len(set(self.sliding_layers)) == 1

    def rope_base(self, layer: int) -> tuple[float, float]:
        """(theta, linear scale) of a layer's RoPE."""
        if self.rope_theta_local is not None and self.window(layer) is not None:
            return self.rope_theta_local, 1.0
        return self.rope_theta, self.rope_scale

    @classmethod
    def from_gguf(cls, reader, path) -> "ModelArgs":
        from .archs import ARCHS

        arch = field(reader, "general.architecture")
        if arch not in ARCHS:
            raise ModelError(f"{path}: architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ARCHS)})")
        m = Meta(reader, path, arch)
        args = cls(**{**common(m), **ARCHS[arch].configure(m)})
        args.validate(path, tensor_index(reader))
        return args

    @classmethod
    def shape_of(cls, reader, path) -> tuple["ModelArgs", str | None]:
        """(args, None) for an architecture selfattn runs; for any other whose metadata has the
        shared shape keys, (args read from those keys alone, why it cannot run): the planner can
        still say what such a file needs."""
        from .archs import ARCHS

        arch = field(reader, "general.architecture")
        if arch in ARCHS:
            return cls.from_gguf(reader, path), None
        if not isinstance(arch, str) or not arch:
            raise ModelError(f"{path}: metadata key 'general.architecture' is missing or not a "
                             "string")
        args = cls(**common(Meta(reader, path, arch)))
        args.validate(path, tensor_index(reader))
        return args, (f"selfattn cannot run architecture {arch!r} (it runs "
                      f"{', '.join(ARCHS)}); the figures are from its shape keys")

    def validate(self, path, tensors):
        """ModelError for sizes that cannot be right, before anything is allocated."""
        for name, top in LIMITS.items():
            value = getattr(self, name)
            if not 1 <= value <= top:
                raise ModelError(f"{path}: {name} = {value} is outside 1 .. {top:,}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ModelError(f"{path}: {self.n_heads} query heads cannot share "
                             f"{self.n_kv_heads} KV heads (head_count_kv must divide head_count)")
        if not 0 < self.rope_dim <= self.head_dim or self.rope_dim % 2:
            raise ModelError(f"{path}: rope dimension {self.rope_dim} must be even and in "
                             f"2 .. head dim {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelError(f"{path}: sliding window {self.sliding_window} must be >= 1")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.n_layers:
            raise ModelError(f"{path}: the sliding-window pattern has {len(self.sliding_layers)} "
                             f"entries for {self.n_layers} layers")
        for value, what in ((self.rope_theta, "rope freq base"), (self.rms_eps, "rms epsilon"),
                            (self.rope_scale, "rope scale")):
            if not 0 < value < float("inf"):
                raise ModelError(f"{path}: {what} = {value} must be positive and finite")
        if "token_embd.weight" not in tensors:
            raise ModelError(f"{path}: tensor 'token_embd.weight' is missing")
        embd = tensors["token_embd.weight"]
        if tuple(int(n) for n in embd.shape) != (self.dim, self.vocab_size):
            raise ModelError(f"{path}: tensor 'token_embd.weight' is {tuple(embd.shape)} "
                             f"(ne order), the metadata says ({self.dim}, {self.vocab_size})")


class Meta:
    """`{arch}.key` metadata of one file, with errors that name the file and the key."""

    def __init__(self, reader, path, arch):
        self.reader, self.path, self.arch = reader, path, arch
        self.tensors = tensor_index(reader)

    def get(self, key, default=None, kind=None):
        value = field(self.reader, f"{self.arch}.{key}", default)
        if value is None or kind is None:
            return value
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelError(f"{self.path}: metadata key '{self.arch}.{key}' must be an integer, "
                             f"got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ModelError(f"{self.path}: metadata key '{self.arch}.{key}' must be a number, "
                             f"got {value!r}")
        return kind(value)

    def require(self, key, kind=int):
        value = self.get(key, None, kind)
        if value is None:
            raise ModelError(f"{self.path}: metadata key '{self.arch}.{key}' is missing")
        return value


def common(m: Meta) -> dict:
    """The keys every architecture here reads the same way."""
    dim = m.require("embedding_length")
    n_heads = m.require("attention.head_count")
    if n_heads < 1:
        raise ModelError(f"{m.path}: metadata key '{m.arch}.attention.head_count' is {n_heads}")
    if m.get("attention.key_length") is None and dim % n_heads:
        raise ModelError(f"{m.path}: head count {n_heads} does not divide the embedding length "
                         f"{dim}")
    head_dim = m.get("attention.key_length", dim // n_heads, int)
    value_dim = m.get("attention.value_length", head_dim, int)
    if value_dim != head_dim:
        raise ModelError(f"{m.path}: value length {value_dim} differs from key length {head_dim} "
                         "(not supported)")
    scaling = field(m.reader, f"{m.arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ModelError(f"{m.path}: rope scaling {scaling!r} is not supported (none, linear)")
    tokens = field(m.reader, "tokenizer.ggml.tokens", None)
    vocab = m.get("vocab_size", None, int)
    if vocab is None:
        vocab = len(tokens) if tokens is not None else None
    if vocab is None:
        raise ModelError(f"{m.path}: neither '{m.arch}.vocab_size' nor a tokenizer vocabulary "
                         "says the vocabulary size")
    heads_kv = m.get("attention.head_count_kv", n_heads)
    if not isinstance(heads_kv, int):  # a per-layer array (some hybrid models)
        raise ModelError(f"{m.path}: per-layer KV head counts are not supported")
    window = m.get("attention.sliding_window", None, int)
    return dict(
        arch=m.arch,
        n_layers=m.require("block_count"),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=heads_kv,
        head_dim=head_dim,
        ffn_dim=m.require("feed_forward_length"),
        vocab_size=vocab,
        context_length=m.require("context_length"),
        rope_theta=m.get("rope.freq_base", 10000.0, float),
        rope_dim=m.get("rope.dimension_count", head_dim, int),
        rope_scale=m.get("rope.scaling.factor", 1.0, float) if scaling == "linear" else 1.0,
        rms_eps=m.get("attention.layer_norm_rms_epsilon", 1e-5, float),
        tied_embeddings="output.weight" not in m.tensors,
        sliding_window=window or None,
        rope_freq_factors="rope_freqs.weight" in m.tensors,
        name=str(field(m.reader, "general.name", "")),
    )
