"""One table of tensor formats: GGUF's weight types and the KV cache's types.

Every part of selfattn that needs a type's block size or bytes reads it here: the compiled
kernels' Python side, the model loader, the KV cache, the planner and the CLI (gguf-py keeps the
same table as GGML_QUANT_SIZES; a test holds the two equal). `kernels` says whether selfattn's
compiled kernels read the type in place; `kv` whether a KV cache may be stored in it.

This module imports nothing from selfattn: it is the bottom layer.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str  # lower case, as the CLI takes it: "q4_k"
    type_id: int  # ggml's type id, as stored in a GGUF tensor info
    block: int  # values per block
    block_bytes: int  # bytes per block
    kernels: bool = False  # the compiled kernels decode it in place
    kv: bool = False  # a KV cache type

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def row_bytes(self, n: int) -> int:
        """Bytes a row of n values takes; ValueError when n is not a whole number of blocks."""
        if n % self.block:
            raise ValueError(f"a row of {self.name} holds a multiple of {self.block} values, "
                             f"not {n}")
        return n // self.block * self.block_bytes


FORMATS = [
    Format("f32", 0, 1, 4, kernels=True, kv=True),
    Format("f16", 1, 1, 2, kernels=True, kv=True),
    Format("q4_0", 2, 32, 18, kernels=True, kv=True),
    Format("q4_1", 3, 32, 20, kernels=True),
    Format("q5_0", 6, 32, 22, kernels=True),
    Format("q5_1", 7, 32, 24, kernels=True),
    Format("q8_0", 8, 32, 34, kernels=True, kv=True),
    Format("q8_1", 9, 32, 40),
    Format("q2_k", 10, 256, 84, kernels=True),
    Format("q3_k", 11, 256, 110, kernels=True),
    Format("q4_k", 12, 256, 144, kernels=True),
    Format("q5_k", 13, 256, 176, kernels=True),
    Format("q6_k", 14, 256, 210, kernels=True),
    Format("q8_k", 15, 256, 292),
    Format("iq2_xxs", 16, 256, 66),
    Format("iq2_xs", 17, 256, 74),
    Format("iq3_xxs", 18, 256, 98),
    Format("iq1_s", 19, 256, 50),
    Format("iq4_nl", 20, 32, 18, kernels=True),
    Format("iq3_s", 21, 256, 110),
    Format("iq2_s", 22, 256, 82),
    Format("iq4_xs", 23, 256, 136, kernels=True),
    Format("i8", 24, 1, 1),
    Format("i16", 25, 1, 2),
    Format("i32", 26, 1, 4),
    Format("i64", 27, 1, 8),
    Format("f64", 28, 1, 8),
    Format("iq1_m", 29, 256, 56),
    Format("bf16", 30, 1, 2, kernels=True),
    Format("tq1_0", 34, 256, 54),
    Format("tq2_0", 35, 256, 66),
    Format("mxfp4", 39, 32, 17),
]
BY_ID = {f.type_id: f for f in FORMATS}
BY_NAME = {f.name: f for f in FORMATS}
KERNEL_TYPES = tuple(f.type_id for f in FORMATS if f.kernels)
# the KV cache's types, widest first: f32, f16, q8_0, q4_0
KV_TYPES = tuple(f.name for f in sorted(FORMATS, key=lambda f: -f.bits_per_weight) if f.kv)


def by_id(type_id: int) -> Format:
    """The format of a ggml type id; ValueError naming the id for one not in the table."""
    f = BY_ID.get(type_id)
    if f is None:
        raise ValueError(f"unknown ggml tensor type id {type_id}")
    return f


def by_name(name: str) -> Format:
    f = BY_NAME.get(str(name).lower())
    if f is None:
        raise ValueError(f"unknown tensor format {name!r} (known: "
                         f"{', '.join(f.name for f in FORMATS)})")
    return f


def supported_names() -> str:
    """The weight types the compiled kernels read, for error messages."""
    return ", ".join(f.name.upper() for f in FORMATS if f.kernels)
