"""The decoder-only transformer every supported architecture runs, on selfattn's attention.

    x = token_embd[tokens] · embed_scale
    per layer:  h = rmsnorm(x) · attn_norm;  q, k, v = h W_q, h W_k, h W_v (+ bias)
                [qk_norm: rmsnorm over each head of q and k];  RoPE(q, k) at the layer's base
                write k, v into the cache;  a = attention(q, cache, causal, the layer's window,
                soft-cap, scale) W_o  [post_norms: rmsnorm(a) · post_attention_norm];  x += a
                h = rmsnorm(x) · ffn_norm;  f = (act(h W_gate) * h W_up) W_down
                [post_norms: rmsnorm(f) · post_ffw_norm];  x += f
    logits = rmsnorm(x) · output_norm · W_outᵀ  (W_out = token_embd when tied) [final soft-cap]

What differs between architectures is read from the file by model/config.py and archs/; this
file does not branch on their names. Weight matrices are `Linear`s over the file's own blocks
(model/linear.py). llama.cpp's converter permutes the q/k rows of `llama` models so that its
RoPE rotates adjacent pairs; `unpermute` undoes it (on a copy of those rows, read from the file
rather than the mapping), so q and k here are in the Hugging Face layout and RoPE rotates halves.

A one-token step of a plain llama-style model over the full KV cache (of one sequence, or of
several at once) runs all its layers in one compiled call (`native.layer_step`: the same kernels
in the same order, so the same bits as the per-kernel loop in `layers`, without ~15 Python calls
a layer).
"""

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .. import formats, native
from ..attention import warmup
from ..attention.decode import split_keys
from ..errors import ModelError
from .config import ModelArgs
from .gguf_file import dequantize, open_gguf, tensor_index
from .linear import Linear, takes_gemm

log = logging.getLogger(__name__)


def prefetch(reader):
    """Read the file's tensors into the page cache with several readers before the warm-up pass
    touches them (a cold 4.47 GB file: 9.4 s to load with the warm-up faulting pages in, 3-4 s
    this way); skipped when the tensors would not fit the memory available."""
    from ..cache.memory import available_memory

    size = reader.file_size - reader.data_offset
    free = available_memory()
    if size > 0 and (free is None or size < free):
        with memoryview(reader.mapping()) as whole, whole[reader.data_offset:] as tensors:
            native.touch_pages(tensors)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute: rows (H, D/2, 2) -> (H, 2, D/2), per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


@dataclass
class Layer:
    attn_norm: np.ndarray  # (dim,)
    wq: Linear  # (H*D, dim)
    wk: Linear  # (H_kv*D, dim)
    wv: Linear
    wo: Linear  # (dim, H*D)
    ffn_norm: np.ndarray
    w_gate: Linear  # (ffn, dim)
    w_up: Linear
    w_down: Linear  # (dim, ffn)
    b_qkv: np.ndarray | None = None  # (H*D + 2*H_kv*D,)
    q_norm: np.ndarray | None = None  # (D,)
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # (dim,)
    post_ffn_norm: np.ndarray | None = None

    @property
    def linears(self):
        return (self.wq, self.wk, self.wv, self.wo, self.w_gate, self.w_up, self.w_down)


@dataclass
class Timings:
    """Where the forward passes' wall time went, with the work each part did. The parts are
    timed where they run (the compiled step times its own); what forward_s holds beyond them is
    Python and dispatch. sampling_s is the callers' (generate, bench)."""
    forward_s: float = 0.0
    attention_s: float = 0.0  # attention and the cache write
    matmul_s: float = 0.0  # the weight matmuls, the LM head's included
    ops_s: float = 0.0  # norms, RoPE, activations, residual adds, the embedding rows
    sampling_s: float = 0.0
    attention_pairs: int = 0  # (query, key) pairs scored, summed over heads and layers
    attention_flops: float = 0.0  # 4 · head dim per pair (QK^T and PV)
    kv_bytes: int = 0  # K and V bytes one-token steps read (each cached key once per kv head)
    matmul_flops: float = 0.0  # 2 per weight and token
    weight_bytes: int = 0  # bytes of the weight matrices read (each once per forward call)
    forward_calls: int = 0

    @property
    def attention_share(self) -> float:
        return self.attention_s / self.forward_s if self.forward_s > 0 else 0.0


@dataclass
class Weights:
    token_embd: Linear  # (vocab, dim)
    output: Linear  # (vocab, dim): token_embd itself when tied
    output_norm: np.ndarray
    layers: list[Layer] = field(default_factory=list)
    rope_freq_factors: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the weights hold: matrices as stored (mapped from the file; float32 copies only
        without the compiled kernels), small vectors as float32."""
        mats = [self.token_embd] + ([] if self.output is self.token_embd else [self.output])
        vecs = [self.output_norm, self.rope_freq_factors]
        for L in self.layers:
            mats += L.linears
            vecs += [L.attn_norm, L.ffn_norm, L.b_qkv, L.q_norm, L.k_norm, L.post_attn_norm,
                     L.post_ffn_norm]
        return sum(m.nbytes for m in mats) + sum(v.nbytes for v in vecs if v is not None)


class Loader:
    """Tensors of one open file as Linears and float32 vectors, checked against the metadata.
    check_only: every name and shape is checked, nothing is read or built (the planner's
    validation of a file it may not run: types it cannot run are its `cannot_run` note)."""

    def __init__(self, reader, path, check_only: bool = False):
        self.reader, self.path, self.check_only = reader, str(path), check_only
        self.tensors = tensor_index(reader)

    def info(self, name, shape):
        """The tensor's info, its shape (numpy order) checked; ModelError if missing or wrong."""
        t = self.tensors.get(name)
        if t is None:
            raise ModelError(f"{self.path}: tensor {name!r} is missing")
        have = tuple(int(n) for n in reversed(tuple(t.shape)))
        if have != tuple(shape):
            raise ModelError(f"{self.path}: tensor {name!r} has shape {have}, expected "
                             f"{tuple(shape)}")
        return t

    def vector(self, name, n, required=True):
        if not required and name not in self.tensors:
            return None
        t = self.info(name, (n,))
        return np.zeros(n, np.float32) if self.check_only else dequantize(t, self.path).reshape(n)

    def linear(self, name, rows, cols, permute_heads=None) -> Linear:
        t = self.info(name, (rows, cols))
        if self.check_only:
            return _Checked()
        fmt = formats.by_id(int(t.tensor_type))
        if not fmt.kernels:
            raise ModelError(f"{self.path}: tensor {name!r} has type {fmt.name.upper()}, which "
                             f"selfattn cannot run (it runs {formats.supported_names()})")
        if native.available():
            if permute_heads is None:
                data = np.asarray(t.data).view(np.uint8).reshape(rows, -1)
            else:  # a copy in the HF row order, read past the mapping (its pages stay unused)
                data = np.fromfile(self.path, np.uint8, count=int(t.n_bytes),
                                   offset=int(t.offset)).reshape(rows, -1)
                data = np.ascontiguousarray(unpermute(data, permute_heads))
            return Linear(native.PackedMatrix(data, fmt.type_id, cols))
        w = dequantize(t, self.path).reshape(rows, cols)
        if permute_heads is not None:
            w = np.ascontiguousarray(unpermute(w, permute_heads))
        return Linear(f32=w)


class _Checked:
    """What Loader(check_only=True) gives for a matrix: its checks passed, nothing was read."""

    def split(self, sizes):
        return [self] * len(sizes)


def check_tensors(reader, path, args: ModelArgs):
    """ModelError for a missing or misshapen tensor, as loading would find, without reading
    any tensor data."""
    load_weights(Loader(reader, path, check_only=True), args)


class Transformer:
    def __init__(self, args: ModelArgs, weights: Weights, path=""):
        self.args, self.weights, self.path = args, weights, str(path)
        self._rope_cache = {}
        self._step_layers = None
        self._all_packed = None  # every layer matrix held as blocks (prompts_join)
        mats = [m for L in weights.layers for m in L.linears]
        self._layer_params = sum(m.shape[0] * m.shape[1] for m in mats)
        self._layer_bytes = sum(m.nbytes for m in mats)

    @classmethod
    def load(cls, path, kv_dtype: str = "f32") -> "Transformer":
        return cls.from_reader(open_gguf(path), path, kv_dtype)

    @classmethod
    def from_reader(cls, reader, path, kv_dtype: str = "f32") -> "Transformer":
        """From an open GGUF file (share it with the tokenizer); kernels are warmed up for the KV
        cache type the caller will use."""
        args = ModelArgs.from_gguf(reader, path)
        model = cls(args, load_weights(Loader(reader, path), args), path)
        prefetch(reader)
        model.warmup(kv_dtype)
        return model

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per forward call (generate.prefill_chunk: activations bounded)."""
        from .generate import prefill_chunk

        a = self.args
        return prefill_chunk(a.dim, a.ffn_dim, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim)

    @property
    def weight_bytes(self) -> int:
        return self.weights.nbytes

    def warmup(self, kv_dtype: str = "f32"):
        """Compile/load the attention kernels and run one token through every layer, so that
        one-time costs (JIT cache, BLAS thread start, first page touches) land in load time, not
        in the first request's TTFT (llama.cpp warms up the same way)."""
        from ..cache import KVCache

        warmup((kv_dtype,))
        self.forward(np.zeros(1, np.int64), KVCache.for_model(self.args, 1), 0)

    # -- pieces ---------------------------------------------------------------------------------

    def inv_freq(self, layer: int = 0) -> np.ndarray:
        """RoPE's angular frequency per rotated pair (rope_dim/2,), float64, for a layer."""
        a = self.args
        theta, _ = a.rope_base(layer)
        inv = 1.0 / (theta ** (np.arange(0, a.rope_dim, 2, dtype=np.float64) / a.rope_dim))
        if self.weights.rope_freq_factors is not None and a.window(layer) is None:
            inv = inv / self.weights.rope_freq_factors.astype(np.float64)
        return inv

    def rope_tables(self, n_positions: int, layer: int = 0):
        """cos, sin: (n_positions, rope_dim/2) float32 for a layer's base, computed in float64."""
        key = self.args.rope_base(layer) + (self.args.window(layer) is None,)
        have, cos, sin = self._rope_cache.get(key, (0, None, None))
        if n_positions > have:
            n = max(n_positions, 2 * have)
            angles = np.outer(np.arange(n, dtype=np.float64) / key[1], self.inv_freq(layer))
            cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
            self._rope_cache[key] = (n, cos, sin)
        return cos, sin

    def rope(self, x: np.ndarray, pos, layer: int = 0) -> np.ndarray:
        """x (T, heads, D) at positions pos .. pos+T-1 (pos: a start, or runs ((start, count),
        ...) of a context-parallel shard); rotates halves of rope_dim (in place when x is
        contiguous). RoPE, RMSNorm and SwiGLU run compiled when the kernels are built, for
        prompts and decode steps alike, so that a token's K is the same bits either way (a
        quantized cache would otherwise round it differently); the NumPy lines are the fallback
        and the tests' twin."""
        if isinstance(pos, tuple):
            r = 0
            out = np.empty_like(x)
            for start, count in pos:
                out[r:r + count] = self.rope(x[r:r + count], start, layer)
                r += count
            return out
        T = x.shape[0]
        half = self.args.rope_dim // 2
        cos, sin = self.rope_tables(pos + T, layer)
        if native.available():
            return native.rope(np.ascontiguousarray(x), cos, sin, pos)
        c, s = cos[pos:pos + T, None, :], sin[pos:pos + T, None, :]
        x1 = x[..., :half].copy()
        x2 = x[..., half:2 * half]
        x[..., :half] = x1 * c - x2 * s
        x[..., half:2 * half] = x2 * c + x1 * s
        return x

    def rotate(self, q: np.ndarray, delta: np.ndarray, layer: int = 0) -> np.ndarray:
        """q (1, H, T, D) already at its positions, turned by delta[t] more positions (a new
        array): RoPE composes, R(p + delta) = R(delta) R(p)."""
        half = self.args.rope_dim // 2
        _, scale = self.args.rope_base(layer)
        angles = np.outer(np.asarray(delta, np.float64) / scale, self.inv_freq(layer))
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

    def head_norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RMSNorm over each head of x (T, heads, D)."""
        T, heads, D = x.shape
        return self.rmsnorm(np.ascontiguousarray(x).reshape(T * heads, D), w).reshape(T, heads, D)

    def ffn_act(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """act(gate) * up: SwiGLU (compiled when built) or GeGLU with gelu's tanh form."""
        if self.args.activation == "gelu_tanh":
            g3 = gate * gate * gate
            inner = np.float32(np.sqrt(2 / np.pi)) * (gate + np.float32(0.044715) * g3)
            return np.float32(0.5) * gate * (np.float32(1) + np.tanh(inner)) * up
        if native.available():  # 256 rows at a time: no (T, 2 ffn) copy of a long prompt's
            out = np.empty_like(gate)
            for r in range(0, gate.shape[0], 256):
                out[r:r + 256] = native.swiglu(np.concatenate([gate[r:r + 256], up[r:r + 256]],
                                                              axis=1))
            return out
        return gate / (1.0 + np.exp(-gate)) * up

    # -- forward --------------------------------------------------------------------------------

    def layers(self, x, segments, observe=None, alone: bool | None = None):
        """x (T, dim) through every layer, one kernel call at a time (prompts, batched steps,
        and steps the compiled layer step does not take). segments: (cache, pos, n) per sequence,
        covering x's rows in order: n rows at positions pos .. pos+n-1 of that cache. The weight
        matmuls take all T rows at once; RoPE and attention run per sequence. alone: each row
        through the one-token loops, with the bits it gets alone (by default when there are
        several sequences: a batched step). Returns x and the seconds spent in attention, in the
        weight matmuls and in the other operations."""
        a = self.args
        T, H, H_kv, D = x.shape[0], a.n_heads, a.n_kv_heads, a.head_dim
        q_dim, kv_dim = H * D, H_kv * D
        if alone is None:
            alone = len(segments) > 1
        attn_s = mat_s = ops_s = 0.0
        clock = time.perf_counter
        for i, L in enumerate(self.weights.layers):
            t0 = clock()
            h = self.rmsnorm(x, L.attn_norm)
            t1 = clock()
            q, k, v = L.wq(h, alone), L.wk(h, alone), L.wv(h, alone)
            t2 = clock()
            if L.b_qkv is not None:
                q += L.b_qkv[:q_dim]
                k += L.b_qkv[q_dim:q_dim + kv_dim]
                v += L.b_qkv[q_dim + kv_dim:]
            q, k, v = q.reshape(T, H, D), k.reshape(T, H_kv, D), v.reshape(T, H_kv, D)
            if L.q_norm is not None:
                q, k = self.head_norm(q, L.q_norm), self.head_norm(k, L.k_norm)
            window = a.window(i)
            outs, attn, seen = [], 0.0, 0.0
            r0 = 0
            for cache, pos, n in segments:
                qs = self.rope(q[r0:r0 + n], pos, i)
                ks = self.rope(k[r0:r0 + n], pos, i)
                q4 = qs.transpose(1, 0, 2)[None]  # (1, H, n, D)
                t3 = clock()
                o = cache.attend(i, pos, q4, ks, v[r0:r0 + n], window,
                                 lambda q_, d_, i=i: self.rotate(q_, d_, i),
                                 softcap=a.attn_softcap, scale=a.attn_scale)  # (1, H, n, D)
                attn += clock() - t3
                if observe is not None:
                    t4 = clock()
                    observe(i, q4, cache.decoded_keys(i, pos + n), pos + n, window)
                    seen += clock() - t4
                outs.append(o[0].transpose(1, 0, 2).reshape(n, q_dim))
                r0 += n
            t5 = clock()
            o = L.wo(outs[0] if len(outs) == 1 else np.concatenate(outs), alone)
            t6 = clock()
            if L.post_attn_norm is not None:
                o = self.rmsnorm(o, L.post_attn_norm)
            x = x + o
            h = self.rmsnorm(x, L.ffn_norm)
            t7 = clock()
            gate, up = L.w_gate(h, alone), L.w_up(h, alone)
            t8 = clock()
            act = self.ffn_act(gate, up)
            t9 = clock()
            f = L.w_down(act, alone)
            t10 = clock()
            if L.post_ffn_norm is not None:
                f = self.rmsnorm(f, L.post_ffn_norm)
            x = x + f
            t11 = clock()
            attn_s += attn
            mat_s += (t2 - t1) + (t6 - t5) + (t8 - t7) + (t10 - t9)
            ops_s += (t1 - t0) + (t5 - t2 - attn - seen) + (t7 - t6) + (t9 - t8) + (t11 - t10)
        return x, attn_s, mat_s, ops_s

    def step_layers(self, cache):
        """Per layer, the native.StepLayer the compiled one-token step takes; None where it does
        not apply: no compiled kernels, a matrix held as float32, an architecture variant the
        step does not compute (q/k norms, post norms, GeGLU, soft-caps, other scales, per-layer
        windows or RoPE bases), a cache other than the full KVCache (the streaming cache
        re-rotates its keys), or head sizes its kernel refuses."""
        from ..cache import KVCache

        a = self.args
        plain = (not a.qk_norm and not a.post_norms and a.activation == "silu"
                 and a.attn_softcap is None and a.attn_scale is None and a.uniform_window
                 and a.rope_theta_local is None)
        if not plain or type(cache) is not KVCache or not native.decode_supported(
                cache.kv_dtype, a.head_dim, a.head_dim, a.n_heads // a.n_kv_heads, False,
                np.float32):
            return None
        if self._step_layers is None:
            self._step_layers = []
            for L in self.weights.layers:
                mats = [m.packed for m in L.linears]
                if any(m is None for m in mats):
                    self._step_layers = False
                    break
                bias = None if L.b_qkv is None else np.ascontiguousarray(L.b_qkv, np.float32)
                self._step_layers.append(native.StepLayer(
                    L.attn_norm, L.ffn_norm, bias, *mats, a.dim, a.n_heads, a.n_kv_heads,
                    a.head_dim, a.ffn_dim, a.rope_dim // 2, float(a.rms_eps),
                    float(1.0 / np.sqrt(a.head_dim))))
        return self._step_layers or None

    def layers_compiled(self, x, caches, positions):
        """One token of each of B sequences, x (B, dim), at positions[b] of caches[b], through
        every layer with native.layer_step: the same kernels as `layers`, in the same order (the
        same bits, each row as alone), in one call. Returns what `layers` returns."""
        a = self.args
        x = np.array(x, np.float32)  # a copy, updated in place
        cos, sin = self.rope_tables(max(positions) + 1)
        window = a.window(0)
        bands = []
        for pos in positions:
            # keys pos - left .. pos; without a window, left reaches past key 0 (as decode_cached)
            left = pos + 2 if window is None else window - 1
            j_base = max(0, pos - left)
            bands.append((pos, left, j_base, *split_keys(pos - j_base + 1, a.n_kv_heads)))
        seqs = [native.StepSeq(c.k, c.v, c.kv_dtype, *band) for c, band in zip(caches, bands)]
        attn_s, mat_s, step_s = native.layer_step(x, self.step_layers(caches[0]), cos, sin, seqs)
        return x, attn_s, mat_s, step_s - attn_s - mat_s

    def keys_read(self, cache, positions: np.ndarray) -> int:
        """(query, key) pairs per head that queries at `positions` score, over all layers."""
        windows = Counter(self.args.window(i) for i in range(self.args.n_layers))
        return sum(n * int(cache.keys_seen(positions, w).sum()) for w, n in windows.items())

    def forward(self, tokens, cache, pos: int, timings: Timings | None = None,
                all_logits: bool = False, observe=None) -> np.ndarray:
        """tokens (T,) at positions pos .. pos+T-1, after `pos` tokens already in `cache` (for a
        context-parallel cache, a prompt's pos is this rank's runs ((start, count), ...)).

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
        clock = time.perf_counter
        t_start = clock()
        positions = np.arange(pos, pos + T) if not isinstance(pos, tuple) else \
            np.concatenate([np.arange(s, s + c) for s, c in pos])
        t0 = clock()
        x = w.token_embd.rows(tokens)  # (T, dim)
        if a.embed_scale != 1.0:
            x *= np.float32(a.embed_scale)
        ops_s = clock() - t0
        if T == 1 and observe is None and self.step_layers(cache) is not None:
            x, attn_s, mat_s, layer_ops_s = self.layers_compiled(x, [cache], [pos])
        else:
            x, attn_s, mat_s, layer_ops_s = self.layers(x, [(cache, pos, T)], observe)
        cache.commit(pos, T)
        t0 = clock()
        h = self.rmsnorm(x if all_logits else x[-1:], w.output_norm)
        t1 = clock()
        logits = w.output(h)
        t2 = clock()
        if a.final_softcap is not None:
            c = np.float32(a.final_softcap)
            logits = c * np.tanh(logits / c)
        if timings is not None:
            t = timings
            t.forward_s += clock() - t_start
            t.attention_s += attn_s
            t.matmul_s += mat_s + (t2 - t1)
            t.ops_s += ops_s + layer_ops_s + (t1 - t0) + (clock() - t2)
            keys = self.keys_read(cache, positions)
            t.attention_pairs += a.n_heads * keys
            t.attention_flops += 4.0 * a.head_dim * a.n_heads * keys
            if T == 1:  # each cached key and value read once per kv head
                t.kv_bytes += keys * a.n_kv_heads * 2 * formats.BY_NAME[cache.kv_dtype].row_bytes(
                    a.head_dim)
            head_rows = T if all_logits else 1
            t.matmul_flops += 2.0 * (T * self._layer_params + head_rows * w.output.shape[0]
                                     * w.output.shape[1])
            t.weight_bytes += self._layer_bytes + w.output.nbytes
            t.forward_calls += 1
        return logits if all_logits else logits[0]

    def prompts_join(self, n_tokens) -> bool:
        """Whether prompts of these token counts can go through `forward_prompts` together with
        each one's result the bits `forward` gives it alone: every matrix held as blocks (the GEMM's
        rows do not depend on the other rows of its call; BLAS's may) and every count past the
        one-token loops' (there, alone, a prompt takes other arithmetic)."""
        if self._all_packed is None:
            self._all_packed = all(lin.packed is not None for L in self.weights.layers
                                   for lin in L.linears)
        return len(n_tokens) > 1 and self._all_packed and all(takes_gemm(n) for n in n_tokens)

    def forward_prompts(self, chunks, caches, timings: Timings | None = None) -> np.ndarray:
        """Prompt tokens of B sequences at once: chunks[b] (n_b,) at the next positions of
        caches[b] (a cache each). The weight matmuls take every row in one call (each weight read
        once for all of them); RoPE and attention run per sequence on its own cache. Returns the
        logits (B, vocab) of each chunk's last token: row b is what `forward` of chunks[b] alone
        on caches[b] gives, bit for bit, where `prompts_join` says so."""
        a, w = self.args, self.weights
        chunks = [np.asarray(c) for c in chunks]
        B = len(chunks)
        if B == 0 or len(caches) != B or len({id(c) for c in caches}) != B:
            raise ValueError(f"forward_prompts needs a cache of its own for each of the {B} "
                             f"chunks, got {len(caches)} caches")
        for c, ids in zip(caches, chunks):
            if ids.ndim != 1 or ids.shape[0] == 0:
                raise ValueError("forward_prompts: each chunk needs at least one token")
            if ids.min() < 0 or ids.max() >= a.vocab_size:
                raise ValueError(f"token ids must be in 0 .. {a.vocab_size - 1}")
            c.reserve(c.length, ids.shape[0])
        clock = time.perf_counter
        t_start = clock()
        tokens = np.concatenate(chunks)
        x = w.token_embd.rows(tokens)
        if a.embed_scale != 1.0:
            x *= np.float32(a.embed_scale)
        segments = [(c, c.length, ids.shape[0]) for c, ids in zip(caches, chunks)]
        x, attn_s, mat_s, ops_s = self.layers(x, segments, alone=False)
        for c, pos, n in segments:
            c.commit(pos, n)
        last = np.cumsum([n for _, _, n in segments]) - 1
        t1 = clock()
        logits = self._logits(x[last], True)
        if timings is not None:
            keys = sum(self.keys_read(c, np.arange(pos, pos + n)) for c, pos, n in segments)
            self._account(timings, clock() - t_start, attn_s, mat_s, clock() - t1, keys,
                          tokens.shape[0], B)
        return logits

    def forward_batch(self, tokens, caches, timings: Timings | None = None) -> np.ndarray:
        """One new token for each of B sequences: tokens (B,), caches[b] the b-th one's cache, the
        token going at its next position. The weight matmuls take the B rows at once, so each
        weight is read once per step for all of them; RoPE and attention run per sequence on its
        own cache (a plain llama-style model: every layer in one compiled call, as a one-token
        step).
        Returns logits (B, vocab); row b is what `forward` of that token alone on that cache
        gives, bit for bit."""
        a, w = self.args, self.weights
        tokens = np.asarray(tokens)
        B = tokens.shape[0]
        if B == 0 or len(caches) != B:
            raise ValueError(f"forward_batch needs one cache per token, got {B} tokens and "
                             f"{len(caches)} caches")
        if tokens.min() < 0 or tokens.max() >= a.vocab_size:
            raise ValueError(f"token ids must be in 0 .. {a.vocab_size - 1}")
        if len({id(c) for c in caches}) != B:
            raise ValueError("forward_batch: each sequence needs a cache of its own")
        for c in caches:
            c.reserve(c.length, 1)
        clock = time.perf_counter
        t_start = clock()
        x = w.token_embd.rows(tokens)  # (B, dim)
        if a.embed_scale != 1.0:
            x *= np.float32(a.embed_scale)
        segments = [(c, c.length, 1) for c in caches]
        if B <= native.MAX_T and all(self.step_layers(c) is not None for c in caches):
            x, attn_s, mat_s, _ = self.layers_compiled(x, caches, [c.length for c in caches])
        else:
            x, attn_s, mat_s, _ = self.layers(x, segments)
        for c, pos, _ in segments:
            c.commit(pos, 1)
        t1 = clock()
        logits = self._logits(x, B > 1)
        if timings is not None:  # keys each sequence's one query reads, over the layers
            keys = [self.keys_read(c, np.array([pos])) for c, pos, _ in segments]
            kv_bytes = sum(n * a.n_kv_heads * 2 * formats.BY_NAME[c.kv_dtype].row_bytes(
                a.head_dim) for n, c in zip(keys, caches))
            self._account(timings, clock() - t_start, attn_s, mat_s, clock() - t1, sum(keys),
                          B, B, kv_bytes)
        return logits

    def _logits(self, x, alone: bool) -> np.ndarray:
        """The head over rows x (n, dim) of the last layer: final norm, output matrix (alone: each
        row the bits it gets alone), soft-cap."""
        w, a = self.weights, self.args
        logits = w.output(self.rmsnorm(x, w.output_norm), alone)
        if a.final_softcap is not None:
            c = np.float32(a.final_softcap)
            logits = c * np.tanh(logits / c)
        return logits

    def _account(self, t: Timings, elapsed, attn_s, mat_s, head_s, keys, rows, head_rows,
                 kv_bytes=0):
        """A several-sequence forward's figures into t: its seconds (head_s: the output head's,
        counted with the matmuls), the (query, key) pairs its attention scored, the weight
        matmuls of `rows` tokens and the head's of head_rows."""
        a, w = self.args, self.weights
        t.forward_s += elapsed
        t.attention_s += attn_s
        t.matmul_s += mat_s + head_s
        t.ops_s += elapsed - attn_s - mat_s - head_s
        t.attention_pairs += a.n_heads * keys
        t.attention_flops += 4.0 * a.head_dim * a.n_heads * keys
        t.kv_bytes += kv_bytes
        t.matmul_flops += 2.0 * (rows * self._layer_params
                                 + head_rows * w.output.shape[0] * w.output.shape[1])
        t.weight_bytes += self._layer_bytes + w.output.nbytes
        t.forward_calls += 1


def load_weights(ld: Loader, a: ModelArgs) -> Weights:
    """Every tensor the architecture's block needs, by llama.cpp's names, as Linears and float32
    vectors; ModelError for a missing or misshapen tensor or one the variant cannot use."""
    if "rope_factors_long.weight" in ld.tensors:
        raise ModelError(f"{ld.path}: LongRoPE factors (rope_factors_long.weight) are not "
                         "supported")
    q_dim, kv_dim, D = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.head_dim
    layers = []
    for i in range(a.n_layers):
        p = f"blk.{i}."
        if a.fused_qkv:
            wq, wk, wv = ld.linear(p + "attn_qkv.weight", q_dim + 2 * kv_dim, a.dim).split(
                (q_dim, kv_dim, kv_dim))
        else:
            perm = (a.n_heads, a.n_kv_heads) if a.permuted_qk else (None, None)
            wq = ld.linear(p + "attn_q.weight", q_dim, a.dim, perm[0])
            wk = ld.linear(p + "attn_k.weight", kv_dim, a.dim, perm[1])
            wv = ld.linear(p + "attn_v.weight", kv_dim, a.dim)
        if a.fused_gate_up:
            gate, up = ld.linear(p + "ffn_up.weight", 2 * a.ffn_dim, a.dim).split(
                (a.ffn_dim, a.ffn_dim))
        else:
            gate = ld.linear(p + "ffn_gate.weight", a.ffn_dim, a.dim)
            up = ld.linear(p + "ffn_up.weight", a.ffn_dim, a.dim)
        bias = None
        if a.qkv_bias:
            bq, bk = ld.vector(p + "attn_q.bias", q_dim), ld.vector(p + "attn_k.bias", kv_dim)
            if a.permuted_qk:
                bq, bk = unpermute(bq, a.n_heads), unpermute(bk, a.n_kv_heads)
            bias = np.concatenate([bq, bk, ld.vector(p + "attn_v.bias", kv_dim)])
        layers.append(Layer(
            attn_norm=ld.vector(p + "attn_norm.weight", a.dim), wq=wq, wk=wk, wv=wv,
            wo=ld.linear(p + "attn_output.weight", a.dim, q_dim),
            ffn_norm=ld.vector(p + "ffn_norm.weight", a.dim), w_gate=gate, w_up=up,
            w_down=ld.linear(p + "ffn_down.weight", a.dim, a.ffn_dim), b_qkv=bias,
            q_norm=ld.vector(p + "attn_q_norm.weight", D) if a.qk_norm else None,
            k_norm=ld.vector(p + "attn_k_norm.weight", D) if a.qk_norm else None,
            post_attn_norm=ld.vector(p + "post_attention_norm.weight", a.dim)
            if a.post_norms else None,
            post_ffn_norm=ld.vector(p + "post_ffw_norm.weight", a.dim) if a.post_norms else None,
        ))
    embd = ld.linear("token_embd.weight", a.vocab_size, a.dim)
    output = embd if a.tied_embeddings else ld.linear("output.weight", a.vocab_size, a.dim)
    factors = ld.vector("rope_freqs.weight", a.rope_dim // 2, required=False)
    return Weights(token_embd=embd, output=output,
                   output_norm=ld.vector("output_norm.weight", a.dim), layers=layers,
                   rope_freq_factors=factors)
