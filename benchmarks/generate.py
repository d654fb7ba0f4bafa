"""Time to first token and decode speed: selfattn against llama.cpp and HF transformers.

    python benchmarks/generate.py [--model PATH] [--lengths 128,512,2048,4000] [--gen 32]
                                  [--reps 3] [--warmup full|short] [--threads 2]
                                  [--llama-python PATH] [--skip selfattn,llama.cpp,hf]
                                  [--json out.json]

Same GGUF file (default: SmolLM2-135M-Instruct Q4_1), same prompt token ids (the first N tokens
of English text on this machine), greedy, no early stop. Each engine runs in its own process
(their thread pools would fight otherwise) with the same thread count.
Each prompt length is also a depth: decode tok/s is measured right after that prompt, so
`--lengths 16,512,2048,4096` gives TTFT at 512/2048/4096 and decode at depth ~0 and 4096.
Also reported per engine: load time, RSS after load and peak RSS (ru_maxrss of its process;
file-backed mmap pages it touched count too).
- selfattn: `generate`'s ttft_s and decode_tps.
- llama.cpp: llama-cpp-python (built from source) with flash attention on; TTFT = eval of the
  prompt plus the first sample; decode = one eval per token. It may live in another venv:
  --llama-python names that interpreter.
- HF transformers: float32, sdpa, its own KV cache.
Medians over --reps. Warm-up (compilation, first touches): `full` (the default) runs each length
reps+1 times and drops the first; `short` runs one 8-token request with 4 generated tokens per
process (for big models, where a discarded 4096-token prefill costs minutes).
If selfattn cannot load the model (or tokenize: then llama.cpp's tokenizer makes the prompts),
the others still run; `--skip selfattn` leaves it out.
"""

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def default_model():
    from selfattn.model import default_model_path

    return str(default_model_path())


def load_ids(model_path, lengths, llama_python=None):
    from _corpus import prompt_ids

    try:
        from selfattn.model import Tokenizer
        from selfattn.model.gguf_file import open_gguf

        tok = Tokenizer.from_gguf(open_gguf(model_path), model_path)
    except Exception as e:
        if llama_python is None:
            raise
        print(f"selfattn's tokenizer failed ({type(e).__name__}: {e}); prompts from llama.cpp's",
              file=sys.stderr)
        tok = LlamaTokenizer(llama_python, model_path)
    return {n: prompt_ids(tok, n) for n in lengths}


class LlamaTokenizer:
    """encode() through llama-cpp-python (vocab only, no BOS) in the --llama-python interpreter."""

    WORKER = r"""
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps(llm.tokenize(sys.stdin.read().encode(), add_bos=False, special=False)))
"""

    def __init__(self, python, model_path):
        self.python, self.model_path = python, str(model_path)

    def encode(self, text):
        r = subprocess.run([self.python, "-c", self.WORKER, self.model_path], input=text,
                           capture_output=True, text=True, check=True)
        return json.loads(r.stdout)


def rss_mb():
    """(current, peak) resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_ids(prompts):
    return prompts[min(prompts)][:8]


def run_selfattn(model_path, prompts, n_gen, reps, threads, warmup="full"):
    import selfattn
    from selfattn.cache import KVCache
    from selfattn.model import Sampler, Transformer, generate

    selfattn.set_num_threads(threads)
    t0 = time.perf_counter()
    model = Transformer.load(model_path)
    info = dict(load_s=time.perf_counter() - t0)
    info["rss_after_load_mb"], _ = rss_mb()
    if warmup == "short":
        ids = warm_ids(prompts)
        generate(model, ids, 4, Sampler(), KVCache.for_model(model.args, len(ids) + 5))
    out = {}
    for n, ids in prompts.items():
        runs = []
        for _ in range(reps + (warmup == "full")):
            cache = KVCache.for_model(model.args, n + n_gen + 1)
            s = generate(model, ids, n_gen, Sampler(), cache)
            runs.append((s.ttft_s, s.decode_tps, s.attention_share))
        out[n] = runs[1:] if warmup == "full" else runs
    info["peak_rss_mb"] = rss_mb()[1]
    return out, info


def run_hf(model_path, prompts, n_gen, reps, threads, warmup="full"):
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
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    info = dict(load_s=time.perf_counter() - t0)
    info["rss_after_load_mb"], _ = rss_mb()
    out = {}
    with torch.inference_mode():
        if warmup == "short":
            r = model(torch.tensor([warm_ids(prompts)]), use_cache=True)
        for n, ids in prompts.items():
            runs = []
            for _ in range(reps + (warmup == "full")):
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
            out[n] = runs[1:] if warmup == "full" else runs
    info["peak_rss_mb"] = rss_mb()[1]
    return out, info


LLAMA_CPP_WORKER = r"""
import json, os, resource, sys, time
import numpy as np
from llama_cpp import Llama
def rss_mb():
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cfg = json.loads(sys.stdin.read())
n_ctx = max(len(ids) for ids in cfg["prompts"].values()) + cfg["n_gen"] + 8
t0 = time.perf_counter()
llm = Llama(model_path=cfg["model"], n_ctx=n_ctx, n_threads=cfg["threads"],
            n_threads_batch=cfg["threads"], n_batch=512, flash_attn=True, verbose=False)
info = dict(load_s=time.perf_counter() - t0, rss_after_load_mb=rss_mb()[0])
n_vocab = llm.n_vocab()
def last_logits():  # logits_all=False keeps only the last token's logits, in the context
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
full = cfg.get("warmup", "full") == "full"
if not full:
    llm.reset()
    llm.eval(cfg["prompts"][min(cfg["prompts"], key=int)][:8])
    for _ in range(3):
        llm.eval([int(np.argmax(last_logits()))])
out = {}
for n, ids in cfg["prompts"].items():
    runs = []
    for _ in range(cfg["reps"] + full):
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
    out[n] = runs[1:] if full else runs
info["peak_rss_mb"] = rss_mb()[1]
print(json.dumps(dict(results=out, info=info)))
"""


def run_llama_cpp(python, model_path, prompts, n_gen, reps, threads, warmup="full"):
    cfg = dict(model=str(model_path), prompts={str(k): v for k, v in prompts.items()},
               n_gen=n_gen, reps=reps, threads=threads, warmup=warmup)
    r = subprocess.run([python, "-c", LLAMA_CPP_WORKER], input=json.dumps(cfg),
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        print(f"llama.cpp run failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    out = json.loads(r.stdout)
    return {int(k): v for k, v in out["results"].items()}, out["info"]


def run_in_child(ctx, name, fn, *args):
    """fn(*args) in a fresh process; None (and the error on stderr) if it fails."""
    try:
        with ctx.Pool(1) as p:
            return p.apply(fn, args)
    except Exception as e:
        print(f"{name} run failed: {type(e).__name__}: {e}", file=sys.stderr)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return None


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a GGUF file (default: the default model)")
    ap.add_argument("--lengths", default="128,512,2048,4000",
                    help="prompt lengths in tokens: TTFT of each, and decode at that depth")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", choices=["full", "short"], default="full",
                    help="full: one discarded run per length; short: one 8-token request")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a Python with llama-cpp-python installed")
    ap.add_argument("--skip", default="",
                    help="comma list of engines to leave out: selfattn,llama.cpp,hf")
    ap.add_argument("--json")
    args = ap.parse_args()

    model = args.model or default_model()
    lengths = [int(x) for x in args.lengths.split(",")]
    skip = set(args.skip.split(","))
    llama_python = None if "llama.cpp" in skip else args.llama_python
    prompts = load_ids(model, lengths, llama_python)
    ctx = multiprocessing.get_context("spawn")
    results, info = {}, {}
    run_args = (model, prompts, args.gen, args.reps, args.threads, args.warmup)
    load_before = os.getloadavg()
    if "selfattn" not in skip:
        r = run_in_child(ctx, "selfattn", run_selfattn, *run_args)
        if r:
            results["selfattn"], info["selfattn"] = r
    if "llama.cpp" not in skip:
        r = run_llama_cpp(args.llama_python, *run_args)
        if r:
            results["llama.cpp"], info["llama.cpp"] = r
    if "hf" not in skip:
        r = run_in_child(ctx, "hf", run_hf, *run_args)
        if r:
            results["hf"], info["hf"] = r
    peers = list(results)
    if not peers:
        sys.exit("no engine ran")
    ours = "selfattn" in results
    load_after = os.getloadavg()
    from selfattn.native import describe_isa

    print(f"model: {model} · threads {args.threads} · selfattn kernels {describe_isa()} · "
          f"greedy, {args.gen} tokens generated · "
          f"median of {args.reps} · load average before {load_before[0]:.2f}, after "
          f"{load_after[0]:.2f} (other processes on the machine skew every number)")
    head = "| prompt tokens |" + "".join(f" {p} TTFT ms | {p} tg t/s |" for p in peers)
    others = [p for p in peers if p != "selfattn"] if ours else []
    head += "".join(f" TTFT vs {p} | tg vs {p} |" for p in others)
    print(head)
    print("|" + "---|" * (1 + 2 * len(peers) + 2 * len(others)))
    for n in lengths:
        med = {p: (median([r[0] for r in results[p][n]]), median([r[1] for r in results[p][n]]))
               for p in peers}
        row = f"| {n} |" + "".join(f" {med[p][0] * 1e3:.0f} | {med[p][1]:.1f} |" for p in peers)
        if ours:
            row += "".join(f" {med[p][0] / med['selfattn'][0]:.2f}x | "
                           f"{med['selfattn'][1] / med[p][1]:.2f}x |" for p in others)
        print(row)
    for p in peers:
        i = info[p]
        print(f"{p}: load {i['load_s']:.2f} s, RSS after load {i['rss_after_load_mb']:.0f} MiB, "
              f"peak RSS {i['peak_rss_mb']:.0f} MiB")
    if ours:
        share = {n: median([r[2] for r in results["selfattn"][n]]) for n in lengths}
        print("selfattn attention share of forward time: " +
              ", ".join(f"{n}: {100 * s:.0f}%" for n, s in share.items()))
    if others:
        print("(TTFT vs X > 1: selfattn reaches the first token sooner; tg vs X > 1: selfattn "
              "decodes faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=model, threads=args.threads, n_gen=args.gen, reps=args.reps,
                           warmup=args.warmup, results=results, info=info,
                           loadavg=dict(before=load_before, after=load_after)), f, indent=1)


if __name__ == "__main__":
    main()
