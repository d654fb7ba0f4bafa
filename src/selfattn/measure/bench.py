"""`selfattn bench`: llama-bench's tests on selfattn's runner, with where the time went.

For each depth d (tokens already in the KV cache):
- TTFT for a prompt of d tokens (prefill from an empty cache, then the first token chosen);
- pp{p} @ d{d}: p prompt tokens processed after d cached ones, tokens/s (`pp{p}` at d = 0);
- tg{n} @ d{d}: n tokens generated one at a time after d cached ones, tokens/s (`tg{n}` at 0).
Prompts are fixed pseudo-random token ids, as llama-bench's are. After an untimed warm-up (a
prompt of p tokens and a few decode steps), each test runs `reps` times
(TTFT: `ttft_reps`); mean (llama-bench's avg_ts), median and standard deviation are reported,
and every sample is kept.

`calibrate` fits the planner's efficiencies to these samples (see selfattn.plan.predict):
prefill seconds = linear FLOPs / (F·e_linear) + attention FLOPs / (F·e_attention) by least
squares on relative error over every TTFT and pp sample; seconds per generated token =
weight bytes / (B·e_weights) + KV bytes(d) / (B·e_kv) over the tg samples. F is the FMA peak,
B the read bandwidth (the roofline's). `refusals` says why a fit must not be kept: too few reps,
an efficiency outside (0, 1], a fit that misses its own runs by more than FIT_TOLERANCE, or runs
taken while the machine was busy.
"""

import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..cache import KVCache
from ..model.generate import prefill
from ..model.transformer import Timings
from .roofline import MAX_SPREAD  # a median this far below the best: the machine was busy

MIN_REPS = 3  # samples per test a calibration is fitted from, at least
FIT_TOLERANCE = 0.15  # the fit must predict each test's median within this
EFFICIENCIES = ("e_linear", "e_attention", "e_weights", "e_kv")


def bench_name(kind: str, n: int, depth: int) -> str:
    """llama-bench's name for a test: 'pp512', 'tg128', with ' @ d2048' only past depth 0."""
    return f"{kind}{n}" + (f" @ d{depth}" if depth else "")


@dataclass
class Record:
    test: str  # llama-bench's name: "pp512", "tg128", "pp512 @ d2048", "tg128 @ d2048"; "ttft @ 2048"
    n_prompt: int
    n_gen: int
    n_depth: int
    avg_ts: float  # mean tokens/s over the samples, as llama-bench reports it
    stddev_ts: float
    median_ts: float = 0.0  # what the table shows: the median resists this machine's noise
    samples_ns: list = field(default_factory=list)  # wall time of each sample, ns
    samples_ts: list = field(default_factory=list)
    ttft_s: float | None = None  # TTFT for a prompt of n_depth tokens (n_prompt at depth 0)
    attention_share: float = 0.0
    attention_pairs: int = 0  # per sample
    kv_bytes_per_token: int = 0  # KV cache bytes read per generated token (tg) at this depth
    weight_bytes_per_token: int = 0  # weight bytes read per generated token
    flops: float = 0.0  # per sample (pp, ttft)
    roofline_fraction: float = 0.0  # FLOP/s over peak (pp, ttft); bytes/s over bandwidth (tg)
    breakdown: list = field(default_factory=list)  # where the samples' time went (measure.breakdown)

    def as_dict(self):
        return asdict(self)


def _summary(tokens: int, samples_s: list[float]) -> dict:
    """Record fields for samples of `tokens` tokens each taking samples_s seconds."""
    ts = [tokens / s for s in samples_s]
    return dict(avg_ts=statistics.fmean(ts), median_ts=statistics.median(ts),
                stddev_ts=statistics.stdev(ts) if len(ts) > 1 else 0.0,
                samples_ns=[int(s * 1e9) for s in samples_s], samples_ts=ts)


def run_bench(model, shape, roofline: dict, p: int = 512, n: int = 128, depths=(0, 512, 2048),
              reps: int = 5, ttft_reps: int | None = None, on_step=None, seed: int = 0,
              kv_dtype: str = "f32", cache=None):
    """-> list of Record. shape: the model's plan.ModelShape; roofline: this machine's. cache:
    one for max(depths) + max(p, n) positions (a context-parallel one), else a KVCache is made."""
    from ..plan.predict import device_for_this_machine, weight_bytes_per_token
    from .breakdown import breakdown
    from .roofline import peak_gflops

    if p < 1 or n < 1 or reps < 1:
        raise ValueError("-p, -n and --reps must be >= 1")
    if any(d < 0 for d in depths):
        raise ValueError(f"depths must be >= 0, got {list(depths)}")
    ttft_reps = reps if ttft_reps is None else ttft_reps
    a = model.args
    rng = np.random.default_rng(seed)
    max_depth = max(depths)
    tokens = rng.integers(0, a.vocab_size, max_depth + p)
    if cache is None:
        cache = KVCache.for_model(a, max_depth + max(p, n), kv_dtype)
    device = device_for_this_machine(roofline, None, 0)
    w_tok = weight_bytes_per_token(shape, device)
    peak_flops = peak_gflops(roofline) * 1e9
    bandwidth = roofline["read_gbs"] * 1e9
    head_flops = 2.0 * a.vocab_size * a.dim  # the LM head, once per forward call
    records = []

    def step(label):
        if on_step:
            on_step(label)

    # warm-up, untimed: the first prefill and decode steps of a process pay one-time costs (the
    # first touches of the weights and buffers, thread start-up) that no timed rep should carry
    cache.length = 0
    prefill(model, tokens[:p], cache)
    for _ in range(min(n, 4, cache.max_len - cache.length)):
        model.forward(tokens[:1], cache, cache.length)

    for d in sorted(set(depths)):
        ttft = None
        if d > 0:  # TTFT for a prompt of d tokens: prefill from empty + the first token chosen
            samples, t_ = [], Timings()
            for _ in range(ttft_reps):
                cache.length = 0
                t0 = time.perf_counter()
                logits = prefill(model, tokens[:d], cache, t_)
                t_s = time.perf_counter()
                int(np.argmax(logits))
                samples.append(time.perf_counter() - t0)
                t_.sampling_s += time.perf_counter() - t_s
            step(f"ttft @ {d}")
            flops = shape.linear_flops_per_token() * d + shape.attention_flops(d) + head_flops
            ttft = statistics.median(samples)
            records.append(Record(test=f"ttft @ {d}", n_prompt=d, n_gen=0, n_depth=0,
                                  **_summary(d, samples), ttft_s=ttft,
                                  attention_share=t_.attention_share,
                                  attention_pairs=t_.attention_pairs // ttft_reps, flops=flops,
                                  roofline_fraction=flops / ttft / peak_flops,
                                  breakdown=breakdown(t_, sum(samples), False, roofline)))
        else:
            cache.length = 0
        # pp p @ d
        samples, t_ = [], Timings()
        for _ in range(reps):
            cache.length = d
            t0 = time.perf_counter()
            prefill(model, tokens[d:d + p], cache, t_)
            samples.append(time.perf_counter() - t0)
        step(bench_name("pp", p, d))
        flops = shape.linear_flops_per_token() * p + shape.attention_flops(p, d) + head_flops
        stats = _summary(p, samples)
        med = stats["median_ts"]
        records.append(Record(test=bench_name("pp", p, d), n_prompt=p, n_gen=0, n_depth=d, **stats,
                              ttft_s=ttft if d else statistics.median(samples),
                              attention_share=t_.attention_share,
                              attention_pairs=t_.attention_pairs // reps, flops=flops,
                              roofline_fraction=flops * med / p / peak_flops,
                              breakdown=breakdown(t_, sum(samples), False, roofline)))
        # tg n @ d: the cache holds d tokens; n more, one at a time
        samples, t_ = [], Timings()
        for _ in range(reps):
            cache.length = d
            token = np.array([int(tokens[d])])
            t0 = time.perf_counter()
            for _ in range(n):
                logits = model.forward(token, cache, cache.length, t_)
                t_s = time.perf_counter()
                token[0] = int(np.argmax(logits))
                t_.sampling_s += time.perf_counter() - t_s
            samples.append(time.perf_counter() - t0)
        step(bench_name("tg", n, d))
        stats = _summary(n, samples)
        med = stats["median_ts"]
        kv_tok = shape.kv_bytes(d + n // 2, kv_dtype)  # the mean depth over the n tokens
        records.append(Record(test=bench_name("tg", n, d), n_prompt=0, n_gen=n, n_depth=d, **stats,
                              ttft_s=ttft,
                              attention_share=t_.attention_share,
                              attention_pairs=t_.attention_pairs // reps,
                              kv_bytes_per_token=kv_tok, weight_bytes_per_token=w_tok,
                              roofline_fraction=(w_tok + kv_tok) * med / bandwidth,
                              breakdown=breakdown(t_, sum(samples), True, roofline)))
    return records


def count_steps(depths) -> int:
    depths = set(depths)
    return 2 * len(depths) + sum(1 for d in depths if d > 0)


def _relative_lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients c minimizing Σ ((X c - y) / y)²."""
    from scipy.optimize import nnls

    c, _ = nnls(X / y[:, None], np.ones_like(y))
    return c


def calibrate(records: list, shape, roofline: dict, kv_dtype: str = "f32") -> dict:
    """The planner's efficiencies for this machine from bench records (see module docstring)."""
    from ..plan.predict import device_for_this_machine, weight_bytes_per_token
    from .roofline import peak_gflops

    peak = peak_gflops(roofline) * 1e9
    bw = roofline["read_gbs"] * 1e9
    rows, y = [], []
    for r in records:
        if r.n_gen:
            continue
        n_new, depth = r.n_prompt, r.n_depth
        for s in r.samples_ns:
            rows.append([shape.linear_flops_per_token() * n_new / peak,
                         shape.attention_flops(n_new, depth) / peak])
            y.append(s / 1e9)
    if len(rows) < 2:
        raise ValueError("calibration needs prompt tests at two or more sizes")
    inv_lin, inv_attn = _relative_lstsq(np.array(rows), np.array(y))
    device = device_for_this_machine(roofline, None, 0)
    w_tok = weight_bytes_per_token(shape, device)
    rows, y = [], []
    for r in records:
        if not r.n_gen:
            continue
        for s in r.samples_ns:
            rows.append([w_tok / bw, shape.kv_bytes(r.n_depth + r.n_gen // 2, kv_dtype) / bw])
            y.append(s / 1e9 / r.n_gen)
    inv_w, inv_kv = _relative_lstsq(np.array(rows), np.array(y))
    depths = sorted({r.n_depth for r in records if r.n_gen})
    if len(depths) < 2:
        raise ValueError("calibration needs tg tests at two or more depths")
    big = 1e9  # a coefficient of 0 means "no measurable cost": an efficiency of at most 1e9
    return {"e_linear": 1 / max(inv_lin, 1 / big), "e_attention": 1 / max(inv_attn, 1 / big),
            "e_weights": 1 / max(inv_w, 1 / big), "e_kv": 1 / max(inv_kv, 1 / big),
            "model": shape.name, "depths": depths, "kv_dtype": kv_dtype,
            "samples": sum(len(r.samples_ns) for r in records),
            "weights": weights_layout(device)}


def predicted_seconds(r: Record, fit: dict, shape, roofline: dict, kv_dtype: str = "f32") -> float:
    """What the fitted speed model says one sample of r takes."""
    from ..plan.predict import device_for_this_machine, weight_bytes_per_token
    from .roofline import peak_gflops

    peak, bw = peak_gflops(roofline) * 1e9, roofline["read_gbs"] * 1e9
    if r.n_gen:
        w_tok = weight_bytes_per_token(shape, device_for_this_machine(roofline, None, 0))
        kv = shape.kv_bytes(r.n_depth + r.n_gen // 2, kv_dtype)
        return r.n_gen * (w_tok / (bw * fit["e_weights"]) + kv / (bw * fit["e_kv"]))
    return (shape.linear_flops_per_token() * r.n_prompt / (peak * fit["e_linear"])
            + shape.attention_flops(r.n_prompt, r.n_depth) / (peak * fit["e_attention"]))


def refusals(records: list, fit: dict, shape, roofline: dict, kv_dtype: str = "f32",
             peak_during: float | None = None) -> list[str]:
    """Why `fit` must not replace the stored calibration (empty: it may). peak_during: the FMA
    peak measured around the run (GFLOP/s), checked against the roofline's."""
    found = []
    few = [r.test for r in records if len(r.samples_ns) < MIN_REPS]
    if few:
        found.append(f"{', '.join(few)}: fewer than {MIN_REPS} samples (--reps {MIN_REPS} or "
                     "more to calibrate)")
    for k in EFFICIENCIES:
        if not 0 < fit[k] <= 1:
            found.append(f"{k} = {fit[k]:.3g} is not a share of the roofline (must be in (0, 1]): "
                         "the runs cannot tell this cost apart (more depths, deeper "
                         "ones, or larger -p and -n help)")
    for r in records:
        if len(r.samples_ns) > 1:
            best, med = min(r.samples_ns), statistics.median(r.samples_ns)
            if med > best / (1 - MAX_SPREAD):
                found.append(f"{r.test}: the median sample took {100 * (med / best - 1):.0f}% "
                             "longer than the fastest (the machine was busy)")
    if not found:  # the fit's own error, when the efficiencies are usable at all
        for r in records:
            med = statistics.median(r.samples_ns) / 1e9
            err = predicted_seconds(r, fit, shape, roofline, kv_dtype) / med - 1
            if abs(err) > FIT_TOLERANCE:
                found.append(f"the fit misses {r.test} by {100 * err:+.0f}% (at most "
                             f"{100 * FIT_TOLERANCE:.0f}%)")
    fma = roofline.get("fma_gflops")
    if peak_during is not None and fma and peak_during < (1 - MAX_SPREAD) * fma:
        found.append(f"the FMA peak around the run was {peak_during:.0f} GFLOP/s, "
                     f"{100 * (1 - peak_during / fma):.0f}% below the roofline's {fma:.0f} "
                     "(the machine was busy)")
    return found


def weights_layout(device) -> str:
    """How decode steps read the weights when a calibration is fitted: a calibration is only valid
    for the layout it was measured with ('packed' blocks, or 'float32' copies) and for the
    compiled kernels' revision (native.KERNELS_REVISION) and instruction-set level (native.isa());
    '-fma': efficiencies are shares of the FMA peak (older ones were of a BLAS matmul's)."""
    from .. import native

    return (f"{'packed' if device.packed else 'float32'}-r{native.KERNELS_REVISION}"
            f"-{native.isa()}-fma")


def run_kernel_bench(shape, roofline: dict, p: int = 512, depths=(0, 512, 2048), reps: int = 5,
                     on_step=None, seed: int = 0):
    """The same sweep over the attention kernels alone, one layer of the model's shape, float32:
    'attn pp{p} @ d{d}' (the flash path: p causal queries after d keys) and 'attn tg1 @ d{d}'
    (the decode path: one query against d keys; reads the layer's K and V once); at depth 0
    without ' @ d0', as llama-bench names its tests."""
    from ..attention import attention
    from .roofline import peak_gflops

    rng = np.random.default_rng(seed)
    H, H_kv, D = shape.n_heads, shape.n_kv_heads, shape.head_dim
    peak = peak_gflops(roofline) * 1e9
    bw = roofline["read_gbs"] * 1e9
    records = []
    for d in sorted(set(depths)):
        S = d + p
        k = rng.standard_normal((1, H_kv, S, D), np.float32)
        v = rng.standard_normal((1, H_kv, S, D), np.float32)
        q = rng.standard_normal((1, H, p, D), np.float32)
        attention(q, k, v, causal=True)  # warm
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            attention(q, k, v, causal=True)
            samples.append(time.perf_counter() - t0)
        stats = _summary(p, samples)
        med = stats["median_ts"]
        pairs = H * (p * (d + 1) + p * (p - 1) // 2)
        records.append(Record(test="attn " + bench_name("pp", p, d), n_prompt=p, n_gen=0, n_depth=d, **stats,
                              attention_share=1.0, attention_pairs=pairs, flops=4.0 * D * pairs,
                              roofline_fraction=4.0 * D * pairs * med / p / peak))
        if on_step:
            on_step("attn " + bench_name("pp", p, d))
        if d == 0:
            continue
        q1 = q[:, :, :1]
        attention(q1, k, v, causal=True, kv_len=d)
        samples = []
        for _ in range(reps * 20):  # one call is short: more samples
            t0 = time.perf_counter()
            attention(q1, k, v, causal=True, kv_len=d)
            samples.append(time.perf_counter() - t0)
        stats = _summary(1, samples)
        med = stats["median_ts"]
        kv = 2 * H_kv * d * D * 4
        records.append(Record(test="attn " + bench_name("tg", 1, d), n_prompt=0, n_gen=1, n_depth=d, **stats,
                              attention_share=1.0, attention_pairs=H * d, kv_bytes_per_token=kv,
                              roofline_fraction=kv * med / bw))
        if on_step:
            on_step("attn " + bench_name("tg", 1, d))
    return records
