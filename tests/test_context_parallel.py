"""Context parallelism over MPI: ring prefill and sharded decode against one process, the whole
model's tokens, the CLI, and what happens when MPI or a rank is missing.

The multi-rank cases run under mpiexec (tests/mpi_cases.py); more ranks than cores is fine for
correctness. The 4-rank run of the whole model takes about a minute on two cores: it runs when
SELFATTN_MPI_ALL=1 (the 2-rank one always)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from selfattn import attention, native
from selfattn.distributed.ring import (Accumulator, attend_block, by_runs, positions,
                                       visibility, zigzag)
from selfattn.errors import DistributedError
from selfattn.plan.parallel import ring_step_bytes

from .conftest import assert_close_to_reference

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401

    HAVE_MPI = MPIEXEC is not None
except ImportError:
    HAVE_MPI = False
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="mpi4py and mpiexec (selfattn[distributed]) "
                                                    "are not installed")
# the whole-model cases run the same Python over either kernels: the suite's pass without the
# compiled ones (numba, minutes longer here) keeps the kernel-level multi-rank cases only
needs_kernels = pytest.mark.skipif(not native.available(), reason="the model-level context-"
                                   "parallel cases run in the pass with the compiled kernels")


def launch(ranks, *args, timeout=600, env=None):
    cmd = [MPIEXEC, "-n", str(ranks), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


# -- one process: the pieces the ring is made of ---------------------------------------------


@pytest.mark.parametrize("n,R", [(8, 2), (203, 2), (203, 3), (1000, 4), (17, 4)])
def test_zigzag_covers_every_position_once_and_balances_causal_work(n, R):
    runs = zigzag(n, R)
    pos = sorted(p for r in runs for s, c in r for p in range(s, s + c))
    assert pos == list(range(n))
    pairs = [sum((s + 1 + s + c) * c // 2 for s, c in r) for r in runs]  # keys seen, causal
    assert max(pairs) / min(pairs) < 1.0 + 4.0 / (n / (2 * R))


def test_zigzag_refuses_too_short():
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        zigzag(7, 4)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (False, None),
                                           (False, (3, 7)), (True, (4, 2)), (True, 30)])
def test_blocks_at_their_positions_merge_to_the_whole(rng, causal, window):
    """Keys split between two holders in runs with gaps (single positions too, as decoded
    tokens leave them), each attended at its positions: merged, attention over all keys."""
    H, H_kv, n, D = 4, 2, 61, 32
    q = rng.standard_normal((1, H, n, D), np.float32)
    k = rng.standard_normal((1, H_kv, n, D), np.float32)
    v = rng.standard_normal((1, H_kv, n, D), np.float32)
    want, want_lse = attention(q, k, v, causal=True if causal else False, window=window,
                               return_lse=True, impl="reference")
    q_runs = ((0, 20), (20, 1), (21, 40))
    mine = np.array([p for p in range(n) if p < 7 or 20 <= p < 30 or p in (41, 43, 50)
                     or p >= 55])
    others = np.setdiff1d(np.arange(n), mine)
    acc = Accumulator(H, n, D)
    for pos in (mine, others):
        attend_block(by_runs(q, q_runs), q_runs, np.ascontiguousarray(k[:, :, pos]),
                     np.ascontiguousarray(v[:, :, pos]), pos, acc, visibility(causal, window))
    assert_close_to_reference(acc.out, acc.lse, want.astype(np.float64),
                              want_lse.astype(np.float64), q, k, v, 1 / np.sqrt(D), np.float32)


def test_no_mpi_is_a_named_error(monkeypatch):
    from selfattn.distributed import comm

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(DistributedError, match=r"mpi4py.*selfattn\[distributed\]"):
        comm.mpi()


def test_single_machine_paths_do_not_import_mpi():
    code = ("import sys, selfattn, selfattn.model, selfattn.cli, selfattn.serve.engine; "
            "print('mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# -- under mpiexec -----------------------------------------------------------------------------


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_ring_and_sharded_decode_equal_one_process(ranks):
    """Causal and not, GQA, windows, soft-cap, every KV type, lengths not divisible by R, and
    the bytes the transport sent equal the planner's formula (see mpi_cases.check_prefill)."""
    out = launch(ranks, sys.executable, "tests/mpi_cases.py", "kernels")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"34 cases passed on {ranks} ranks" in out.stdout


def test_transport_bytes_formula_is_the_planners():
    """mpi_cases holds the transport's count to plan.parallel.ring_step_bytes; that is
    2 · rows · H_kv · the KV type's row bytes."""
    from selfattn.attention.kvformat import quantize

    for fmt in ("f32", "f16", "q8_0", "q4_0"):
        row = quantize(np.zeros((1, 64), np.float32), fmt)[0].nbytes
        assert ring_step_bytes(10, 2, 64, fmt) == 2 * 10 * 2 * row


@needs_mpi
@needs_kernels
@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.skipif(
    os.environ.get("SELFATTN_MPI_ALL") != "1",
    reason="about a minute on two cores: SELFATTN_MPI_ALL=1"))])
def test_whole_model_greedy_tokens_equal_one_process(ranks):
    # 3,000 prompt tokens on 2 ranks (about 20 s on two cores), 6,000 on 4
    n = "3000" if ranks == 2 else "6000"
    out = launch(ranks, sys.executable, "tests/mpi_cases.py", "model", n, "64", "f32")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "the 64 greedy tokens equal one process's" in out.stdout


@needs_mpi
@needs_kernels
def test_whole_model_compact_kv_equal_one_process():
    out = launch(2, sys.executable, "tests/mpi_cases.py", "model", "300", "16", "q8_0")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "the 16 greedy tokens equal one process's" in out.stdout


@needs_mpi
@needs_kernels
def test_cli_generate_context_parallel_matches_one_process():
    args = [str(BIN / "selfattn"), "generate", "Name three prime numbers.", "--max-tokens", "24",
            "--json"]
    cp = launch(2, *args, "--context-parallel")
    assert cp.returncode == 0, cp.stderr[-3000:]
    one = subprocess.run(args, capture_output=True, text=True, timeout=300)
    got, want = json.loads(cp.stdout), json.loads(one.stdout)
    assert got["token_ids"] == want["token_ids"]
    f = got["context_parallel"]
    assert f["ranks"] == 2 and f["kv_cache_bytes_per_rank"] < want["kv_cache_bytes"] * 0.51
    assert f["ring_bytes_sent_per_layer"] > 0 and 0 <= f["ring_hidden_share"] <= 1


@needs_mpi
def test_cli_without_mpiexec_is_one_line():
    out = subprocess.run([str(BIN / "selfattn"), "generate", "hi", "--context-parallel"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "mpiexec -n R" in out.stderr, out.stderr


@needs_mpi
@pytest.mark.parametrize("how", ["exits", "hangs"])
def test_a_rank_that_stops_ends_the_launch(how):
    """A rank that dies, or lives but stops answering: the others do not wait forever."""
    t0 = time.perf_counter()
    out = launch(2, sys.executable, "tests/mpi_cases.py", f"rank1-{how}", timeout=120,
                 env={"CP_TIMEOUT": "3"})
    assert time.perf_counter() - t0 < 60
    assert out.returncode != 0
    if how == "hangs":  # rank 0's own error names what happened
        assert "had no answer from the other ranks in 3 s" in out.stderr, out.stderr[-2000:]


@needs_mpi
@needs_kernels
def test_cli_perplexity_context_parallel_matches_one_process(tmp_path):
    import argparse as source

    text = tmp_path / "text.txt"
    text.write_text(Path(source.__file__).read_text())
    args = [str(BIN / "selfattn"), "perplexity", str(text), "--ctx", "256",
            "--max-text-tokens", "768", "--json"]
    cp = launch(2, *args, "--context-parallel")
    assert cp.returncode == 0, cp.stderr[-3000:]
    one = subprocess.run(args, capture_output=True, text=True, timeout=300)
    got, want = json.loads(cp.stdout), json.loads(one.stdout)
    assert got["scored"] == want["scored"] and got["context_parallel_ranks"] == 2
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)


@needs_mpi
@needs_kernels
def test_cli_error_on_every_rank_is_said_once():
    out = launch(2, str(BIN / "selfattn"), "generate", "hello there friend", "--raw", "--ctx",
                 "2", "--context-parallel", timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("the context is 2") == 1 and out.stderr.count("\n") == 1, out.stderr


@needs_mpi
@needs_kernels
@pytest.mark.parametrize("ranks", [2, 3])
def test_prompts_at_depth_and_rewinds_follow_one_process(ranks):
    out = launch(ranks, sys.executable, "tests/mpi_cases.py", "turns")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 cases passed" in out.stdout


@needs_mpi
@needs_kernels
def test_cli_bench_context_parallel_reports_and_keeps_no_calibration(tmp_path):
    """Rank 0 measures the roofline (none is stored) and shares it; the run is reported,
    never calibrated from."""
    xdg = tmp_path / "xdg"
    env = {"XDG_CACHE_HOME": str(xdg)}
    folder = xdg / "selfattn"
    out = launch(2, str(BIN / "selfattn"), "bench", "--context-parallel", "-p", "32", "-n", "4",
                 "--depths", "0,64", "--reps", "1", "--json", str(tmp_path / "b.json"),
                 env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "context parallel on 2 ranks" in out.stdout and "not calibrated" in out.stdout
    doc = json.loads((tmp_path / "b.json").read_text())
    assert {r["test"] for r in doc} >= {"pp32", "tg4", "pp32 @ d64", "tg4 @ d64"}
    assert all(r["context_parallel_ranks"] == 2 for r in doc)
    assert (folder / "roofline.json").is_file()
    assert not list(folder.glob("calibration*")), list(folder.iterdir())


@needs_mpi
@needs_kernels
def test_cli_error_on_one_rank_is_said_once_and_ends_every_rank(tmp_path):
    """rank 0 alone cannot write its --json (a folder is in the way); the others must not wait
    for it at their first exchange."""
    (tmp_path / "out.json").mkdir()
    t0 = time.perf_counter()
    out = launch(2, str(BIN / "selfattn"), "bench", "--context-parallel", "-p", "32", "-n", "4",
                 "--depths", "0", "--reps", "1", "--json", str(tmp_path / "out.json"),
                 timeout=120)
    assert time.perf_counter() - t0 < 60
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "out.json" in out.stderr and "Traceback" not in out.stderr
