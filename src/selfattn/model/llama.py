"""The llama-family forward pass (Llama 2/3, SmolLM2, Mistral, Qwen2) on selfattn's attention.

    x = token_embd[tokens]
    per layer:  h = rmsnorm(x) · attn_norm;  q, k, v = h W_qkv (+ bias);  RoPE(q, k)
                write k, v into the cache at their positions;  a = attention(q, cache, causal)
                x += a W_o;  h = rmsnorm(x) · ffn_norm;  x += (silu(h W_gate) * h W_up) W_down
    logits = rmsnorm(x) · output_norm · W_outᵀ   (W_out = token_embd when tied)

Weights are dequantized to float32 once at load, for prompts (BLAS sgemm). Where the compiled
kernels read the file's own type (q4_0, q4_1, q8_0, f16), the matrix is also kept as its GGUF
blocks, and a step of at most PACKED_MAX_T tokens (decoding) multiplies against those: decoding
reads every weight once per token, so it streams the compact bytes (SmolLM2's Q4_1: 0.6 bytes a
weight) instead of the float32 copy (4). A one-token step over the full KV cache runs each
layer in one compiled call (`native.layer_step`: the same kernels in the same order, so the same
bits as the per-kernel loop in `layers`, without ~15 Python calls a layer).

llama.cpp's converter permutes the rows of attn_q / attn_k of `llama` models so that its RoPE can
rotate adjacent pairs; `unpermute` undoes it, so q and k here are in the original (Hugging Face)
layout and RoPE rotates halves (`rotate_half`). qwen2 files are stored unpermuted. The model
reports where its time went (attention vs the rest) and knows nothing of benchmarks or the CLI.
"""

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .. import native
from ..attention import warmup
from ..attention.decode import split_keys
from ..errors import ModelError
from .config import ModelArgs
from .gguf_file import dequantize, open_gguf, tensor_index

log = logging.getLogger(__name__)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute: rows (H, D/2, 2) -> (H, 2, D/2), per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


PACKED_MAX_T = 4  # steps of up to this many tokens use the packed weights


@dataclass
class Linear:
    """y = x @ Wᵀ for W (out, in): float32 for prompts, and the file's blocks (or None) for steps
    of a few tokens."""
    f32: np.ndarray
    packed: native.PackedMatrix | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.packed is not None and x.shape[0] <= PACKED_MAX_T:
            return native.matmul(x, self.packed)
        return x @ self.f32.T

    @property
    def packed_bytes(self) -> int:
        return 0 if self.packed is None else self.packed.nbytes


@dataclass
class Layer:
    attn_norm: np.ndarray  # (dim,)
    w_qkv: Linear  # (H*D + 2*H_kv*D, dim): q, k, v stacked, one matmul
    b_qkv: np.ndarray | None
    w_o: Linear  # (dim, H*D)
    ffn_norm: np.ndarray
    w_gate_up: Linear  # (2*ffn, dim): gate, up stacked
    w_down: Linear  # (dim, ffn)


@dataclass
class Timings:
    """Wall time inside the forward pass, and the part of it spent in attention."""
    forward_s: float = 0.0
    attention_s: float = 0.0
    attention_pairs: int = 0  # (query, key) pairs scored, summed over heads and layers

    @property
    def attention_share(self) -> float:
        return self.attention_s / self.forward_s if self.forward_s > 0 else 0.0


@dataclass
class Weights:
    token_embd: np.ndarray  # (vocab, dim)
    output: Linear  # (vocab, dim), token_embd's float32 array when tied
    output_norm: np.ndarray
    layers: list[Layer] = field(default_factory=list)
    rope_freq_factors: np.ndarray | None = None


class Llama:
    def __init__(self, args: ModelArgs, weights: Weights, path=""):
        self.args, self.weights, self.path = args, weights, str(path)
        self._rope_cache = (0, None, None)
        self._step_args = None

    @classmethod
    def load(cls, path, kv_dtype: str = "f32") -> "Llama":
        return cls.from_reader(open_gguf(path), path, kv_dtype)

    @classmethod
    def from_reader(cls, reader, path, kv_dtype: str = "f32") -> "Llama":
        """From an open gguf.GGUFReader (opening one parses every field: share it); kernels are
        warmed up for the KV cache type the caller will use."""
        args = ModelArgs.from_gguf(reader, path)
        tensors = tensor_index(reader)

        def get(name, shape=None, required=True):
            """The tensor as float32, checked against the shape the metadata implies."""
            if name not in tensors:
                if required:
                    raise ModelError(f"{path}: tensor {name!r} is missing")
                return None
            t = dequantize(tensors[name], path)
            if shape is not None and t.shape != shape:
                raise ModelError(f"{path}: tensor {name!r} has shape {t.shape}, expected {shape}")
            return t

        def packed(name, permute_heads=None):
            """The tensor's own blocks, rows in the float32 copy's order (None: not a type the
            compiled kernels read, or no kernels)."""
            t = tensors[name]
            fmt = int(t.tensor_type)  # ggml's type ids are the kernels' format codes
            cols = int(t.shape[0])
            if fmt not in native.PACKED_TYPES or cols % 32 or not native.available():
                return None
            data = np.asarray(t.data).view(np.uint8).reshape(int(t.shape[1]), -1)
            if permute_heads is not None:
                data = unpermute(data, permute_heads)
            return native.PackedMatrix(data, fmt, cols)

        def linear(names, f32, permute=()):
            parts = [packed(n, p) for n, p in zip(names, permute or [None] * len(names))]
            if any(p is None for p in parts) or len({p.fmt for p in parts}) > 1:
                return Linear(f32)
            return Linear(f32, parts[0] if len(parts) == 1 else native.PackedMatrix.stack(parts))

        a = args
        q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        layers = []
        for i in range(a.n_layers):
            p = f"blk.{i}."
            wq = get(p + "attn_q.weight", (q_dim, a.dim))
            wk = get(p + "attn_k.weight", (kv_dim, a.dim))
            wv = get(p + "attn_v.weight", (kv_dim, a.dim))
            bias = None
            if a.qkv_bias:
                bias = np.concatenate([get(p + "attn_q.bias"), get(p + "attn_k.bias"),
                                       get(p + "attn_v.bias")])
            if a.arch == "llama":
                wq, wk = unpermute(wq, a.n_heads), unpermute(wk, a.n_kv_heads)
                if bias is not None:
                    bias = np.concatenate([unpermute(bias[:q_dim], a.n_heads),
                                           unpermute(bias[q_dim:q_dim + kv_dim], a.n_kv_heads),
                                           bias[q_dim + kv_dim:]])
            heads = (a.n_heads, a.n_kv_heads, None) if a.arch == "llama" else ()
            layers.append(Layer(
                attn_norm=get(p + "attn_norm.weight", (a.dim,)),
                w_qkv=linear([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
                             np.concatenate([wq, wk, wv]), heads),
                b_qkv=bias,
                w_o=linear([p + "attn_output.weight"], get(p + "attn_output.weight",
                                                          (a.dim, q_dim))),
                ffn_norm=get(p + "ffn_norm.weight", (a.dim,)),
                w_gate_up=linear([p + "ffn_gate.weight", p + "ffn_up.weight"],
                                 np.concatenate([get(p + "ffn_gate.weight", (a.ffn_dim, a.dim)),
                                                 get(p + "ffn_up.weight", (a.ffn_dim, a.dim))])),
                w_down=linear([p + "ffn_down.weight"], get(p + "ffn_down.weight",
                                                           (a.dim, a.ffn_dim))),
            ))
        embd = get("token_embd.weight", (a.vocab_size, a.dim))
        head = "token_embd.weight" if a.tied_embeddings else "output.weight"
        output = linear([head], embd if a.tied_embeddings else get(head, (a.vocab_size, a.dim)))
        weights = Weights(token_embd=embd, output=output,
                          output_norm=get("output_norm.weight", (a.dim,)),
                          layers=layers, rope_freq_factors=get("rope_freqs.weight", required=False))
        model = cls(args, weights, path)
        model.warmup(kv_dtype)
        return model

    def warmup(self, kv_dtype: str = "f32"):
        """Compile/load the attention kernels and run one token through every layer, so that
        one-time costs (JIT cache, BLAS thread start, first page touches) land in load time, not
        in the first request's TTFT (llama.cpp warms up the same way)."""
        from ..cache import KVCache

        warmup((kv_dtype,))
        self.forward(np.zeros(1, np.int64), KVCache.for_model(self.args, 1), 0)

    # -- pieces ---------------------------------------------------------------------------------

    def inv_freq(self) -> np.ndarray:
        """RoPE's angular frequency per rotated pair (rope_dim/2,), float64."""
        a = self.args
        inv = 1.0 / (a.rope_theta ** (np.arange(0, a.rope_dim, 2, dtype=np.float64) / a.rope_dim))
        if self.weights.rope_freq_factors is not None:
            inv = inv / self.weights.rope_freq_factors.astype(np.float64)
        return inv

    def rope_tables(self, n_positions: int):
        """cos, sin: (n_positions, rope_dim/2) float32, computed in float64."""
        have, cos, sin = self._rope_cache
        if n_positions > have:
            a = self.args
            n = max(n_positions, 2 * have)
            angles = np.outer(np.arange(n, dtype=np.float64) / a.rope_scale, self.inv_freq())
            cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
            self._rope_cache = (n, cos, sin)
        return cos, sin

    def rope(self, x: np.ndarray, pos: int) -> np.ndarray:
        """x (T, heads, D) at positions pos .. pos+T-1; rotates halves of rope_dim (in place when
        x is contiguous). RoPE, RMSNorm and SwiGLU run compiled when the kernels are built, for
        prompts and decode steps alike, so that a token's K is the same bits either way (a
        quantized cache would otherwise round it differently); the NumPy lines are the fallback
        and the tests' twin."""
        T = x.shape[0]
        half = self.args.rope_dim // 2
        cos, sin = self.rope_tables(pos + T)
        if native.available():
            return native.rope(np.ascontiguousarray(x), cos, sin, pos)
        c, s = cos[pos:pos + T, None, :], sin[pos:pos + T, None, :]
        x1 = x[..., :half].copy()
        x2 = x[..., half:2 * half]
        x[..., :half] = x1 * c - x2 * s
        x[..., half:2 * half] = x2 * c + x1 * s
        return x

    def rotate(self, q: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """q (1, H, T, D) already at its positions, turned by delta[t] more positions (a new
        array): RoPE composes, R(p + delta) = R(delta) R(p)."""
        half = self.args.rope_dim // 2
        angles = np.outer(np.asarray(delta, np.float64) / self.args.rope_scale, self.inv_freq())
        c = np.cos(angles).astype(np.float32)[None, None]
        s = np.sin(angles).astype(np.float32)[None, None]
        out = q.copy()
        x1, x2 = q[..., :half], q[..., half:2 * half]
        out[..., :half] = x1 * c - x2 * s
        out[..., half:2 * half] = x2 * c + x1 * s
        return out

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        if native.available():
            return native.rmsnorm(x, w, self.args.rms_eps)
        ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
        return x * (1.0 / np.sqrt(ms + np.float32(self.args.rms_eps))) * w

    def swiglu(self, gu: np.ndarray) -> np.ndarray:
        """gu (T, 2*ffn), gate then up -> silu(gate) * up."""
        if native.available():
            return native.swiglu(gu)
        gate, up = gu[:, :self.args.ffn_dim], gu[:, self.args.ffn_dim:]
        return gate / (1.0 + np.exp(-gate)) * up

    # -- forward --------------------------------------------------------------------------------

    def layers(self, x, cache, pos: int, observe=None):
        """x (T, dim) at positions pos .. pos+T-1 through every layer, one kernel call at a time
        (prompts; and steps the compiled layer step does not take). Returns x and the seconds
        spent in attention."""
        a = self.args
        T, H, H_kv, D = x.shape[0], a.n_heads, a.n_kv_heads, a.head_dim
        q_dim, kv_dim = H * D, H_kv * D
        window = a.sliding_window
        attn_s = 0.0
        for i, layer in enumerate(self.weights.layers):
            h = self.rmsnorm(x, layer.attn_norm)
            qkv = layer.w_qkv(h)
            if layer.b_qkv is not None:
                qkv += layer.b_qkv
            q = self.rope(qkv[:, :q_dim].reshape(T, H, D), pos)
            k = self.rope(qkv[:, q_dim:q_dim + kv_dim].reshape(T, H_kv, D), pos)
            v = qkv[:, q_dim + kv_dim:].reshape(T, H_kv, D)
            q4 = q.transpose(1, 0, 2)[None]  # (1, H, T, D)
            t = time.perf_counter()
            o = cache.attend(i, pos, q4, k, v, window, self.rotate)  # (1, H, T, D)
            attn_s += time.perf_counter() - t
            if observe is not None:
                observe(i, q4, cache.decoded_keys(i, pos + T), pos + T, window)
            x = x + layer.w_o(o[0].transpose(1, 0, 2).reshape(T, q_dim))
            h = self.rmsnorm(x, layer.ffn_norm)
            gu = layer.w_gate_up(h)
            x = x + layer.w_down(self.swiglu(gu))
        return x, attn_s

    def step_args(self, cache):
        """Per layer, what native.layer_step needs of it; None where the compiled step does not
        apply: no compiled kernels, a weight without GGUF blocks, a cache other than the full
        KVCache (the streaming cache re-rotates its keys), or head sizes its kernel refuses."""
        from ..cache import KVCache

        a = self.args
        if type(cache) is not KVCache or not native.decode_supported(
                cache.kv_dtype, a.head_dim, a.head_dim, a.n_heads // a.n_kv_heads, False,
                np.float32):
            return None
        if self._step_args is None:
            self._step_args = []
            for L in self.weights.layers:
                mats = [m.packed for m in (L.w_qkv, L.w_o, L.w_gate_up, L.w_down)]
                if any(m is None for m in mats):
                    self._step_args = False
                    break
                bias = None if L.b_qkv is None else np.ascontiguousarray(L.b_qkv, np.float32)
                self._step_args.append(
                    (L.attn_norm, L.ffn_norm, bias, *[f for m in mats for f in (m.data, m.fmt)],
                     a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.rope_dim // 2,
                     float(a.rms_eps), float(1.0 / np.sqrt(a.head_dim))))
        return self._step_args or None

    def layers_compiled(self, x, cache, pos: int):
        """One token x (1, dim) at pos through every layer with native.layer_step: the same
        kernels as `layers`, in the same order (the same bits), one call a layer."""
        a = self.args
        x = np.array(x[0], np.float32)  # a copy, updated in place
        cos, sin = self.rope_tables(pos + 1)
        # keys pos - left .. pos; without a window, left reaches past key 0 (as decode_cached)
        left = pos + 2 if a.sliding_window is None else a.sliding_window - 1
        j_base = max(0, pos - left)
        chunk, n_chunks = split_keys(pos - j_base + 1, a.n_kv_heads)
        attn_s = 0.0
        for i, args in enumerate(self.step_args(cache)):
            attn_s += native.layer_step(x, args, cos, sin, cache.k[i], cache.v[i], cache.kv_dtype,
                                        pos, left, j_base, chunk, n_chunks)
        return x[None], attn_s

    def forward(self, tokens, cache, pos: int, timings: Timings | None = None,
                all_logits: bool = False, observe=None) -> np.ndarray:
        """tokens (T,) at positions pos .. pos+T-1, after `pos` tokens already in `cache`.

        Writes their K/V into the cache. Returns logits (vocab,) of the last token, or (T, vocab).
        observe(layer, q, k, kv_len, window), if given, sees each layer's attention inputs after
        RoPE: q (1, H, T, D) and the cached keys k (1, H_kv, kv_len, D) as float32 (a full cache).
        """
        a, w = self.args, self.weights
        tokens = np.asarray(tokens)
        T = tokens.shape[0]
        if T == 0:
            raise ValueError("forward needs at least one token")
        if tokens.min() < 0 or tokens.max() >= a.vocab_size:
            raise ValueError(f"token ids must be in 0 .. {a.vocab_size - 1}")
        cache.reserve(pos, T)
        t_start = time.perf_counter()
        layer_pairs = int(cache.keys_seen(np.arange(pos, pos + T), a.sliding_window).sum())
        x = w.token_embd[tokens]  # (T, dim)
        if T == 1 and observe is None and self.step_args(cache) is not None:
            x, attn_s = self.layers_compiled(x, cache, pos)
        else:
            x, attn_s = self.layers(x, cache, pos, observe)
        pairs = a.n_heads * layer_pairs * len(w.layers)
        cache.commit(pos, T)
        h = self.rmsnorm(x if all_logits else x[-1:], w.output_norm)
        logits = w.output(h)
        if timings is not None:
            timings.forward_s += time.perf_counter() - t_start
            timings.attention_s += attn_s
            timings.attention_pairs += pairs
        return logits if all_logits else logits[0]
