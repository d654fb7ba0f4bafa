"""A device's efficiencies from a user's own `llama-bench -o json` run (`plan --calibrate-from`).

llama-bench writes one record per test: n_prompt, n_gen, n_depth (tokens already in the cache;
absent in older builds), samples_ts or avg_ts (tokens/s), model_n_params, type_k. A pp record
gives the prefill efficiency, FLOPs / (peak FLOP/s · seconds); a tg record the decode one,
bytes read per token / (bandwidth · seconds per token), as selfattn.plan.predict models them; each
is the median over the file's records. The model must be the one --model names (checked by its
parameter count), the device the catalog entry --hardware names (its specification's peaks).
"""

import json
import statistics

from .predict import Device, weight_bytes_per_token

PARAMS_TOLERANCE = 0.10  # the file's model and --model may differ this much in parameter count


def read_records(path: str) -> list[dict]:
    """The pp and tg records of a llama-bench JSON file; ValueError naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"{path}: not `llama-bench -o json` output (a list of test records)")
    out = []
    for i, r in enumerate(doc):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is not an object")
        try:
            n_prompt, n_gen = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0))
            depth = int(r.get("n_depth", 0))
            samples = r.get("samples_ts") or [r["avg_ts"]]
            ts = statistics.median(float(s) for s in samples)
            params = int(r["model_n_params"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: record {i} lacks a llama-bench field or has a bad one "
                             f"({e})") from None
        if not ts > 0 or n_prompt < 0 or n_gen < 0 or depth < 0 or (n_prompt > 0) == (n_gen > 0):
            raise ValueError(f"{path}: record {i} is neither a pp nor a tg test with a positive "
                             "speed")
        out.append(dict(n_prompt=n_prompt, n_gen=n_gen, n_depth=depth, ts=ts, params=params,
                        type_k=str(r.get("type_k", "f16")), test=r.get("test_time", "")))
    return out


def fit(records: list[dict], shape, device: Device) -> dict:
    """Efficiencies of `device` running `shape` from llama-bench records (see module doc)."""
    from ..cache import KV_BITS

    params = records[0]["params"]
    if abs(params / shape.params - 1) > PARAMS_TOLERANCE:
        raise ValueError(f"the llama-bench file ran a {params / 1e9:.2f} B-parameter model and "
                         f"--model is {shape.params / 1e9:.2f} B: pass the model it ran")
    peak, bw = device.tflops * 1e12, device.bandwidth_gbs * 1e9
    pre, dec = [], []
    for r in records:
        kv = r["type_k"] if r["type_k"] in KV_BITS else "f16"
        if r["n_prompt"]:
            seconds = r["n_prompt"] / r["ts"]
            flops = (shape.linear_flops_per_token() * r["n_prompt"]
                     + shape.attention_flops(r["n_prompt"], r["n_depth"]))
            pre.append(flops / peak / seconds)
        else:
            nbytes = (weight_bytes_per_token(shape, device)
                      + shape.kv_bytes(r["n_depth"] + r["n_gen"] // 2, kv))
            dec.append(nbytes / bw * r["ts"])
    if not pre or not dec:
        raise ValueError("calibrating a device needs a pp and a tg test (llama-bench's default "
                         "run has both: pp512 and tg128)")
    e_pre, e_dec = statistics.median(pre), statistics.median(dec)
    for name, e in (("prefill", e_pre), ("decode", e_dec)):
        if not 0 < e <= 1:
            raise ValueError(f"the {name} efficiency comes out at {e:.2f} of {device.name}'s "
                             "specification: not that device or not that model")
    return dict(e_linear=e_pre, e_attention=e_pre, e_weights=e_dec, e_kv=e_dec,
                tests=len(records), model=shape.name)
