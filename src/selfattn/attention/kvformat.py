"""Compact KV cache formats: their layout, ggml's rounding, and reading them back.

    f32   float32                                   32 bits per value
    f16   IEEE half, stored as its uint16 bits      16
    q8_0  ggml's block_q8_0: 32 values = f16 scale d + 32 int8 q;    x = d·q        8.5
    q4_0  ggml's block_q4_0: 32 values = f16 scale d + 16 bytes of nibbles; value j of the block
          is the low nibble of byte j (j < 16) or the high nibble of byte j-16, x = d·(n - 8)  4.5

A stored row of D values is a 1-d array: float32 (D), uint16 (D), or uint8 bytes (D/32 blocks of
34 or 18 bytes, exactly ggml's layout, so the bits per value are llama.cpp's). Quantization is
ggml's reference rounding, compiled (`gguf.quants.quantize` does the same in NumPy at ~0.1 ms a
call, too slow for 60 calls per generated token; the tests hold the two equal bit for bit).
Inside the numba kernels `kvformat_numba.load_rows` turns a block of stored rows into float32: the
compact bytes are what streams from memory, and the float32 rows live in a small scratch tile.
"""

import numpy as np

from .. import formats

FORMATS = formats.KV_TYPES  # f32, f16, q8_0, q4_0
BLOCK = 32
_BLOCK_BYTES = {f: formats.BY_NAME[f].block_bytes for f in FORMATS
                if formats.BY_NAME[f].block == BLOCK}
Q8_0, Q4_0 = 1, 2  # format codes the uint8 kernels branch on


def row_shape(fmt: str, D: int) -> tuple[int, np.dtype]:
    """(items per stored row, dtype) of one row of D values."""
    if fmt == "f32":
        return D, np.dtype(np.float32)
    if fmt == "f16":
        return D, np.dtype(np.uint16)
    if fmt in _BLOCK_BYTES:
        if D % BLOCK:
            raise ValueError(f"{fmt} needs a head dim that is a multiple of {BLOCK}, got {D}")
        return D // BLOCK * _BLOCK_BYTES[fmt], np.dtype(np.uint8)
    raise ValueError(f"kv format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def format_code(fmt: str) -> int:
    return {"q8_0": Q8_0, "q4_0": Q4_0}.get(fmt, 0)


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """x (..., D) float -> stored rows (..., row items) in fmt (ggml's rounding, bit for bit)."""
    x = np.ascontiguousarray(x, np.float32)
    if fmt == "f32":
        return x
    if fmt == "f16":
        return x.astype(np.float16).view(np.uint16)
    items, _ = row_shape(fmt, x.shape[-1])
    blocks = x.reshape(-1, BLOCK)
    out = np.empty((blocks.shape[0], _BLOCK_BYTES[fmt]), np.uint8)
    d = np.empty(blocks.shape[0], np.float32)
    from .kvformat_numba import quantize_blocks

    quantize_blocks(blocks, format_code(fmt), out, d)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return out.reshape(*x.shape[:-1], items)


def write_rows(x: np.ndarray, dst: np.ndarray, pos: int, fmt: str):
    """x (T, H, D) -> rows pos .. pos+T-1 of each head of a cache array dst (1, H, S_max, row
    items), quantized to fmt. The compiled twin (selfattn.native) when there is one: one call
    instead of NumPy's several, which cost more than a decode step's attention at short depths."""
    from .. import native

    if fmt != "f32" and native.available() and dst.flags.c_contiguous:
        native.quantize_rows(x, dst, pos, fmt)
    else:
        dst[0, :, pos:pos + x.shape[0]] = quantize(x.transpose(1, 0, 2), fmt)


def dequantize(stored: np.ndarray, fmt: str, D: int) -> np.ndarray:
    """Stored rows (..., row items) -> float32 (..., D): the plain NumPy reading, via gguf."""
    if fmt == "f32":
        return stored
    if fmt == "f16":
        return stored.view(np.float16).astype(np.float32)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    t = GGMLQuantizationType.Q8_0 if fmt == "q8_0" else GGMLQuantizationType.Q4_0
    return gguf_dequantize(stored, t).reshape(*stored.shape[:-1], D).astype(np.float32)


# every half's value as float32, for the one scale per 32-value block (256 KiB, stays in L2)
HALF_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16) \
    .astype(np.float32)


def decode_rows(stored: np.ndarray, fmt: str, D: int) -> np.ndarray:
    """Stored rows (..., row items) -> float32 (..., D) with the kernels' own decoding, on all
    cores (the reference path and `inspect` read a compact cache with it; tests hold it equal to
    `dequantize`)."""
    if fmt == "f32":
        return stored
    from . import jit
    from .kvformat_numba import decode_rows_tiled
    from .threads import prepare_numba_threads

    flat = np.ascontiguousarray(stored).reshape(-1, stored.shape[-1])
    out = np.empty((flat.shape[0], D), np.float32)
    prepare_numba_threads()
    with jit.parallel_lock:
        decode_rows_tiled(flat, format_code(fmt), HALF_TABLE, out, 256)
    return out.reshape(*stored.shape[:-1], D)
