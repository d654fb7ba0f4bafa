"""`selfattn bench --plot`: the two walls on one PNG.

Left: TTFT against prompt length, log-log, the measured points and the fitted model split into
its linear part (the weights' matmuls) and its quadratic part (attention over n²/2 pairs).
Right: generated tokens/s against depth, the measured points under two lines: the bandwidth
roofline (every byte of weights and KV cache read at the measured bandwidth) and the calibrated
prediction (the same bytes at the efficiencies bench fitted).
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_bench(records, shape, roofline: dict, calibration: dict, path, title: str = "",
               fit_label: str = "fit"):
    """calibration: the efficiencies the lines are drawn with; fit_label names them in the
    legends ('fit', or 'fit, not kept' for one bench refused to store)."""
    from ..plan.predict import device_for_this_machine, token_seconds, weight_bytes_per_token
    from .roofline import peak_gflops

    peak = peak_gflops(roofline) * 1e9
    bw = roofline["read_gbs"] * 1e9
    device = device_for_this_machine(roofline, calibration, 0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100)

    ttft = [(r.n_prompt, r.ttft_s) for r in records if not r.n_gen and r.n_depth == 0]
    if ttft:
        n_pts, t_pts = map(np.array, zip(*sorted(ttft)))
        n = np.geomspace(max(16, n_pts.min() / 2), n_pts.max() * 2, 100)
        lin = shape.linear_flops_per_token() * n / (peak * calibration["e_linear"])
        quad = np.array([shape.attention_flops(int(x)) for x in n]) / (
            peak * calibration["e_attention"])
        left.loglog(n_pts, t_pts, "o", color="black", label="measured (median)")
        left.loglog(n, lin, "--", label="linear part: weights' matmuls")
        left.loglog(n, quad, "--", label="quadratic part: attention, n²/2 pairs")
        left.loglog(n, lin + quad, "-", label=f"sum ({fit_label})")
    left.set_xlabel("prompt tokens")
    left.set_ylabel("time to first token (s)")
    left.set_title("the quadratic wall: TTFT")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)

    tg = sorted((r.n_depth + r.n_gen // 2, r.median_ts, r.stddev_ts) for r in records if r.n_gen)
    if tg:
        d_pts, ts_pts, sd_pts = map(np.array, zip(*tg))
        d = np.linspace(0, d_pts.max() * 1.1 + 1, 200)
        w_tok = weight_bytes_per_token(shape, device)
        roof = bw / (w_tok + np.array([shape.kv_bytes(int(x), "f32") for x in d]))
        pred = 1 / np.array([token_seconds(shape, device, int(x), "f32") for x in d])
        right.plot(d, roof, "-", label=f"bandwidth roofline ({roofline['read_gbs']:.1f} GB/s)")
        right.plot(d, pred, "--", label=f"prediction ({fit_label})")
        right.errorbar(d_pts, ts_pts, yerr=sd_pts, fmt="o", color="black", capsize=3,
                       label="measured (median ± sd)")
    right.set_xlabel("depth: tokens in the KV cache")
    right.set_ylabel("generated tokens/s")
    right.set_title("the bandwidth wall: decode speed")
    right.set_ylim(bottom=0)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
