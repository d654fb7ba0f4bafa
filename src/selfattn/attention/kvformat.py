"""Compact KV cache formats, and reading them inside compiled kernels.

    f32   float32                                   32 bits per value
    f16   IEEE half, stored as its uint16 bits      16
    q8_0  ggml's block_q8_0: 32 values = f16 scale d + 32 int8 q;    x = d·q        8.5
    q4_0  ggml's block_q4_0: 32 values = f16 scale d + 16 bytes of nibbles; value j of the block
          is the low nibble of byte j (j < 16) or the high nibble of byte j-16, x = d·(n - 8)  4.5

A stored row of D values is a 1-d array: float32 (D), uint16 (D), or uint8 bytes (D/32 blocks of
34 or 18 bytes, exactly ggml's layout, so the bits per value are llama.cpp's). Quantization is
ggml's reference rounding, compiled (`gguf.quants.quantize` does the same in NumPy at ~0.1 ms a
call, too slow for 60 calls per generated token; the tests hold the two equal bit for bit). `load_rows` turns a block of stored rows into float32 inside a
kernel: the compact bytes are what streams from memory, and the float32 rows live in a small
scratch tile in L1.
"""

import numba as nb
import numpy as np
from numba import types
from numba.extending import overload

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


@nb.njit(nogil=True, cache=True)  # no fastmath: the rounding must be ggml's, bit for bit
def _quantize_blocks(x, code, out, d):
    """x (n, 32) float32 -> out (n, 34 | 18) uint8 quants (bytes 2..), d (n,) float32 scales.
    ggml's reference (quantize_row_q8_0_ref / q4_0_ref), as gguf-py writes it in NumPy."""
    for b in range(x.shape[0]):
        blk = x[b]
        if code == Q8_0:
            amax = np.float32(0.0)
            for i in range(32):
                amax = max(amax, abs(blk[i]))
            db = amax / np.float32(127.0)
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            for i in range(32):
                v = blk[i] * inv
                a = abs(v)
                fl = np.floor(a)
                r = fl + np.floor(np.float32(2.0) * (a - fl))  # roundf: half away from zero
                q = np.int32(r) if v >= 0 else -np.int32(r)
                out[b, 2 + i] = np.uint8(q & 0xFF)
        else:
            mx = np.float32(0.0)
            amax = np.float32(-1.0)
            for i in range(32):
                if abs(blk[i]) > amax:  # the first of the largest magnitudes, as argmax
                    amax = abs(blk[i])
                    mx = blk[i]
            db = mx / np.float32(-8.0)
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            for i in range(16):
                lo = min(max(np.int32(np.trunc(blk[i] * inv + np.float32(8.5))), 0), 15)
                hi = min(max(np.int32(np.trunc(blk[16 + i] * inv + np.float32(8.5))), 0), 15)
                out[b, 2 + i] = np.uint8(lo | (hi << 4))
        d[b] = db


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
    _quantize_blocks(blocks, format_code(fmt), out, d)
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


# -- inside kernels -------------------------------------------------------------------------------

_F16_EXP_SHIFT = np.float32(2.0 ** 112)  # rebias a half's exponent (15) to a float's (127)
# every half's value as float32, for the one scale per 32-value block (256 KiB, stays in L2)
HALF_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16) \
    .astype(np.float32)


@nb.njit(fastmath={"nsz", "contract", "reassoc"}, nogil=True, cache=True)
def _halves_to_floats(src, j0, nk, buf):
    """src[j0:j0+nk] (rows of uint16 half bits) -> buf[:nk] float32. Branch-free, so LLVM
    vectorizes it: the magnitude bits shifted into a float's place and scaled by 2^112 (exact for
    normals and subnormals), then the sign, and exponent 31 (inf/NaN) forced to 255.
    (Loops run over slice lengths: with computed offsets numba's index code stays scalar.)"""
    bits = buf.view(np.uint32)
    for jj in range(nk):
        row = src[j0 + jj]
        out = bits[jj]
        val = buf[jj]
        n = row.shape[0]
        for i in range(n):
            out[i] = np.uint32(row[i] & 0x7FFF) << 13
        for i in range(n):
            val[i] = val[i] * _F16_EXP_SHIFT
        for i in range(n):
            h = np.uint32(row[i])
            special = np.uint32(0x7F800000) if (h & 0x7C00) == 0x7C00 else np.uint32(0)
            out[i] = out[i] | ((h & 0x8000) << 16) | special


@nb.njit(fastmath={"nsz", "contract", "reassoc"}, nogil=True, cache=True)
def _blocks_to_floats(src, j0, nk, code, table, buf):
    """src[j0:j0+nk] (rows of ggml q8_0 / q4_0 blocks, uint8) -> buf[:nk] float32."""
    D = buf.shape[1]
    signed = src.view(np.int8)
    for jj in range(nk):
        row = src[j0 + jj]
        out = buf[jj]
        if code == Q8_0:
            qrow = signed[j0 + jj]
            for blk in range(D // 32):
                o = blk * 34
                d = table[np.int32(row[o]) | (np.int32(row[o + 1]) << 8)]
                qs = qrow[o + 2:o + 34]
                dst = out[blk * 32:blk * 32 + 32]
                for i in range(qs.shape[0]):
                    dst[i] = d * np.float32(qs[i])
        else:
            for blk in range(D // 32):
                o = blk * 18
                d = table[np.int32(row[o]) | (np.int32(row[o + 1]) << 8)]
                qs = row[o + 2:o + 18]
                lo = out[blk * 32:blk * 32 + 16]
                hi = out[blk * 32 + 16:blk * 32 + 32]
                for i in range(qs.shape[0]):
                    lo[i] = d * np.float32(np.int32(qs[i] & 0x0F) - 8)
                for i in range(qs.shape[0]):
                    hi[i] = d * np.float32(np.int32(qs[i] >> 4) - 8)


def load_rows(src, j0, nk, code, table, buf):
    """Rows j0 .. j0+nk-1 of src (N, row items) as float32: -> (rows, base), row j at
    rows[base + j - j0]. Float rows are returned in place (src, j0); compact rows are decoded into
    buf (>= nk, D) (buf, 0). Compiled code only; the overload below picks by src's dtype."""
    raise NotImplementedError("load_rows runs inside numba-compiled kernels")


@overload(load_rows)
def _load_rows_by_dtype(src, j0, nk, code, table, buf):
    if src.dtype in (types.float32, types.float64):
        return lambda src, j0, nk, code, table, buf: (src, j0)
    if src.dtype == types.uint16:
        def halves(src, j0, nk, code, table, buf):
            _halves_to_floats(src, j0, nk, buf)
            return buf, 0
        return halves

    def blocks(src, j0, nk, code, table, buf):
        _blocks_to_floats(src, j0, nk, code, table, buf)
        return buf, 0
    return blocks


@nb.njit(parallel=True, nogil=True, cache=True)
def _decode_rows(stored, code, table, out, tile):
    """stored (N, items) -> out (N, D), `tile` rows per task (the last one may be short)."""
    N = stored.shape[0]
    for t in nb.prange(-(-N // tile)):
        j0 = t * tile
        nk = min(tile, N - j0)
        load_rows(stored, j0, nk, code, table, out[j0:j0 + nk])


def decode_rows(stored: np.ndarray, fmt: str, D: int) -> np.ndarray:
    """Stored rows (..., row items) -> float32 (..., D) with the kernels' own decoding, on all
    cores (the reference path and `inspect` read a compact cache with it; tests hold it equal to
    `dequantize`)."""
    if fmt == "f32":
        return stored
    from .threads import prepare_numba_threads

    flat = np.ascontiguousarray(stored).reshape(-1, stored.shape[-1])
    out = np.empty((flat.shape[0], D), np.float32)
    prepare_numba_threads()
    _decode_rows(flat, format_code(fmt), HALF_TABLE, out, 256)
    return out.reshape(*stored.shape[:-1], D)
