"""Time to first token and decode speed: selfattn against llama.cpp and HF transformers.

    python benchmarks/generate.py [--lengths 128,512,2048,4000] [--gen 32] [--reps 3]
                                  [--threads 2] [--llama-python PATH] [--json out.json]

Same GGUF file (default: SmolLM2-135M-Instruct Q4_1), same prompt token ids (the first N tokens
of English text on this machine), greedy, no early stop. Each engine runs in its own process
(their thread pools would fight otherwise) with the same thread count.
- selfattn: `generate`'s ttft_s and decode_tps.
- llama.cpp: llama-cpp-python (built from source) with flash attention on; TTFT = eval of the
  prompt plus the first sample; decode = one eval per token. It may live in another venv:
  --llama-python names that interpreter.
- HF transformers: float32, sdpa, its own KV cache.
Medians over --reps; a warm-up request first in each process (compilation, first touches).
"""

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_ids(model_path, lengths):
    from _corpus import prompt_ids

    from selfattn.model import Tokenizer
    from selfattn.model.gguf_file import open_gguf

    tok = Tokenizer.from_gguf(open_gguf(model_path), model_path)
    return {n: prompt_ids(tok, n) for n in lengths}


def run_selfattn(model_path, prompts, n_gen, reps, threads):
    import selfattn
    from selfattn.cache import KVCache
    from selfattn.model import Llama, Sampler, generate

    selfattn.set_num_threads(threads)
    model = Llama.load(model_path)
    out = {}
    for n, ids in prompts.items():
        runs = []
        for _ in range(reps + 1):
            cache = KVCache.for_model(model.args, n + n_gen + 1)
            s = generate(model, ids, n_gen, Sampler(), cache)
            runs.append((s.ttft_s, s.decode_tps, s.attention_share))
        out[n] = runs[1:]
    return out


def run_hf(model_path, prompts, n_gen, reps, threads):
    import warnings

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    from pathlib import Path

    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    out = {}
    with torch.inference_mode():
        for n, ids in prompts.items():
            runs = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                r = model(torch.tensor([ids]), use_cache=True)
                token = int(np.argmax(r.logits[0, -1].numpy()))
                ttft = time.perf_counter() - t0
                past = r.past_key_values
                t1 = time.perf_counter()
                for _ in range(n_gen - 1):
                    r = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                    past = r.past_key_values
                    token = int(np.argmax(r.logits[0, -1].numpy()))
                runs.append((ttft, (n_gen - 1) / (time.perf_counter() - t1), None))
            out[n] = runs[1:]
    return out


LLAMA_CPP_WORKER = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
cfg = json.loads(sys.stdin.read())
n_ctx = max(len(ids) for ids in cfg["prompts"].values()) + cfg["n_gen"] + 8
llm = Llama(model_path=cfg["model"], n_ctx=n_ctx, n_threads=cfg["threads"],
            n_threads_batch=cfg["threads"], n_batch=512, flash_attn=True, verbose=False)
n_vocab = llm.n_vocab()
def last_logits():  # logits_all=False keeps only the last token's logits, in the context
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
out = {}
for n, ids in cfg["prompts"].items():
    runs = []
    for _ in range(cfg["reps"] + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(last_logits()))
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(cfg["n_gen"] - 1):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        runs.append((ttft, (cfg["n_gen"] - 1) / (time.perf_counter() - t1), None))
    out[n] = runs[1:]
print(json.dumps(out))
"""


def run_llama_cpp(python, model_path, prompts, n_gen, reps, threads):
    cfg = dict(model=str(model_path), prompts={str(k): v for k, v in prompts.items()},
               n_gen=n_gen, reps=reps, threads=threads)
    r = subprocess.run([python, "-c", LLAMA_CPP_WORKER], input=json.dumps(cfg),
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        print(f"llama.cpp run failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return {int(k): v for k, v in json.loads(r.stdout).items()}


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--lengths", default="128,512,2048,4000")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a Python with llama-cpp-python installed")
    ap.add_argument("--skip", default="", help="comma list of peers to leave out: llama.cpp,hf")
    ap.add_argument("--json")
    args = ap.parse_args()
    from selfattn.model import default_model_path

    model = args.model or str(default_model_path())
    lengths = [int(x) for x in args.lengths.split(",")]
    prompts = load_ids(model, lengths)
    ctx = multiprocessing.get_context("spawn")
    results = {}
    with ctx.Pool(1) as p:
        results["selfattn"] = p.apply(run_selfattn, (model, prompts, args.gen, args.reps,
                                                     args.threads))
    skip = set(args.skip.split(","))
    if "llama.cpp" not in skip:
        r = run_llama_cpp(args.llama_python, model, prompts, args.gen, args.reps, args.threads)
        if r:
            results["llama.cpp"] = r
    if "hf" not in skip:
        with ctx.Pool(1) as p:
            results["hf"] = p.apply(run_hf, (model, prompts, args.gen, args.reps, args.threads))
    peers = list(results)
    print(f"model: {model} · threads {args.threads} · greedy, {args.gen} tokens generated · "
          f"median of {args.reps}")
    head = "| prompt tokens |" + "".join(f" {p} TTFT ms | {p} tg t/s |" for p in peers)
    head += "".join(f" TTFT vs {p} | tg vs {p} |" for p in peers if p != "selfattn")
    print(head)
    print("|" + "---|" * (1 + 2 * len(peers) + 2 * (len(peers) - 1)))
    for n in lengths:
        med = {p: (median([r[0] for r in results[p][n]]), median([r[1] for r in results[p][n]]))
               for p in peers}
        row = f"| {n} |" + "".join(f" {med[p][0] * 1e3:.0f} | {med[p][1]:.1f} |" for p in peers)
        ours = med["selfattn"]
        row += "".join(f" {med[p][0] / ours[0]:.2f}x | {ours[1] / med[p][1]:.2f}x |"
                       for p in peers if p != "selfattn")
        print(row)
    share = {n: median([r[2] for r in results["selfattn"][n]]) for n in lengths}
    print("selfattn attention share of forward time: " +
          ", ".join(f"{n}: {100 * s:.0f}%" for n, s in share.items()))
    print("(TTFT vs X > 1: selfattn reaches the first token sooner; tg vs X > 1: selfattn "
          "decodes faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=model, threads=args.threads, n_gen=args.gen, results=results),
                      f, indent=1)


if __name__ == "__main__":
    main()
