"""Attention kernels against their peers, on this machine, in one run.

    python benchmarks/attention.py [--quick] [--reps 5] [--rounds 1] [--threads 2] [--json out.json]

Rows: prefill (causal, T = S = n) and decode (T = 1 against S keys), for two shapes:
SmolLM2-135M (H 9, H_kv 3, D 64) and Llama-3-8B (H 32, H_kv 8, D 128), float32.
Columns: selfattn, a plain NumPy implementation (per head: scores, softmax, @ v) and
torch.nn.functional.scaled_dot_product_attention (CPU, enable_gqa=True), all on the same threads;
the machine's limits (the FMA units' peak, NumPy BLAS matmul GFLOP/s, read bandwidth) measured in
the same run, before and after the tables (the higher of the two is used: on a shared machine a
busy moment lowers a peak, nothing raises it); prefill rows also say what share of the FMA peak
selfattn and SDPA reach, and decode rows the read bandwidth of a plain read of as many bytes as
K and V hold, measured in selfattn's process after its row (on a CPU with a last-level cache of
hundreds of MB a small cache is read from it, faster than the 512 MiB roofline figure allows).
"% of roofline" is of the FMA peak (prefill) and of the better of those two reads (decode); a
selfattn row above 100% is listed at the end as a roofline measured low.
The header names the instruction-set level of selfattn's kernels (SELFATTN_ISA forces one).
Times are medians over --reps after one warm-up call (which also compiles), in each of --rounds
processes per implementation, run in turn with the peers' (selfattn, NumPy, SDPA, selfattn, ...:
on a shared host a slow stretch of minutes then falls on every implementation alike, not on
whichever ran in it); the median is over all rounds' samples, and raw samples go to --json.
GFLOP/s counts 4·n²·D·H, halved for causal, for every implementation alike. Inputs are
allocated 64-byte aligned, as selfattn's KV cache is, and every implementation gets the same ones.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, if set, pin OpenBLAS to an older kernel; this script
re-executes itself without them (its own process only) unless --keep-blas-env, and prints the
BLAS kernel that ran.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

if __name__ == "__main__" and "--keep-blas-env" not in sys.argv and (
        "OPENBLAS_CORETYPE" in os.environ or "OPENBLAS_L2_SIZE" in os.environ):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import selfattn  # noqa: E402
from selfattn import native  # noqa: E402
from selfattn.measure.roofline import blas_description, matmul_gflops, read_gbs  # noqa: E402

SHAPES = {"SmolLM2-135M": (9, 3, 64), "Llama-3-8B": (32, 8, 128)}
PREFILL_N = [512, 1024, 2048, 4096, 8192]
DECODE_S = [1024, 4096, 16384, 32768, 65536]


def numpy_plain(q, k, v, causal):
    """The textbook formula in float32 NumPy, one head at a time (T x S per head)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    S = k.shape[2]
    out = np.empty((B, H, T, v.shape[-1]), q.dtype)
    allowed = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None] if causal else None
    for b in range(B):
        for h in range(H):
            s = (q[b, h] @ k[b, h // G].T) * np.float32(1 / np.sqrt(D))
            if causal:
                s = np.where(allowed, s, np.float32(-np.inf))
            s = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = (s / s.sum(-1, keepdims=True)) @ v[b, h // G]
    return out


def make_impl(name, causal):
    if name == "selfattn":
        return lambda q, k, v: selfattn.attention(q, k, v, causal=causal)
    if name == "numpy":
        return lambda q, k, v: numpy_plain(q, k, v, causal)
    import torch

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_sdpa(q, k, v):
        with torch.inference_mode():
            return sdpa(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                        is_causal=causal and q.shape[2] > 1, enable_gqa=True)

    return torch_sdpa


def time_it(fn, reps):
    fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return samples


def worker(name, phase, H, H_kv, D, sizes, reps, threads):
    """Runs in a fresh process: one implementation, one phase, one shape, every size.

    Peers never share a process: OpenBLAS's, OpenMP's and numba's idle threads spin for a while
    after each call and would slow whoever runs next in the same process.
    """
    if name == "sdpa":
        import torch

        torch.set_num_threads(threads)
    else:  # not in torch's process: numba's OpenMP runtime would fight torch's own
        selfattn.set_num_threads(threads)
    from selfattn.cache.memory import aligned_zeros

    def normal(shape):  # 64-byte aligned, as a KV cache is (NumPy's big arrays start mid-line)
        x = aligned_zeros(shape, np.float32)
        x[:] = rng.standard_normal(shape, np.float32)
        return x

    fn = make_impl(name, causal=phase == "prefill")
    rng = np.random.default_rng(0)
    out, ceiling = {}, {}
    with threadpool_limits(threads, user_api="blas"):
        for size in sizes:
            T = size if phase == "prefill" else 1
            q, k, v = normal((1, H, T, D)), normal((1, H_kv, size, D)), normal((1, H_kv, size, D))
            out[size] = time_it(lambda: fn(q, k, v), reps)
            if phase == "decode" and name == "selfattn" and native.available():
                # the bandwidth ceiling of this row: a plain read of as many bytes as K and V,
                # in this process (a last-level cache of hundreds of MB holds small caches)
                del q, k, v
                ceiling[size] = native.read_gbs(threads, nbytes=2 * H_kv * size * D * 4)
    return out, ceiling


def describe_torch():
    import torch

    return f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"


def torch_available():
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def cpu_jiffies():
    """(stolen, total) CPU time of this machine so far (/proc/stat), or None: the host running
    something else on our virtual CPUs shows up as steal, and a row measured then is low."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def steal_share(before, after):
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def measure_limits(threads):
    """(FMA peak GFLOP/s or None, NumPy matmul GFLOP/s, read GB/s) on `threads` threads; BLAS
    last, since its threads spin for a while after a matmul and slow what runs next."""
    fma = native.fma_gflops(threads) if native.available() else None
    bandwidth = read_gbs(threads=threads)
    with threadpool_limits(threads, user_api="blas"):
        matmul = matmul_gflops(threads=threads)
    return fma, matmul, bandwidth


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="processes per implementation, in turn with the peers'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="n <= 2048, S <= 16384")
    ap.add_argument("--numpy-max-n", type=int, default=4096,
                    help="largest n for the plain NumPy peer (its T x S matrix per head)")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--keep-blas-env", action="store_true")
    ap.add_argument("--phases", default="prefill,decode", help="which tables to run")
    args = ap.parse_args()

    console = Console(width=160)
    torch_info = "torch: not installed"
    if torch_available():
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as p:
            torch_info = p.apply(describe_torch)
    with threadpool_limits(args.threads, user_api="blas"):
        blas = blas_description()
    console.print(f"threads {args.threads} · selfattn kernels: {native.describe_isa()} · "
                  f"BLAS: {blas} · {torch_info}")

    def describe(fma, matmul, bw):
        return ((f"float32 FMA peak {fma:.0f} GFLOP/s, " if fma else "")
                + f"float32 matmul {matmul:.0f} GFLOP/s (NumPy BLAS), read bandwidth {bw:.1f} GB/s")

    before = measure_limits(args.threads)
    console.print("roofline, before: " + describe(*before))

    prefill_n = [n for n in PREFILL_N if not args.quick or n <= 2048]
    decode_s = [s for s in DECODE_S if not args.quick or s <= 16384]
    names = ["selfattn", "numpy"] + (["sdpa"] if torch_available() else [])
    if "sdpa" not in names:
        console.print("torch not installed: `pip install torch==2.13.0` to add SDPA")
    ctx = multiprocessing.get_context("spawn")
    samples_by, steal_by, ceiling_by = {}, {}, {}
    for shape, (H, H_kv, D) in SHAPES.items():
        for phase, sizes in (("prefill", prefill_n), ("decode", decode_s)):
            if phase not in args.phases.split(","):
                continue
            samples = samples_by[shape, phase] = {nm: {} for nm in names}
            steal = steal_by[shape, phase] = {}
            stolen_in = {nm: [] for nm in names}
            for r in range(args.rounds):
                for name in names:
                    todo = [n for n in sizes
                            if not (name == "numpy" and phase == "prefill" and n > args.numpy_max_n)]
                    j0 = cpu_jiffies()
                    with ctx.Pool(1) as p, console.status(f"{phase} {shape}: {name}, round {r + 1}"):
                        got, ceiling = p.apply(worker, (name, phase, H, H_kv, D, todo,
                                                        args.reps, args.threads))
                    for size, times in got.items():
                        samples[name].setdefault(size, []).extend(times)
                    for size, gbs in ceiling.items():  # the better read over the rounds
                        seen = ceiling_by.setdefault((shape, phase), {})
                        seen[size] = max(seen.get(size, 0.0), gbs)
                    stolen_in[name].append(steal_share(j0, cpu_jiffies()))
            for name, shares in stolen_in.items():
                steal[name] = None if None in shares else float(np.mean(shares))
    after = measure_limits(args.threads)
    console.print("roofline, after: " + describe(*after))
    fma_peak, peak_gflops, bandwidth = (max(a, b) if a and b else a or b
                                        for a, b in zip(before, after))
    console.print("roofline used (the higher of the two): " + describe(fma_peak, peak_gflops,
                                                                       bandwidth))
    records, over = [], []  # over: selfattn rows above their ceiling
    for shape, (H, H_kv, D) in SHAPES.items():
        for phase, sizes in (("prefill", prefill_n), ("decode", decode_s)):
            if (shape, phase) not in samples_by:
                continue
            samples = samples_by[shape, phase]
            unit = "GFLOP/s" if phase == "prefill" else "GB/s"
            table = Table(title=f"{phase} · {shape} (H {H}, H_kv {H_kv}, D {D}) · float32 · "
                                f"median of {args.reps * args.rounds}")
            table.add_column("n" if phase == "prefill" else "S", justify="right")
            for name in names:
                table.add_column(f"{name} ms", justify="right")
                table.add_column(f"{name} {unit}", justify="right")
            table.add_column("selfattn vs sdpa", justify="right")
            table.add_column("selfattn % of roofline", justify="right")
            fma_cols = [nm for nm in ("sdpa",) if nm in names] \
                if phase == "prefill" and fma_peak else []  # selfattn's: its % of roofline
            for name in fma_cols:
                table.add_column(f"{name} % of FMA peak", justify="right")
            ceiling = ceiling_by.get((shape, phase), {})
            if ceiling:
                table.add_column("read GB/s, K+V's bytes", justify="right")
                table.add_column("selfattn % of it", justify="right")
            for size in sizes:
                T = size if phase == "prefill" else 1
                flops = 4.0 * T * size * D * H / (2 if phase == "prefill" else 1)
                kv_bytes = 2.0 * H_kv * size * D * 4
                row, rate = [str(size)], {}
                for name in names:
                    if size not in samples[name]:
                        row += ["-", "-"]
                        continue
                    med = float(np.median(samples[name][size]))
                    rate[name] = (flops if phase == "prefill" else kv_bytes) / med / 1e9
                    row += [f"{med * 1e3:.2f}", f"{rate[name]:.1f}"]
                    records.append(dict(shape=shape, phase=phase, size=size, impl=name,
                                        steal=steal_by[shape, phase][name],
                                        samples_s=samples[name][size], median_s=med,
                                        rate=rate[name], unit=unit))
                    if name == "selfattn" and size in ceiling:
                        records[-1]["read_gbs_same_bytes"] = ceiling[size]
                # the ceiling no kernel passes: the FMA peak; for decode the better of the two
                # reads (512 MiB, and the row's own K+V bytes, which may sit in cache)
                roof = (fma_peak or peak_gflops) if phase == "prefill" else \
                    max(bandwidth, ceiling.get(size, 0.0))
                row.append(f"{rate['selfattn'] / rate['sdpa']:.2f}x" if "sdpa" in rate else "-")
                row.append(f"{100 * rate['selfattn'] / roof:.0f}%")
                if rate["selfattn"] > roof:
                    over.append(f"{phase} {shape} {size}: {100 * rate['selfattn'] / roof:.0f}%")
                row += [f"{100 * rate[nm] / fma_peak:.0f}%" if nm in rate else "-" for nm in fma_cols]
                if ceiling:
                    row += [f"{ceiling[size]:.1f}", f"{100 * rate['selfattn'] / ceiling[size]:.0f}%"]
                table.add_row(*row)
            console.print(table)
            stolen = [f"{nm} {100 * x:.1f}%" for nm, x in steal_by[shape, phase].items()
                      if x is not None]
            if stolen:
                console.print("CPU time the host took from this machine during each column's run "
                              "(steal): " + ", ".join(stolen))
    if over:  # a kernel above its ceiling: the roofline, not the kernel, is wrong
        console.print("[red]above the roofline (it was measured low; rerun on a quiet machine): "
                      + "; ".join(over) + "[/]")
    else:
        console.print("no selfattn row above the roofline (prefill: the FMA peak; decode: the "
                      "better read of 512 MiB and of the row's own K+V bytes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(blas=blas, torch=torch_info, threads=args.threads, reps=args.reps,
                           rounds=args.rounds,
                           fma_gflops=fma_peak, matmul_gflops=peak_gflops, read_gbs=bandwidth,
                           limits_before=before, limits_after=after, records=records,
                           over_roofline=over), f, indent=1)


if __name__ == "__main__":
    main()
