"""Damaged copies of a GGUF file, one per index, reproducible from (seed, index).

`scan` walks the file's layout once and lists its *sites*: every count, length, type id, scalar
value and tensor-info field, with its offset and width. `mutant` then makes mutant i: a truncation
(anywhere, weighted to the header, the metadata and the tensor infos), byte flips in the header
region, or a site overwritten with a value chosen to hurt (0, 1, 2**63, all ones, one past the
original, the file size, NaN, a nested array type, an unknown type id, ...).
"""

import random
import struct
from dataclasses import dataclass

# GGUF value types: id -> (struct format, width) for the scalars
SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
           6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
STRING, ARRAY = 8, 9
STRINGS_KEPT = 32  # sites recorded for the first strings of an array (the rest are stepped over)


@dataclass
class Site:
    offset: int
    width: int  # bytes
    kind: str  # count, length, type, item_type, value, n_dims, dim, ggml_type, tensor_offset, ...
    what: str  # the key or tensor it belongs to
    fmt: str = "<Q"


@dataclass
class Layout:
    size: int
    sites: list
    meta_end: int  # end of the key/value pairs
    infos_end: int  # end of the tensor infos


def scan(data: bytes) -> Layout:
    """The sites of a well-formed GGUF file (v2/v3)."""
    sites = [Site(4, 4, "version", "header", "<I"), Site(8, 8, "count", "tensor_count"),
             Site(16, 8, "count", "kv_count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(pos, what, record):
        n = struct.unpack_from("<Q", data, pos)[0]
        if record:
            sites.append(Site(pos, 8, "length", what))
        return pos + 8 + n, data[pos + 8:pos + 8 + n]

    def value(pos, vtype, what, record=True):
        if vtype in SCALARS:
            fmt, width = SCALARS[vtype]
            if record:
                sites.append(Site(pos, width, "value", what, fmt))
            return pos + width
        if vtype == STRING:
            return string(pos, what, record)[0]
        if vtype == ARRAY:
            item, count = struct.unpack_from("<IQ", data, pos)
            sites.append(Site(pos, 4, "item_type", what, "<I"))
            sites.append(Site(pos + 4, 8, "count", what))
            pos += 12
            for j in range(count):
                pos = value(pos, item, what, record and j < STRINGS_KEPT)
            return pos
        raise ValueError(f"value type {vtype} at {pos}")

    for _ in range(n_kv):
        key_pos = pos
        pos, key = string(pos, "key", True)
        key = key.decode("utf-8", "replace")
        sites[-1].what = key
        sites.append(Site(pos, 4, "type", key, "<I"))
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos = value(pos + 4, vtype, key)
        assert pos > key_pos
    meta_end = pos
    for _ in range(n_tensors):
        pos, name = string(pos, "tensor name", True)
        name = name.decode("utf-8", "replace")
        sites[-1].what = name
        n_dims = struct.unpack_from("<I", data, pos)[0]
        sites.append(Site(pos, 4, "n_dims", name, "<I"))
        pos += 4
        for d in range(n_dims):
            sites.append(Site(pos + 8 * d, 8, "dim", name))
        pos += 8 * n_dims
        sites.append(Site(pos, 4, "ggml_type", name, "<I"))
        sites.append(Site(pos + 4, 8, "tensor_offset", name))
        pos += 12
    return Layout(len(data), sites, meta_end, pos)


def _hurtful(site: Site, old, size: int, rng: random.Random):
    """A value for a site, chosen to hurt."""
    bits = 8 * site.width
    if site.fmt in ("<f", "<d"):
        return rng.choice([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30])
    if site.fmt == "<?":
        return rng.choice([True, False])
    signed = site.fmt in ("<b", "<h", "<i", "<q")
    top = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    low = -(2 ** (bits - 1)) if signed else 0
    choices = [0, 1, top, low, top // 2, old + 1, max(old - 1, low), min(old * 2, top),
               min(size, top), min(size - 1, top)]
    if site.kind in ("type", "item_type"):
        choices += [ARRAY, STRING, 13, 255, rng.randrange(14)]
    if site.kind == "ggml_type":
        choices += [4, 5, 16, 17, 19, 29, 31, 39, 40, 255, rng.randrange(41)]
    if site.kind == "n_dims":
        choices += [0, 5, 8, 255]
    if site.kind in ("count", "dim", "length"):
        choices += [2**63, 2**62, 2**32, 2**31, min(2**64 - 1, top)]
    if signed:
        choices += [-1]
    return min(max(rng.choice(choices), low), top)


def mutant(data: bytes, layout: Layout, seed: int, index: int) -> tuple[bytes, str, str]:
    """(the damaged bytes, the mutation's kind, a description) of mutant `index`."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = rng.choices(["truncate", "flip", "site", "sites"], [2, 2, 5, 1])[0]
    if kind == "truncate":
        region = rng.choices(["header", "meta", "infos", "data"], [1, 3, 3, 2])[0]
        lo, hi = {"header": (0, 24), "meta": (24, layout.meta_end),
                  "infos": (layout.meta_end, layout.infos_end),
                  "data": (layout.infos_end, layout.size)}[region]
        cut = rng.randrange(lo, hi)
        return data[:cut], kind, f"truncated at {cut:,} ({region})"
    out = bytearray(data)
    if kind == "flip":
        n = rng.randint(1, 4)
        spots = [rng.randrange(0, layout.infos_end) for _ in range(n)]
        for p in spots:
            out[p] ^= 1 << rng.randrange(8)
        return bytes(out), kind, f"bits flipped at {', '.join(f'{p:,}' for p in spots)}"
    notes = []
    meta = [s for s in layout.sites if s.offset < layout.meta_end]
    infos = [s for s in layout.sites if s.offset >= layout.meta_end]
    for _ in range(1 if kind == "site" else rng.randint(2, 5)):
        site = rng.choice(rng.choice([meta, infos]))  # the metadata as often as the infos
        old = struct.unpack_from(site.fmt, data, site.offset)[0]
        for _ in range(4):  # a value that differs (NaN differs from everything)
            new = _hurtful(site, old, layout.size, rng)
            if new != old:
                break
        struct.pack_into(site.fmt, out, site.offset, new)
        notes.append(f"{site.kind} of {site.what} {old!r} -> {new!r}")
    return bytes(out), kind, "; ".join(notes)
