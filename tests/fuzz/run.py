"""Run selfattn's commands on damaged GGUF files and say how each run ended.

    python -m tests.fuzz.run --count 10000 --jobs 2 --out fuzz.jsonl [--seed 1] [--start 0]
    python -m tests.fuzz.run --out fuzz.jsonl --report     (markdown tables of a run)

Mutant i of the default model (tests/fuzz/gguf_mutants.py) goes through `selfattn plan --model F
--ctx 64 --json` and `selfattn generate hi --model F --ctx 64 --max-tokens 2`. Workers run the
commands in-process (`selfattn.cli.main`, ~0.5 s a mutant instead of ~2 s of interpreter start-up)
and measure each one's peak RSS (VmHWM, reset before each command through /proc/self/clear_refs)
and time (the memory a command adds to the worker's, at its peak); the parent kills a worker that has not answered within HANG_S, records the mutant as a
hang and starts a new worker. Results are JSON lines; an existing --out file is resumed (its
indices are skipped). Each command's outcome:
  refused  exit 2, one line on stderr starting with "selfattn <command>:"
  ran      exit 0
  FAILED   anything else: a traceback, an internal error (exit 70), several lines, a hang,
           a run over SLOW_S, or more than 2 x the file size + 512 MB of memory added
"""

import argparse
import contextlib
import io
import json
import os
import select
import subprocess
import sys
import time
import traceback

HANG_S = 30.0  # per mutant, both commands
SLOW_S = 10.0  # per command
COMMANDS = (["plan", "--model", "{f}", "--ctx", "64", "--json"],
            ["generate", "hi", "--model", "{f}", "--ctx", "64", "--max-tokens", "2"])


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_peak() -> int:
    """Start a new peak at the resident size now; returns that size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def run_command(argv) -> dict:
    """One CLI command in this process: exit status, stderr lines, seconds, and the resident
    memory it added at its peak (the worker's own, the mutant's bytes included, is not its)."""
    from selfattn.cli import main

    err = io.StringIO()
    before = _reset_peak()
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:  # noqa: BLE001 - the finding itself
            rc = "traceback"
            err.write(traceback.format_exc())
    return dict(rc=rc, stderr=err.getvalue().strip().splitlines(),
                s=round(time.perf_counter() - t, 3), rss=_status("VmHWM") - before)


def rss_bound(file_size: int) -> int:
    """The memory a command on a file of file_size bytes may add: the file's bytes twice, or
    without the compiled kernels (every matrix held as float32: 8x a 4-bit file) eight times,
    and 512 MiB of buffers and cache."""
    from selfattn import native

    return (2 if native.available() else 8) * file_size + (512 << 20)


def judge(result: dict, command: str, file_size: int) -> str:
    lines = result["stderr"]
    if result["rc"] == 0:
        outcome = "ran"
    elif result["rc"] == 2 and len(lines) == 1 and lines[0].startswith(f"selfattn {command}"):
        outcome = "refused"
    else:
        return "FAILED"
    if result["s"] > SLOW_S or result["rss"] > rss_bound(file_size):
        return "FAILED"
    return outcome


def worker(seed: int, tmp: str):
    """Reads mutant indices on stdin, writes one JSON line per mutant on the original stdout."""
    from selfattn.model import default_model_path

    from .gguf_mutants import mutant, scan

    out = os.fdopen(os.dup(1), "w")
    base = open(default_model_path(), "rb").read()
    layout = scan(base)
    for line in sys.stdin:
        i = int(line)
        data, kind, what = mutant(base, layout, seed, i)
        with contextlib.suppress(FileNotFoundError):  # a new file: an old mapping keeps its own
            os.remove(tmp)
        with open(tmp, "wb") as f:
            f.write(data)
        runs = []
        for argv in COMMANDS:
            r = run_command([a.format(f=tmp) for a in argv])
            r["outcome"] = judge(r, argv[0], len(data))
            runs.append(dict(command=argv[0], **r))
        out.write(json.dumps(dict(i=i, kind=kind, what=what, size=len(data), runs=runs)) + "\n")
        out.flush()


class Worker:
    def __init__(self, seed, slot):
        tmp = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp",
                           f"selfattn-fuzz-{os.getpid()}-{slot}.gguf")
        self.tmp = tmp
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.run", "--worker", "--seed", str(seed),
             "--tmp", tmp], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        self.index, self.since = None, 0.0

    def give(self, i):
        self.index, self.since = i, time.monotonic()
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


def run(indices, seed=1, jobs=2, on_result=None) -> list[dict]:
    """Every mutant index through the commands on `jobs` workers; results in completion order."""
    todo, results = list(indices), []
    workers = [Worker(seed, k) for k in range(min(jobs, len(todo)) or 1)]
    try:
        for w in workers:
            if todo:
                w.give(todo.pop(0))
        while any(w.index is not None for w in workers):
            busy = [w for w in workers if w.index is not None]
            ready = select.select([w.proc.stdout for w in busy], [], [], 1.0)[0]
            for k, w in enumerate(workers):
                if w.index is None:
                    continue
                line = w.proc.stdout.readline() if w.proc.stdout in ready else ""
                if not line and (w.proc.poll() is not None or
                                 time.monotonic() - w.since > HANG_S):
                    died = w.proc.poll() is not None
                    r = dict(i=w.index, kind="?", what="?", size=0, runs=[dict(
                        command="?", rc="died" if died else "hang", stderr=[], s=HANG_S, rss=0,
                        outcome="FAILED")])
                    w.stop()
                    workers[k] = w = Worker(seed, k)
                elif not line:
                    continue
                else:
                    r = json.loads(line)
                results.append(r)
                if on_result:
                    on_result(r)
                w.index = None
                if todo:
                    w.give(todo.pop(0))
    finally:
        for w in workers:
            w.stop()
    return results


def summary(results) -> dict:
    """Counts by command and outcome, and by mutation kind."""
    out = {"mutants": len(results), "failed": 0, "by_command": {}, "by_kind": {}}
    for r in results:
        failed = any(x["outcome"] == "FAILED" for x in r["runs"])
        out["failed"] += failed
        kind = out["by_kind"].setdefault(r["kind"], {"mutants": 0, "all refused": 0,
                                                     "some ran": 0, "failed": 0})
        kind["mutants"] += 1
        kind["failed" if failed else "some ran" if any(x["outcome"] == "ran" for x in r["runs"])
             else "all refused"] += 1
        for x in r["runs"]:
            c = out["by_command"].setdefault(x["command"], {})
            c[x["outcome"]] = c.get(x["outcome"], 0) + 1
    return out


def _target(r, sites) -> str:
    """What a mutant changed, coarsely: the kind of site and the key or tensor family (for a bit
    flip, the key or tensor info whose bytes it fell in)."""
    import bisect
    import re

    if r["kind"] == "truncate":
        return "truncate"
    if r["kind"] == "flip":
        spots = [int(x.replace(",", "")) for x in r["what"].split(" at ")[1].split(", ")]
        starts = [site.offset for site in sites]
        names = {re.sub(r"blk\.\d+\.", "blk.N.", sites[bisect.bisect_right(starts, p) - 1].what)
                 for p in spots}
        return "flip in " + ", ".join(sorted(names))
    parts = []
    for note in r["what"].split("; "):
        site, _, rest = note.partition(" of ")
        name = re.sub(r"blk\.\d+\.", "blk.N.", rest.split(" ")[0])
        parts.append(f"{site} of {name}")
    return "; ".join(sorted(set(parts)))


def report(results) -> str:
    """Markdown: outcomes by command and by mutation kind, the slowest run, the most memory a
    command added, and what the mutants that ran had changed."""
    s = summary(results)
    lines = [f"{s['mutants']:,} mutants, {s['failed']} failed.", "",
             "| command | refused in one line | ran | FAILED |", "|---|---|---|---|"]
    for cmd, c in s["by_command"].items():
        lines.append(f"| {cmd} | {c.get('refused', 0):,} | {c.get('ran', 0):,} | "
                     f"{c.get('FAILED', 0):,} |")
    lines += ["", "| mutation | mutants | all refused | some ran | failed |", "|---|---|---|---|---|"]
    for kind, c in sorted(s["by_kind"].items()):
        lines.append(f"| {kind} | {c['mutants']:,} | {c['all refused']:,} | {c['some ran']:,} | "
                     f"{c['failed']:,} |")
    runs = [(x, r) for r in results for x in r["runs"]]
    slow, slow_r = max(runs, key=lambda p: p[0]["s"])
    big, big_r = max(runs, key=lambda p: p[0]["rss"])
    lines += ["", f"Slowest command: {slow['s']:.2f} s (`{slow['command']}`, mutant {slow_r['i']}: "
              f"{slow_r['what'][:80]}). Most memory a command added: {big['rss'] / 2**20:.0f} MiB "
              f"(`{big['command']}`, mutant {big_r['i']}, a {big_r['size'] / 2**20:.0f} MiB file)."]
    from selfattn.model import default_model_path

    from .gguf_mutants import scan

    sites = scan(default_model_path().read_bytes()).sites
    ran = {}
    for r in results:
        if any(x["outcome"] == "ran" for x in r["runs"]):
            key = (_target(r, sites), tuple(x["outcome"] for x in r["runs"]))
            ran[key] = ran.get(key, 0) + 1
    lines += ["", "Mutants that ran, by what they changed (outcome of plan, generate):", "",
              "| changed | plan, generate | mutants |", "|---|---|---|"]
    for (what, outcome), n in sorted(ran.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {what[:90]} | {', '.join(outcome)} | {n} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="fuzz-gguf.jsonl")
    ap.add_argument("--report", action="store_true", help="markdown tables of --out, no runs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.seed, args.tmp)
    if args.report:
        with open(args.out) as f:
            print(report([json.loads(line) for line in f if line.strip()]))
        return
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {json.loads(line)["i"] for line in f if line.strip()}
    todo = [i for i in range(args.start, args.start + args.count) if i not in done]
    t0 = time.time()
    with open(args.out, "a") as f:
        def keep(r):
            f.write(json.dumps(r) + "\n")
            f.flush()
            if any(x["outcome"] == "FAILED" for x in r["runs"]):
                print(f"FAILED {r['i']} {r['what'][:100]}: "
                      f"{[(x['command'], x['rc'], x['stderr'][-1:]) for x in r['runs']]}",
                      file=sys.stderr)
        run(todo, args.seed, args.jobs, keep)
    with open(args.out) as f:
        results = [json.loads(line) for line in f if line.strip()]
    print(json.dumps(summary(results), indent=1))
    print(f"{len(todo)} mutants run in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
