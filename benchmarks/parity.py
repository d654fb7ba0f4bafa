"""selfattn's forward against HF transformers loading the same GGUF file (not run in CI).

    python benchmarks/parity.py [--model PATH] [--llama-python PATH]

Needs torch==2.13.0, transformers and accelerate. For each prompt (a short one, a chat prompt,
one of >= 1,500 tokens): the last position's logits (max abs difference) and 16 greedy tokens,
each decoded by both, counted as agreeing unless the reference's own top-1/top-2 margin at that
step is below 0.01 (a tie that float rounding may break either way).

With --llama-python (an interpreter with llama-cpp-python), llama.cpp's last-position logits for
the same token ids are compared too: llama.cpp rounds activations to 8-bit integers for its
quantized dot products, so its logits differ from both float32 forwards by more than they
differ from each other.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _corpus import prompt_ids  # noqa: E402

from selfattn.cache import KVCache  # noqa: E402
from selfattn.model import Transformer, Tokenizer, default_model_path  # noqa: E402
from selfattn.model.gguf_file import open_gguf  # noqa: E402

N_GEN = 16

LLAMA_CPP_LOGITS = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
cfg = json.loads(sys.stdin.read())
llm = Llama(model_path=cfg["model"], n_ctx=max(map(len, cfg["prompts"])) + 8, n_threads=2,
            n_batch=512, flash_attn=True, verbose=False)
out = []
for ids in cfg["prompts"]:
    llm.reset()
    llm.eval(ids)
    out.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).tolist())
np.save(cfg["out"], np.array(out, np.float64))
"""


def llama_cpp_logits(python, model, prompts):
    """llama.cpp's last-position logits for each prompt (run in the --llama-python interpreter)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "logits.npy")
        cfg = dict(model=str(model), prompts=list(prompts), out=out)
        r = subprocess.run([python, "-c", LLAMA_CPP_LOGITS], input=json.dumps(cfg), text=True,
                           capture_output=True, timeout=1800)
        if r.returncode != 0:
            sys.exit(f"llama.cpp run failed: {r.stderr.strip()[-2000:]}")
        return np.load(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--llama-python", help="also compare llama.cpp's logits (llama-cpp-python)")
    args = ap.parse_args()
    import warnings

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.set_verbosity_error()

    torch.set_num_threads(2)
    path = Path(args.model) if args.model else default_model_path()
    reader = open_gguf(path)
    ours, tok = Transformer.from_reader(reader, path), Tokenizer.from_gguf(reader, path)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32, attn_implementation="sdpa")
    hf.eval()
    prompts = {
        "plain": tok.encode("The first three planets from the Sun are Mercury, Venus and"),
        "chat": tok.encode(tok.render_chat([{"role": "user", "content":
                                             "Write a haiku about memory bandwidth."}])),
        "long": prompt_ids(tok, 1600),
    }
    worst = 0.0
    lcpp = (llama_cpp_logits(args.llama_python, path, prompts.values())
            if args.llama_python else None)
    print(f"model: {path}")
    head = "| prompt | tokens | max abs diff, last logits | greedy tokens agreeing | ties skipped |"
    if lcpp is not None:
        head += " selfattn vs llama.cpp | HF vs llama.cpp |"
    print(head)
    print("|---" * head.count(" |") + "|")
    for i, (name, ids) in enumerate(prompts.items()):
        cache = KVCache.for_model(ours.args, len(ids) + N_GEN + 1)
        ours_logits = ours.forward(np.array(ids), cache, 0)
        with torch.inference_mode():
            out = hf(torch.tensor([ids]), use_cache=True)
        ref = out.logits[0, -1].double().numpy()
        diff = float(np.abs(ours_logits - ref).max())
        worst = max(worst, diff)
        vs_lcpp = "" if lcpp is None else (f" {np.abs(ours_logits - lcpp[i]).max():.2e} |"
                                           f" {np.abs(ref - lcpp[i]).max():.2e} |")
        # greedy continuation, each side feeding its own choice; compare step by step
        past, agree, ties = out.past_key_values, 0, 0
        a, b = int(np.argmax(ours_logits)), int(np.argmax(ref))
        for step in range(N_GEN):
            top2 = np.sort(ref)[-2:]
            if a == b:
                agree += 1
            elif top2[1] - top2[0] < 0.01:
                ties += 1
            else:
                break
            ours_logits = ours.forward(np.array([a]), cache, cache.length)
            with torch.inference_mode():
                out = hf(torch.tensor([[b]]), past_key_values=past, use_cache=True)
            past, ref = out.past_key_values, out.logits[0, -1].double().numpy()
            a, b = int(np.argmax(ours_logits)), int(np.argmax(ref))
        print(f"| {name} | {len(ids)} | {diff:.2e} | {agree}/{N_GEN} | {ties} |{vs_lcpp}")
    print(f"\nworst last-logit difference: {worst:.2e} (target <= 1e-3)")


if __name__ == "__main__":
    main()
