"""GGUF model files: the header, the metadata and the tensor infos, with the tensor data mapped.

selfattn reads GGUF itself rather than with gguf.GGUFReader because model files come from
strangers and can be large:
- bounded: every count, length and offset is checked against the bytes left in the file before
  anything is allocated or looped over, so a count of 2**63, arrays nested in arrays or a tensor
  past the end of the file is a ModelError naming the file, never a runaway loop;
- fast: the vocabulary's strings (string arrays) are only stepped over at open and decoded when
  their key is first read; numeric arrays are read with one np.frombuffer; tensor data is mapped
  (mmap, read-only), never read at open.
Layout (little-endian): b'GGUF', version u32 (2 or 3), tensor_count u64, kv_count u64, then the
key/value pairs (key: u64 length + UTF-8; value type u32; value), the tensor infos (name, n_dims
u32, n_dims x u64, ggml type u32, offset u64), padding to `general.alignment`, the tensor data.
The gguf package is still what dequantizes (`dequantize`).
"""

import enum
import logging
import mmap
import struct
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np

from .. import formats
from ..errors import ModelError

log = logging.getLogger(__name__)
_MISSING = object()

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # an array of arrays at most; nothing real nests deeper
_INT64_MAX = 2**63 - 1


class ValueType(enum.IntEnum):
    """GGUF metadata value types (gguf.GGUFValueType)."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# ggml tensor types by id, named as gguf.GGMLQuantizationType names them ("Q4_K")
GGMLType = enum.IntEnum("GGMLType", {f.name.upper(): f.type_id for f in formats.FORMATS})

_NUMBER_FORMATS = {  # struct format of each number type
    ValueType.UINT8: "B", ValueType.INT8: "b", ValueType.UINT16: "H", ValueType.INT16: "h",
    ValueType.UINT32: "I", ValueType.INT32: "i", ValueType.FLOAT32: "f", ValueType.BOOL: "B",
    ValueType.UINT64: "Q", ValueType.INT64: "q", ValueType.FLOAT64: "d",
}
_SCALARS = {t: struct.Struct("<" + c) for t, c in _NUMBER_FORMATS.items()}
_NUMBER_DTYPES = {t: np.dtype("<" + c) for t, c in _NUMBER_FORMATS.items()}
_MIN_SIZE = {**{t: s.size for t, s in _SCALARS.items()}, ValueType.STRING: 8,
             ValueType.ARRAY: 12}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")
_ARRAY_HEAD = struct.Struct("<IQ")
_TENSOR_TAIL = struct.Struct("<IQ")
_MIN_KV = 8 + 4 + 1  # empty key, type, one byte of value
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # empty name, one dim, type, offset

# tensor types gguf's reader gives as typed arrays; every other type is uint8 rows of blocks
_TENSOR_DTYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32,
                  27: np.int64, 28: np.float64}


class _Strings:
    """A string array not decoded yet: where it starts in the file and how many strings."""
    __slots__ = ("offset", "count")

    def __init__(self, offset, count):
        self.offset, self.count = offset, count


class Field:
    """One metadata key/value. `value`: str, int, float, bool, a numpy array (an array of
    numbers), a list of str, or a list of those (an array of arrays); string arrays are decoded
    on first access."""

    def __init__(self, file, key, offset, type_, item_type, raw):
        self._file, self.key, self.offset = file, key, offset
        self.type, self.item_type = type_, item_type  # item_type: arrays only, else None
        self._raw = raw

    @property
    def value(self):
        self._raw = self._resolve(self._raw)
        return self._raw

    def contents(self):
        """Plain Python values, as gguf's ReaderField.contents(): arrays become lists."""
        return _plain(self.value)

    def _resolve(self, v):
        if isinstance(v, _Strings):
            return self._file._decode_strings(v, self.key)
        if isinstance(v, list) and v and isinstance(v[0], (_Strings, list)):
            return [self._resolve(x) for x in v]
        return v

    def __repr__(self):
        kind = ValueType(self.type).name
        if self.item_type is not None:
            kind += f"[{ValueType(self.item_type).name}]"
        return f"Field({self.key!r}, {kind})"


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list):  # a copy: the decoded strings stay as the file has them
        return [_plain(x) for x in v] if v and not isinstance(v[0], str) else list(v)
    return v


class TensorInfo:
    """One tensor: `shape` in GGUF's ne order (innermost first), `offset` absolute in the file,
    `data` a read-only view of its bytes in the mapping (as gguf's ReaderTensor.data)."""

    __slots__ = ("_file", "name", "tensor_type", "shape", "n_elements", "n_bytes", "offset")

    def __init__(self, file, name, tensor_type, shape, n_elements, n_bytes, offset):
        self._file, self.name, self.tensor_type, self.shape = file, name, tensor_type, shape
        self.n_elements, self.n_bytes, self.offset = n_elements, n_bytes, offset

    @property
    def data_offset(self):  # gguf's name for it
        return self.offset

    @property
    def data(self) -> np.ndarray:
        buf = self._file._mapped()
        dims = tuple(reversed(self.shape))
        dtype = _TENSOR_DTYPES.get(int(self.tensor_type))
        if dtype is not None:
            return np.frombuffer(buf, dtype, self.n_elements, self.offset).reshape(dims)
        fmt = formats.by_id(int(self.tensor_type))
        rows = dims[:-1] + (dims[-1] // fmt.block * fmt.block_bytes,)
        return np.frombuffer(buf, np.uint8, self.n_bytes, self.offset).reshape(rows)

    def __repr__(self):
        return (f"TensorInfo({self.name!r}, {self.tensor_type.name}, shape={self.shape}, "
                f"offset={self.offset})")


class GGUFFile:
    """An open GGUF file (see open_gguf). `fields`: key -> Field; `tensors`: TensorInfo list in
    file order. Usable as a context manager; close() unmaps once no tensor view is alive."""

    def __init__(self, path, buf):
        self.path, self._buf, self.file_size = path, buf, len(buf)
        self._closed = False
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.fields: Mapping[str, Field] = MappingProxyType({})
        self.tensors: list[TensorInfo] = []

    def get(self, key, default=None):
        """A key's value (Field.contents()), or default."""
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def close(self):
        self._closed = True
        try:
            self._buf.close()
        except BufferError:  # tensor views still alive: the mapping goes when they do
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.fields)} keys, "
                f"{len(self.tensors)} tensors)")

    def mapping(self) -> mmap.mmap:
        """The whole file, mapped read-only (ModelError once closed)."""
        return self._mapped()

    def _mapped(self):
        if self._closed:
            raise ModelError(f"{self.path}: the file was closed")
        return self._buf

    def _decode_strings(self, lazy, key):
        buf, pos, out = self._mapped(), lazy.offset, []
        unpack = _U64.unpack_from
        try:
            for i in range(lazy.count):  # lengths were checked when the file was opened
                (n,) = unpack(buf, pos)
                out.append(buf[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
        except UnicodeDecodeError as e:
            raise ModelError(f"{self.path}: metadata key {key!r}: string {i} is not valid "
                             f"UTF-8 ({e.reason} at byte {e.start})") from None
        return out


class _Parser:
    """Walks the mapped bytes; every read is checked against the bytes left first."""

    def __init__(self, file: GGUFFile):
        self.file, self.path, self.buf, self.size = file, file.path, file._buf, file.file_size

    def fail(self, problem):
        raise ModelError(f"{self.path}: {problem}")

    def need(self, pos, n, what):
        left = self.size - pos
        if n > left:
            self.fail(f"truncated: {what} needs {n} bytes, {max(left, 0)} left")

    def text(self, raw, what):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start} of "
                      f"{raw[:40]!r})")

    def string(self, pos, what):
        """-> (the raw bytes of the string at pos, the position after it)."""
        self.need(pos, 8, what)
        (n,) = _U64.unpack_from(self.buf, pos)
        self.need(pos + 8, n, what)
        return self.buf[pos + 8:pos + 8 + n], pos + 8 + n

    # -- header -----------------------------------------------------------------------------

    def header(self):
        """-> (version, tensor_count, kv_count, position after the header)."""
        if self.buf[:4] != MAGIC:
            self.fail(f"not a GGUF file (starts with {self.buf[:4]!r}, expected {MAGIC!r})")
        self.need(0, _HEADER.size, "the header")
        _, version, n_tensors, n_kv = _HEADER.unpack_from(self.buf, 0)
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if version & 0xFFFF == 0 and swapped in (1, 2, 3):
                self.fail(f"a big-endian GGUF file (version {swapped} byte-swapped); only "
                          "little-endian files are supported")
            if version == 1:
                self.fail("GGUF version 1 is not supported (versions 2 and 3 are)")
            self.fail(f"unknown GGUF version {version} (versions 2 and 3 are supported)")
        pos = _HEADER.size
        least, left = n_kv * _MIN_KV + n_tensors * _MIN_TENSOR_INFO, self.size - pos
        if least > left:
            self.fail(f"truncated: the header announces {n_kv} metadata keys and {n_tensors} "
                      f"tensor infos, which need at least {least} bytes, {left} left")
        return version, n_tensors, n_kv, pos

    # -- metadata ---------------------------------------------------------------------------

    def fields(self, pos, count):
        fields = {}
        for i in range(count):
            start = pos
            raw, pos = self.string(pos, f"metadata key #{i}")
            key = self.text(raw, f"metadata key #{i}")
            if key in fields:
                self.fail(f"metadata key {key!r} appears twice")
            what = f"metadata key {key!r}"
            self.need(pos, 4, what)
            (vtype,) = _U32.unpack_from(self.buf, pos)
            item_type = None
            if vtype == ValueType.ARRAY:
                self.need(pos + 4, 4, what)
                (item_type,) = _U32.unpack_from(self.buf, pos + 4)
            value, pos = self.value(pos + 4, vtype, key, 0)
            fields[key] = Field(self.file, key, start, self.value_type(vtype, key), item_type,
                                value)
        return fields, pos

    def value_type(self, vtype, key):
        try:
            return ValueType(vtype)
        except ValueError:
            self.fail(f"metadata key {key!r} has value type {vtype}, which is not a GGUF type")

    def value(self, pos, vtype, key, depth):
        """-> (the value at pos, the position after it)."""
        vtype = self.value_type(vtype, key)
        what = f"metadata key {key!r}"
        if vtype == ValueType.STRING:
            raw, end = self.string(pos, what)
            return self.text(raw, f"the value of {what}"), end
        if vtype != ValueType.ARRAY:
            s = _SCALARS[vtype]
            self.need(pos, s.size, what)
            (v,) = s.unpack_from(self.buf, pos)
            return (v != 0 if vtype == ValueType.BOOL else v), pos + s.size
        if depth >= MAX_ARRAY_DEPTH:
            self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        self.need(pos, _ARRAY_HEAD.size, what)
        item, count = _ARRAY_HEAD.unpack_from(self.buf, pos)
        item = self.value_type(item, key)
        pos += _ARRAY_HEAD.size
        self.need(pos, count * _MIN_SIZE[item],
                  f"{what} (an array of {count} {item.name.lower()} values)")
        if item in _NUMBER_DTYPES:
            arr = np.frombuffer(self.buf, _NUMBER_DTYPES[item], count, pos).copy()
            end = pos + arr.nbytes
            arr = arr != 0 if item == ValueType.BOOL else arr
            arr.flags.writeable = False  # Field.value hands out this one array
            return arr, end
        if item == ValueType.STRING:
            return _Strings(pos, count), self.skip_strings(pos, count, key)
        items = []
        for _ in range(count):
            v, pos = self.value(pos, ValueType.ARRAY, key, depth + 1)
            items.append(v)
        return items, pos

    def skip_strings(self, pos, count, key):
        """The position after `count` strings at pos, each length checked on the way."""
        buf, unpack, i = self.buf, _U64.unpack_from, 0
        try:
            for i in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):
            pos = self.size + 1
        if pos > self.size:
            self.fail(f"truncated: metadata key {key!r}: string {i} of {count} runs past the "
                      "end of the file")
        return pos

    # -- tensors ----------------------------------------------------------------------------

    def alignment(self, fields):
        f = fields.get("general.alignment")
        if f is None:
            return DEFAULT_ALIGNMENT
        a = f.value
        if f.type != ValueType.UINT32 or a == 0 or a & (a - 1):
            self.fail(f"general.alignment must be a power of two stored as uint32, not "
                      f"{a!r} ({f.type.name.lower()})")
        return a

    def tensor_infos(self, pos, count):
        """-> ([(name, dims, type id, relative offset)], position after them)."""
        infos, names = [], set()
        for i in range(count):
            raw, pos = self.string(pos, f"tensor info #{i}")
            name = self.text(raw, f"the name of tensor #{i}")
            if name in names:
                self.fail(f"tensor name {name!r} appears twice")
            names.add(name)
            what = f"tensor info {name!r}"
            self.need(pos, 4, what)
            (n_dims,) = _U32.unpack_from(self.buf, pos)
            if not 1 <= n_dims <= MAX_DIMS:
                self.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            pos += 4
            self.need(pos, 8 * n_dims + _TENSOR_TAIL.size, what)
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, pos)
            type_id, offset = _TENSOR_TAIL.unpack_from(self.buf, pos + 8 * n_dims)
            pos += 8 * n_dims + _TENSOR_TAIL.size
            infos.append((name, dims, type_id, offset))
        return infos, pos

    def tensor(self, name, dims, type_id, offset, data_offset, alignment):
        try:
            fmt = formats.by_id(type_id)
        except ValueError:
            self.fail(f"tensor {name!r} has type id {type_id}, which is not a ggml type")
        n = 1
        for d in dims:
            if d < 1:
                self.fail(f"tensor {name!r} has a dimension of {d} (shape {list(dims)})")
            n *= d
            if n > _INT64_MAX:
                self.fail(f"tensor {name!r} has shape {list(dims)}: its element count "
                          "overflows int64")
        if dims[0] % fmt.block:
            self.fail(f"tensor {name!r} has rows of {dims[0]} values, not a multiple of "
                      f"{fmt.name.upper()}'s block of {fmt.block}")
        if offset % alignment:
            self.fail(f"tensor {name!r} has offset {offset}, not a multiple of the alignment "
                      f"{alignment}")
        n_bytes = n // fmt.block * fmt.block_bytes
        start = data_offset + offset
        if start + n_bytes > self.size:
            self.fail(f"tensor {name!r} runs past the end of the file (bytes {start} to "
                      f"{start + n_bytes}, file size {self.size})")
        return TensorInfo(self.file, name, GGMLType(type_id), tuple(dims), n, n_bytes, start)

    def no_overlap(self, tensors):
        by_start = sorted(tensors, key=lambda t: t.offset)
        for a, b in zip(by_start, by_start[1:]):
            if a.offset + a.n_bytes > b.offset:
                self.fail(f"tensors {a.name!r} and {b.name!r} overlap (bytes {a.offset} to "
                          f"{a.offset + a.n_bytes} and {b.offset} to {b.offset + b.n_bytes})")


def _parse(file: GGUFFile):
    p = _Parser(file)
    file.version, n_tensors, n_kv, pos = p.header()
    fields, pos = p.fields(pos, n_kv)
    file.fields = MappingProxyType(fields)
    file.alignment = p.alignment(fields)
    infos, pos = p.tensor_infos(pos, n_tensors)
    file.data_offset = -(-pos // file.alignment) * file.alignment
    file.tensors = [p.tensor(*info, file.data_offset, file.alignment) for info in infos]
    p.no_overlap(file.tensors)


def open_gguf(path) -> GGUFFile:
    """-> GGUFFile, or ModelError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise ModelError(f"{path}: not a GGUF file (it is empty)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e})") from e
    file = GGUFFile(path, buf)
    try:
        _parse(file)
    except BaseException:
        file.close()
        raise
    return file


def field(reader, key, default=_MISSING):
    """A metadata value as plain Python (str, int, float, bool, lists for arrays)."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise ModelError(f"{reader.path}: metadata key {key!r} is missing")
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
