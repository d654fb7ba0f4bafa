"""Generation speed at depth for each KV cache type: selfattn against llama.cpp, same file.

    python benchmarks/kv_speed.py [--depths 4096,8192] [--gen 32] [--reps 3] [--types f32,q8_0]
                                  [--llama-python PATH | --skip-llama] [--json out.json]

For each KV type (f32, f16, q8_0, q4_0) and depth d: the cache is filled with the first d tokens
of English text on this machine (a real prefill, on both engines), then --gen tokens are generated
greedily, one forward per token; tg t/s is their count over their time, median of --reps.
llama.cpp runs through llama-cpp-python with flash attention on and the matching
`type_k`/`type_v` (llama-bench's -ctk/-ctv, -fa 1), in its own process, same thread count.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

TYPES = ("f32", "f16", "q8_0", "q4_0")


def run_selfattn(model_path, ids, depths, n_gen, reps, threads, types=TYPES):
    import numpy as np

    import selfattn
    from selfattn.cache import KVCache
    from selfattn.model import Transformer
    from selfattn.model.generate import prefill

    selfattn.set_num_threads(threads)
    out = {}
    for kv in types:
        model = Transformer.load(model_path, kv)
        cache = KVCache.for_model(model.args, max(depths) + n_gen + 1, kv)
        for d in depths:
            cache.length = 0
            prefill(model, np.asarray(ids[:d]), cache)
            samples = []
            for _ in range(reps):
                cache.length = d
                token = np.array([int(ids[d])])
                t0 = time.perf_counter()
                for _ in range(n_gen):
                    token[0] = int(np.argmax(model.forward(token, cache, cache.length)))
                samples.append(n_gen / (time.perf_counter() - t0))
            out[f"{kv}@{d}"] = samples
    return out


LLAMA_WORKER = r"""
import json, sys, time
import numpy as np
import llama_cpp
cfg = json.loads(sys.stdin.read())
types = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16,
         "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
out = {}
for kv in cfg["types"]:
    try:
        llm = llama_cpp.Llama(model_path=cfg["model"], n_ctx=max(cfg["depths"]) + cfg["n_gen"] + 8,
                              n_threads=cfg["threads"], n_threads_batch=cfg["threads"], n_batch=512,
                              flash_attn=True, type_k=types[kv], type_v=types[kv], verbose=False)
    except Exception as e:
        out[kv] = str(e)
        continue
    n_vocab = llm.n_vocab()
    for d in cfg["depths"]:
        llm.reset()
        llm.eval(cfg["ids"][:d])
        samples = []
        for _ in range(cfg["reps"]):
            llm.n_tokens = d  # back to depth d: the generated tokens' cells are overwritten
            token = cfg["ids"][d]
            t0 = time.perf_counter()
            for _ in range(cfg["n_gen"]):
                llm.eval([token])
                token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
            samples.append(cfg["n_gen"] / (time.perf_counter() - t0))
        out[f"{kv}@{d}"] = samples
    del llm
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--depths", default="4096,8192")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument("--types", default=",".join(TYPES), help="KV types to run")
    ap.add_argument("--skip-llama", action="store_true",
                    help="selfattn only (its ratios to its own f32; no peer column)")
    ap.add_argument("--json")
    args = ap.parse_args()
    types = tuple(t for t in args.types.split(",") if t in TYPES)
    if "f32" not in types:
        ap.error("--types must include f32 (the ratios are to it)")
    from _corpus import prompt_ids

    from selfattn.model import Tokenizer, default_model_path
    from selfattn.model.gguf_file import open_gguf

    model = args.model or str(default_model_path())
    depths = [int(x) for x in args.depths.split(",")]
    tok = Tokenizer.from_gguf(open_gguf(model), model)
    ids = prompt_ids(tok, max(depths) + 1)
    with multiprocessing.get_context("spawn").Pool(1) as p:
        ours = p.apply(run_selfattn, (model, ids, depths, args.gen, args.reps, args.threads,
                                      types))
    theirs = {}
    if not args.skip_llama:
        cfg = dict(model=model, ids=ids, depths=depths, n_gen=args.gen, reps=args.reps,
                   threads=args.threads, types=types)
        r = subprocess.run([args.llama_python, "-c", LLAMA_WORKER], input=json.dumps(cfg),
                           capture_output=True, text=True, timeout=7200)
        theirs = json.loads(r.stdout) if r.returncode == 0 else {}
        if r.returncode:
            print(f"llama.cpp failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    print(f"model: {model} · threads {args.threads} · tg{args.gen}, median of {args.reps}")
    print("| KV type | depth | selfattn t/s | vs selfattn f32 | llama.cpp t/s | selfattn / llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    for kv in types:
        for d in depths:
            key = f"{kv}@{d}"
            med = statistics.median(ours[key])
            base = statistics.median(ours[f"f32@{d}"])
            peer = theirs.get(key)
            peer_s = f"{statistics.median(peer):.2f}" if isinstance(peer, list) else \
                f"n/a ({theirs.get(kv, 'not run')})"
            ratio = f"{med / statistics.median(peer):.2f}x" if isinstance(peer, list) else ""
            print(f"| {kv} | {d} | {med:.2f} | {med / base:.2f}x | {peer_s} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=model, depths=depths, n_gen=args.gen, threads=args.threads,
                           selfattn=ours, llama_cpp=theirs), f, indent=1)


if __name__ == "__main__":
    main()
