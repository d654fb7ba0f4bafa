"""`selfattn plan`: catalogs, memory arithmetic, speed model, and agreement with the runner."""

import json
import subprocess
import sys

import numpy as np
import pytest

from selfattn.cache import KV_BITS, KVCache
from selfattn.model import Transformer, default_model_path
from selfattn.model.gguf_file import open_gguf
from selfattn.model.transformer import Timings
from selfattn.plan import (ModelShape, find_hardware, find_model, hardware_entries, model_entries,
                           plan)
from selfattn.plan.catalog import load
from selfattn.plan.predict import catalog_device, device_for_this_machine, token_seconds, ttft_s

from .tiny_gguf import make_weights, write_gguf

ROOFLINE = {"matmul_gflops": 100.0, "read_gbs": 20.0, "cpu": "test"}  # an input, not a finding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    w, cfg = make_weights(np.random.default_rng(3))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, w, cfg)
    return path


def this_device(memory=8 << 30):
    return device_for_this_machine(ROOFLINE, None, memory)


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_planned_kv_bytes_equal_what_the_runner_allocates(which, tiny):
    path = tiny if which == "tiny" else default_model_path()
    reader = open_gguf(path)
    shape = ModelShape.from_gguf(reader, path)
    from selfattn.model.config import ModelArgs
    args = ModelArgs.from_gguf(reader, path)
    for ctx in (1, 100, 4096):
        for kv in KV_BITS:  # every cache type the runner has
            if args.head_dim % 32 and kv in ("q8_0", "q4_0"):
                continue
            cache = KVCache(args.n_layers, args.n_kv_heads, args.head_dim, ctx, kv)
            assert plan(shape, this_device(), ctx, kv).kv_cache_bytes == cache.nbytes


def test_planned_attention_pairs_equal_the_runners_count(tiny):
    reader = open_gguf(tiny)
    shape = ModelShape.from_gguf(reader, tiny)
    model = Transformer.from_reader(reader, tiny)
    cache = KVCache.for_model(model.args, 64)
    t = Timings()
    model.forward(np.arange(20) % 50, cache, 0, t)
    assert t.attention_pairs == shape.attention_pairs(20, 0)
    t = Timings()
    model.forward(np.arange(7) % 50, cache, 20, t)
    assert t.attention_pairs == shape.attention_pairs(7, 20)


def test_gguf_shape_counts_the_files_tensors(tiny):
    reader = open_gguf(tiny)
    shape = ModelShape.from_gguf(reader, tiny)
    assert shape.file_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert shape.params == sum(int(t.n_elements) for t in reader.tensors)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim) == (2, 4, 2, 16)


def test_catalogs_are_complete_and_sourced():
    hw, models = hardware_entries(), model_entries()
    assert len(hw) >= 20 and len(models) >= 10
    from selfattn.plan.published import CLASSES

    assert {e["class"] for e in hw} == set(CLASSES)
    assert {e["vendor"] for e in hw} == {"nvidia", "amd", "apple", "cpu"}
    for e in hw:
        assert e["memory_gb"] > 0 and e["bandwidth_gbs"] > 0 and e["tflops"] > 0 and e["source"]
        assert 0 < e["usable"] <= 1
    for e in models:
        assert e["source"] and e["n_heads"] % e["n_kv_heads"] == 0 and e["params"] > 1e8
    assert len({e["name"] for e in hw}) == len(hw) and len({e["name"] for e in models}) == len(models)


def test_unknown_names_list_the_closest():
    with pytest.raises(ValueError, match="rtx-4090"):
        find_hardware("rtx4090")
    with pytest.raises(ValueError, match="qwen2.5-7b"):
        find_model("qwen2.5-7")


def test_kv_arithmetic_known_values():
    llama8 = ModelShape.from_catalog(find_model("llama-3.1-8b"), "Q4_K_M")
    # 2 (K, V) x 32 layers x 8 kv heads x 128 dims x 8192 positions x 2 bytes = 1 GiB exactly
    assert llama8.kv_bytes(8192, "f16") == 1 << 30
    assert llama8.kv_bytes(8192, "q8_0") == (1 << 30) * 8.5 / 16
    assert llama8.kv_bytes(8192, "q4_0") == (1 << 30) * 4.5 / 16
    gemma = ModelShape.from_catalog(find_model("gemma-2-9b"), "Q4_K_M")
    per_pos_layer = 2 * 8 * 256 * 2
    assert gemma.kv_bytes(32768, "f16") == 21 * per_pos_layer * (32768 + 4096)
    assert llama8.file_bytes == int(8.03e9 * 4.89 / 8)


def test_attention_pairs_closed_form_matches_counting():
    shape = ModelShape.from_catalog(find_model("gemma-2-9b"), "Q8_0")
    for n, depth in ((1, 0), (10, 0), (37, 5000), (6000, 0), (100, 4090)):
        seen = depth + 1 + np.arange(n)
        expect = shape.n_heads * (21 * seen.sum() + 21 * np.minimum(seen, 4096).sum())
        assert shape.attention_pairs(n, depth) == expect


def test_max_ctx_is_the_boundary_and_advice_names_smaller_kv_types():
    shape = ModelShape.from_catalog(find_model("llama-3.1-8b"), "Q4_K_M")
    dev = catalog_device(find_hardware("rtx-3060-12gb"))
    p = plan(shape, dev, 131072, "f16")
    assert not p.fits and 0 < p.max_ctx < 131072
    assert plan(shape, dev, p.max_ctx, "f16").fits and not plan(shape, dev, p.max_ctx + 1, "f16").fits
    assert p.max_ctx_by_kv_dtype["q4_0"] > p.max_ctx_by_kv_dtype["q8_0"] > p.max_ctx
    assert any("a context of at most" in a for a in p.advice)
    p = plan(shape, dev, 60000, "f16")  # f16 fits 46,819 positions on 12 GB, q8_0 88,130
    assert not p.fits and any("--kv-dtype q8_0 fits the whole context" in a for a in p.advice)
    huge = ModelShape.from_catalog(find_model("llama-3.1-70b"), "Q4_K_M")
    p = plan(huge, dev, 1024, "f16")
    assert p.max_ctx == 0 and "weights alone do not fit" in p.advice[0]


def test_the_largest_context_is_the_trained_one_and_min_tps_stays_within_it():
    """1,351,445 positions fit an 8B model's q4_0 cache on a big GPU, but it was trained on
    131,072: that is the answer, and why; a --min-tps depth past it is no answer."""
    shape = ModelShape.from_catalog(find_model("llama-3.1-8b"), "Q4_K_M")
    dev = catalog_device(find_hardware("h100-sxm"))
    p = plan(shape, dev, 8192, "q4_0", min_tps=1e-3)
    assert p.max_ctx_memory > shape.context == 131072 == p.max_ctx
    assert all(n <= shape.context for n in p.max_ctx_by_kv_dtype.values())
    assert any("the model's trained one, 131,072" in a for a in p.advice)
    assert p.min_tps_depth is None  # tokens/s stays above 0.001 to the end of the context
    slow = plan(shape, dev, 8192, "q4_0", min_tps=p.decode_tps_empty * 0.9)
    assert slow.min_tps_depth is not None and 0 < slow.min_tps_depth <= slow.max_ctx


def test_speed_model_walls():
    shape = ModelShape.from_catalog(find_model("llama-3.1-8b"), "Q4_K_M")
    dev = catalog_device(find_hardware("rtx-4090"))
    p1, p2 = plan(shape, dev, 16384, "f16"), plan(shape, dev, 32768, "f16")
    assert p2.ttft_s > 2 * p1.ttft_s  # the quadratic term
    assert p2.decode_tps < p1.decode_tps < p1.decode_tps_empty  # the bandwidth wall
    p = plan(shape, dev, 8192, "f16", min_tps=100)
    d = p.min_tps_depth
    assert 1 / token_seconds(shape, dev, d - 1, "f16") >= 100 > 1 / token_seconds(shape, dev, d,
                                                                                  "f16")
    assert plan(shape, dev, 8192, "f16", min_tps=1e6).min_tps_depth == 0


def test_catalog_predictions_against_published_llama_bench_results():
    """plan with each class's fitted efficiencies against every published point (in-sample):
    the median error docs/plan.md reports stays within 20% for pp512 and tg, every class's
    figures are physical, and leaving a device out still predicts it from its class."""
    from selfattn.plan.published import fit, leave_one_out, results, tg_test

    points = results()
    assert len({r["hardware"] for r in points}) >= 12
    pp_err, tg_err = [], []
    for r in points:
        shape = ModelShape.from_catalog(find_model(r["model"]), r["quant"])
        dev = catalog_device(find_hardware(r["hardware"]))
        pp_err.append(abs(512 / ttft_s(shape, dev, 512) / r["pp512"] - 1))
        depth = int(tg_test(r)[2:]) // 2
        tg_err.append(abs(1 / token_seconds(shape, dev, depth, "f16") / r[tg_test(r)] - 1))
    assert np.median(pp_err) < 0.2 and np.median(tg_err) < 0.2, (np.median(pp_err),
                                                                  np.median(tg_err))
    for f in fit(points).values():
        assert 0 < f["prefill"] <= 1 and 0 < f["decode"] <= 1 and f["t_token"] >= 0
    rows = leave_one_out(points)
    assert all(r["pp512_loo"] and r["tg_loo"] for r in rows)  # every class has 2+ devices
    one = [r for r in points if r["hardware"] == "rtx-4090"]
    assert fit(points, leave_out="rtx-4090") != fit(points) and one


def test_a_class_without_published_results_says_its_figures_are_assumed(monkeypatch):
    from selfattn.plan import published

    monkeypatch.setattr(published, "_fitted", lambda: {})
    dev = catalog_device(find_hardware("rtx-4090"))
    assert dev.basis["efficiencies"].startswith("assumed: no published")
    assert dev.e_weights == load("efficiency.json")["consumer-gpu"]["decode"]


def test_bad_plan_arguments():
    shape = ModelShape.from_catalog(find_model("mistral-7b"), "Q8_0")
    dev = this_device()
    with pytest.raises(ValueError, match="--ctx"):
        plan(shape, dev, 0)
    with pytest.raises(ValueError, match="--kv-dtype"):
        plan(shape, dev, 10, "q2")
    with pytest.raises(ValueError, match="unknown --quant"):
        ModelShape.from_catalog(find_model("mistral-7b"), "Q3_XS")
    assert set(KV_BITS) == {"f32", "f16", "q8_0", "q4_0"}


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "selfattn.cli", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def test_cli_plan_json_and_rank():
    r = run("plan", "--model", "qwen2.5-14b", "--ctx", "32768", "--quant", "Q5_K_M",
            "--kv-dtype", "q8_0", "--hardware", "rtx-4090", "--min-tps", "20", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for key in ("weights_bytes", "kv_cache_bytes", "total_bytes", "memory_bytes", "fits",
                "max_ctx", "ttft_s", "decode_tps", "min_tps_depth"):
        assert key in doc
    assert doc["total_bytes"] == doc["weights_bytes"] + doc["kv_cache_bytes"] + doc["buffer_bytes"]
    assert doc["basis"]["peak"].startswith("assumed: the vendor's specification")
    assert doc["basis"]["efficiencies"].startswith("fitted: published llama-bench results")
    r = run("plan", "--model", "llama-3.1-8b", "--ctx", "8192", "--rank", "--json")
    ranked = json.loads(r.stdout)
    assert len(ranked) == len(hardware_entries())
    classes = {e["name"]: e["class"] for e in hardware_entries()}
    published = {classes[r["hardware"]] for r in load("validation.json")["results"]}
    for p in ranked:
        assert p["basis"]["efficiencies"].startswith(
            "fitted" if classes[p["hardware"]] in published else "assumed"), p["basis"]
    fitting = [p["decode_tps"] for p in ranked if p["fits"]]
    assert fitting == sorted(fitting, reverse=True)
    r = run("plan", "--model", "llama-3.1-8b", "--ctx", "8192", "--hardware", "rtx-4090,apple-m4")
    assert r.returncode == 0 and "rtx-4090" in r.stdout and "apple-m4" in r.stdout
    assert "are predictions" in r.stdout and "assumed: the vendor's" in r.stdout


def test_plan_says_what_this_machine_s_figures_rest_on():
    """This machine's peak is measured; its efficiencies measured by bench when it has
    calibrated, else assumed: each with its date."""
    from selfattn.plan import device_for_this_machine

    roof = {"fma_gflops": 300.0, "matmul_gflops": 200.0, "read_gbs": 28.0, "cpu": "x",
            "date": "2026-12-01T10:00:00+00:00"}
    dev = device_for_this_machine(roof, None, 1 << 30)
    assert dev.basis["peak"] == "measured: selfattn roofline, 2026-12-01T10:00:00+00:00"
    assert dev.basis["efficiencies"].startswith("assumed") and not dev.calibrated
    assert dev.tflops == 0.3  # the FMA peak: every efficiency is a share of it
    cal = dict(e_weights=0.5, e_kv=0.4, e_linear=0.6, e_attention=0.3,
               date="2026-12-01T11:00:00+00:00")
    dev = device_for_this_machine(roof, cal, 1 << 30)
    assert dev.basis["efficiencies"] == "measured: selfattn bench, 2026-12-01T11:00:00+00:00"


def test_cli_plan_errors_are_one_line(tiny):
    for args, words in ((("--model", "llama-3-9b", "--ctx", "10"), "closest"),
                        (("--model", "mistral-7b", "--ctx", "10", "--hardware", "rtx-9090"),
                         "unknown hardware"),
                        (("--model", str(tiny), "--ctx", "10", "--quant", "Q8_0"),
                         "--quant is for catalog models"),
                        (("--model", "mistral-7b", "--ctx", "0"), "expected a number >= 1")):
        r = run("plan", *args)
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_planned_weight_bytes_equal_what_the_runner_holds_and_reads():
    """SmolLM2's Q4_1 / Q8_0 matrices: the planner's weight bytes are exactly what the loaded
    model holds (its matrices as the file's blocks, its norms as float32), and its bytes read per
    token the blocks of every matrix (the embedding is the LM head)."""
    from selfattn import native

    path = default_model_path()
    reader = open_gguf(path)
    shape = ModelShape.from_gguf(reader, path)
    model = Transformer.from_reader(reader, path)
    w = model.weights
    mats = [lin for layer in w.layers for lin in layer.linears] + [w.output]
    packed = sum(lin.nbytes for lin in mats if lin.packed is not None)
    dev = this_device()
    if not native.available():
        assert packed == 0 and plan(shape, dev, 64).weights_bytes == shape.params * 4
        return
    assert shape.packed_bytes == packed > 0
    assert shape.held_bytes == model.weight_bytes
    # tied embeddings: every weight is streamed; all matrices are packed, the norms stay float32
    assert shape.packed_params == shape.params - sum(
        int(t.n_elements) for t in reader.tensors if len(t.shape) == 1)
    assert plan(shape, dev, 64).weights_bytes == model.weight_bytes
    assert plan(shape, dev, 64).weight_bytes_per_token == \
        (shape.params - shape.packed_params) * 4 + packed


def llama_bench_file(path, shape, device, e_prefill, e_decode, params=None):
    """A `llama-bench -o json` file whose pp512 and tg128 speeds are what the speed model gives
    `device` at these efficiencies."""
    from selfattn.plan.predict import weight_bytes_per_token

    pp_s = (shape.linear_flops_per_token() * 512 + shape.attention_flops(512, 0)) / (
        device.tflops * 1e12 * e_prefill)
    tg_s = (weight_bytes_per_token(shape, device) + shape.kv_bytes(64, "f16")) / (
        device.bandwidth_gbs * 1e9 * e_decode)
    base = dict(build_commit="x", model_type="llama 8B Q4_K - Medium", n_threads=8,
                model_n_params=params or shape.params, model_size=shape.file_bytes,
                type_k="f16", type_v="f16", n_gpu_layers=99, n_depth=0)
    recs = [dict(base, n_prompt=512, n_gen=0, avg_ts=512 / pp_s, samples_ts=[512 / pp_s] * 3),
            dict(base, n_prompt=0, n_gen=128, avg_ts=1 / tg_s, samples_ts=[1 / tg_s] * 3)]
    path.write_text(json.dumps(recs))
    return path


def test_a_users_llama_bench_run_calibrates_that_device(tmp_path):
    import os

    from selfattn.plan.predict import catalog_device, token_seconds

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    shape = ModelShape.from_catalog(find_model("llama-3.1-8b"), "Q4_K_M")
    dev = catalog_device(find_hardware("rtx-4090"))
    f = llama_bench_file(tmp_path / "lb.json", shape, dev, 0.5, 0.7)
    args = ("plan", "--model", "llama-3.1-8b", "--hardware", "rtx-4090", "--ctx", "4096", "--json")
    r = run(*args, "--calibrate-from", str(f), env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["basis"]["efficiencies"].startswith("measured: llama-bench, lb.json")
    # one tg test cannot tell a per-token cost from the bandwidth term: the efficiency takes both
    want = dict(dev.__dict__, e_weights=0.7, e_kv=0.7, e_linear=0.5, e_attention=0.5,
                t_token=0.0)
    from selfattn.plan.predict import Device
    assert doc["decode_tps_empty"] == pytest.approx(
        1 / token_seconds(shape, Device(**want), 0, "f16"), rel=1e-6)
    later = json.loads(run(*args, env=env).stdout)  # kept for later plans of the device
    assert later["decode_tps_empty"] == doc["decode_tps_empty"]
    assert later["basis"] == doc["basis"]
    other = json.loads(run("plan", "--model", "llama-3.1-8b", "--hardware", "rtx-4080",
                           "--ctx", "4096", "--json", env=env).stdout)
    assert other["basis"]["efficiencies"].startswith("fitted")
    for bad_args, expect in (
            (("--calibrate-from", str(llama_bench_file(tmp_path / "b.json", shape, dev, 0.5, 0.7,
                                                       params=1_235_814_432))),
             "pass the model it ran"),
            (("--calibrate-from", str(llama_bench_file(tmp_path / "c.json", shape, dev, 2.0, 0.7))),
             "not that device or not that model"),
            (("--calibrate-from", str(tmp_path / "missing.json")), "missing.json"),
            (("--calibrate-from", str(f), "--hardware", "this"), "one catalog device")):
        r = run("plan", "--model", "llama-3.1-8b", "--hardware", "rtx-4090", "--ctx", "4096",
                *bad_args, env=env)
        assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "d.json").write_text('{"not": "a list"}')
    r = run(*args, "--calibrate-from", str(tmp_path / "d.json"), env=env)
    assert r.returncode == 2 and "not `llama-bench -o json` output" in r.stderr


def test_context_parallel_prediction_follows_its_formulas():
    from selfattn.cache import kv_cache_bytes
    from selfattn.plan.parallel import context_parallel, ring_step_bytes

    shape = ModelShape.from_catalog(find_model("llama-3.1-8b"), "Q4_K_M")
    dev = catalog_device(find_hardware("rtx-4090"))
    H, H_kv, D = shape.n_heads, shape.n_kv_heads, shape.head_dim
    for nodes, gbps in ((2, 10.0), (4, 100.0), (8, 400.0)):
        cp = context_parallel(shape, dev, 65536, "f16", nodes, gbps)
        c = 65536 // nodes
        assert cp.chunk == c and cp.step_bytes == ring_step_bytes(c, H_kv, D, "f16") \
            == 2 * c * H_kv * D * 2
        assert cp.bytes_per_layer == (nodes - 1) * cp.step_bytes
        assert cp.kv_cache_bytes_per_node == kv_cache_bytes(shape.n_layers, H_kv, D, c, "f16")
        assert cp.hidden == (cp.step_compute_s >= cp.step_transfer_s)
        assert 1.0 < cp.speedup <= nodes + 1e-9
        assert cp.ttft_s_one_node == ttft_s(shape, dev, 65536)
        # the smallest chunk that hides a step: compute covers the transfer there, not below
        F, B = dev.tflops * 1e12 * dev.e_attention, gbps * 1e9 / 8
        at = lambda n: (2 * D * H * n * n / F, ring_step_bytes(n, H_kv, D, "f16") / B)  # noqa: E731
        assert at(cp.min_chunk)[0] >= at(cp.min_chunk)[1]
        assert at(cp.min_chunk - 1)[0] < at(cp.min_chunk - 1)[1]
    slow = context_parallel(shape, dev, 65536, "f16", 4, 0.1)
    assert not slow.hidden and slow.speedup < context_parallel(shape, dev, 65536, "f16", 4,
                                                               100.0).speedup
    assert slow.basis["link"].startswith("assumed: --link-gbps 0.1")
    for bad, words in (((1, 10.0), "--nodes"), ((2, 0.0), "--link-gbps")):
        with pytest.raises(ValueError, match=words):
            context_parallel(shape, dev, 4096, "f16", *bad)


def test_cli_plan_context_parallel():
    r = run("plan", "--model", "llama-3.1-8b", "--ctx", "32768", "--hardware", "rtx-4090",
            "--nodes", "4", "--link-gbps", "100", "--json")
    assert r.returncode == 0, r.stderr
    cp = json.loads(r.stdout)["context_parallel"]
    assert cp["nodes"] == 4 and cp["chunk"] == 8192 and cp["min_chunk"] > 0
    r = run("plan", "--model", "llama-3.1-8b", "--ctx", "32768", "--hardware", "rtx-4090",
            "--nodes", "4", "--link-gbps", "100")
    assert "context parallel: 4 nodes" in r.stdout and "chunk to hide" in r.stdout
    r = run("plan", "--model", "llama-3.1-8b", "--ctx", "32768", "--nodes", "4")
    assert r.returncode == 2 and "--nodes and --link-gbps go together" in r.stderr
