"""selfattn's compiled kernels: C with x86 SIMD intrinsics (src/selfattn/native/*.c), built at
install time by setup.py as the extension module `_kernels`, once per instruction-set level
(`avx2`: AVX2 + FMA + F16C; `avx512`: AVX-512 F/BW/VL/DQ as well; `portable`: the same sources
over plain-C intrinsics (portable.h), the one level on a CPU other than x86, NEON on aarch64).
The widest level this CPU and its OS run is chosen at import (cpuid and XCR0; on x86 never the
portable one); SELFATTN_ISA=avx2|avx512|portable forces one, and SELFATTN_ISA=generic (or
SELFATTN_NATIVE=0) runs without compiled kernels. `isa()` names the level in use. Each kernel
releases the GIL while it runs, on its own small thread pool (pool.c).

- `matmul(x, w)`: x @ Wᵀ for a few rows of x, with W kept in its GGUF type (`PackedMatrix`:
  every type selfattn.formats marks `kernels`, f32 / f16 / bf16, the 32-value block types and
  the 256-value K-quants, decoded inside the kernel from the stored bytes). Decoding a token
  streams the file's compact bytes instead of a float32 copy.
- `matvecs(x, w)`: `matmul` with each row of the result exactly what that row of x alone gives
  (several sequences' decode steps at once, each weight read once for all of them).
- `gemm(x, w)`: the same product for a prompt's many rows: tiles of W decoded to float32 in
  cache and multiplied by a register-blocked kernel (gemm.c); no float32 copy of W, no BLAS.
- `PackedMatrix.dequantize(r0, r1)`, `PackedMatrix.rows_f32(index)`: stored rows to float32,
  bit for bit what gguf's dequantize gives (embedding lookups; the reference for the tests).
- `StepLayer`, `StepSeq`, `layer_step(...)`: one token of each of B sequences through a model's
  llama-style layers, all of them in one C call.
- `flash_attention(...)`: the prefill kernel (blocked online softmax over a float32 or compact
  KV cache), with the contract of the numba + BLAS kernel in attention/flash.py (which stays as
  the fallback, and for masks and float64).
- `decode_attention(...)`: the split-K decode kernel over a float32 or compact KV cache, with the
  contract of the numba kernel in attention/decode_numba.py (which stays as the fallback).
- `touch_pages(buf)`: a mapped file's pages faulted in by several reader threads (pages.c).
- `rmsnorm`, `rope`, `swiglu`: a decode step's small operations, whose NumPy versions (in
  model/transformer.py, used without them) cost more in call overhead than in arithmetic.

`available()` is False when the extension was not built (no C compiler at install time), an x86
CPU lacks AVX2/FMA/F16C (unless SELFATTN_ISA=portable), SELFATTN_ISA=generic or
SELFATTN_NATIVE=0; callers then use the NumPy and numba paths.
"""

import contextlib
import os
import threading

import numpy as np

from .. import formats
from .. import runtime

# ggml's type ids of the KV formats
F32, F16, Q4_0, Q4_1, Q8_0 = (formats.by_name(n).type_id for n in ("f32", "f16", "q4_0", "q4_1",
                                                                     "q8_0"))
KV_CODES = {f.name: f.type_id for f in formats.FORMATS if f.kv}
# raised when a change makes decoding or prefill materially faster or slower, so that speed
# calibrations fitted before it (measure.bench.calibrate) are no longer taken for this machine's
# 2: one C call a layer per decode step, fused compact-KV kernel; 3: the C prefill kernel
# (prefill.c), decode tiles of up to 1,024 keys and groups of four rows; 4: built with -fno-wrapv
# (every kernel), prefill in column blocks, decode without a spilled accumulator;
# 5: every weight type read in place, prompts through gemm.c instead of BLAS over float32 copies;
# 6: one copy of the kernels per instruction-set level (a calibration also names its level);
# 7: a 512-bit Q6_K row loop for one token; 8: AVX-512 rows of q4/q8/float weights in 16-lane
# blocks, a decode step's layers in one C call
KERNELS_REVISION = 8
# the extension's limits (kernels.h), restated only where it was not built: rows of x per matmul
# call, head dims of the attention kernels, G*T rows of a decode call
MAX_T, MAX_DIM, MAX_ROWS = 16, 256, 256
# setup.py's levels, widest first, and the float32 lanes of each one's widest vectors; "generic"
# is the name of running without compiled kernels
LEVELS = {"avx512": 16, "avx2": 8, "portable": 8}

_lock = threading.Lock()  # the pool runs one kernel at a time
_mod = None
_threads = 0


def _load():
    global _mod, MAX_T, MAX_DIM, MAX_ROWS
    if _mod is None:
        # a level the CPU lacks, or a misspelt one, is an error every time it is asked for,
        # never a silent run without the kernels
        want = os.environ.get("SELFATTN_ISA", "").strip().lower()
        if want not in ("", "generic", *LEVELS):
            raise ValueError(f"SELFATTN_ISA={want!r}: use one of generic, {', '.join(LEVELS)}")
        mod = False
        if os.environ.get("SELFATTN_NATIVE", "1") != "0" and want != "generic":
            try:
                from . import _kernels
            except ImportError:
                _kernels = None
            if _kernels is not None and want:
                if want not in _kernels.isas():
                    raise ValueError(f"SELFATTN_ISA={want}: this CPU runs "
                                     f"{', '.join(_kernels.isas())} kernels")
                _kernels.set_isa(want)
                mod = _kernels
            elif _kernels is not None and _kernels.cpu_ok():
                mod = _kernels
            if mod:
                MAX_T, MAX_DIM, MAX_ROWS = _kernels.MAX_T, _kernels.MAX_DIM, _kernels.MAX_ROWS
        _mod = mod
    return _mod or None


def _in_child():
    """A forked child's pool has no workers: size it again on first use. fork() waited for the
    kernel in flight (it takes _lock first), so the pool's state was quiet when copied."""
    global _threads, _lock
    _threads = 0
    _lock = threading.Lock()


os.register_at_fork(before=lambda: _lock.acquire(), after_in_parent=lambda: _lock.release(),
                    after_in_child=_in_child)


def available() -> bool:
    return _load() is not None


def isa() -> str:
    """The instruction-set level the kernels run at: "avx512", "avx2", or "generic" (no compiled
    kernels: the NumPy and numba paths)."""
    mod = _load()
    return mod.isa() if mod is not None else "generic"


def describe_isa(level: str | None = None) -> str:
    """A level (isa() by default) in words, for the tables that name the kernels they timed."""
    level = level or isa()
    if level in LEVELS:
        return f"{level} ({LEVELS[level]} float32 lanes)"
    return f"{level} (no compiled kernels: NumPy and numba)"


def isas() -> list[str]:
    """The levels this CPU and OS run, widest first, then "generic"."""
    mod = _load()
    return (mod.isas() if mod is not None else []) + ["generic"]


@contextlib.contextmanager
def using_isa(level: str):
    """Run the compiled kernels at `level` (one of isas() but "generic") inside the block, so
    tests and benchmarks compare levels in one process."""
    mod = _load()
    if mod is None or level not in mod.isas():
        raise ValueError(f"this machine runs {', '.join(isas())} kernels, not {level!r}")
    with _lock:
        before = mod.isa()
        mod.set_isa(level)
    try:
        yield
    finally:
        with _lock:
            mod.set_isa(before)


def _module():
    """The module, with its pool sized to selfattn's thread count."""
    global _threads
    mod = _load()
    if mod is None:
        raise RuntimeError("selfattn's compiled kernels are not available")
    n = runtime.num_threads()
    if n != _threads:
        mod.set_threads(n)
        _threads = n
    return mod


class PackedMatrix:
    """A (rows, cols) weight matrix as its GGUF bytes: data (rows, row_bytes) C-contiguous (any
    dtype, viewed as bytes; a read-only memmap is used in place, never copied), fmt a ggml type id
    the kernels read (selfattn.formats: `kernels`), cols a multiple of the type's block size."""

    def __init__(self, data: np.ndarray, fmt: int, cols: int):
        f = formats.BY_ID.get(fmt)
        if f is None or not f.kernels:
            raise ValueError(f"unsupported weight type id {fmt} (the kernels read "
                             f"{formats.supported_names()})")
        if cols < 1 or cols % f.block:
            raise ValueError(f"cols must be a multiple of {f.block} for {f.name}, got {cols}")
        data = np.asarray(data)
        if not data.flags.c_contiguous:
            raise ValueError("PackedMatrix: data must be C-contiguous (it is used in place)")
        data = data.view(np.uint8)
        data = data.reshape(data.shape[0], -1)
        if data.shape[1] != f.row_bytes(cols):
            raise ValueError(f"rows of {data.shape[1]} bytes do not hold {cols} values of "
                             f"{f.name}")
        self.data, self.fmt, self.cols = data, fmt, cols
        self.rows, self.row_bytes = data.shape

    @property
    def shape(self):
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self, r0: int = 0, r1: int | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Rows r0 .. r1-1 as float32 (r1 - r0, cols), exactly gguf's dequantize, decoded on the
        kernels' threads; into `out` (C-contiguous float32 of that shape) when given."""
        r1 = self.rows if r1 is None else r1
        if not 0 <= r0 <= r1 <= self.rows:
            raise ValueError(f"rows {r0} .. {r1} outside a matrix of {self.rows}")
        if out is None:
            out = np.empty((r1 - r0, self.cols), np.float32)
        elif (out.dtype != np.float32 or out.shape != (r1 - r0, self.cols)
              or not out.flags.c_contiguous):
            raise ValueError(f"out must be C-contiguous float32 {(r1 - r0, self.cols)}")
        mod = _module()
        with _lock:
            mod.dequant_range(self.data, self.fmt, self.cols, self.row_bytes, r0, r1, out)
        return out

    def rows_f32(self, index) -> np.ndarray:
        """Rows `index` (n,) decoded to float32 (n, cols): an embedding lookup."""
        index = np.ascontiguousarray(index, np.int64)
        out = np.empty((index.shape[0], self.cols), np.float32)
        mod = _module()
        with _lock:
            mod.dequant_rows(self.data, self.fmt, self.cols, self.row_bytes, index, out)
        return out


def _product(kernel: str, x: np.ndarray, w: PackedMatrix, max_t) -> np.ndarray:
    mod = _module()
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != w.cols or not 1 <= x.shape[0] <= (max_t or x.shape[0]):
        raise ValueError(f"x must be (T{f' <= {max_t}' if max_t else ' >= 1'}, {w.cols}), "
                         f"got {x.shape}")
    y = np.empty((x.shape[0], w.rows), np.float32)
    with _lock:
        getattr(mod, kernel)(w.data, w.fmt, w.rows, w.cols, w.row_bytes, x, x.shape[0], y)
    return y


def matmul(x: np.ndarray, w: PackedMatrix) -> np.ndarray:
    """x (T, cols) float32, T <= MAX_T -> (T, rows) = x @ Wᵀ."""
    return _product("matmul", x, w, MAX_T)


def matvecs(x: np.ndarray, w: PackedMatrix) -> np.ndarray:
    """x (T, cols) float32, T <= MAX_T -> (T, rows) = x @ Wᵀ, each row exactly what `matmul` of
    that row alone gives (every weight still read from memory once for all T)."""
    return _product("matvecs", x, w, MAX_T)


def dot_rows() -> int:
    """Rows of x the level's matvecs takes a pass, each weight block decoded once for all of them
    (4 at avx512, 2 below)."""
    return _module().dot_rows()


def gemm(x: np.ndarray, w: PackedMatrix) -> np.ndarray:
    """x (T, cols) float32, any T >= 1 -> (T, rows) = x @ Wᵀ: tiles of W decoded to float32 in
    cache and multiplied by a register-blocked kernel (gemm.c), for prompts."""
    return _product("gemm", x, w, None)


def decode_supported(fmt: str, D: int, Dv: int, R: int, has_mask: bool, dtype) -> bool:
    """Whether decode_attention takes this call (else the numba kernel does)."""
    return (available() and not has_mask and dtype == np.float32 and D % 8 == 0 and Dv % 8 == 0
            and D <= MAX_DIM and Dv <= MAX_DIM and R <= MAX_ROWS
            and (fmt == "f32" or (D % 32 == 0 and Dv == D)))


def decode_attention(qs, k, v, fmt, S, T, j_base, chunk, C, left, right, softcap, out, lse):
    """The C twin of attention.decode_numba.decode_chunks, same arguments (less the scratch arrays,
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


class StepLayer:
    """One llama layer's weights as native.layer_step takes them: attn_norm, ffn_norm (dim,)
    float32; b_qkv (q_dim + 2·kv_dim,) float32 or None; q (H·D, dim), k and v (H_kv·D, dim),
    o (dim, H·D), gate and up (ffn, dim), down (dim, ffn) PackedMatrix, each in its own type;
    rope_half: the rotated pairs per head; scale: the attention scale. Checked here, and every
    size again in C."""

    def __init__(self, attn_norm, ffn_norm, b_qkv, q, k, v, o, gate, up, down, dim: int,
                 n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int, rope_half: int,
                 eps: float, scale: float):
        q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
        shapes = {"w_q": (q, (q_dim, dim)), "w_k": (k, (kv_dim, dim)), "w_v": (v, (kv_dim, dim)),
                  "w_o": (o, (dim, q_dim)), "w_gate": (gate, (ffn_dim, dim)),
                  "w_up": (up, (ffn_dim, dim)), "w_down": (down, (dim, ffn_dim))}
        for name, (m, shape) in shapes.items():
            if not isinstance(m, PackedMatrix) or m.shape != shape:
                raise ValueError(f"StepLayer: {name} must be a PackedMatrix {shape}, got "
                                 f"{getattr(m, 'shape', type(m).__name__)}")

        def vector(a, n, name):
            a = np.ascontiguousarray(a, np.float32)
            if a.shape != (n,):
                raise ValueError(f"StepLayer: {name} must be ({n},), got {a.shape}")
            return a

        b = None if b_qkv is None else vector(b_qkv, q_dim + 2 * kv_dim, "b_qkv")
        self.mats = (q, k, v, o, gate, up, down)
        # the C struct, built and checked once (it holds the arrays while it lives)
        self._c = _module().step_layer(
            vector(attn_norm, dim, "attn_norm"), vector(ffn_norm, dim, "ffn_norm"), b,
            *(part for m in self.mats for part in (m.data, m.fmt)), dim, n_heads, n_kv_heads,
            head_dim, ffn_dim, rope_half, float(eps), float(scale))


class StepSeq:
    """One sequence's part of native.layer_step: its cache, k and v (n_layers, 1, H_kv, S_max,
    row), or one layer's (1, H_kv, S_max, row), in kv_fmt; and where its token goes: at pos,
    attending keys from pos - left on (j_base, chunk, n_chunks: attention.decode.split_keys).
    Checked again in C."""

    __slots__ = ("_args",)

    def __init__(self, k: np.ndarray, v: np.ndarray, kv_fmt: str, pos: int, left: int,
                 j_base: int, chunk: int, n_chunks: int):
        if k.ndim not in (4, 5) or k.shape != v.shape or k.dtype != v.dtype or k.shape[-4] != 1:
            raise ValueError(f"StepSeq: k and v must be a cache's (n_layers, 1, H_kv, S_max, row), "
                             f"got {k.shape} and {v.shape}")
        self._args = (k, v, KV_CODES[kv_fmt], k.shape[-2], k.shape[-1] * k.itemsize, pos, left,
                      j_base, chunk, n_chunks)


def layer_step(x: np.ndarray, layers: "list[StepLayer]", cos: np.ndarray, sin: np.ndarray,
               seqs: "list[StepSeq]") -> tuple[float, float, float]:
    """One token of each of B = len(seqs) sequences through `layers` in turn (step.c), layer i
    on layer i of each sequence's cache, in one call (the GIL released throughout): x (B, dim)
    float32 updated in place; each token writes its K/V into its cache and attends over it;
    cos, sin (positions > every pos, rope_half). Each row is the bits it gets with B = 1 (the
    matmuls read each weight once for all rows; see sa_matvecs). Returns seconds, summed over
    the layers: (attention with the cache writes, the weight matmuls, the whole step)."""
    mod = _module()
    with _lock:
        return mod.layer_step(x, tuple(L._c for L in layers), cos, sin,
                              tuple(s._args for s in seqs))


def touch_pages(buf, readers: int = 4) -> bool:
    """Fault in every page of buf (a mapped file) from `readers` threads at once, so a cold
    file is read at the disk's parallel speed rather than one page fault at a time. Returns
    False (and does nothing) without the compiled kernels."""
    mod = _load()
    if mod is None:
        return False
    mod.touch_pages(buf, readers)
    return True


@contextlib.contextmanager
def _pool_of(n_threads: int):
    """The module, its pool set to n_threads for a measurement (the next kernel call sizes it
    back to selfattn's count), under the kernels' lock."""
    global _threads
    if not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
    with _lock:
        mod = _load()
        if mod is None:
            raise RuntimeError("selfattn's compiled kernels are not available")
        mod.set_threads(n_threads)
        _threads = n_threads
        yield mod


def fma_gflops(n_threads: int, seconds: float = 0.05, reps: int = 5, samples: bool = False):
    """This machine's float32 FMA throughput (GFLOP/s, an FMA counted as 2 FLOPs) on n_threads
    of the kernels' pool: registers-only FMA chains (peak.c) at the widest vectors of the level
    in use (isa()), best of `reps` runs of ~`seconds` (samples: every run's, as a list)."""
    import time

    with _pool_of(n_threads) as mod:
        lanes = mod.lanes()
        tasks = 4 * n_threads  # taken dynamically: a late-waking worker still gets its share
        sums = np.empty(tasks, np.float32)

        def run(iters):
            t = time.perf_counter()
            mod.fma_loop(iters, tasks, sums)
            return time.perf_counter() - t

        iters = 100_000
        iters = max(iters, int(iters * seconds / max(run(iters), 1e-6)))
        times = [run(iters) for _ in range(reps)]
    if not np.isfinite(sums).all():
        raise RuntimeError("fma_loop: the chains' sums are not finite")
    rates = [tasks * iters * 12 * 2 * lanes / t / 1e9 for t in times]
    return rates if samples else max(rates)


def read_gbs(n_threads: int, nbytes: int = 512 << 20, reps: int = 5, samples: bool = False):
    """This machine's read bandwidth (GB/s) on n_threads of the kernels' pool: one array of
    nbytes, much larger than the last-level cache, summed in 1 MiB tasks with eight
    accumulators a thread (peak.c), best of `reps` passes after a first (samples: every pass's,
    as a list)."""
    import time

    x = np.ones(nbytes // 4, np.float32)
    sums = np.empty(-(-x.nbytes // (1 << 20)), np.float32)
    with _pool_of(n_threads) as mod:
        mod.read_sum(x, sums)  # pages touched, threads awake
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            mod.read_sum(x, sums)
            times.append(time.perf_counter() - t)
    if float(sums.sum()) != x.size:
        raise RuntimeError("read_sum: the array's sum is wrong")
    rates = [x.nbytes / t / 1e9 for t in times]
    return rates if samples else max(rates)


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
