"""A llama.cpp-class engine's efficiencies per device class, fitted to the published llama-bench
results in data/validation.json, and how well they predict a device left out of the fit.

Prefill is linear in its efficiency (pp512 = 512 / TTFT, TTFT = FLOPs / (e · peak)): a result's
efficiency is its published pp512 over the one predicted at efficiency 1, and a class's is the
median of its devices' (each device the median of its own results). A decode step costs its
bytes over e · bandwidth plus a fixed t_token (a GPU's kernel launches and syncs, which cap the
fastest cards: an A100 and an H100 both make ~140 tokens/s of an 8B model): per class, the
step times 1 / tg against the times at efficiency 1 are fitted by a line, relative least
squares, e <= 1 and t_token >= 0 (a class of fewer than 3 devices: t_token = 0). A class with no
result keeps the assumed figures of data/efficiency.json, and says so.
"""

import functools
import statistics

from .catalog import efficiency, find_hardware, find_model, load

CLASSES = {"consumer-gpu": "NVIDIA consumer and workstation GPU",
           "amd-consumer-gpu": "AMD consumer GPU (ROCm, Vulkan; integrated ones too)",
           "datacenter-gpu": "datacenter GPU", "apple": "Apple silicon", "cpu": "CPU"}


def results() -> list:
    return load("validation.json")["results"]


def tg_test(r: dict) -> str:
    """The result's tg test: tg128, or tg512 where its source ran -n 512."""
    return "tg128" if "tg128" in r else "tg512"


def unit_speeds(r: dict) -> tuple:
    """(pp512, tg) predicted for result r's device, model and quant at efficiency 1; tg over its
    test's tokens (the time per token grows linearly with depth: the mean is the midpoint's)."""
    from .predict import catalog_device, token_seconds, ttft_s
    from .shape import ModelShape

    shape = ModelShape.from_catalog(find_model(r["model"]), r["quant"])
    dev = catalog_device(find_hardware(r["hardware"]),
                         {"e_weights": 1.0, "e_kv": 1.0, "e_linear": 1.0, "e_attention": 1.0,
                          "source": "unit", "date": ""})
    n = int(tg_test(r)[2:])
    return 512 / ttft_s(shape, dev, 512), 1 / token_seconds(shape, dev, n // 2, "f16")


def fit(points: list, leave_out: str | None = None) -> dict:
    """-> {class: {"prefill", "decode", "devices": [names]}} from the results of every device but
    leave_out; classes without any are absent."""
    per_device = {}
    for r in points:
        if r["hardware"] == leave_out:
            continue
        pp1, tg1 = unit_speeds(r)
        d = per_device.setdefault(r["hardware"], ([], []))
        d[0].append(r["pp512"] / pp1)
        d[1].append((1 / tg1, 1 / r[tg_test(r)]))
    out = {}
    for name, (pre, steps) in per_device.items():
        c = out.setdefault(find_hardware(name)["class"], {"prefill": [], "steps": [],
                                                          "devices": []})
        c["prefill"].append(statistics.median(pre))
        c["steps"].append(tuple(statistics.median(s) for s in zip(*steps)))
        c["devices"].append(name)
    fitted = {}
    for k, v in out.items():
        e, t = step_line(v["steps"])
        fitted[k] = {"prefill": statistics.median(v["prefill"]), "decode": e, "t_token": t,
                     "devices": sorted(v["devices"])}
    return fitted


def step_line(steps: list) -> tuple:
    """steps: (seconds at efficiency 1, measured seconds) per device -> (e, t_token) of
    measured = unit / e + t_token, minimizing the relative squared error, e <= 1, t_token >= 0."""
    def through_origin():
        a = sum(x / y for x, y in steps) / sum((x / y) ** 2 for x, y in steps)
        return max(a, 1.0), 0.0

    if len(steps) < 3:
        a, c = through_origin()
    else:  # weights 1/y²: the normal equations of sum((a x + c) / y - 1)²
        sxx = sum((x / y) ** 2 for x, y in steps)
        sx1 = sum(x / y ** 2 for x, y in steps)
        s11 = sum(1 / y ** 2 for x, y in steps)
        sx = sum(x / y for x, y in steps)
        s1 = sum(1 / y for x, y in steps)
        det = sxx * s11 - sx1 * sx1
        a, c = (sx * s11 - sx1 * s1) / det, (sxx * s1 - sx1 * sx) / det
        if c < 0:
            a, c = through_origin()
        elif a < 1:  # e capped at 1: the best t_token with a = 1
            a, c = 1.0, max(0.0, sum((y - x) / y ** 2 for x, y in steps) / s11)
    return 1 / a, c


@functools.lru_cache(maxsize=None)
def _fitted() -> dict:
    return fit(results())


def class_efficiency(cls: str) -> tuple:
    """-> ({"prefill", "decode"}, basis): fitted where published results of the class exist,
    else data/efficiency.json's assumed figures."""
    f = _fitted().get(cls)
    if f:
        n = len(f["devices"])
        return ({"prefill": f["prefill"], "decode": f["decode"], "t_token": f["t_token"]},
                f"fitted: published llama-bench results of {n} {CLASSES[cls]} "
                f"device{'s' * (n > 1)} (plan/data/validation.json)")
    return efficiency(cls), (f"assumed: no published {CLASSES[cls]} result in "
                             "plan/data/validation.json to fit them to")


def tg_of(tg1: float, f: dict) -> float:
    """tokens/s from the one predicted at efficiency 1, under a class's fit"""
    return 1 / (1 / (tg1 * f["decode"]) + f["t_token"])


def leave_one_out(points: list | None = None) -> list:
    """Per result: the published pp512 and tg, and the prediction from its class's efficiencies
    fitted without its device (None where its class has no other device)."""
    points = results() if points is None else points
    rows = []
    for r in points:
        f = fit(points, leave_out=r["hardware"]).get(find_hardware(r["hardware"])["class"])
        pp1, tg1 = unit_speeds(r)
        rows.append(dict(r, cls=find_hardware(r["hardware"])["class"], tg_test=tg_test(r),
                         tg=r[tg_test(r)], pp512_loo=f and pp1 * f["prefill"],
                         tg_loo=f and tg_of(tg1, f)))
    return rows
