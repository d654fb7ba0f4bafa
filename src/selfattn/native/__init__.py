"""selfattn's compiled kernels: C with AVX2/FMA/F16C intrinsics (src/selfattn/native/*.c), built
at install time by setup.py as the extension module `_kernels`. Each releases the GIL while it
runs, on its own small thread pool (pool.c).

- `matmul(x, w)`: x @ Wᵀ for a few rows of x, with W kept in its GGUF type (`PackedMatrix`: f32,
  f16, q4_0, q4_1, q8_0 blocks, decoded in registers inside the kernel to the exact float32
  values gguf's dequantize gives). Decoding a token streams the file's compact bytes instead of a
  float32 copy.
- `flash_attention(...)`: the prefill kernel (blocked online softmax over a float32 or compact
  KV cache), with the contract of the numba + BLAS kernel in attention/flash.py (which stays as
  the fallback, and for masks and float64).
- `decode_attention(...)`: the split-K decode kernel over a float32 or compact KV cache, with the
  contract of the numba kernel in attention/decode.py (which stays as the fallback).
- `rmsnorm`, `rope`, `swiglu`: a decode step's small operations, whose NumPy versions (in
  model/llama.py, used for prompts) cost more in call overhead than in arithmetic.

`available()` is False when the extension was not built (no C compiler at install time), the CPU
lacks AVX2/FMA/F16C, or SELFATTN_NATIVE=0; callers then use the NumPy and numba paths.
"""

import os
import threading

import numpy as np

from ..attention import threads

F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8  # ggml's type ids
BLOCK_BYTES = {F32: 128, F16: 64, Q4_0: 18, Q4_1: 20, Q8_0: 34}  # bytes per 32 values
PACKED_TYPES = (F16, Q4_0, Q4_1, Q8_0)  # the types a model keeps as stored (smaller than float32)
KV_CODES = {"f32": F32, "f16": F16, "q4_0": Q4_0, "q8_0": Q8_0}
# raised when a change makes decoding or prefill materially faster or slower, so that speed
# calibrations fitted before it (measure.bench.calibrate) are no longer taken for this machine's
# 2: one C call a layer per decode step, fused compact-KV kernel; 3: the C prefill kernel
# (prefill.c), decode tiles of up to 1,024 keys and groups of four rows; 4: built with -fno-wrapv
# (every kernel), prefill in column blocks, decode without a spilled accumulator
KERNELS_REVISION = 4
MAX_T = 16  # rows of x per matmul call
MAX_DIM, MAX_ROWS = 256, 256  # decode_attention's head dims and G*T rows at most

_lock = threading.Lock()  # the pool runs one kernel at a time
_mod = None
_threads = 0


def _load():
    global _mod
    if _mod is None:
        _mod = False
        if os.environ.get("SELFATTN_NATIVE", "1") != "0":
            try:
                from . import _kernels
            except ImportError:
                _kernels = None
            if _kernels is not None and _kernels.cpu_ok():
                _mod = _kernels
    return _mod or None


def _forget_pool_size():
    global _threads
    _threads = 0  # a forked child's pool has no workers: size it again on first use


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_size)


def available() -> bool:
    return _load() is not None


def _module():
    """The module, with its pool sized to selfattn's thread count."""
    global _threads
    mod = _load()
    if mod is None:
        raise RuntimeError("selfattn's compiled kernels are not available")
    n = threads.num_threads()
    if n != _threads:
        mod.set_threads(n)
        _threads = n
    return mod


class PackedMatrix:
    """A (rows, cols) weight matrix as its GGUF bytes: data (rows, row_bytes) uint8, C-contiguous.
    cols must be a multiple of 32 (every block type's block size divides it)."""

    def __init__(self, data: np.ndarray, fmt: int, cols: int):
        if fmt not in BLOCK_BYTES:
            raise ValueError(f"unsupported weight type id {fmt}")
        if cols % 32:
            raise ValueError(f"cols must be a multiple of 32, got {cols}")
        data = np.ascontiguousarray(data).view(np.uint8)
        data = data.reshape(data.shape[0], -1)
        if data.shape[1] != cols // 32 * BLOCK_BYTES[fmt]:
            raise ValueError(f"rows of {data.shape[1]} bytes do not hold {cols} values of type "
                             f"{fmt}")
        self.data, self.fmt, self.cols = data, fmt, cols
        self.rows, self.row_bytes = data.shape

    @property
    def shape(self):
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @classmethod
    def stack(cls, parts: list["PackedMatrix"]) -> "PackedMatrix":
        """Rows of several matrices of one type and width, one after another."""
        fmt, cols = parts[0].fmt, parts[0].cols
        if any(p.fmt != fmt or p.cols != cols for p in parts):
            raise ValueError("stacked matrices must share type and width")
        return cls(np.concatenate([p.data for p in parts]), fmt, cols)

    def rows_f32(self, index) -> np.ndarray:
        """Rows `index` (n,) decoded to float32 (n, cols): an embedding lookup."""
        index = np.ascontiguousarray(index, np.int64)
        out = np.empty((index.shape[0], self.cols), np.float32)
        _module().dequant_rows(self.data, self.fmt, self.cols, self.row_bytes, index, out)
        return out


def matmul(x: np.ndarray, w: PackedMatrix) -> np.ndarray:
    """x (T, cols) float32, T <= MAX_T -> (T, rows) = x @ Wᵀ."""
    mod = _module()
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != w.cols or not 1 <= x.shape[0] <= MAX_T:
        raise ValueError(f"x must be (T <= {MAX_T}, {w.cols}), got {x.shape}")
    y = np.empty((x.shape[0], w.rows), np.float32)
    with _lock:
        mod.matmul(w.data, w.fmt, w.rows, w.cols, w.row_bytes, x, x.shape[0], y)
    return y


def decode_supported(fmt: str, D: int, Dv: int, R: int, has_mask: bool, dtype) -> bool:
    """Whether decode_attention takes this call (else the numba kernel does)."""
    return (available() and not has_mask and dtype == np.float32 and D % 8 == 0 and Dv % 8 == 0
            and D <= MAX_DIM and Dv <= MAX_DIM and R <= MAX_ROWS
            and (fmt == "f32" or (D % 32 == 0 and Dv == D)))


def decode_attention(qs, k, v, fmt, S, T, j_base, chunk, C, left, right, softcap, out, lse):
    """The C twin of attention.decode.decode_chunks, same arguments (less the scratch arrays,
    which the C code allocates): qs (B, H_kv, R, D) pre-scaled
    float32; k, v (B, H_kv, S_max, row) stored rows; results into out (B, H, T, Dv), lse (B, H, T).
    Every array C-contiguous (the buffer protocol refuses anything else)."""
    mod = _module()
    B, H_kv, R, D = qs.shape
    with _lock:
        mod.decode_attention(qs, k, v, KV_CODES[fmt], B, H_kv, R, D, out.shape[3], k.shape[2],
                             k.shape[3] * k.itemsize, v.shape[3] * v.itemsize, S, T, j_base,
                             chunk, C, left, right, softcap, out, lse)


def flash_supported(fmt: str, D: int, Dv: int, has_mask: bool, dtype) -> bool:
    """Whether flash_attention takes this call (else the numba + BLAS kernel does)."""
    return (available() and not has_mask and dtype == np.float32 and D <= MAX_DIM
            and Dv <= MAX_DIM and (fmt == "f32" or (D % 8 == 0 and Dv % 8 == 0))
            and (fmt in ("f32", "f16") or (D % 32 == 0 and Dv % 32 == 0)))


def flash_attention(q, k, v, fmt, S, left, right, scale, softcap, out, lse):
    """The C prefill kernel (prefill.c): q (B, H, T, D) float32, k (B, H_kv, S_max, ·) and v
    (B, H_kv, S_max, ·) stored rows of fmt (float32 rows of D and Dv values, or a compact KV
    format), all C-contiguous, the first S keys used; query i at position S - T + i sees keys
    p - left .. p + right. Results into out (B, H, T, Dv) and lse (B, H, T) float32."""
    mod = _module()
    B, H, T, D = q.shape
    Dv = out.shape[3]
    with _lock:
        mod.flash_attention(q, k, v, KV_CODES[fmt], B, H, k.shape[1], T, D, Dv, k.shape[2],
                            k.shape[3] * k.itemsize, v.shape[3] * v.itemsize, S, left, right,
                            scale, softcap, out, lse)


def quantize_rows(x: np.ndarray, dst: np.ndarray, pos: int, fmt: str):
    """x (T, H, D) float32 -> rows pos .. pos+T-1 of each head of dst (1, H, S_max, row items)
    in place, in fmt (f16, q8_0, q4_0): ggml's rounding, bit for bit as kvformat.quantize."""
    x = np.ascontiguousarray(x, np.float32)
    T, H, D = x.shape
    if dst.ndim != 4 or dst.shape[:2] != (1, H) or not 0 <= pos <= dst.shape[2] - T:
        raise ValueError(f"quantize_rows: {T} rows of {H} heads at {pos} into {dst.shape}")
    row_bytes = dst.shape[3] * dst.itemsize
    _module().quantize_rows(x, T, H, D, KV_CODES[fmt], dst, pos * row_bytes,
                            dst.shape[2] * row_bytes, row_bytes, row_bytes)


def layer_step(x: np.ndarray, layer_args: tuple, cos: np.ndarray, sin: np.ndarray, k: np.ndarray,
               v: np.ndarray, kv_fmt: str, pos: int, left: int, j_base: int, chunk: int,
               n_chunks: int) -> float:
    """One token through one llama layer (step.c), x (dim,) float32 updated in place; writes the
    token's K/V at pos of this layer's cache k, v (1, H_kv, S_max, row) and attends over 0..pos
    (keys from pos - left on; j_base, chunk, n_chunks: attention.decode.split_keys). layer_args:
    the layer's arrays and sizes, as model.llama.Llama.step_args builds them. Returns the seconds
    spent in attention (the cache write included)."""
    mod = _module()
    with _lock:
        return mod.layer_step(x, *layer_args[:11], cos, sin, k, v, KV_CODES[kv_fmt],
                              *layer_args[11:], k.shape[2], k.shape[3] * k.itemsize, pos, left,
                              j_base, chunk, n_chunks)


def fma_gflops(n_threads: int, seconds: float = 0.05, reps: int = 5) -> float:
    """This machine's float32 FMA throughput (GFLOP/s, an FMA counted as 2 FLOPs) on n_threads
    of the kernels' pool: registers-only FMA chains (peak.c), best of `reps` runs of ~`seconds`."""
    import time

    global _threads
    if not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
    with _lock:
        mod = _load()
        if mod is None:
            raise RuntimeError("selfattn's compiled kernels are not available")
        mod.set_threads(n_threads)
        _threads = n_threads  # the next kernel call sizes the pool back
        tasks = 4 * n_threads  # taken dynamically: a late-waking worker still gets its share
        sums = np.empty(tasks, np.float32)

        def run(iters):
            t = time.perf_counter()
            mod.fma_loop(iters, tasks, sums)
            return time.perf_counter() - t

        iters = 100_000
        iters = max(iters, int(iters * seconds / max(run(iters), 1e-6)))
        best = min(run(iters) for _ in range(reps))
    if not np.isfinite(sums).all():
        raise RuntimeError("fma_loop: the chains' sums are not finite")
    return tasks * iters * 12 * 16 / best / 1e9


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, n) float32 -> x / sqrt(mean(x²) + eps) · w."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    _module().rmsnorm(x, w, eps, x.shape[0], x.shape[1], out)
    return out


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: int) -> np.ndarray:
    """x (T, heads, D) float32 C-contiguous, in place: the halves of the first 2·half values of each
    head rotated by the angles of positions pos .. pos+T-1 (cos, sin (positions, half))."""
    T, heads, D = x.shape
    _module().rope(x, T, heads, D, cos.shape[1], cos, sin, pos)
    return x


def swiglu(gu: np.ndarray) -> np.ndarray:
    """gu (T, 2·ffn): gate then up -> silu(gate) · up (T, ffn)."""
    gu = np.ascontiguousarray(gu, np.float32)
    T, ffn = gu.shape[0], gu.shape[1] // 2
    out = np.empty((T, ffn), np.float32)
    _module().swiglu(gu, T, ffn, out)
    return out
