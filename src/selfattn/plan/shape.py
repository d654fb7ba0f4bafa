"""A model's shape as the planner needs it: parameters, bytes, and the attention dimensions.

From a GGUF file (its metadata and the actual size of every tensor) or from the model catalog
(its parameter count at the real bits per weight of a quantization type).
"""

from dataclasses import dataclass

from .. import formats
from ..cache import kv_cache_bytes

# average bits per weight of llama.cpp's quantization types over a whole file, as llama.cpp
# reports them (BPW) for Llama-3 8B: the K-quant mixes keep some tensors at higher precision
QUANT_BITS = {"Q4_0": 4.55, "Q4_1": 5.0, "Q4_K_M": 4.89, "Q5_K_M": 5.70, "Q6_K": 6.56,
              "Q8_0": 8.50, "F16": 16.0, "BF16": 16.0, "F32": 32.0}


@dataclass
class ModelShape:
    name: str
    params: int
    embedding_params: int  # the token embedding: one row read per token
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dim: int
    ffn_dim: int
    vocab: int
    tied: bool  # LM head = embedding (then it is streamed once per token after all)
    context: int  # trained context
    file_bytes: int  # the quantized weights (a GGUF file's tensor bytes)
    quant: str
    sliding_window: int | None = None
    sliding_layers: int = 0  # how many layers use the window
    # the matrices selfattn's compiled kernels read in their file type (selfattn.formats' kernel
    # types; the LM head included, an untied embedding table not): their weights and bytes
    packed_params: int = 0
    packed_bytes: int = 0
    # bytes selfattn holds with its compiled kernels: every matrix of a kernel type as stored,
    # the rest as float32
    held_bytes: int = 0
    cannot_run: str | None = None  # why selfattn cannot run this file (its plan still stands)

    @classmethod
    def from_catalog(cls, entry: dict, quant: str) -> "ModelShape":
        quant = quant.upper()
        if quant not in QUANT_BITS:
            raise ValueError(f"unknown --quant {quant!r} (known: {', '.join(QUANT_BITS)})")
        window = entry.get("sliding_window")
        layers = entry["n_layers"]
        # a single-type file (the kernels read every type in QUANT_BITS as stored): every matrix
        # but an untied embedding
        matrices = int(entry["params"]) - (0 if entry["tied"] else entry["vocab"] * entry["dim"])
        sliding = {"alternate": layers // 2, "all": layers}.get(entry.get("sliding_layers", ""), 0)
        return cls(name=entry["name"], params=int(entry["params"]),
                   embedding_params=entry["vocab"] * entry["dim"], n_layers=layers,
                   n_heads=entry["n_heads"], n_kv_heads=entry["n_kv_heads"],
                   head_dim=entry["head_dim"], dim=entry["dim"], ffn_dim=entry["ffn_dim"],
                   vocab=entry["vocab"], tied=entry["tied"], context=entry["context"],
                   file_bytes=int(entry["params"] * QUANT_BITS[quant] / 8), quant=quant,
                   sliding_window=window, sliding_layers=sliding if window else 0,
                   packed_params=matrices, packed_bytes=int(matrices * QUANT_BITS[quant] / 8),
                   held_bytes=int(entry["params"] * QUANT_BITS[quant] / 8))

    @classmethod
    def from_gguf(cls, reader, path) -> "ModelShape":
        from ..model.config import ModelArgs
        from ..model.gguf_file import tensor_index

        a, cannot_run = ModelArgs.shape_of(reader, path)
        if cannot_run is None:  # the checks loading makes: every tensor named and shaped
            from ..model.transformer import check_tensors
            check_tensors(reader, path, a)
        tensors = tensor_index(reader)
        fmt = {name: formats.by_id(int(t.tensor_type)) for name, t in tensors.items()}
        types = sorted({f.name.upper() for f in fmt.values()})
        odd = sorted({f.name.upper() for name, f in fmt.items()
                      if not f.kernels and len(tensors[name].shape) == 2})
        if odd and cannot_run is None:
            cannot_run = (f"selfattn cannot run {', '.join(odd)} weights (it runs "
                          f"{formats.supported_names()})")
        embd = tensors["token_embd.weight"] if "token_embd.weight" in tensors else None
        as_stored = {name for name, t in tensors.items()
                     if fmt[name].kernels and len(t.shape) == 2 and t.shape[0] % fmt[name].block == 0}
        packed = [t for name, t in tensors.items() if name in as_stored
                  and (name != "token_embd.weight" or a.tied_embeddings)]
        held = sum(int(t.n_bytes) if name in as_stored else 4 * int(t.n_elements)
                   for name, t in tensors.items())
        return cls(name=a.name or str(path), params=sum(int(t.n_elements) for t in tensors.values()),
                   embedding_params=int(embd.n_elements) if embd is not None else 0,
                   n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                   head_dim=a.head_dim, dim=a.dim, ffn_dim=a.ffn_dim, vocab=a.vocab_size,
                   tied=a.tied_embeddings, context=a.context_length,
                   file_bytes=sum(int(t.n_bytes) for t in tensors.values()),
                   quant="+".join(types), sliding_window=a.sliding_window,
                   sliding_layers=sum(a.window(i) is not None for i in range(a.n_layers)),
                   packed_params=sum(int(t.n_elements) for t in packed),
                   packed_bytes=sum(int(t.n_bytes) for t in packed), held_bytes=held,
                   cannot_run=cannot_run)

    # -- what a token costs ---------------------------------------------------------------------

    def streamed_fraction(self) -> float:
        """Share of the weights read in full for every generated token: all but the embedding
        table, of which one row is read (unless it is also the LM head)."""
        if self.tied or self.params == 0:
            return 1.0
        return 1.0 - self.embedding_params / self.params

    def decode_weight_bytes(self, weight_bits: float | None, packed: bool) -> int:
        """Weight bytes read per generated token. weight_bits None: the file's own bytes (an
        engine that computes on the quantized blocks, as llama.cpp); else the weights are held at
        weight_bits, except, with `packed`, the matrices the compiled kernels read as stored."""
        if weight_bits is None:
            return int(self.file_bytes * self.streamed_fraction())
        streamed = self.params * self.streamed_fraction()  # all but an untied embedding table
        if not packed:
            return int(streamed * weight_bits / 8)
        return int((streamed - self.packed_params) * weight_bits / 8) + self.packed_bytes

    def kv_positions(self, depth: int) -> tuple[int, int]:
        """Positions cached by (full layers, sliding layers) at this depth."""
        window = self.sliding_window or depth
        return depth, min(depth, window)

    def kv_bytes(self, depth: int, kv_dtype: str) -> int:
        full, local = self.kv_positions(depth)
        n_local = self.sliding_layers
        return (kv_cache_bytes(self.n_layers - n_local, self.n_kv_heads, self.head_dim, full,
                               kv_dtype)
                + kv_cache_bytes(n_local, self.n_kv_heads, self.head_dim, local, kv_dtype))

    def linear_flops_per_token(self) -> float:
        """Matmul FLOPs of one token through the layers (2 per weight), LM head excluded."""
        layer_params = self.params - self.embedding_params * (1 if self.tied else 2)
        return 2.0 * max(layer_params, 0)

    def attention_pairs(self, n_tokens: int, depth: int = 0) -> int:
        """(query, key) pairs scored by n new causal tokens after `depth` cached ones, summed
        over heads and layers (sliding layers: each query sees at most `window` keys)."""
        def per_head(window):
            # query t (0-based) sees depth + 1 + t keys, or `window` once that is larger
            n_full = n_tokens if window is None else max(0, min(n_tokens, window - depth))
            seen = n_full * (depth + 1) + n_full * (n_full - 1) // 2
            return seen + (n_tokens - n_full) * (window or 0)
        n_local = self.sliding_layers
        heads = self.n_heads
        return heads * ((self.n_layers - n_local) * per_head(None)
                        + (n_local * per_head(self.sliding_window) if n_local else 0))

    def attention_flops(self, n_tokens: int, depth: int = 0) -> float:
        """FLOPs of q·k and p·v: 4·D per pair."""
        return 4.0 * self.head_dim * self.attention_pairs(n_tokens, depth)
