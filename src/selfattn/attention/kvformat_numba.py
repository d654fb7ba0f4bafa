"""The numba side of the compact KV formats (attention/kvformat.py): ggml's quantizer for the
reference path, and the row decoders the numba attention kernels call (`load_rows`, picked by the
stored dtype at compile time). Imported only when first needed."""

import numpy as np

from .jit import CACHE, nb
from .kvformat import Q8_0

_F16_EXP_SHIFT = np.float32(2.0 ** 112)  # rebias a half's exponent (15) to a float's (127)

@nb.njit(nogil=True, cache=CACHE)  # no fastmath: the rounding must be ggml's, bit for bit
def quantize_blocks(x, code, out, d):
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


@nb.njit(fastmath={"nsz", "contract", "reassoc"}, nogil=True, cache=CACHE)
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


@nb.njit(fastmath={"nsz", "contract", "reassoc"}, nogil=True, cache=CACHE)
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


@nb.extending.overload(load_rows)
def _load_rows_by_dtype(src, j0, nk, code, table, buf):
    if src.dtype in (nb.types.float32, nb.types.float64):
        return lambda src, j0, nk, code, table, buf: (src, j0)
    if src.dtype == nb.types.uint16:
        def halves(src, j0, nk, code, table, buf):
            _halves_to_floats(src, j0, nk, buf)
            return buf, 0
        return halves

    def blocks(src, j0, nk, code, table, buf):
        _blocks_to_floats(src, j0, nk, code, table, buf)
        return buf, 0
    return blocks


@nb.njit(parallel=True, nogil=True, cache=CACHE)
def decode_rows_tiled(stored, code, table, out, tile):
    """stored (N, items) -> out (N, D), `tile` rows per task (the last one may be short)."""
    N = stored.shape[0]
    for t in nb.prange(-(-N // tile)):
        j0 = t * tile
        nk = min(tile, N - j0)
        load_rows(stored, j0, nk, code, table, out[j0:j0 + nk])
