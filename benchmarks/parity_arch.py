"""selfattn and the float64 references of tests/arch_reference.py against HF transformers
loading the same tiny GGUF files (tests/tiny_gguf.py), one per architecture and variant (not run
in CI).

    python benchmarks/parity_arch.py [--tokens 24] [--only NAME ...]

Needs torch and transformers (pip install transformers). For each case: a tiny random GGUF is
written and loaded with AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32,
attn_implementation="eager"); printed are the max |difference| of HF's logits from the float64
reference (at the last position and over all positions), and from selfattn's own forward
(Transformer.load on the same file, float32, the compiled kernels when built) at the last
position, with the positions where selfattn's greedy token (argmax) equals HF's. Exit status 1
if a last-position difference exceeds --tol or a greedy token differs.

HF's GGUF loader does not read every key llama.cpp does; the config values it misses are passed
to from_pretrained as overrides (OVERRIDES below, listed in the output), so the comparison is of
the weights' layout and the math, not of HF's metadata mapping:
  qwen3   attention.key_length is not mapped: head_dim (Qwen3Config defaults to 128)
  gemma2  attn_logit_softcapping / final_logit_softcapping are not mapped (HF defaults 50 / 30);
          query_pre_attn_scalar (HF default 256) is set to head_dim, which is what llama.cpp uses
          (1/sqrt(attention.key_length)) for every size but 27B
  gemma3  query_pre_attn_scalar as gemma2; rope.scaling.* not mapped (rope_scaling)
  phi3    rope.dimension_count is not mapped: partial_rotary_factor; sliding_window not mapped;
          pad_token_id None (Phi3Config's 32000 is outside the tiny vocabulary)
  llama   rope_freqs.weight (llama3) is not read: rope_parameters llama3 (HF then computes its own
          factors from the parameters, so this also checks the converter's formula)
  mistral (llama with llama.attention.sliding_window) the Llama weights HF loads are moved into a
          MistralForCausalLM with sliding_window (HF maps a file named "mistral" to Mistral but
          then fails in gguf-py's name map)
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.arch_reference import reference_logits  # noqa: E402
from tests.tiny_gguf import KQUANT_SHAPE, Q, make_weights, matrices, write_gguf  # noqa: E402

KQUANT_MIX = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.BF16, Q.Q8_0,
              Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16]

# name: (arch, make_weights options, quantize with KQUANT_MIX)
CASES = {
    "llama": ("llama", {}, False),
    "llama-llama3-rope": ("llama", dict(llama3=True), False),
    "mistral-window": ("llama", dict(window=8), False),
    "qwen2": ("qwen2", {}, False),
    "qwen3": ("qwen3", {}, False),
    "gemma2": ("gemma2", {}, False),
    "gemma3": ("gemma3", {}, False),
    "gemma3-linear-rope": ("gemma3", dict(rope_scale=8.0), False),
    "phi3": ("phi3", {}, False),
    "phi3-window": ("phi3", dict(window=8), False),
    "llama-kquants": ("llama", dict(KQUANT_SHAPE), True),
    "qwen3-kquants": ("qwen3", dict(KQUANT_SHAPE), True),
    "gemma2-kquants": ("gemma2", dict(KQUANT_SHAPE), True),
    "gemma3-kquants": ("gemma3", dict(KQUANT_SHAPE), True),
    "phi3-kquants": ("phi3", dict(KQUANT_SHAPE), True),
}


def overrides(cfg):
    """Config values HF's GGUF loader does not take from the file (see the module docstring)."""
    arch, o = cfg["arch"], {}
    if arch == "qwen3":
        o["head_dim"] = cfg["head_dim"]
    if arch in ("gemma2", "gemma3"):
        o["query_pre_attn_scalar"] = cfg["head_dim"]
    if arch == "gemma2":
        o["attn_logit_softcapping"] = cfg["attn_softcap"]
        o["final_logit_softcapping"] = cfg["final_softcap"]
    if arch == "gemma3" and cfg["rope_scale"]:
        o["rope_parameters"] = {
            "full_attention": dict(rope_type="linear", factor=cfg["rope_scale"],
                                   rope_theta=cfg["theta"]),
            "sliding_attention": dict(rope_type="default", rope_theta=cfg["theta_local"])}
    if arch == "phi3":
        o["pad_token_id"] = None  # Phi3Config's default 32000 is outside a tiny vocabulary
        o["rope_parameters"] = dict(rope_type="default", rope_theta=cfg["theta"],
                                    partial_rotary_factor=cfg["rope_dim"] / cfg["head_dim"])
    if arch == "phi3" and cfg["window"]:
        o["sliding_window"] = cfg["window"]
    if cfg["llama3"]:
        o["rope_parameters"] = dict(rope_type="llama3", rope_theta=cfg["theta"], **cfg["llama3"])
    return o


def _as_mistral(llama, window):
    """The loaded Llama weights in a MistralForCausalLM with a sliding window (HF's GGUF loader
    reads a llama file named "mistral" as Mistral, but then fails in gguf-py's name map)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    c = {k: v for k, v in llama.config.to_dict().items()
         if k not in ("model_type", "architectures", "sliding_window")}
    model = MistralForCausalLM(MistralConfig(**c, sliding_window=window)).to(torch.float32)
    model.config._attn_implementation = "eager"
    model.load_state_dict(llama.state_dict())
    return model


def hf_logits(path, cfg, tokens):
    """float64 logits (T, vocab) from transformers loading the GGUF file at path."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation="eager", **overrides(cfg))
    if cfg["arch"] == "llama" and cfg["window"]:
        model = _as_mistral(model, cfg["window"])
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens)[None], dtype=torch.long))
    return out.logits[0].double().numpy()


def selfattn_logits(path, tokens):
    """(T, vocab) float32 logits of selfattn's forward over the file at path."""
    from selfattn.cache import KVCache
    from selfattn.model import Transformer

    m = Transformer.load(path)
    return m.forward(np.asarray(tokens), KVCache.for_model(m.args, len(tokens)), 0,
                     all_logits=True)


def compare(name, tmpdir, n_tokens=24, seed=0):
    """-> (max |HF - reference| at the last position, over all positions, max |selfattn - HF|
    at the last position, positions whose argmax agrees, overrides used)."""
    arch, options, quantized = CASES[name]
    w, cfg = make_weights(np.random.default_rng(seed), arch=arch, **options)
    path = os.path.join(tmpdir, f"{name}.gguf")
    quant = {n: KQUANT_MIX[i % len(KQUANT_MIX)] for i, n in enumerate(matrices(w))} \
        if quantized else None
    held = write_gguf(path, w, cfg, quant=quant)
    tokens = np.random.default_rng(seed + 1).integers(0, cfg["vocab"], n_tokens)
    ref = reference_logits(held, cfg, tokens)
    got = hf_logits(path, cfg, tokens)
    diff = np.abs(got - ref)
    ours = selfattn_logits(path, tokens).astype(np.float64)
    same = int((ours.argmax(-1) == got.argmax(-1)).sum())
    return (float(diff[-1].max()), float(diff.max()), float(np.abs(ours[-1] - got[-1]).max()),
            same, overrides(cfg))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--only", nargs="*", choices=sorted(CASES))
    args = ap.parse_args()
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or CASES:
            try:
                last, every, ours, same, o = compare(name, tmp, args.tokens)
            except Exception as e:  # an arch HF cannot load: say so, go on
                print(f"{name:20s} FAILED  {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                bad += 1
                continue
            ok = last <= args.tol and ours <= args.tol and same == args.tokens
            bad += not ok
            print(f"{name:20s} {'ok  ' if ok else 'DIFF'}  reference: last {last:.2e}  all "
                  f"{every:.2e}  selfattn: last {ours:.2e}  greedy {same}/{args.tokens}"
                  f"  overrides {o}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
