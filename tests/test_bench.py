"""`selfattn roofline` and `selfattn bench`: records, calibration, the stored roofline, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from selfattn.measure import bench, store
from selfattn.model import Transformer
from selfattn.plan import ModelShape
from selfattn.plan.predict import device_for_this_machine, ttft_s, token_seconds

from .tiny_gguf import tiny_model_file

ROOFLINE = {"matmul_gflops": 100.0, "read_gbs": 20.0, "cpu": "test", "threads": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, reader, _, _ = tiny_model_file(tmp_path_factory, 5, ffn=128)
    return path, Transformer.from_reader(reader, path), ModelShape.from_gguf(reader, path)


def test_bench_records(tiny):
    _, model, shape = tiny
    steps = []
    recs = bench.run_bench(model, shape, ROOFLINE, p=8, n=4, depths=(0, 16, 40), reps=3,
                           on_step=steps.append)
    assert [r.test for r in recs] == ["pp8", "tg4", "ttft @ 16", "pp8 @ d16",
                                      "tg4 @ d16", "ttft @ 40", "pp8 @ d40", "tg4 @ d40"]
    assert len(steps) == bench.count_steps((0, 16, 40))
    for r in recs:
        assert len(r.samples_ns) == 3 and all(s > 0 for s in r.samples_ns)
        assert r.avg_ts == pytest.approx(np.mean(r.samples_ts))  # llama-bench's avg_ts
        assert r.median_ts == pytest.approx(np.median(r.samples_ts))
        tokens = r.n_gen or r.n_prompt
        assert r.samples_ts == pytest.approx([tokens / (s / 1e9) for s in r.samples_ns], rel=1e-5)
        assert 0 < r.attention_share < 1 and r.roofline_fraction > 0
    pp40 = recs[6]
    assert pp40.attention_pairs == shape.attention_pairs(8, 40)
    assert recs[5].attention_pairs == shape.attention_pairs(40, 0)
    tg = recs[7]
    assert tg.kv_bytes_per_token == shape.kv_bytes(42, "f32")
    # the tiny file's matrices are F32, held as the file's bytes; of the (untied) embedding
    # table one row is read per token, not streamed
    assert shape.packed_bytes == 4 * shape.packed_params > 0
    assert tg.weight_bytes_per_token == (shape.params - shape.embedding_params) * 4
    assert recs[4].ttft_s == recs[3].ttft_s == pytest.approx(np.median(recs[2].samples_ns) / 1e9,
                                                          rel=1e-5)


def test_calibration_recovers_known_efficiencies(tiny):
    """Records made from the speed model itself with chosen efficiencies: the fit returns them."""
    _, _, shape = tiny
    truth = TRUTH
    dev = device_for_this_machine(ROOFLINE, truth, 0)
    recs = synthetic_records(shape, truth, reps=2)
    fit = bench.calibrate(recs, shape, ROOFLINE)
    for k, v in truth.items():
        assert fit[k] == pytest.approx(v, rel=1e-3)
    # stamped with how decode read the weights, so that `plan` ignores a fit from another layout
    assert fit["weights"] == bench.weights_layout(dev)
    assert ttft_s(shape, device_for_this_machine(ROOFLINE, fit, 0), 1000) == pytest.approx(
        ttft_s(shape, dev, 1000), rel=1e-3)
    with pytest.raises(ValueError, match="two or more depths"):
        bench.calibrate([r for r in recs if r.n_depth == 0 or not r.n_gen], shape, ROOFLINE)


def test_kernel_bench(tiny):
    _, _, shape = tiny
    recs = bench.run_kernel_bench(shape, ROOFLINE, p=16, depths=(0, 32), reps=2)
    assert [r.test for r in recs] == ["attn pp16", "attn pp16 @ d32", "attn tg1 @ d32"]
    assert recs[1].attention_pairs == shape.n_heads * (16 * 33 + 16 * 15 // 2)
    assert recs[2].kv_bytes_per_token == 2 * shape.n_kv_heads * 32 * shape.head_dim * 4


def test_store_is_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert store.load("roofline") is None
    store.save("roofline", {"read_gbs": 1.5})
    doc = store.load("roofline")
    assert doc["read_gbs"] == 1.5 and doc["machine"] == store.machine_key() and doc["date"]
    monkeypatch.setattr(store, "machine_key", lambda: "another machine")
    assert store.load("roofline") is None


@pytest.fixture(scope="module")
def cli_env(cli_cache):
    return dict(os.environ, XDG_CACHE_HOME=str(cli_cache))


def run(*args, env):
    return subprocess.run([sys.executable, "-m", "selfattn.cli", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def test_cli_roofline_measures_then_caches(cli_env):
    r = run("roofline", "--json", env=cli_env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["measured_now"] is True
    assert doc["matmul_gflops"] > 1 and doc["read_gbs"] > 0.5 and doc["threads"] >= 1
    assert doc["matmul_gflops_1t"] > 0.5 and doc["read_gbs_1t"] > 0.2
    from selfattn import native

    built = native.available()  # the FMA peak is measured by the compiled kernels
    assert (doc["fma_gflops"] > 1 and doc["fma_gflops_1t"] > 0.5) if built else \
        (doc["fma_gflops"] is None)
    assert "blas" in doc and doc["blas"] != "unknown BLAS"
    assert isinstance(doc["warnings"], list)
    assert set(doc["spread"]) == {"matmul_gflops", "matmul_gflops_1t", "read_gbs",
                                  "read_gbs_1t"} | ({"fma_gflops", "fma_gflops_1t"} if built else set())
    assert all(0 <= v < 1 for v in doc["spread"].values()) and doc["reps"] >= 3
    again = json.loads(run("roofline", "--json", env=cli_env).stdout)
    assert again["measured_now"] is False and again["date"] == doc["date"]
    r = run("roofline", env=cli_env)
    assert r.returncode == 0 and "GFLOP/s" in r.stdout and "GB/s" in r.stdout
    assert ("FMA peak" in r.stdout) == built and "%)" in r.stdout  # each figure's spread


def test_the_age_of_a_measurement():
    import datetime

    from selfattn.measure.roofline import age

    now = datetime.datetime(2026, 12, 1, 12, tzinfo=datetime.timezone.utc)
    assert age("2026-12-01T09:00:00+00:00", now) == "3 h ago"
    assert age("2026-11-20T09:00:00+00:00", now) == "11 days ago"
    assert age("2026-12-01T11:59:30+00:00", now) == "just now"


def synthetic_records(shape, truth, reps=3, depths=(0, 512, 2048, 8192)):
    """Records whose samples are what the speed model says for efficiencies `truth`."""
    dev = device_for_this_machine(ROOFLINE, truth, 0)
    recs = []
    for d in depths:
        for test, n_prompt, n_gen, depth in (("pp", 512, 0, d), ("tg", 0, 128, d),
                                              ("ttft", d, 0, 0)):
            if n_prompt == 0 and n_gen == 0:
                continue
            if n_gen:
                t = n_gen * token_seconds(shape, dev, depth + n_gen // 2, "f32")
            else:
                t = (shape.linear_flops_per_token() * n_prompt / (1e11 * truth["e_linear"])
                     + shape.attention_flops(n_prompt, depth) / (1e11 * truth["e_attention"]))
            recs.append(bench.Record(test=f"{test} {n_prompt} {n_gen} @ {depth}",
                                     n_prompt=n_prompt, n_gen=n_gen, n_depth=depth, avg_ts=0,
                                     stddev_ts=0, samples_ns=[t * 1e9] * reps))
    return recs


TRUTH = dict(e_weights=0.7, e_kv=0.3, e_linear=0.45, e_attention=0.2)


def test_a_fit_is_refused_when_it_cannot_be_trusted(tiny):
    """Too few reps, an efficiency outside (0, 1], a fit that misses its runs, a busy machine:
    each is named, and a sound fit has no refusal."""
    _, _, shape = tiny
    recs = synthetic_records(shape, TRUTH)
    fit = bench.calibrate(recs, shape, ROOFLINE)
    assert bench.refusals(recs, fit, shape, ROOFLINE) == []
    few = synthetic_records(shape, TRUTH, reps=1)
    assert any("fewer than 3 samples" in p for p in bench.refusals(few, fit, shape, ROOFLINE))
    impossible = dict(fit, e_attention=1.7)
    assert any("e_attention = 1.7 is not a share" in p
               for p in bench.refusals(recs, impossible, shape, ROOFLINE))
    # one test twice as slow as the others say: the fit cannot explain every run
    bad = synthetic_records(shape, TRUTH)
    bad[4].samples_ns = [2 * s for s in bad[4].samples_ns]
    refit = bench.calibrate(bad, shape, ROOFLINE)
    assert any(p.startswith("the fit misses") for p in bench.refusals(bad, refit, shape, ROOFLINE))
    # a busy moment: samples far apart, or the FMA peak around the run below the roofline's
    busy = synthetic_records(shape, TRUTH)
    busy[0].samples_ns = [busy[0].samples_ns[0] * f for f in (1.0, 1.4, 1.5)]
    assert any("busy" in p for p in bench.refusals(busy, fit, shape, ROOFLINE))
    roof = dict(ROOFLINE, fma_gflops=100.0)
    assert bench.refusals(recs, fit, shape, roof, peak_during=95.0) == []
    assert any("busy" in p for p in bench.refusals(recs, fit, shape, roof, peak_during=60.0))


def test_cli_bench_json_plot_and_plan_this(tiny, cli_env, tmp_path, monkeypatch):
    """bench's records and plot; a run that cannot be trusted (here: too few reps, and a tiny
    model whose times the speed model does not describe) leaves `plan`'s answers alone."""
    run("roofline", env=cli_env)  # measured once per test session (cached)
    path = str(tiny[0])
    monkeypatch.setenv("XDG_CACHE_HOME", cli_env["XDG_CACHE_HOME"])
    roofline = store.load("roofline")
    fit = bench.calibrate(synthetic_records(tiny[2], TRUTH), tiny[2], roofline)
    store.save("calibration", fit)
    before = run("plan", "--model", path, "--ctx", "200", "--json", env=cli_env)
    assert before.returncode == 0, before.stderr
    doc = json.loads(before.stdout)
    assert doc["calibrated"] is True and doc["hardware"] == "this" and doc["fits"]
    r = run("bench", "--model", path, "-p", "8", "-n", "4", "--depths", "0,24,48", "--reps", "2",
            "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"), env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "pp8 @ d24" in r.stdout and "tg4 @ d48" in r.stdout
    assert "not calibrated" in r.stdout and "fewer than 3 samples" in r.stdout, r.stdout
    recs = json.loads((tmp_path / "b.json").read_text())
    for rec in recs:
        for key in ("test", "n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "samples_ns",
                    "ttft_s", "attention_share", "kv_bytes_per_token", "weight_bytes_per_token",
                    "roofline_fraction"):
            assert key in rec
    from PIL import Image
    with Image.open(tmp_path / "b.png") as im:
        assert im.size == (1200, 480)
    r = run("bench", "--model", path, "-p", "8", "-n", "4", "--depths", "0,24", "--reps", "1",
            env=cli_env)
    assert r.returncode == 0 and "not calibrated" in r.stdout, r.stdout
    kept = store.load("calibration")
    assert {k: kept[k] for k in fit} == fit
    after = json.loads(run("plan", "--model", path, "--ctx", "200", "--json", env=cli_env).stdout)
    for key in ("calibrated", "ttft_s", "decode_tps", "decode_tps_empty"):  # memory is "now"
        assert after[key] == doc[key]
    r = run("bench", "--model", path, "--kernels", "-p", "16", "--depths", "0,32", "--reps", "2",
            env=cli_env)
    assert r.returncode == 0 and "attn tg1 @ d32" in r.stdout, r.stderr
    r = run("bench", "--model", path, "--kernels", "-p", "16", "--depths", "0", "--reps", "1",
            env=cli_env)  # one sample has no spread: none is printed
    assert r.returncode == 0 and "(1 sample)" in r.stdout and "± 0.0 " not in r.stdout, r.stdout


def test_cli_bench_errors(cli_env, tmp_path):
    r = run("bench", "--depths", "0,-5", env=cli_env)
    assert r.returncode == 2 and "numbers" in r.stderr and "Traceback" not in r.stderr
    r = run("bench", "--json", str(tmp_path / "missing" / "x.json"), env=cli_env)
    assert r.returncode == 2 and "folder does not exist" in r.stderr


def test_a_roofline_that_contradicts_itself_is_named_and_repeated(cli_env):
    """A stored roofline with all-thread bandwidth below one thread's, or a matmul above the FMA
    peak, is named as such; every command that measures against it says so."""
    from selfattn.measure.roofline import Roofline, contradictions

    r = Roofline(fma_gflops=71.0, fma_gflops_1t=36.0, matmul_gflops=93.0, matmul_gflops_1t=50.0,
                 read_gbs=1.8, read_gbs_1t=4.3, threads=2, blas="x", isa="avx2", warnings=[])
    found = contradictions(r)
    assert len(found) == 2 and "below one thread's" in found[0] and "above the FMA" in found[1]
    assert contradictions(Roofline(70.0, 36.0, 60.0, 31.0, 20.0, 12.0, 2, "x", "avx2", [])) == []
    busy = Roofline(70.0, 36.0, 60.0, 31.0, 20.0, 12.0, 2, "x", "avx2", [],
                    spread={"read_gbs": 0.31, "fma_gflops": 0.02})
    assert contradictions(busy) == ["read gbs: the median of 5 runs is 31% below the best (over "
                                    "20%: the machine was busy)"]
    first = json.loads(run("roofline", "--json", env=cli_env).stdout)
    path = os.path.join(cli_env["XDG_CACHE_HOME"], "selfattn", "roofline.json")
    stored = json.loads(open(path).read())
    stored.update(warnings=found)
    with open(path, "w") as f:
        json.dump(stored, f)
    for args in (("roofline",), ("plan", "--ctx", "256")):
        r = run(*args, env=cli_env)
        assert r.returncode == 0 and "roofline" in r.stderr and "suspect" in r.stderr, r.stderr
    stored.update(warnings=first["warnings"])
    with open(path, "w") as f:
        json.dump(stored, f)


def test_the_compiled_reader_reads_an_array_once():
    from selfattn import native

    if not native.available():
        pytest.skip("no compiled kernels")
    assert native.read_gbs(1, 8 << 20, reps=2) > 0.1
    with pytest.raises(ValueError):
        native.read_gbs(0)
