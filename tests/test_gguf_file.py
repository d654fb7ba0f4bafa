"""selfattn's own GGUF reader: the same fields and tensors as gguf.GGUFReader on good files,
a prompt ModelError naming the file on hostile ones, and fast opening."""

import os
import struct
import time
import tracemalloc

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from selfattn.errors import ModelError
from selfattn.model import default_model_path
from selfattn.model.gguf_file import dequantize, field, open_gguf, tensor_index


def flat(v):
    """gguf's ReaderField.contents() flattens arrays of arrays."""
    return [x for item in v for x in flat(item)] if isinstance(v, list) else [v]


def assert_same_as_gguf(path):
    """Every field and tensor of open_gguf(path) equals what gguf.GGUFReader reads."""
    ours, theirs = open_gguf(path), GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for k in keys:
        want, got = theirs.fields[k].contents(), field(ours, k)
        if theirs.fields[k].types[:2] == [GGUFValueType.ARRAY, GGUFValueType.ARRAY]:
            got = flat(got)
        assert got == want, k
        assert type(got) is type(want), k
        assert [type(x) for x in flat(got)] == [type(x) for x in flat(want)], k
    assert ours.version == theirs.fields["GGUF.version"].contents()
    assert ours.alignment == theirs.alignment and ours.data_offset == theirs.data_offset
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, int(a.tensor_type), a.shape) == \
            (b.name, int(b.tensor_type), tuple(b.shape.tolist()))
        assert a.tensor_type.name == b.tensor_type.name
        assert (a.n_elements, a.n_bytes, a.offset) == (b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name
    return ours


# -- good files -----------------------------------------------------------------------------

def write_every_type(path):
    rng = np.random.default_rng(0)
    g = GGUFWriter(str(path), "llama")
    g.add_uint8("t.u8", 200)
    g.add_int8("t.i8", -100)
    g.add_uint16("t.u16", 60000)
    g.add_int16("t.i16", -30000)
    g.add_uint32("t.u32", 4_000_000_000)
    g.add_int32("t.i32", -2_000_000_000)
    g.add_uint64("t.u64", 2**64 - 1)
    g.add_int64("t.i64", -(2**63))
    g.add_float32("t.f32", 0.1)
    g.add_float64("t.f64", 0.1)
    g.add_bool("t.true", True)
    g.add_bool("t.false", False)
    g.add_string("t.str", "héllo ▁ world 🙂")
    g.add_string("t.empty", "")
    for vt in (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16,
               GGUFValueType.INT16, GGUFValueType.UINT32, GGUFValueType.INT32,
               GGUFValueType.UINT64, GGUFValueType.INT64):
        g.add_key_value(f"t.array.{vt.name.lower()}", [0, 1, 2, 100], GGUFValueType.ARRAY,
                        sub_type=vt)
    g.add_key_value("t.array.f32", [0.5, -1.25, 3.0], GGUFValueType.ARRAY,
                    sub_type=GGUFValueType.FLOAT32)
    g.add_key_value("t.array.f64", [0.1, 1e300], GGUFValueType.ARRAY,
                    sub_type=GGUFValueType.FLOAT64)
    g.add_array("t.array.bool", [True, False, True])
    g.add_array("t.array.str", ["a", "", "ü▁", "<|im_end|>"])
    g.add_array("t.array.array", [[1, 2], [3, 4, 5]])
    g.add_tensor("w.f32", rng.standard_normal((3, 64)).astype(np.float32))
    g.add_tensor("w.f16", rng.standard_normal((2, 5, 32)).astype(np.float16))
    g.add_tensor("w.q8_0", quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0),
                 raw_dtype=Q.Q8_0)
    g.add_tensor("w.q4_k", rng.integers(0, 256, (2, 2 * 144), np.uint8),  # raw blocks
                 raw_dtype=Q.Q4_K)
    g.add_tensor("w.vec", rng.standard_normal(7).astype(np.float32))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return path


def test_every_value_type_reads_as_gguf_reads_it(tmp_path):
    f = assert_same_as_gguf(write_every_type(tmp_path / "all.gguf"))
    assert field(f, "t.array.array") == [[1, 2], [3, 4, 5]]
    assert field(f, "t.str") == "héllo ▁ world 🙂"
    assert field(f, "t.missing", 7) == 7
    with pytest.raises(ModelError, match="all.gguf: metadata key 't.missing' is missing"):
        field(f, "t.missing")
    t = tensor_index(f)
    assert t["w.q4_k"].shape == (512, 2) and t["w.q4_k"].data.shape == (2, 288)
    assert dequantize(t["w.f16"], f.path).shape == (2, 5, 32)
    assert dequantize(t["w.q8_0"], f.path).shape == (4, 64)


def test_default_model_reads_as_gguf_reads_it():
    assert_same_as_gguf(default_model_path())


def test_default_model_opens_fast_and_maps_its_tensors():
    path = default_model_path()
    open_gguf(path).close()  # imports and the page cache
    t = time.perf_counter()
    f = open_gguf(path)
    seconds = time.perf_counter() - t
    print(f"open_gguf(default model): {seconds * 1e3:.1f} ms")
    assert seconds < 0.5
    tracemalloc.start()
    views = [t.data for t in f.tensors]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(v.nbytes for v in views) > 50e6 and peak < 1e6  # views, not copies
    for v in views:
        assert not v.flags.writeable and not v.flags.owndata
    f.close()  # views alive: the mapping stays until they go
    assert views[0].sum() == views[0].sum()
    with pytest.raises(ModelError, match="closed"):
        f.tensors[0].data


def test_big_vocabulary_opens_fast_and_decodes_lazily(tmp_path):
    path = tmp_path / "vocab.gguf"
    tokens = [f"t{i}▁" for i in range(262_144)]
    g = GGUFWriter(str(path), "llama")
    g.add_token_list(tokens)
    g.add_token_scores([0.0] * 4 + [-1.5] * (len(tokens) - 4))
    g.add_tensor("x", np.zeros((1, 32), np.float32))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    t = time.perf_counter()
    f = open_gguf(path)
    seconds = time.perf_counter() - t
    print(f"open_gguf(262,144-string vocabulary): {seconds * 1e3:.1f} ms")
    assert seconds < 0.5
    assert field(f, "tokenizer.ggml.tokens") == tokens
    assert field(f, "tokenizer.ggml.scores")[3:5] == [0.0, -1.5]


# -- hostile files ----------------------------------------------------------------------------

def s(text):
    raw = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def array(item_type, count, payload=b""):
    return struct.pack("<IQ", item_type, count) + payload


def tensor_info(name, dims, type_id=0, offset=0):
    return (s(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
            + struct.pack("<IQ", type_id, offset))


STR, ARR, U32 = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.UINT32
GOOD_KVS = [kv("general.architecture", STR, s("llama")), kv("llama.block_count", U32,
            struct.pack("<I", 1)), kv("tokenizer.ggml.tokens", ARR, array(STR, 3, s("a")
                                                                             + s("bc") + s("")))]
GOOD_TENSORS = [tensor_info("a", [8]), tensor_info("b", [4, 2], 0, 32)]


def build(kvs=GOOD_KVS, tensors=GOOD_TENSORS, data=bytes(64), version=3, n_kv=None,
          n_tensors=None):
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None
                                 else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + bytes(-len(body) % 32) + data


def nested(depth):
    """An array of arrays ... of one u8, `depth` arrays deep."""
    value = array(GGUFValueType.UINT8, 1, b"\x07")
    for _ in range(depth - 1):
        value = array(ARR, 1, value)
    return value


HOSTILE = {
    "string length 2^63": build([kv("general.name", STR, struct.pack("<Q", 2**63) + b"x")]),
    "key length 2^63": build([struct.pack("<Q", 2**63) + b"key"]),
    "array count 2^63": build([kv("x", ARR, array(U32, 2**63))]),
    "array count 2^40": build([kv("x", ARR, array(GGUFValueType.UINT8, 2**40, b"12345"))]),
    "string array count 2^40": build([kv("x", ARR, array(STR, 2**40, s("a")))]),
    "string in array length 2^63": build([kv("x", ARR, array(STR, 2, s("a")
                                                             + struct.pack("<Q", 2**63)))]),
    "arrays nested 10 deep": build([kv("x", ARR, nested(10))]),
    "arrays nested 3 deep": build([kv("x", ARR, nested(3))]),
    "kv count 2^63": build(n_kv=2**63),
    "tensor count 2^40": build(n_tensors=2**40),
    "unknown value type": build([kv("x", 13, b"\0" * 8)]),
    "unknown array item type": build([kv("x", ARR, array(99, 1, b"\0" * 8))]),
    "0 dims": build(tensors=[tensor_info("a", [])]),
    "9 dims": build(tensors=[tensor_info("a", [1] * 9)]),
    "a zero dim": build(tensors=[tensor_info("a", [8, 0])]),
    "dims overflow": build(tensors=[tensor_info("a", [2**32, 2**32, 2**32])]),
    "dim 2^64-1": build(tensors=[tensor_info("a", [2**64 - 1])]),
    "unknown tensor type": build(tensors=[tensor_info("blk.0.attn_q.weight", [32], 99)]),
    "row not whole blocks": build(tensors=[tensor_info("a", [16], int(Q.Q8_0))]),
    "offset past the end": build(tensors=[tensor_info("a", [8], 0, 2**63)]),
    "data past the end": build(tensors=[tensor_info("a", [17])]),
    "misaligned offset": build(tensors=[tensor_info("a", [4], 0, 4)]),
    "tensors overlap": build(tensors=[tensor_info("a", [8]), tensor_info("b", [8], 0, 0)]),
    "tensors overlap partly": build(tensors=[tensor_info("a", [16]), tensor_info("b", [8], 0,
                                                                                 32)]),
    "duplicate keys": build(GOOD_KVS + [GOOD_KVS[1]]),
    "duplicate tensor names": build(tensors=[tensor_info("a", [8]),
                                             tensor_info("a", [8], 0, 32)]),
    "invalid UTF-8 key": build([kv(b"general.\xff", U32, b"\0" * 4)]),
    "invalid UTF-8 string value": build([kv("general.name", STR, s(b"\xc3("))]),
    "invalid UTF-8 tensor name": build(tensors=[tensor_info(b"\xe2\x82", [8])]),
    "alignment 0": build([kv("general.alignment", U32, struct.pack("<I", 0))]),
    "alignment 3": build([kv("general.alignment", U32, struct.pack("<I", 3))]),
    "alignment not u32": build([kv("general.alignment", GGUFValueType.UINT64,
                                   struct.pack("<Q", 32))]),
    "version 1": build(version=1),
    "version 4": build(version=4),
    "big-endian": build(version=3 << 24),
    "not GGUF": b"GGML" + build()[4:],
    "empty": b"",
}
EXPECT = {"0 dims": "0 dimensions", "9 dims": "9 dimensions", "a zero dim": "dimension of 0",
          "dims overflow": "overflows", "unknown tensor type": "tensor 'blk.0.attn_q.weight' "
          "has type id 99, which is not a ggml type", "offset past the end": "runs past the end",
          "data past the end": "runs past the end", "misaligned offset": "not a multiple of the "
          "alignment", "tensors overlap": "overlap", "duplicate keys": "appears twice",
          "duplicate tensor names": "appears twice", "invalid UTF-8 key": "not valid UTF-8",
          "arrays nested 10 deep": "nests arrays", "big-endian": "big-endian",
          "version 1": "version 1", "not GGUF": "not a GGUF file", "empty": "not a GGUF file",
          "string length 2^63": "truncated: metadata key 'general.name' needs "
          "9223372036854775808 bytes", "array count 2^63": "truncated",
          "kv count 2^63": "the header announces", "tensor count 2^40": "the header announces"}


def test_the_hostile_files_base_is_valid(tmp_path):
    path = tmp_path / "good.gguf"
    path.write_bytes(build())
    f = assert_same_as_gguf(path)
    assert field(f, "tokenizer.ggml.tokens") == ["a", "bc", ""]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused_promptly(tmp_path, case):
    path = tmp_path / "bad.gguf"
    path.write_bytes(HOSTILE[case])
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(ModelError) as e:
        open_gguf(path)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(e.value).startswith(f"{path}: ")
    assert case not in EXPECT or EXPECT[case] in str(e.value), str(e.value)
    assert seconds < 1.0 and peak < 4e6, (seconds, peak)


def test_every_truncation_is_refused(tmp_path):
    path = write_every_type(tmp_path / "cut.gguf")
    with open_gguf(path) as f:
        end = max(t.offset + t.n_bytes for t in f.tensors)
        data_offset = f.data_offset
    # every cut in the header, the metadata and the tensor infos, some in the data; cutting
    # the one file shorter and shorter (rewriting it each time is slow)
    cuts = [end - 1, *range(end - 2, data_offset, -97), *range(data_offset, -1, -1)]
    for n in cuts:
        os.truncate(path, n)
        with pytest.raises(ModelError) as e:
            open_gguf(path)
        assert str(e.value).startswith(f"{path}: "), (n, str(e.value))
        assert any(w in str(e.value) for w in ("truncated", "not a GGUF", "past the end")), \
            (n, str(e.value))


def test_bad_utf8_deep_in_the_vocabulary_is_named_when_read(tmp_path):
    path = tmp_path / "vocab.gguf"
    strings = s("a") * 1000 + s(b"\xff\xfe") + s("b")
    path.write_bytes(build([kv("tokenizer.ggml.tokens", ARR, array(STR, 1002, strings))]))
    f = open_gguf(path)  # opening does not decode the vocabulary
    with pytest.raises(ModelError, match=r"vocab.gguf: metadata key 'tokenizer.ggml.tokens': "
                                         r"string 1000 is not valid UTF-8"):
        field(f, "tokenizer.ggml.tokens")


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")


def _patched_default(tmp_path, key, new):
    """The default model with metadata value `key` overwritten by bytes of the same size."""
    from .fuzz.gguf_mutants import scan

    data = bytearray(default_model_path().read_bytes())
    site = next(s for s in scan(bytes(data)).sites if s.what == key and s.kind == "value")
    struct.pack_into(site.fmt, data, site.offset, new)
    path = tmp_path / "patched.gguf"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("key", ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"])
def test_token_ids_past_the_vocabulary_are_named(tmp_path, key):
    from selfattn.model import Tokenizer

    path = _patched_default(tmp_path, key, 49152)
    with pytest.raises(ModelError, match=f"{key} = 49152 is not a token id of its 49,152-entry"):
        Tokenizer.from_gguf(open_gguf(path), path)


def test_a_merge_the_tokenizers_library_refuses_is_one_error_naming_the_file(tmp_path):
    from selfattn.model import Tokenizer

    data = bytearray(default_model_path().read_bytes())
    first = data.index(b"\xc4\xa0 t")  # the first merge, 'Ġ t'
    data[first + 2] = ord("x")  # 'Ġxt': no space, not a pair
    path = tmp_path / "merges.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"{path}: the tokenizer cannot be built from the file"):
        Tokenizer.from_gguf(open_gguf(path), path)
