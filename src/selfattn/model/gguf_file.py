"""GGUF access through the `gguf` package: open with clear errors, read metadata, dequantize."""

import logging
from pathlib import Path

import numpy as np

from ..errors import ModelError

log = logging.getLogger(__name__)
_MISSING = object()


def open_gguf(path):
    """-> gguf.GGUFReader, or ModelError naming the file and the problem."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises many kinds on a damaged file
        raise ModelError(f"{path}: damaged or truncated GGUF file ({type(e).__name__}: {e})") from e


def field(reader, key, default=_MISSING):
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise ModelError(f"{reader.data.filename}: metadata key {key!r} is missing")
        return default
    return f.contents()


def tensor_index(reader):
    return {t.name: t for t in reader.tensors}


def dequantize(tensor, path) -> np.ndarray:
    """A GGUF tensor as float32, numpy shape (reverse of GGUF's ne order)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        data = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        name = GGMLQuantizationType(tensor.tensor_type).name
        raise ModelError(f"{path}: tensor {tensor.name!r} has type {name}, which the gguf "
                         "package cannot dequantize") from None
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{path}: tensor {tensor.name!r} is unreadable ({e})") from e
    return np.ascontiguousarray(data.reshape(shape), dtype=np.float32)
