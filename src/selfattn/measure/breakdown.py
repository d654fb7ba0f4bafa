"""Where each millisecond went: a phase's wall time (a prompt's TTFT, or the decode steps) split
into the parts model.Timings times, each with the work it did and its share of the roofline.

    weight matmuls   FLOPs (prompt) or weight bytes read (decode)
    attention        FLOPs (prompt) or K/V bytes read (decode), the cache write included
    norms, RoPE, activations, residual adds, embedding rows
    sampling         choosing each token from the logits
    rest             the phase's wall time less the parts: Python, dispatch, printing

A prompt is judged by FLOP/s against the FMA peak, decode by bytes/s against the read bandwidth:
the wall each phase meets. The parts are timed where they run; only `rest` is a difference.
"""

PARTS = ("weight matmuls", "attention", "norms, RoPE, activations", "sampling", "rest")


def breakdown(t, wall_s: float, decode: bool, roofline: dict | None = None) -> list[dict]:
    """t: a model.Timings gathered over the phase; wall_s: the phase's measured wall time. ->
    one dict a part (PARTS order): part, seconds, share of wall_s, flops, bytes, and
    roofline_fraction (None without a roofline, or where the part has no work to judge)."""
    if wall_s <= 0:
        raise ValueError(f"a phase's wall time must be > 0, got {wall_s}")
    peak = bandwidth = None
    if roofline:
        from .roofline import peak_gflops

        peak, bandwidth = peak_gflops(roofline) * 1e9, roofline["read_gbs"] * 1e9
    timed = (t.matmul_s, t.attention_s, t.ops_s, t.sampling_s)
    work = ((t.matmul_flops, t.weight_bytes), (t.attention_flops, t.kv_bytes if decode else 0),
            (0.0, 0), (0.0, 0))
    rows = []
    for part, s, (flops, nbytes) in zip(PARTS, timed, work):
        fraction = None
        if peak and s > 0:
            if decode and nbytes:
                fraction = nbytes / s / bandwidth
            elif not decode and flops:
                fraction = flops / s / peak
        rows.append(dict(part=part, seconds=s, share=s / wall_s, flops=flops, bytes=nbytes,
                         roofline_fraction=fraction))
    rest = wall_s - sum(timed)
    rows.append(dict(part="rest", seconds=rest, share=rest / wall_s, flops=0.0, bytes=0,
                     roofline_fraction=None))
    return rows
