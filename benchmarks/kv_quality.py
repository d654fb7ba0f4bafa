"""KV cache types and eviction policies: what they cost in perplexity, on the default model.

    python benchmarks/kv_quality.py [--out docs/bench/kv-quality.json] [--stride 128]

The text: Debian's license texts (GPL-3, Apache-2.0, GFDL-1.3, MPL-2.0, LGPL-2.1, GPL-2,
Artistic), already on the machine, written to a file and read by `selfattn perplexity`'s code.
1. KV types, llama-perplexity's method (windows of 512, second halves scored): f32, f16, q8_0,
   q4_0, and each one's change against f32.
2. Eviction, the way StreamingLLM measured it: the text as one stream, every target from token
   1,024 on scored, with sink:4,window:1020 and window:1024, against the exact baseline that
   recomputes each 1,024-token window from scratch (`--stride` targets per recomputation: 1 is
   exact and slow; 128 means each target sees 897..1,024 tokens).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _corpus import perplexity_text  # noqa: E402

from selfattn.model import Transformer, Tokenizer, default_model_path  # noqa: E402
from selfattn.model import perplexity as ppl  # noqa: E402
from selfattn.model.gguf_file import open_gguf  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/bench/kv-quality.json")
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    text = perplexity_text()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    path = default_model_path()
    reader = open_gguf(path)
    model, tok = Transformer.from_reader(reader, path), Tokenizer.from_gguf(reader, path)
    ids = tok.encode(text)
    console = Console(width=130)
    console.print(f"text: {len(text):,} characters, {len(ids):,} tokens")
    results = {"tokens": len(ids), "characters": len(text), "kv": {}, "eviction": {}}
    for kv in ("f32", "f16", "q8_0", "q4_0"):
        r = ppl.windows(model, ids, args.ctx, kv)
        results["kv"][kv] = r.as_dict()
        console.print(f"{kv}: {r.ppl:.4f} ({r.seconds:.0f} s)")
    base = results["kv"]["f32"]["ppl"]
    t = Table(title=f"KV cache type: perplexity, windows of {args.ctx} ({len(ids):,} tokens)")
    for col in ("KV type", "bits/value", "perplexity", "vs f32"):
        t.add_column(col, justify="right")
    for kv, bits in (("f32", 32), ("f16", 16), ("q8_0", 8.5), ("q4_0", 4.5)):
        p = results["kv"][kv]["ppl"]
        t.add_row(kv, str(bits), f"{p:.4f}", f"{100 * (p / base - 1):+.3f}%")
    console.print(t)

    first = 1024
    runs = [("sink:4,window:1020", lambda: ppl.stream(model, ids, 4, 1020, first=first)),
            ("window:1024", lambda: ppl.stream(model, ids, 0, 1024, first=first)),
            (f"recompute 1024 (stride {args.stride})",
             lambda: ppl.recompute(model, ids, 1024, args.stride, first=first))]
    for name, run in runs:
        r = run()
        results["eviction"][name] = r.as_dict()
        console.print(f"{name}: {r.ppl:.4f} over {r.scored:,} targets ({r.seconds:.0f} s)")
    exact = results["eviction"][runs[2][0]]["ppl"]
    t = Table(title="Eviction over one stream, targets from token 1,024 on")
    for col in ("policy", "perplexity", "vs recompute baseline"):
        t.add_column(col, justify="right")
    for name, _ in runs:
        p = results["eviction"][name]["ppl"]
        t.add_row(name, f"{p:.4f}", f"{100 * (p / exact - 1):+.2f}%")
    console.print(t)
    Path(args.out).write_text(json.dumps(results, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
