"""`selfattn generate` and `selfattn perplexity`: run a model over text."""

import sys

from . import parallel
from .common import (CLIError, chat_mode, check_kv_dtype, check_system, guard_memory,
                     load_model, open_model_file, prompt_ids, terminal)


def cmd_generate(args):
    from ..model import Sampler

    check_system(args)
    Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # checked early
    parallel.run(args, "generate", generate_here)


def generate_here(args, cp):
    """generate on this process; cp: this rank's part of a --context-parallel launch, or None
    (then only rank 0 prints)."""
    import json

    quiet = cp is not None and not cp.prints
    # progress on a terminal only: nothing extra with --json or when piped
    console = terminal(stderr=True)
    status = console.status("opening the model...") \
        if console.is_terminal and not args.json and not quiet else None
    if status:
        status.start()
    try:
        stats, tok, path, load_s, policy, ctx, eos, cache = run_generate(args, status, cp)
    finally:
        if status:
            status.stop()
    if quiet:
        return
    out_ids = [t for t in stats.token_ids if t not in eos]
    text_out = tok.decode(out_ids, skip_special=True)
    roofline = this_roofline(measure=args.breakdown)
    parts = phases(stats, roofline)
    if args.json:
        extra = {} if cp is None else dict(context_parallel=cp.figures(cache))
        print(json.dumps(dict(model=str(path), chat=chat_mode(tok, args), text=text_out,
                              load_s=load_s, ctx=ctx,
                              kv_dtype=args.kv_dtype, context_policy=str(policy),
                              **stats.as_dict(), breakdown=parts, **extra)))
    else:
        print()
        print(f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated "
              f"({stats.stop_reason}) | load {load_s:.2f} s | TTFT {stats.ttft_s * 1e3:.0f} ms "
              f"({stats.prefill_tps:.0f} tok/s) | decode {stats.decode_tps:.1f} tok/s | "
              f"attention {100 * stats.attention_share:.0f}% of forward time | KV cache "
              f"{stats.kv_cache_bytes / 2**20:.0f} MiB {args.kv_dtype}, "
              f"{ctx if policy.kind == 'full' else policy} positions]", file=sys.stderr)
        if cp is not None:
            f = cp.figures(cache)
            threads = f"{f['threads_per_rank']} thread" + ("s" if f["threads_per_rank"] > 1 else "")
            print(f"[context parallel: {f['ranks']} ranks x {threads} | KV "
                  f"cache {f['kv_cache_bytes_per_rank'] / 2**20:.0f} MiB a rank | ring "
                  f"{f['ring_bytes_sent_per_layer'] / 2**20:.2f} MiB sent a layer by rank 0, "
                  f"{100 * f['ring_hidden_share']:.0f}% of its transfer time behind compute | "
                  f"decode waited {f['decode_wait_s'] * 1e3:.0f} ms on the others]",
                  file=sys.stderr)
        if args.breakdown:
            show_breakdown(parts, stats, roofline)


def run_generate(args, status, cp=None):
    """cmd_generate's work, with `status` (a rich Status, or None) saying what it is doing
    until the first token streams. -> (stats, tokenizer, path, load_s, policy, ctx, eos ids,
    cache)."""
    from ..cache import make_cache
    from ..model import Sampler, StreamDecoder, generate

    opened = open_model_file(args.model)
    policy, ctx = guard_memory(args, opened)
    if status:
        status.update("loading the model...")
    model, tok, path, load_s = load_model(args.model, args.kv_dtype, opened)
    ids = prompt_ids(tok, args)
    if policy.kind == "full" and len(ids) >= ctx:
        raise CLIError(f"the prompt is {len(ids)} tokens, the context is {ctx}: raise --ctx, "
                       "shorten the prompt, or let old tokens go with --context-policy "
                       "sink:4,window:W")
    if cp is None:
        cache = make_cache(model.args, policy, ctx, args.kv_dtype)
        seed = args.seed
    else:  # every rank samples alike: one seed
        cache = cp.cache(model.args, policy, ctx, args.kv_dtype)
        seed = cp.shared_seed(args.seed)
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=seed)
    budget = args.max_tokens if policy.kind != "full" else min(args.max_tokens, ctx - len(ids))
    stream = StreamDecoder(tok)

    def prefilling(done, total):
        if cp is not None and done == total:
            cp.prefilled()
        if status:
            status.update(f"prompt: {done:,} of {total:,} tokens through the model...")

    def show(token_id):
        if cp is not None and not cp.prints:
            return
        if status:
            status.stop()  # the first token: the text takes over
        if token_id != tok.eos_id:
            sys.stdout.write(stream.push(token_id))
            sys.stdout.flush()
    eos = {tok.eos_id} if tok.eos_id is not None else set()
    stats = generate(model, ids, budget, sampler, cache, eos, None if args.json else show,
                     prefilling)
    return stats, tok, path, load_s, policy, ctx, eos, cache


def this_roofline(measure: bool) -> dict | None:
    """This machine's roofline: the stored one, or (measure) one measured now."""
    from ..measure import store
    from ..measure.roofline import load_or_measure

    if measure:
        with terminal(stderr=True).status("measuring this machine's roofline (once)..."):
            return load_or_measure()[0]
    return store.load("roofline")


def phases(stats, roofline) -> dict:
    """The prompt's (TTFT) and the decode's breakdown (measure.breakdown), by phase."""
    from ..measure.breakdown import breakdown

    out = {"prompt": breakdown(stats.prompt_timings, stats.ttft_s, False, roofline)}
    if stats.decode_s > 0 and stats.decode_timings.forward_calls:
        out["decode"] = breakdown(stats.decode_timings, stats.decode_s, True, roofline)
    return out


def show_breakdown(parts: dict, stats, roofline):
    from rich.table import Table

    wall = {"prompt": stats.ttft_s, "decode": stats.decode_s}
    for phase, rows in parts.items():
        ceiling = "FMA peak" if phase == "prompt" else "read bandwidth"
        table = Table(title=f"{phase}: {wall[phase] * 1e3:,.1f} ms "
                            f"({stats.prompt_tokens if phase == 'prompt' else stats.generated_tokens - 1} tokens)")
        for col in ("part", "ms", "share", "work", f"of {ceiling}"):
            table.add_column(col, justify="right")
        for r in rows:
            if phase == "decode" and r["bytes"]:
                work = f"{r['bytes'] / 1e6:,.1f} MB read"
            elif r["flops"]:
                work = f"{r['flops'] / 1e9:,.2f} GFLOP"
            else:
                work = ""
            frac = r["roofline_fraction"]
            table.add_row(r["part"], f"{r['seconds'] * 1e3:,.1f}", f"{100 * r['share']:.0f}%",
                          work, "" if frac is None else f"{100 * frac:.0f}%")
        terminal(stderr=True).print(table)
    if roofline:
        terminal(stderr=True).print(f"roofline: {roofline['cpu']}, {roofline['threads']} threads, "
                                    f"measured {roofline['date']}")


def cmd_perplexity(args):
    parallel.run(args, "perplexity", perplexity_here)


def perplexity_here(args, cp):
    import json

    from rich.progress import Progress

    from ..cache import parse_policy
    from ..model import perplexity as ppl

    try:
        text = open(args.file, encoding="utf-8").read()
    except UnicodeDecodeError as e:
        raise CLIError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    policy = parse_policy(args.context_policy or "full")
    if args.recompute and policy.kind != "full":
        raise CLIError("--recompute is its own method: leave --context-policy out")
    if cp is not None and (args.recompute or policy.kind != "full"):
        raise CLIError("--context-parallel runs llama-perplexity's windows (the full policy), "
                       "not --recompute or --context-policy")
    model, tok, path, _ = load_model(args.model, args.kv_dtype)
    check_kv_dtype(args.kv_dtype, model.args.head_dim)
    ids = tok.encode(text)
    if args.max_text_tokens:
        ids = ids[:args.max_text_tokens]
    quiet = cp is not None and not cp.prints
    console = terminal(stderr=True)
    with Progress(console=console, transient=True, disable=quiet) as progress:
        task = progress.add_task("perplexity", total=None)

        def on_step(done, total):
            progress.update(task, completed=done, total=total)
        if args.recompute:
            r = ppl.recompute(model, ids, args.recompute, args.stride, args.kv_dtype,
                              args.first or 0, on_step)
        elif policy.kind == "full":
            cache = None if cp is None else cp.cache(model.args, policy, args.ctx, args.kv_dtype)
            r = ppl.windows(model, ids, args.ctx, args.kv_dtype, on_step, cache)
        else:
            r = ppl.stream(model, ids, policy.sinks, policy.window, args.kv_dtype,
                           args.first or 1, on_step=on_step)
    if quiet:
        return
    doc = dict(r.as_dict(), model=str(path), file=args.file, kv_dtype=args.kv_dtype,
               policy=str(policy), ctx=args.ctx,
               **({} if cp is None else {"context_parallel_ranks": cp.size}))
    if args.json:
        print(json.dumps(doc))
    else:
        terminal().print(f"perplexity {r.ppl:.4f} ({r.method}, {args.kv_dtype} KV): {r.scored:,} "
                         f"of {r.tokens:,} tokens scored in {r.seconds:.1f} s")
