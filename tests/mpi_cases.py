"""Context-parallel attention checked against one process, run under mpiexec by
tests/test_context_parallel.py: `mpiexec -n R python tests/mpi_cases.py kernels`.

Every rank draws the same inputs, computes single-process `selfattn.attention` over the whole
sequence, then its own part over the ring (or the sharded cache) and compares its rows with the
same tolerances the kernel tests use. Prints one line per case on rank 0; a failing rank raises
(mpiexec then ends the launch with a non-zero status)."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selfattn import attention  # noqa: E402
from selfattn.attention.kvformat import quantize  # noqa: E402
from selfattn.distributed import Comm, ring_attention, sharded_decode, zigzag  # noqa: E402
from selfattn.distributed.ring import RingStats, positions, run_rows  # noqa: E402
from selfattn.plan.parallel import ring_step_bytes  # noqa: E402
from tests.conftest import assert_close_to_reference  # noqa: E402

KV_FORMATS = ("f32", "f16", "q8_0", "q4_0")


def local_rows(x, runs, axis=2):
    return np.concatenate([x.take(np.arange(s, s + c), axis=axis) for s, c in runs], axis=axis)


def inputs(seed, H, H_kv, n, D):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, H, n, D), np.float32)
    k = rng.standard_normal((1, H_kv, n, D), np.float32)
    v = rng.standard_normal((1, H_kv, n, D), np.float32)
    return q, k, v


def check_prefill(comm, n, H, H_kv, D, causal, window, fmt, softcap=None, split="zigzag"):
    R = comm.size
    q, k, v = inputs(n * 7 + H, H, H_kv, n, D)
    kq, vq = (quantize(x, fmt) for x in (k, v))
    flags = dict(softcap=softcap, kv_format=None if fmt == "f32" else fmt)
    want, want_lse = attention(q, kq, vq, causal=causal, window=window, return_lse=True,
                               impl="reference", **flags)
    if split == "zigzag":
        runs = zigzag(n, R)
    else:  # contiguous blocks, uneven: any ascending layout works
        edges = np.linspace(0, n, R + 1).astype(int)
        runs = [((int(edges[r]), int(edges[r + 1] - edges[r])),) for r in range(R)]
    mine = runs[comm.rank]
    stats = RingStats()
    out, lse = ring_attention(comm, local_rows(q, mine), mine, local_rows(kq, mine),
                              local_rows(vq, mine), runs, causal=causal, window=window,
                              stats=stats, **flags)
    rows = positions(mine)
    assert_close_to_reference(out, lse, want[:, :, rows].astype(np.float64),
                              want_lse[:, :, rows].astype(np.float64), q[:, :, rows], k, v,
                              1 / np.sqrt(D), np.float32)
    # the transport moved each other rank's block once: the planner's bytes per ring step
    # (2 · rows · H_kv · row bytes, plan/parallel.py) for each block this rank passed on
    expect = sum(ring_step_bytes(run_rows(runs[(comm.rank - s) % R]), H_kv, D, fmt)
                 for s in range(R - 1))
    assert stats.bytes_sent == expect, (stats.bytes_sent, expect)
    return f"prefill n={n} H={H}/{H_kv} D={D} causal={causal} window={window} {fmt} " \
           f"softcap={softcap} {split}"


def check_decode(comm, n, H, H_kv, D, window, fmt, T=1):
    R = comm.size
    q, k, v = inputs(n * 3 + T, H, H_kv, n, D)
    kq, vq = (quantize(x, fmt) for x in (k, v))
    flags = dict(kv_format=None if fmt == "f32" else fmt)
    want, want_lse = attention(q[:, :, n - T:], kq, vq, causal=True, window=window,
                               return_lse=True, impl="reference", **flags)
    # a slice per rank: zigzag for the first n - T - 1 positions, then the rest round robin
    base = n - T - 1
    runs = [list(r) for r in zigzag(base, R)]
    for p in range(base, n):
        runs[p % R].append((p, 1))
    mine = runs[comm.rank]
    out, lse = sharded_decode(comm, q[:, :, n - T:], n - T, local_rows(kq, mine),
                              local_rows(vq, mine), mine, window=window, **flags)
    assert_close_to_reference(out, lse, want.astype(np.float64), want_lse.astype(np.float64),
                              q[:, :, n - T:], k, v, 1 / np.sqrt(D), np.float32)
    return f"decode n={n} T={T} H={H}/{H_kv} D={D} window={window} {fmt}"


def kernels(comm):
    R = comm.size
    done = []
    for n in (8 * R + 3, 203):  # lengths not divisible by R (or 2R)
        for causal in (True, False):
            done.append(check_prefill(comm, n, 4, 2, 32, causal, None, "f32"))
        done.append(check_prefill(comm, n, 6, 2, 64, True, 17, "f32"))
        done.append(check_prefill(comm, n, 4, 4, 32, True, None, "f32", softcap=20.0))
        done.append(check_prefill(comm, n, 4, 1, 32, False, (9, 5), "f32"))
        done.append(check_prefill(comm, n, 4, 2, 32, True, None, "f32", split="blocks"))
        for fmt in KV_FORMATS[1:]:
            done.append(check_prefill(comm, n, 4, 2, 64, True, None, fmt))
            done.append(check_prefill(comm, n, 4, 2, 64, True, 40, fmt))
    done.append(check_prefill(comm, 1000, 8, 2, 64, True, None, "f32"))  # flash-sized blocks
    for fmt in KV_FORMATS:
        for window in (None, 11):
            done.append(check_decode(comm, 150, 4, 2, 64, window, fmt))
    done.append(check_decode(comm, 150, 8, 2, 32, None, "f32", T=3))
    return done


def model(comm):
    """Greedy tokens of the default model after a long prompt: identical to one process.
    argv: n_prompt n_generate kv_dtype."""
    import argparse as source  # a long, plain text on every machine: a stdlib module's code

    import selfattn
    from selfattn.cache import KVCache
    from selfattn.distributed.cache import SLACK, ShardedKVCache
    from selfattn.model import Sampler, Tokenizer, Transformer, default_model_path, generate
    from selfattn.model.gguf_file import open_gguf

    n, n_gen, kv = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    selfattn.set_num_threads(1)
    path = default_model_path()
    reader = open_gguf(path)
    net = Transformer.from_reader(reader, path, kv)
    ids = Tokenizer.from_gguf(reader, path).encode(open(source.__file__).read())[:n]
    assert len(ids) == n
    cache = ShardedKVCache.for_model(comm, net.args, n + n_gen, kv)
    got = generate(net, ids, n_gen, Sampler(), cache)
    # the cache is split evenly: per rank, the single-process cache's positions / R, + SLACK
    one_bytes = KVCache.for_model(net.args, n + n_gen, kv).nbytes
    per_position = one_bytes // (n + n_gen)
    assert cache.nbytes == per_position * (-(-(n + n_gen) // comm.size) + SLACK)
    done = [f"model: {n}-token prompt, {n_gen} tokens, {kv}: KV {cache.nbytes} bytes a rank of "
            f"{one_bytes}, ring sent {cache.ring.bytes_sent} bytes"]
    if comm.rank == 0:  # the others wait (sleeping, not spinning) while rank 0 runs alone
        selfattn.set_num_threads(2)
        want = generate(net, ids, n_gen, Sampler(), KVCache.for_model(net.args, n + n_gen, kv))
        assert got.token_ids == want.token_ids, (got.token_ids, want.token_ids)
        done.append(f"model: the {n_gen} greedy tokens equal one process's")
    comm.barrier("the end of the model case")
    return done


def turns(comm):
    """Prompts after what the cache holds, decoded tokens between them, and a rewind
    (cache.length = n): the sharded cache's logits follow one process's."""
    import selfattn
    from selfattn.cache import KVCache
    from selfattn.distributed.cache import ShardedKVCache
    from selfattn.model import Transformer, default_model_path
    from selfattn.model.generate import prefill

    selfattn.set_num_threads(1)
    net = Transformer.load(default_model_path())
    ids = np.random.default_rng(5).integers(100, 20000, 700)
    caches = [ShardedKVCache.for_model(comm, net.args, 800), KVCache.for_model(net.args, 800)]
    worst = 0.0

    def both(step):
        nonlocal worst
        a, b = (step(c) for c in caches)
        worst = max(worst, float(np.abs(a - b).max()))
        assert np.argmax(a) == np.argmax(b)
        return int(np.argmax(a))

    def decode(n):
        for _ in range(n):
            both(lambda c: net.forward(np.array([7]), c, c.length))

    both(lambda c: prefill(net, ids[:300], c))
    decode(5)
    both(lambda c: prefill(net, ids[300:517], c))  # at depth 305, across decoded positions
    decode(4)
    for c in caches:
        c.length = 290
    both(lambda c: prefill(net, ids[300:450], c))
    decode(3)
    assert caches[0].length == caches[1].length == 443
    assert worst < 1e-3, worst
    return [f"turns: three prompts at depths 0, 305, 290 and decoded tokens between, logits "
            f"within {worst:.1e} of one process's"]


def rank1_stops(comm, how):
    """Rank 1 leaves (os._exit) or sleeps instead of joining the ring; rank 0 must not hang."""
    if comm.rank == 1:
        if how == "exits":
            os._exit(3)
        import time

        time.sleep(100)
    check_prefill(comm, 64, 2, 1, 32, True, None, "f32")
    return ["unreachable: rank 1 answered"]


def main():
    comm = Comm(timeout_s=float(os.environ.get("CP_TIMEOUT", 60)))
    try:
        run(comm)
    except Exception as e:  # a rank that fails ends the launch, as the CLI does
        import traceback

        traceback.print_exc()
        print(f"rank {comm.rank}: {e}", file=sys.stderr, flush=True)
        comm.abort(1)


def run(comm):
    what = sys.argv[1]
    if what.startswith("rank1-"):
        done = rank1_stops(comm, what.split("-")[1])
    else:
        done = {"kernels": kernels, "model": model, "turns": turns}[what](comm)
    if comm.rank == 0:
        for line in done:
            print("ok", line)
        print(f"{len(done)} cases passed on {comm.size} ranks")


if __name__ == "__main__":
    main()
