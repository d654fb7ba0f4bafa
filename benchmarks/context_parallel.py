"""Context-parallel prefill attention over MPI against one process, on this machine, in one run.

    python benchmarks/context_parallel.py [--shape Llama-3-8B] [--n 16384] [--ranks 2]
        [--threads T] [--reps 3] [--json out.json]
    python benchmarks/context_parallel.py --model [--n 6000] ...

Rows (causal attention of n tokens, float32, one layer's shape):
- one rank x (ranks · T) threads: all the cores in one process (the baseline);
- one rank x T threads: what one rank of the split has, giving the node's attention FLOP/s F;
- R ranks x T threads each: ring_attention over the zigzag split.
Each is a separate launch of this script (`mpiexec -n R ... --worker`); every rep starts after a
barrier and ends when the slowest rank has its part; medians over --reps after one warm-up.
The ring row also gives what its transfers cost (bytes, the share of their time in flight that
compute covered), the link bandwidth measured between ranks 0 and 1 with a ring step's bytes,
and the planner's prediction from those measured F and B (plan/parallel.py: the node's share of
the attention plus what no compute covers of each step). KV cache bytes per rank are those of
ShardedKVCache for the shape's model at n positions against one process's KVCache / R.
T defaults to the cores / ranks. With --model, the same three launches run the default model
instead (`generate` with the sharded cache): TTFT of an n-token prompt and decode tokens/s.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {"SmolLM2-135M": (9, 3, 64, 30), "Llama-3-8B": (32, 8, 128, 32)}  # H, H_kv, D, layers
HERE = Path(__file__).resolve()


def worker(args):
    import selfattn
    from selfattn import attention
    from selfattn.distributed import Comm, RingStats, ring_attention, zigzag

    selfattn.set_num_threads(args.threads)
    comm = Comm(timeout_s=3600)
    H, H_kv, D, L = SHAPES[args.shape]
    n, R = args.n, comm.size
    rng = np.random.default_rng(0)
    runs = zigzag(n, R) if R > 1 else [((0, n),)]
    mine = runs[comm.rank]

    def rows(x):
        return np.ascontiguousarray(np.concatenate([x[:, :, s:s + c] for s, c in mine], axis=2))

    q = rows(rng.standard_normal((1, H, n, D), np.float32))
    k = rows(rng.standard_normal((1, H_kv, n, D), np.float32))
    v = rows(rng.standard_normal((1, H_kv, n, D), np.float32))
    out = {"ranks": R, "threads": args.threads, "n": n, "shape": args.shape}
    if R > 1:  # the link: a ring step's bytes from rank 0 to rank 1 and back, best of 5
        step = np.ones(2 * k.nbytes, np.uint8)
        best = float("inf")
        for _ in range(5):
            comm.barrier("the link measurement")
            t0 = time.perf_counter()
            if comm.rank == 0:
                comm.comm.Send(step, dest=1)
                comm.comm.Recv(step, source=1)
            elif comm.rank == 1:
                comm.comm.Recv(step, source=0)
                comm.comm.Send(step, dest=0)
            best = min(best, (time.perf_counter() - t0) / 2)
        out["link_gbs"] = step.nbytes / best / 1e9
        out.update(kv_cache_bytes(comm, args.shape, n))
    times, stats = [], None
    for rep in range(args.reps + 1):
        comm.barrier("the start of a rep")
        t0 = time.perf_counter()
        if R > 1:
            stats = RingStats()
            ring_attention(comm, q, mine, k, v, runs, causal=True, stats=stats)
        else:
            attention(q, k, v, causal=True)
        mine_s = np.array([time.perf_counter() - t0])
        slowest = float(comm.allgather(mine_s, "the rep's times").max())
        if rep:  # the first is the warm-up
            times.append(slowest)
    out["times_s"] = times
    if stats is not None:
        out["ring"] = stats.as_dict()
    if comm.rank == 0:
        print(json.dumps(out))


def model_worker(args):
    """The default model: a prompt of n tokens (a stdlib module's source) and 32 greedy tokens,
    with the sharded cache on R > 1 ranks. Prints TTFT and decode tokens/s (the slowest rank)."""
    import argparse as source

    import selfattn
    from selfattn.cache import KVCache
    from selfattn.distributed import Comm
    from selfattn.distributed.cache import ShardedKVCache
    from selfattn.model import Sampler, Tokenizer, Transformer, default_model_path, generate
    from selfattn.model.gguf_file import open_gguf

    selfattn.set_num_threads(args.threads)
    comm = Comm(timeout_s=3600)
    path = default_model_path()
    reader = open_gguf(path)
    net = Transformer.from_reader(reader, path)
    ids = Tokenizer.from_gguf(reader, path).encode(Path(source.__file__).read_text())
    ids = (ids * (args.n // len(ids) + 1))[:args.n]
    rows = []
    for rep in range(args.reps + 1):
        cache = ShardedKVCache.for_model(comm, net.args, args.n + 32) if comm.size > 1 else \
            KVCache.for_model(net.args, args.n + 32)
        comm.barrier("the start of a rep")
        st = generate(net, ids, 32, Sampler(), cache)
        got = comm.allgather(np.array([st.ttft_s, st.decode_s]), "the rep's times").max(axis=0)
        if rep:
            rows.append((float(got[0]), 31 / float(got[1])))
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "threads": args.threads, "n": args.n,
                          "ttft_s": [r[0] for r in rows], "decode_tps": [r[1] for r in rows]}))


def kv_cache_bytes(comm, shape, n):
    from selfattn.cache import KVCache
    from selfattn.distributed.cache import ShardedKVCache

    H, H_kv, D, L = SHAPES[shape]
    sharded = ShardedKVCache(comm, L, H_kv, D, n, "f32").nbytes
    one = KVCache(L, H_kv, D, n, "f32").nbytes
    return {"kv_bytes_per_rank": sharded, "kv_bytes_one_process": one}


def three_launches(args, T, last, show):
    """One process on all the cores, one rank of T threads, R ranks of T: {name: the worker's
    JSON}, each shown (show(ranks, threads, row)) as it comes."""
    rows = {}
    for name, ranks, threads in (("one", 1, args.ranks * T), ("node", 1, T),
                                 (last, args.ranks, T)):
        rows[name] = launch(ranks, threads, args)
        show(ranks, threads, rows[name])
    return rows


def launch(ranks, threads, args):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(ranks), sys.executable, str(HERE), "--worker",
           "--shape", args.shape, "--n", str(args.n), "--threads", str(threads),
           "--reps", str(args.reps)] + (["--model"] if args.model else [])
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if got.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="Llama-3-8B")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, help="per rank (default: the cores / ranks)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", action="store_true",
                    help="the default model instead: TTFT of an n-token prompt and decode tok/s")
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return model_worker(args) if args.model else worker(args)
    from selfattn import native
    from selfattn.measure.store import cpu_name
    from selfattn.plan.parallel import ring_step

    cores = len(os.sched_getaffinity(0))
    T = args.threads or max(1, cores // args.ranks)
    if args.model:
        return model_main(args, cores, T)
    H, H_kv, D, _ = SHAPES[args.shape]
    print(f"{cpu_name()}, {cores} cores, selfattn kernels: {native.isa()}; "
          f"{args.shape} attention (H {H}, H_kv {H_kv}, D {D}), causal, n = {args.n:,}, "
          f"float32, {time.strftime('%Y-%m-%d')}", flush=True)

    def show(ranks, threads, row):
        row["median_s"] = float(np.median(row["times_s"]))
        print(f"{ranks} rank{'s' if ranks > 1 else ''} x {threads} thread"
              f"{'s' if threads > 1 else ''}: {row['median_s']:.2f} s (median of {args.reps}: "
              f"{', '.join(f'{t:.2f}' for t in row['times_s'])})", flush=True)
    rows = three_launches(args, T, "ring", show)
    ring, n, R = rows["ring"], args.n, args.ranks
    flops = 4.0 * D * H * n * (n + 1) / 2
    F = flops / rows["node"]["median_s"]
    B = ring["link_gbs"] * 1e9
    c = -(-n // R)
    _, send_s, compute_s = ring_step(c, H, H_kv, D, "f32", F, B)
    predicted = flops / R / F + (R - 1) * max(0.0, send_s - compute_s)
    r = ring["ring"]
    ratio = rows["one"]["median_s"] / ring["median_s"]
    summary = dict(
        speedup_vs_one=ratio,
        speedup_vs_node=rows["node"]["median_s"] / ring["median_s"],
        predicted_s=predicted, prediction_error=predicted / ring["median_s"] - 1,
        node_gflops=F / 1e9, link_gbs=ring["link_gbs"],
        hidden_share=r["hidden_share"], bytes_sent_rank0=r["bytes_sent"],
        kv_bytes_per_rank=ring["kv_bytes_per_rank"],
        kv_share_error=ring["kv_bytes_per_rank"] / (ring["kv_bytes_one_process"] / R) - 1)
    print(f"ring / one process: {ratio:.2f}x as fast (target on 2 cores: within 20%, i.e. >= "
          f"0.83x); / one rank of its threads: {summary['speedup_vs_node']:.2f}x")
    print(f"ring transfers: {r['bytes_sent'] / 2**20:,.1f} MiB sent by rank 0, "
          f"{100 * r['hidden_share']:.0f}% of their time in flight covered by compute; link "
          f"{ring['link_gbs']:.1f} GB/s between ranks 0 and 1")
    print(f"planner from measured F = {F / 1e9:.1f} GFLOP/s a node and B: {predicted:.2f} s "
          f"predicted, {100 * summary['prediction_error']:+.1f}% of measured")
    print(f"KV cache a rank ({SHAPES[args.shape][3]} layers, {n:,} positions, f32): "
          f"{ring['kv_bytes_per_rank'] / 2**20:,.1f} MiB vs one process / {R} = "
          f"{ring['kv_bytes_one_process'] / R / 2**20:,.1f} MiB "
          f"({100 * summary['kv_share_error']:+.3f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu_name(), cores=cores,
                                                   isa=native.isa(), date=time.strftime(
                                                       "%Y-%m-%d"), rows=rows,
                                                   summary=summary), indent=1) + "\n")


def model_main(args, cores, T):
    from selfattn import native
    from selfattn.measure.store import cpu_name

    print(f"{cpu_name()}, {cores} cores, selfattn kernels: {native.isa()}; the default model "
          f"(SmolLM2-135M-Instruct), a {args.n:,}-token prompt, 32 greedy tokens, f32 KV, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)

    def show(ranks, threads, r):
        r["median_ttft_s"] = float(np.median(r["ttft_s"]))
        r["median_decode_tps"] = float(np.median(r["decode_tps"]))
        print(f"{ranks} rank{'s' if ranks > 1 else ''} x {threads} thread"
              f"{'s' if threads > 1 else ''}: TTFT {r['median_ttft_s']:.2f} s "
              f"({', '.join(f'{t:.2f}' for t in r['ttft_s'])}), decode "
              f"{r['median_decode_tps']:.1f} tok/s "
              f"({', '.join(f'{t:.1f}' for t in r['decode_tps'])})", flush=True)
    rows = three_launches(args, T, "sharded", show)
    print(f"TTFT, {args.ranks} ranks / one process: "
          f"{rows['one']['median_ttft_s'] / rows['sharded']['median_ttft_s']:.2f}x as fast; "
          f"decode {rows['sharded']['median_decode_tps'] / rows['one']['median_decode_tps']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu_name(), cores=cores,
                                                   isa=native.isa(), date=time.strftime(
                                                       "%Y-%m-%d"), rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
