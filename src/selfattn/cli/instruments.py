"""`selfattn demo`, `roofline`, `bench` and `plan`: the walls, this machine's limits, predictions."""

import os

from .common import (CLIError, check_outputs, gb, load_model, model_shape, open_model_file,
                     store_path, terminal)


def cmd_demo(args):
    from rich.table import Table

    from ..measure.wall import quadratic_wall

    if args.max_n < 256:
        raise CLIError(f"--max-n must be at least 256, got {args.max_n}")
    if args.heads % args.kv_heads:
        raise CLIError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    ns = []
    n = 256
    while n <= args.max_n:
        ns.append(n)
        n *= 2
    console = terminal()
    console.print(f"[bold]The quadratic wall[/]: causal self-attention, H={args.heads} "
                  f"H_kv={args.kv_heads} D={args.dim}, float32. Reference (builds the n x n "
                  f"matrix, float64) against selfattn's flash path (never builds it).")
    table = Table()
    for col in ("n", "pairs", "impl", "ms (median)", "x prev n", "GFLOP/s", "peak extra MiB"):
        table.add_column(col, justify="right")
    points = []
    with console.status("measuring...") as status:
        for p in quadratic_wall(ns, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
                                reference_max_n=args.reference_max_n):
            status.update(f"measured {p.impl} at n={p.n}")
            points.append(p)
    prev = {}
    for p in sorted(points, key=lambda p: (p.n, p.impl != "reference")):
        grow = f"{p.median_s / prev[p.impl]:.1f}x" if p.impl in prev else ""
        prev[p.impl] = p.median_s
        table.add_row(str(p.n), f"{p.pairs:,}", p.impl, f"{p.median_s * 1e3:.1f}", grow,
                      f"{p.gflops:.1f}", f"{p.peak_bytes / 2**20:.1f}")
    console.print(table)
    console.print("Doubling n multiplies the pairs, and so the time, by ~4: the quadratic wall. "
                  "The reference's memory grows by ~4 too; the flash path's only by ~2 (its "
                  "output and per-task buffers), never n².")


def warn_roofline(roofline: dict, console):
    """Repeat, on stderr, what is wrong with the roofline every figure here is measured against."""
    for w in roofline.get("warnings") or []:
        console.print(f"[yellow]warning: this machine's roofline ({roofline['date']}) is "
                      f"suspect: {w}; `selfattn roofline --refresh` on a quiet machine[/]")


def cmd_roofline(args):
    import json

    from rich.table import Table

    from ..native import describe_isa
    from ..measure.roofline import age, load_or_measure

    console = terminal(stderr=True)
    with console.status("measuring this machine's FLOP/s and read bandwidth..."):
        r, fresh = load_or_measure(refresh=args.refresh)
    warn_roofline(r, console)
    if args.json:
        print(json.dumps(dict(r, measured_now=fresh)))
        return
    table = Table(title=f"roofline of this machine ({r['cpu']}), "
                        f"{'measured now' if fresh else 'measured ' + r['date']}")
    spread = r.get("spread") or {}

    def cell(key):
        return f"{r[key]:.1f}" + (f" (-{100 * spread[key]:.0f}%)" if key in spread else "")
    for col in ("", "1 thread", f"{r['threads']} threads"):
        table.add_column(col, justify="right")
    if r["fma_gflops"] is not None:
        table.add_row("float32 FMA peak GFLOP/s", cell("fma_gflops_1t"), cell("fma_gflops"))
    table.add_row("float32 matmul GFLOP/s", cell("matmul_gflops_1t"), cell("matmul_gflops"))
    table.add_row("read bandwidth GB/s", cell("read_gbs_1t"), cell("read_gbs"))
    table.add_row("ridge point FLOP/byte", "", f"{r['matmul_gflops'] / r['read_gbs']:.1f}")
    terminal().print(table)
    terminal().print(f"Each figure: the best of {r.get('reps', 5)} runs; (-x%): how far the "
                     f"median run fell below it. Measured {age(r['date'])}, {r['threads']} "
                     f"threads. Kernels: {describe_isa(r['isa'])}. BLAS: {r['blas']}. Cached in "
                     f"{store_path('roofline')}; --refresh measures again.")


def cmd_bench(args):
    from . import parallel

    parallel.run(args, "bench", bench_here)


def bench_here(args, cp):
    """bench on this process; cp: this rank's part of a --context-parallel launch, or None.
    Under context parallelism rank 0's roofline is every rank's, rank 0 prints, and no
    calibration is kept (the fit is of this machine running one process)."""
    import json

    from rich.progress import Progress
    from rich.table import Table

    from ..cache import ContextPolicy
    from ..measure import bench
    from ..measure.roofline import load_or_measure, peak_gflops
    from ..plan import ModelShape

    if cp is not None and (args.kernels or args.plot):
        raise CLIError("--context-parallel benchmarks the model: not with --kernels or --plot")
    quiet = cp is not None and cp.rank != 0
    if not quiet:  # rank 0 writes them (several ranks testing one path would race)
        check_outputs(args, {"json": (".json",), "plot": (".png", ".svg", ".pdf")})
    console = terminal(stderr=True)
    opened = open_model_file(args.model)
    path, reader, _ = opened
    shape = ModelShape.from_gguf(reader, path)
    depths = sorted(set(args.depths))
    if cp is None:
        with console.status("roofline..."):
            roofline, _ = load_or_measure()
    else:
        roofline = cp.share(lambda: load_or_measure()[0], "rank 0's roofline")
    if not quiet:
        warn_roofline(roofline, console)
    with Progress(console=console, transient=True, disable=quiet) as progress:
        if args.kernels:
            total = len(depths) + sum(1 for d in depths if d > 0)
            task = progress.add_task("attention kernels", total=total)
            records = bench.run_kernel_bench(shape, roofline, args.p, depths, args.reps,
                                             on_step=lambda _: progress.advance(task))
        else:
            task = progress.add_task("loading the model", total=bench.count_steps(depths))
            model, _, _, _ = load_model(path, args.kv_dtype, opened)
            progress.update(task, description="benchmarking")
            cache = None if cp is None else cp.cache(
                model.args, ContextPolicy("full"), max(depths) + max(args.p, args.n),
                args.kv_dtype)
            peak_during = [fma_now(roofline) if cp is None else None]
            records = bench.run_bench(model, shape, roofline, args.p, args.n, depths, args.reps,
                                      args.ttft_reps, on_step=lambda s: progress.update(
                                          task, advance=1, description=s),
                                      kv_dtype=args.kv_dtype, cache=cache)
            peak_during.append(fma_now(roofline) if cp is None else None)
            peak_during = min(peak_during) if None not in peak_during else None
    if quiet:
        return
    name = os.path.basename(path)
    where = f"on {roofline['cpu']} ({roofline['threads']} threads" if cp is None else \
        f"context parallel on {cp.size} ranks x {cp.threads} threads (rank 0: {roofline['cpu']}"
    table = Table(title=f"selfattn bench: {name}, {args.kv_dtype} KV, {where}, "
                        f"{roofline['isa']} kernels; roofline {peak_gflops(roofline):.0f} GFLOP/s, "
                        f"{roofline['read_gbs']:.1f} GB/s)")
    for col in ("test", "t/s", "TTFT s", "attn share", "pairs", "W B/tok", "KV B/tok",
                "of roofline"):
        table.add_column(col, justify="right")
    for r in records:
        spread = f" ± {r.stddev_ts:,.1f}" if len(r.samples_ns) > 1 else " (1 sample)"
        table.add_row(r.test, f"{r.median_ts:,.1f}{spread}",
                      f"{r.ttft_s:.3f}" if r.ttft_s else "",
                      f"{100 * r.attention_share:.0f}%", f"{r.attention_pairs:,}",
                      f"{r.weight_bytes_per_token / 1e6:,.0f} MB" if r.weight_bytes_per_token else "",
                      f"{r.kv_bytes_per_token / 1e6:,.1f} MB" if r.kv_bytes_per_token else "",
                      f"{100 * r.roofline_fraction:.0f}% {'BW' if r.n_gen else 'FLOP/s'}")
    out = terminal()
    out.print(table)
    for r in records:  # no kernel passes the roofline: if one seems to, say what that means
        if r.roofline_fraction > 1:
            out.print(f"[yellow]{r.test}: {100 * r.roofline_fraction:.0f}% of the roofline: "
                      + ("its bytes came partly from the CPU's caches, not memory, or "
                         if r.n_gen else "") + "the roofline was measured in a slow moment "
                      "(`selfattn roofline --refresh`)[/]")
    fit, kept = None, False
    if cp is not None:
        out.print("not calibrated: `plan --hardware this` is fitted to one process's runs; "
                  "rank 0's times are shown (it waits for the others in every step)")
    elif not args.kernels:
        fit, kept = keep_calibration(records, shape, roofline, args.kv_dtype, peak_during, out)
    if args.plot:
        if fit is None:
            raise CLIError("--plot needs a run the speed model can be fitted to (without "
                           "--kernels, two or more depths)")
        from ..measure.plot import plot_bench
        plot_bench(records, shape, roofline, fit, args.plot, f"selfattn bench: {name}",
                   "fit" if kept else "fit, not kept")
        out.print(f"wrote {args.plot}")
    if args.json:
        doc = [dict(r.as_dict(), model=name, model_params=shape.params,
                    model_bytes=shape.file_bytes,
                    threads=roofline["threads"] if cp is None else cp.threads,
                    isa=roofline["isa"], backend="selfattn (CPU)",
                    **({} if cp is None else {"context_parallel_ranks": cp.size}))
               for r in records]
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        out.print(f"wrote {args.json}")


def fma_now(roofline: dict) -> float | None:
    """A short FMA-peak measurement on the roofline's threads: is the machine as quiet now?"""
    from .. import native

    if not native.available() or not roofline.get("fma_gflops"):
        return None
    return native.fma_gflops(roofline["threads"], seconds=0.02, reps=3)


def keep_calibration(records, shape, roofline, kv_dtype, peak_during, out):
    """Fit the planner's efficiencies to bench's records and store them only when nothing is
    wrong with the fit; print the old and new ones side by side. -> (the fit or None, kept)."""
    from rich.table import Table

    from ..measure import bench, store

    kind = "calibration" if kv_dtype == "f32" else f"calibration-{kv_dtype}"
    old = store.load(kind)
    try:
        fit = bench.calibrate(records, shape, roofline, kv_dtype)
    except ValueError as e:
        out.print(f"not calibrated: {e}")
        return None, False
    problems = bench.refusals(records, fit, shape, roofline, kv_dtype, peak_during)
    table = Table(title="efficiencies (shares of the roofline)")
    for col in ("", f"stored ({old['date']})" if old else "stored", "this run"):
        table.add_column(col, justify="right")
    for k in bench.EFFICIENCIES:
        table.add_row(k, f"{old[k]:.3f}" if old else "none", f"{fit[k]:.3g}")
    out.print(table)
    if problems:
        out.print("[yellow]not calibrated: this run's fit is not kept"
                  + (f"; `plan` keeps the stored one ({old['date']})" if old else "") + "[/]")
        for p in problems:
            out.print(f"- {p}")
        return fit, False
    store.save(kind, fit)
    out.print(f"calibrated `selfattn plan --hardware this` ({store_path(kind)}): "
              + ("replaces the stored fit above" if old else "the first fit on this machine"))
    return fit, True


def calibrate_device(args, shape):
    """--calibrate-from: fit one catalog device's efficiencies to a user's llama-bench run and
    keep them (per device, in this machine's cache) for every later plan of that device."""
    from ..measure import store
    from ..plan import find_hardware, llama_bench
    from ..plan.predict import catalog_device

    names = [n.strip() for n in args.hardware.split(",")]
    if args.rank or len(names) != 1 or names[0] == "this":
        raise CLIError("--calibrate-from calibrates one catalog device: name it with --hardware "
                       "(this machine is calibrated by `selfattn bench`)")
    entry = find_hardware(names[0])
    before = catalog_device(entry)
    fit = llama_bench.fit(llama_bench.read_records(args.calibrate_from), shape, before)
    store.save(f"llama-bench-{entry['name']}", dict(fit, source=os.path.basename(
        args.calibrate_from)))
    out = terminal(stderr=True)
    out.print(f"{entry['name']}: prefill efficiency {before.e_linear:.2f} -> {fit['e_linear']:.2f}, "
              f"decode {before.e_weights:.2f} -> {fit['e_weights']:.2f} of its specification's "
              f"peaks ({fit['tests']} llama-bench tests); kept for later plans of this device")


def show_context_parallel(out, cps, preds, args):
    from rich.table import Table

    table = Table(title=f"context parallel: {args.nodes} nodes, {args.link_gbps:g} Gbit/s links "
                        f"({args.link_latency_us:g} us), {args.ctx:,} tokens")
    for col in ("hardware", "fits a node", "KV a node", f"TTFT {args.ctx:,}", "one node",
                "speedup", "ring step: send / compute", "hidden", "chunk to hide",
                f"tok/s @ d{args.ctx}"):
        table.add_column(col, justify="right")
    for cp, p in zip(cps, preds):
        table.add_row(p.hardware, "yes" if cp.fits else "[red]no[/]",
                      f"{gb(cp.kv_cache_bytes_per_node)} {p.kv_dtype}", f"{cp.ttft_s:,.2f} s",
                      f"{cp.ttft_s_one_node:,.2f} s", f"{cp.speedup:.2f}x",
                      f"{cp.step_transfer_s * 1e3:,.2f} / {cp.step_compute_s * 1e3:,.2f} ms",
                      "yes" if cp.hidden else "[red]no[/]", f"{cp.min_chunk:,} tokens",
                      f"{cp.decode_tps:,.1f}")
    out.print(table)
    out.print(f"Predictions. Each node holds {cps[0].chunk:,} prompt tokens; a ring step sends "
              f"{cps[0].step_bytes / 2**20:,.2f} MiB a layer (K and V of those tokens). The link "
              "figures are assumed (the options above); the node figures rest on what the "
              "table above says.")


def cmd_plan(args):
    import json

    from rich.table import Table

    from ..cache import available_memory
    from ..plan import device_for_this_machine, find_hardware, hardware_entries, plan
    from ..plan.predict import catalog_device

    shape = model_shape(args.model, args.quant)

    def device(name):
        if name == "this":
            from ..measure import bench, store
            from ..measure.roofline import load_or_measure

            roofline, _ = load_or_measure()
            warn_roofline(roofline, terminal(stderr=True))
            kv = args.kv_dtype or "f32"  # efficiencies fitted with this KV type, else f32's
            calibration = store.load(f"calibration-{kv}") or store.load("calibration")
            dev = device_for_this_machine(roofline, calibration, available_memory() or 0)
            if calibration and calibration.get("weights") != bench.weights_layout(dev):
                # fitted with other kernels, or weights read another way: not this machine's
                dev = device_for_this_machine(roofline, None, dev.memory_bytes)
            return dev
        from ..measure import store

        return catalog_device(find_hardware(name), store.load(f"llama-bench-{name}"))

    if args.calibrate_from:
        calibrate_device(args, shape)
    if (args.nodes is None) != (args.link_gbps is None):
        raise CLIError("--nodes and --link-gbps go together (context parallelism on N nodes "
                       "joined by a B Gbit/s link)")
    if args.rank:
        devices = [catalog_device(e) for e in hardware_entries()]
    else:
        devices = [device(n.strip()) for n in args.hardware.split(",")]
    kv = args.kv_dtype
    preds = [plan(shape, d, args.ctx, kv or ("f32" if d.name == "this" else "f16"), args.min_tps)
             for d in devices]
    if args.rank:
        preds.sort(key=lambda p: (not p.fits, -p.decode_tps))
    cps = [None] * len(preds)
    if args.nodes:
        from ..plan.parallel import context_parallel

        cps = [context_parallel(shape, d, args.ctx, p.kv_dtype, args.nodes, args.link_gbps,
                                args.link_latency_us) for p, d in zip(preds, devices)]
    if args.json:
        docs = [dict(p.as_dict(), hardware_label=d.label, source=d.source,
                     runnable=shape.cannot_run is None, cannot_run=shape.cannot_run,
                     **({} if cp is None else {"context_parallel": cp.as_dict()}))
                for p, d, cp in zip(preds, devices, cps)]
        print(json.dumps(docs[0] if len(docs) == 1 and not args.rank else docs))
        return
    out = terminal()
    table = Table(title=f"selfattn plan: {shape.name} ({shape.quant}, {shape.params / 1e9:.2f} B "
                        f"params) at {args.ctx:,} tokens of context")
    for col in ("hardware", "fits", "weights", "KV cache", "total / usable", "max ctx",
                f"TTFT {args.ctx:,}", f"tok/s @ d{args.ctx}", "tok/s empty") + \
            (("below min @",) if args.min_tps else ()):
        table.add_column(col, justify="right")
    for p in preds:
        table.add_row(p.hardware + ("" if p.calibrated else " (uncalibrated)"),
                      "yes" if p.fits else "[red]no[/]", gb(p.weights_bytes),
                      f"{gb(p.kv_cache_bytes)} {p.kv_dtype}",
                      f"{gb(p.total_bytes)} / {gb(p.usable_bytes)}", f"{p.max_ctx:,}",
                      f"{p.ttft_s:,.2f} s", f"{p.decode_tps:,.1f}", f"{p.decode_tps_empty:,.1f}",
                      *(((f"not by {p.max_ctx:,}" if p.min_tps_depth is None
                           else f"{p.min_tps_depth:,}"),)
                        if args.min_tps else ()))
    out.print(table)
    if args.nodes:
        show_context_parallel(out, cps, preds, args)
    if shape.cannot_run:
        out.print(f"[yellow]{shape.cannot_run}[/]")
    if len(preds) == 1:
        for line in preds[0].advice:
            out.print(f"- {line}")
    out.print("Memory figures are counted from the model's shape and types. The speed figures "
              "are predictions; what they rest on:")
    groups = {}
    for p in preds:
        groups.setdefault((p.basis["peak"], p.basis["efficiencies"]), []).append(p.hardware)
    for (peak, eff), names in groups.items():
        who = ", ".join(names) if len(names) <= 4 else f"{len(names)} devices"
        out.print(f"- {who}: peak FLOP/s and bandwidth {peak}; efficiencies {eff}")
