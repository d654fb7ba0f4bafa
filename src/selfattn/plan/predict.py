"""Predictions: memory (does it fit, the largest context that does) and speed (TTFT, tokens/s).

    TTFT(N)      = linear FLOPs(N) / (peak FLOP/s · e_linear) + attention FLOPs(N) / (peak · e_attn)
    1 / tps(d)   = weight bytes / (bandwidth · e_weights) + KV bytes(d) / (bandwidth · e_kv)
                   + t_token

linear FLOPs = 2 · (layer weights) · N; attention FLOPs = 4 · D · (query, key) pairs, summed over
heads and layers (N(N+1)/2 per head and layer for a causal prompt: the quadratic wall); KV bytes(d)
= 2 · layers · kv heads · D · d · bytes per value (the bandwidth wall). The e's are efficiencies:
the share of the peak an engine reaches. For catalog hardware they are a llama.cpp-class engine's
per device class (published.py: fitted to published llama-bench results); for this machine they are
selfattn's own, fitted by `selfattn bench` from measured TTFT and tokens/s against the measured
roofline (uncalibrated defaults until bench has run).
"""

from dataclasses import asdict, dataclass, field

from ..cache import KV_BITS
from .shape import ModelShape

MAX_PLANNED_CTX = 1 << 24  # the largest context the planner searches (16M positions)


@dataclass
class Device:
    name: str
    label: str
    memory_bytes: int
    usable: float  # share of memory a model may take
    bandwidth_gbs: float
    tflops: float
    e_weights: float
    e_kv: float
    e_linear: float
    e_attention: float
    t_token: float = 0.0  # seconds a step costs beyond its bytes (a GPU's kernel launches, syncs)
    weight_bits: float | None = None  # None: the file's own (quantized) bytes; 32: float32 copy
    packed: bool = False  # selfattn with its compiled kernels: matrices held as the file's blocks
    calibrated: bool = True
    source: str = ""
    basis: dict = field(default_factory=dict)  # what each figure rests on (see `basis_of`)


def basis_of(peak: str, efficiencies: str) -> dict:
    """How a device's speed figures were obtained: its peak FLOP/s and bandwidth ('measured' on
    this machine, or 'assumed' from a specification) and its efficiencies ('measured' by bench
    here, 'fitted' to published results, or 'assumed'), each with its date or source."""
    return {"peak": peak, "efficiencies": efficiencies}


@dataclass
class Prediction:
    model: str
    hardware: str
    ctx: int
    kv_dtype: str
    weights_bytes: int
    kv_cache_bytes: int
    buffer_bytes: int
    total_bytes: int
    memory_bytes: int
    usable_bytes: int
    fits: bool
    max_ctx: int  # what memory holds, capped at the model's trained context
    max_ctx_by_kv_dtype: dict
    max_ctx_memory: int  # what memory alone would hold (kv_dtype)
    ttft_s: float
    decode_tps: float  # at depth ctx
    decode_tps_empty: float
    weight_bytes_per_token: int
    kv_bytes_per_token: int  # at depth ctx
    min_tps: float | None = None
    min_tps_depth: int | None = None  # the first depth at which tokens/s < min_tps
    calibrated: bool = True
    advice: list = field(default_factory=list)
    basis: dict = field(default_factory=dict)  # the device's: what the speed figures rest on

    def as_dict(self):
        return asdict(self)


def catalog_device(entry: dict, calibration: dict | None = None) -> Device:
    """A catalog entry with its class's efficiencies (fitted to published results: published.py),
    or with those a user's own llama-bench run gave (`plan --calibrate-from`: calibration has e_*
    keys, 'source' and 'date')."""
    if calibration:
        eff = {k: calibration[k] for k in ("e_weights", "e_kv", "e_linear", "e_attention")}
        basis = f"measured: llama-bench, {calibration['source']}, {calibration['date']}"
    else:
        from .published import class_efficiency

        e, basis = class_efficiency(entry["class"])
        eff = dict(e_weights=e["decode"], e_kv=e["decode"], e_linear=e["prefill"],
                   e_attention=e["prefill"], t_token=e.get("t_token", 0.0))
    return Device(name=entry["name"], label=entry["label"],
                  memory_bytes=int(entry["memory_gb"] * 1e9), usable=entry["usable"],
                  bandwidth_gbs=entry["bandwidth_gbs"], tflops=entry["tflops"],
                  source=entry["source"],
                  basis=basis_of("assumed: the vendor's specification (its source in `source`)",
                                 basis), **eff)


def device_for_this_machine(roofline: dict, calibration: dict | None,
                            memory_bytes: int) -> Device:
    """This machine running selfattn: its measured roofline, and bench's efficiencies.

    With its compiled kernels selfattn holds every matrix of a type they read as the file's
    blocks (selfattn.formats), the rest as float32; without them, everything as float32.
    memory_bytes is what the OS says is available now (all of it usable)."""
    from .. import native
    from ..measure.roofline import peak_gflops

    defaults = dict(e_weights=0.6, e_kv=0.5, e_linear=0.5, e_attention=0.3)
    fitted = {k: calibration[k] for k in defaults} if calibration else defaults
    return Device(name="this", label=f"this machine ({roofline.get('cpu', 'CPU')})",
                  memory_bytes=memory_bytes, usable=1.0, bandwidth_gbs=roofline["read_gbs"],
                  tflops=peak_gflops(roofline) / 1e3, weight_bits=32.0,
                  packed=native.available(), calibrated=calibration is not None,
                  source="measured: selfattn roofline" + (", calibrated by selfattn bench"
                                                          if calibration else ""),
                  basis=basis_of(f"measured: selfattn roofline, {roofline.get('date', 'now')}",
                                 f"measured: selfattn bench, {calibration.get('date', 'now')}"
                                 if calibration else "assumed: defaults until `selfattn bench` "
                                 "calibrates this machine"), **fitted)


def weights_bytes(shape: ModelShape, device: Device) -> int:
    """Memory the weights take: an engine that computes on the file's blocks holds the file's
    bytes; selfattn with its compiled kernels holds the matrices of the types they read as
    stored and the rest as float32, and without them everything as float32."""
    if device.weight_bits is None:
        return shape.file_bytes
    if device.packed:
        return shape.held_bytes
    return int(shape.params * device.weight_bits / 8)


def weight_bytes_per_token(shape: ModelShape, device: Device) -> int:
    """Weight bytes read per generated token."""
    return shape.decode_weight_bytes(device.weight_bits, device.packed)


def buffer_bytes(shape: ModelShape, device: Device) -> int:
    """Working memory besides weights and cache: the activations of one prefill batch (selfattn:
    its prefill chunk, one row of logits; llama.cpp: 512-token micro-batches with their logits)."""
    if device.name == "this":
        from ..model.generate import activation_floats, prefill_chunk

        dims = (shape.dim, shape.ffn_dim, shape.n_heads * shape.head_dim,
                shape.n_kv_heads * shape.head_dim)
        return 4 * (prefill_chunk(*dims) * activation_floats(*dims) + shape.vocab)
    ubatch = 512
    return 4 * ubatch * (shape.vocab + 4 * shape.dim + 2 * shape.ffn_dim)


def ttft_s(shape: ModelShape, device: Device, n: int) -> float:
    peak = device.tflops * 1e12
    return (shape.linear_flops_per_token() * n / (peak * device.e_linear)
            + shape.attention_flops(n) / (peak * device.e_attention))


def token_seconds(shape: ModelShape, device: Device, depth: int, kv_dtype: str) -> float:
    bw = device.bandwidth_gbs * 1e9
    w = weight_bytes_per_token(shape, device)
    return (w / (bw * device.e_weights) + shape.kv_bytes(depth, kv_dtype) / (bw * device.e_kv)
            + device.t_token)


def max_ctx(shape: ModelShape, device: Device, kv_dtype: str) -> int:
    """The largest context whose weights + buffers + KV cache fit the usable memory (0: none)."""
    room = int(device.memory_bytes * device.usable) - weights_bytes(shape, device) \
        - buffer_bytes(shape, device)
    if room < shape.kv_bytes(1, kv_dtype):
        return 0
    lo, hi = 1, MAX_PLANNED_CTX
    if shape.kv_bytes(hi, kv_dtype) <= room:
        return hi
    while lo < hi:  # kv_bytes grows with ctx (flat past a sliding window): bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if shape.kv_bytes(mid, kv_dtype) <= room else (lo, mid - 1)
    return lo


def min_tps_depth(shape: ModelShape, device: Device, kv_dtype: str, min_tps: float) -> int | None:
    """The first depth at which tokens/s drops below min_tps (0 if already at an empty cache;
    None if it never does, e.g. every layer has a sliding window)."""
    limit = 1.0 / min_tps
    if token_seconds(shape, device, 0, kv_dtype) > limit:
        return 0
    if token_seconds(shape, device, MAX_PLANNED_CTX, kv_dtype) <= limit:
        return None
    lo, hi = 0, MAX_PLANNED_CTX
    while hi - lo > 1:  # invariant: fast enough at lo, too slow at hi
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if token_seconds(shape, device, mid, kv_dtype) <= limit else (lo, mid)
    return hi


def memory_guard(shape: ModelShape, ctx: int, kv_dtype: str, available: int):
    """Before a model and its cache are allocated on this machine: ContextError if the float32
    weights, the KV cache and the working buffers do not fit `available` bytes, naming the largest
    context that fits with this KV type and with the others (the figures `selfattn plan` gives)."""
    from ..errors import ContextError

    from .. import native

    dev = Device(name="this", label="this machine", memory_bytes=available, usable=1.0,
                 bandwidth_gbs=1.0, tflops=1.0, e_weights=1.0, e_kv=1.0, e_linear=1.0,
                 e_attention=1.0, weight_bits=32.0, packed=native.available())
    w, buf, kv = weights_bytes(shape, dev), buffer_bytes(shape, dev), shape.kv_bytes(ctx, kv_dtype)
    if w + buf + kv <= available:
        return
    gib = 2 ** 30
    others = ", ".join(f"{t}: {max_ctx(shape, dev, t):,}" for t in KV_BITS if t != kv_dtype)
    raise ContextError(
        f"{ctx:,} positions need {(w + buf + kv) / gib:.2f} GiB (weights {w / gib:.2f}, {kv_dtype} "
        f"KV cache {kv / gib:.2f}, buffers {buf / gib:.2f}); {available / gib:.2f} GiB is "
        f"available: at most {max_ctx(shape, dev, kv_dtype):,} positions fit with {kv_dtype} KV "
        f"({others})")


def plan(shape: ModelShape, device: Device, ctx: int, kv_dtype: str = "f32",
         min_tps: float | None = None) -> Prediction:
    if ctx < 1:
        raise ValueError(f"--ctx must be >= 1, got {ctx}")
    if kv_dtype not in KV_BITS:
        raise ValueError(f"--kv-dtype must be one of {', '.join(KV_BITS)}, got {kv_dtype!r}")
    if min_tps is not None and not min_tps > 0:
        raise ValueError(f"--min-tps must be > 0, got {min_tps}")
    w = weights_bytes(shape, device)
    kv = shape.kv_bytes(ctx, kv_dtype)
    buf = buffer_bytes(shape, device)
    total = w + kv + buf
    usable = int(device.memory_bytes * device.usable)
    memory_ctx = {t: max_ctx(shape, device, t) for t in KV_BITS}
    trained = shape.context if shape.context and shape.context > 0 else MAX_PLANNED_CTX
    by_type = {t: min(n, trained) for t, n in memory_ctx.items()}
    p = Prediction(
        model=shape.name, hardware=device.name, ctx=ctx, kv_dtype=kv_dtype, weights_bytes=w,
        kv_cache_bytes=kv, buffer_bytes=buf, total_bytes=total,
        memory_bytes=device.memory_bytes, usable_bytes=usable, fits=total <= usable,
        max_ctx=by_type[kv_dtype], max_ctx_by_kv_dtype=by_type,
        max_ctx_memory=memory_ctx[kv_dtype],
        ttft_s=ttft_s(shape, device, ctx),
        decode_tps=1.0 / token_seconds(shape, device, ctx, kv_dtype),
        decode_tps_empty=1.0 / token_seconds(shape, device, 0, kv_dtype),
        weight_bytes_per_token=weight_bytes_per_token(shape, device),
        kv_bytes_per_token=shape.kv_bytes(ctx, kv_dtype), min_tps=min_tps,
        calibrated=device.calibrated, basis=dict(device.basis))
    if min_tps is not None:  # a depth past the largest usable context is no answer
        depth = min_tps_depth(shape, device, kv_dtype, min_tps)
        p.min_tps_depth = depth if depth is not None and depth <= p.max_ctx else None
    if memory_ctx[kv_dtype] > trained:
        p.advice.append(f"memory holds {memory_ctx[kv_dtype]:,} positions; the largest context "
                        f"is the model's trained one, {trained:,}")
    if not p.fits:
        if p.max_ctx > 0:
            p.advice.append(f"a context of at most {p.max_ctx:,} fits with {kv_dtype} KV")
        else:
            p.advice.append("the weights alone do not fit: a smaller --quant or model")
        for t, n in by_type.items():
            if KV_BITS[t] < KV_BITS[kv_dtype] and n >= ctx:
                p.advice.append(f"--kv-dtype {t} fits the whole context (up to {n:,})")
                break
    if ctx > shape.context:
        p.advice.append(f"{ctx:,} is past the model's trained context ({shape.context:,}): "
                        "quality is not predicted, only memory and speed")
    return p
