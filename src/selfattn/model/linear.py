"""A linear layer over a weight matrix held as its GGUF blocks: y = x @ Wᵀ, W (out, in).

The matrix is the file's own bytes (memory-mapped, never copied), in any type the compiled kernels
read (selfattn.formats). A step of a few tokens multiplies against the blocks, decoded in
registers (decoding reads every weight once a token: a stream over the compact bytes). A prompt
decodes a tile of the matrix at a time into a float32 buffer that stays in cache and multiplies
it with a register-blocked kernel (native/gemm.c), so a float32 copy of the matrix never
exists. The forward pass does not know which type a layer holds (gpt-fast and mlx-lm swap in a
quantized Linear the same way).

Without the compiled kernels (a CPU without AVX2/FMA/F16C, or SELFATTN_NATIVE=0) the matrix is
dequantized to float32 once at load (gguf's reference dequantizer) and multiplied with BLAS.
"""

import numpy as np

from .. import native

# Steps of up to FEW_PASSES x native.dot_rows() tokens go through the one-token loops (native.
# matvecs: dot_rows tokens a pass, each block decoded in registers once for them), longer ones
# through the GEMM (native.gemm), whose float32 tiles cost as much for 1 token as for 16: on an
# 8B-sized matrix matvecs took 0.2-0.9x the GEMM's time up to 8 tokens at avx512 and up to 4 at
# avx2, and no less past that. Each row gets the bits it gets alone, as in a decode step.
FEW_PASSES = 2


def takes_gemm(T: int) -> bool:
    """Whether T rows of x go through the GEMM (native.gemm, each row the bits it gets in any
    other call of the GEMM) rather than the one-token loops."""
    return T > FEW_PASSES * native.dot_rows()


class Linear:
    def __init__(self, packed: "native.PackedMatrix | None" = None, f32: np.ndarray | None = None):
        if (packed is None) == (f32 is None):
            raise ValueError("a Linear holds either blocks or a float32 matrix")
        self.packed, self.f32 = packed, f32
        self.shape = packed.shape if packed is not None else f32.shape

    @property
    def nbytes(self) -> int:
        """Bytes of weights this layer holds."""
        return self.packed.nbytes if self.packed is not None else self.f32.nbytes

    def __call__(self, x: np.ndarray, alone: bool = False) -> np.ndarray:
        """x (T, in) float32 -> (T, out). alone: each row of x is a different sequence's token,
        and each row of the result is exactly what that row alone gives (batched decode steps)."""
        if alone:
            if self.f32 is not None:
                return np.concatenate([x[i:i + 1] @ self.f32.T for i in range(x.shape[0])])
            return np.concatenate([native.matvecs(x[i:i + native.MAX_T], self.packed)
                                   for i in range(0, x.shape[0], native.MAX_T)])
        if self.f32 is not None:
            return x @ self.f32.T
        if not takes_gemm(x.shape[0]):
            return native.matvecs(x, self.packed)
        return native.gemm(x, self.packed)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` as float32 (n, in): an embedding lookup."""
        if self.f32 is not None:
            return self.f32[index]
        return self.packed.rows_f32(index)

    def split(self, sizes) -> list["Linear"]:
        """Consecutive row ranges as Linears of their own (a fused tensor's parts), in place."""
        out, r0 = [], 0
        for n in sizes:
            if self.packed is not None:
                p = self.packed
                out.append(Linear(native.PackedMatrix(p.data[r0:r0 + n], p.fmt, p.cols)))
            else:
                out.append(Linear(f32=self.f32[r0:r0 + n]))
            r0 += n
        if r0 != self.shape[0]:
            raise ValueError(f"parts of {sum(sizes)} rows do not make {self.shape[0]}")
        return out
