"""Two builds of the compiled kernels in one process, calls alternated: a change's speed against
the commit it started from, on the same work, with the host's drift falling on both alike.

    python benchmarks/ab_kernels.py --base REF [--what matvecs|gemm|step] [--rows 1,4]
                                    [--model PATH] [--layers 0] [--threads N] [--rounds 15]

B is the working tree's built extension (src/selfattn/native/_kernels*.so, as `setup.py
build_ext --inplace` leaves it); A is REF's, built once into build/ab/<commit>/ from a clean
checkout of REF (setup.py's flags, every level); or A is the .so file --base names. Both are loaded (two copies of the same module
under other file names) and selfattn's calls are pointed at one or the other between blocks.

- matvecs / gemm: one pass over the model's matrices (the layers in --layers, and the output
  matrix for matvecs) with --rows rows of x, through native.matvecs or native.gemm;
- step: one decode step of --rows sequences (`Transformer.forward` for one, `forward_batch` for
  several), each cache at --depth tokens (rewound after each step).

Each round runs a block of --calls calls of A and one of B (their order alternating by round),
a pause of a few ms before each block so that the other build's pool workers have stopped
spinning (pool.c: 0.3 ms). The figure is the median over the rounds of B's median over A's,
with the rounds' range; below 1.0 the working tree is faster. The run also checks that both
builds give the same outputs (bit for bit, or says they do not).
"""

import argparse
import glob
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, "src", "selfattn", "native")


def git(*args) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def built_at(ref: str) -> str:
    """The extension built from `ref`'s sources (cached under build/ab/<commit>/)."""
    commit = git("rev-parse", "--verify", ref + "^{commit}")
    out = os.path.join(ROOT, "build", "ab", commit)
    found = glob.glob(os.path.join(out, "_kernels*.so"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        print(f"building {ref} ({commit[:10]}) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=tmp,
                       check=True, capture_output=True)
        so = glob.glob(os.path.join(src, "selfattn", "native", "_kernels*.so"))[0]
        os.makedirs(out, exist_ok=True)
        shutil.copy(so, out)
    return glob.glob(os.path.join(out, "_kernels*.so"))[0]


def load_copy(path: str, tag: str):
    """The extension at `path`, loaded as a module of its own (a copy under another file name,
    so that the dynamic loader does not hand back the one already loaded)."""
    digest = hashlib.sha1(open(path, "rb").read()).hexdigest()[:12]
    copy = os.path.join(ROOT, "build", "ab", f"{tag}-{digest}", os.path.basename(path))
    if not os.path.exists(copy):
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        shutil.copy(path, copy)
    name = "selfattn.native._kernels"
    loader = importlib.machinery.ExtensionFileLoader(name, copy)
    spec = importlib.util.spec_from_file_location(name, copy, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def use(native, mod):
    """selfattn's kernel calls go to `mod` from here on (its pool sized on the next call)."""
    native._mod, native._threads = mod, 0


def workload(args, native):
    """-> (setup(mod) called once per build, run() -> outputs to compare, what it is)."""
    from selfattn.cache import KVCache
    from selfattn.model import Transformer, default_model_path

    m = Transformer.load(args.model or default_model_path())
    layers = [int(i) for i in args.layers.split(",")] if args.layers != "all" else \
        range(m.args.n_layers)
    rng = np.random.default_rng(0)
    T = args.rows
    if args.what in ("matvecs", "gemm"):
        mats = [lin.packed for i in layers for lin in m.weights.layers[i].linears]
        if args.what == "matvecs":
            mats.append(m.weights.output.packed)
        xs = [rng.standard_normal((T, p.cols)).astype(np.float32) for p in mats]
        fn = getattr(native, args.what)

        def run():
            return [fn(x, p) for x, p in zip(xs, mats)]
        return (lambda mod: None), run, (f"{args.what}: {len(mats)} matrices "
                                         f"({sum(p.nbytes for p in mats) / 1e6:.1f} MB), "
                                         f"{T} row(s) of x")
    depth = args.depth
    prompt = np.arange(depth) % 1000 + 100
    caches = []
    for _ in range(T):
        c = KVCache.for_model(m.args, depth + 1)
        m.forward(prompt, c, 0)
        caches.append(c)
    step_layers = {}

    def setup(mod):  # the step's C structs belong to the build that made them
        m._step_layers = None
        m.step_layers(caches[0])
        step_layers[id(mod)] = m._step_layers

    def run():
        m._step_layers = step_layers[id(native._mod)]
        for c in caches:
            c.length = depth
        if T == 1:
            return [m.forward(np.array([5]), caches[0], depth)]
        return [m.forward_batch(np.full(T, 5), caches)]
    return setup, run, f"step: {T} sequence(s) at depth {depth}, {m.args.n_layers} layers"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit (or ref) to compare against, or "
                    "a built extension (a .so file)")
    ap.add_argument("--what", choices=("matvecs", "gemm", "step"), default="matvecs")
    ap.add_argument("--rows", default="1", help="rows of x (sequences for step), comma-separated")
    ap.add_argument("--model")
    ap.add_argument("--layers", default="0", help="layer indices, comma-separated, or all")
    ap.add_argument("--depth", type=int, default=100, help="step: tokens in each cache")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5, help="calls a block")
    args = ap.parse_args()

    from selfattn import native, runtime

    if args.threads:
        runtime.set_num_threads(args.threads)
    mine = glob.glob(os.path.join(NATIVE, "_kernels*.so"))
    if not mine:
        raise SystemExit("no built extension in the working tree: run setup.py build_ext "
                         "--inplace first")
    a = load_copy(args.base if args.base.endswith(".so") else built_at(args.base), "base")
    b = load_copy(mine[0], "tree")
    native._load()
    level = native._mod.isa()
    for mod in (a, b):
        mod.set_isa(level)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    print(f"{time.strftime('%Y-%m-%d')} · {cpu} · level {level} · "
          f"{runtime.num_threads()} thread(s) · A = {args.base}, B = the working tree")
    for rows in [int(r) for r in args.rows.split(",")]:
        args.rows = rows
        setup, run, what = workload(args, native)
        outs = {}
        for mod in (a, b):
            use(native, mod)
            setup(mod)
            outs[id(mod)] = [np.array(o) for o in run()]
        same = all(np.array_equal(x, y) for x, y in zip(outs[id(a)], outs[id(b)]))
        ratios, ta, tb = [], [], []
        for r in range(args.rounds):
            times = {}
            for mod in ((a, b) if r % 2 == 0 else (b, a)):
                use(native, mod)
                time.sleep(0.005)
                run()  # the first call after a switch wakes this build's pool
                t = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    run()
                    t.append(time.perf_counter() - t0)
                times[id(mod)] = statistics.median(t)
            ta.append(times[id(a)])
            tb.append(times[id(b)])
            ratios.append(times[id(b)] / times[id(a)])
        print(f"{what}: B / A {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-"
              f"{max(ratios):.3f}); medians A {1e3 * statistics.median(ta):.3f} ms, B "
              f"{1e3 * statistics.median(tb):.3f} ms; outputs "
              f"{'the same bits' if same else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    main()
