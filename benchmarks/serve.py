"""`selfattn serve` against its own targets, on the real CLI server (a subprocess, localhost):

- turns: the follow-up turn of a conversation with ~--history tokens of history, TTFT against
  the first turn's (each repetition a fresh conversation, so the first turn is cold);
- streams: --streams greedy streams at once, aggregate tokens/s against one stream's (by request
  wall time, and by the server's decode timings), and each stream's text against what it got
  alone, --reps times;
- generate: one stream through the server against `selfattn generate` on the same prompt
  (TTFT and decode tokens/s), both in their own processes;
- steps: the decode step of one stream against that of --streams streams, in this process
  without the server (what the streams' figure would be without HTTP and sampling).

    python benchmarks/serve.py [--model PATH] [--history 2000] [--streams 4] [--gen 64]
                               [--reps 3] [--ctx 4096] [--json out.json] [--peer-python PY]

With --peer-python (an interpreter with llama-cpp-python[server]), llama.cpp's OpenAI server from
that binding runs on the same file after selfattn's, and both are measured the same way from the
client's side: the follow-up turn's TTFT against the first's, and several whole chats at once
against one at a time.

TTFT here is the server's own (`timings.ttft_ms`: arrival to first token); the client's (to the
first content chunk over HTTP) is recorded beside it.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))

# TCP_NODELAY: httpx writes a request's headers and body apart, and without it the body waits
# for the server's delayed ACK (~40 ms) - the client's cost, not the server's
CLIENT = httpx.Client(timeout=None, transport=httpx.HTTPTransport(
    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]))


def start_server(args, slots):
    cmd = [sys.executable, "-m", "selfattn.cli", "serve", "--port", "0", "--slots", str(slots),
           "--ctx", str(args.ctx), "--prefix-cache-mib", str(getattr(args, "prefix_mib", 512))] \
        + (["--model", args.model] if args.model else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stderr.readline()
    if not line.startswith("selfattn serve: "):
        p.kill()
        raise SystemExit(f"the server did not start: {line}{p.stderr.read()}")
    p.log = []  # what it says later, read as it comes (a full pipe would stop it)
    threading.Thread(target=lambda: p.log.extend(p.stderr), daemon=True).start()
    return p, line.split(" on ")[1].split()[0]


def stop_server(p):
    p.send_signal(2)
    p.wait(60)


def chat(url, messages, max_tokens, prompt=None):
    """One streamed greedy request, a chat (or with prompt, a plain completion) -> (text, client
    TTFT s, final timings, usage)."""
    t0 = time.perf_counter()
    ttft, text, last = None, [], None
    what = {"messages": messages} if prompt is None else {"prompt": prompt}
    body = {**what, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    path = "/chat/completions" if prompt is None else "/completions"
    with CLIENT.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            for c in ev.get("choices", []):
                piece = c.get("text") if prompt is not None else c.get("delta", {}).get("content")
                if piece:
                    ttft = ttft or time.perf_counter() - t0
                    text.append(piece)
            if "timings" in ev:
                last = ev
    return "".join(text), ttft, last["timings"], last["usage"]


def history(tok, n_tokens, offset):
    """A conversation of about n_tokens: a long user message from the corpus, an answer, and a
    question; offset picks another part of the corpus for each repetition (wrapping around its
    end)."""
    from _corpus import english_text

    ids = tok.encode(english_text())
    offset %= max(1, len(ids) - n_tokens)
    body = tok.decode(ids[offset:offset + n_tokens])
    return [{"role": "user", "content": "Read this and summarise it in one sentence.\n\n" + body}]


def turns(url, tok, args):
    rows = []
    for rep in range(args.reps):
        messages = history(tok, args.history, 3000 * rep)
        text, c1, t1, u1 = chat(url, messages, 32)
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": "Now say it in five words."}]
        _, c2, t2, u2 = chat(url, messages, 32)
        rows.append(dict(first_ttft_ms=t1["ttft_ms"], follow_ttft_ms=t2["ttft_ms"],
                         first_client_ms=1e3 * c1, follow_client_ms=1e3 * c2,
                         first_prompt=u1["prompt_tokens"], follow_prompt=u2["prompt_tokens"],
                         follow_cached=u2["prompt_tokens_details"]["cached_tokens"],
                         ratio=t2["ttft_ms"] / t1["ttft_ms"]))
        print(f"turns rep {rep}: first {t1['ttft_ms']:.0f} ms ({u1['prompt_tokens']} tokens), "
              f"follow-up {t2['ttft_ms']:.0f} ms ({u2['prompt_tokens']} tokens, "
              f"{rows[-1]['follow_cached']} cached): {100 * rows[-1]['ratio']:.1f}%", flush=True)
    return rows


PROMPTS = ["Write a short poem about the sea.", "List five uses of a paperclip.",
           "Explain photosynthesis to a child.", "Describe a busy market in the morning.",
           "Give three tips for learning to cook.", "What makes a good friend?",
           "Describe the moon to someone who has never seen it.", "Plan a day in a small town."]


def at_once(fn, items):
    """fn(item) for every item, each on its own thread, all started together -> (results in
    order, wall seconds until the last ended)."""
    results = [None] * len(items)

    def run(i):
        results[i] = fn(items[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, time.perf_counter() - t0


def streams(url, args):
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:args.streams]]
    alone = []
    for m in prompts:
        t0 = time.perf_counter()
        text, _, t, u = chat(url, m, args.gen)
        alone.append(dict(text=text, tokens=u["completion_tokens"], wall_s=time.perf_counter() - t0,
                          tps=t["predicted_per_second"]))
    def run(m):
        t0 = time.perf_counter()
        text, _, t, u = chat(url, m, args.gen)
        return dict(text=text, tokens=u["completion_tokens"], end=time.perf_counter(), start=t0,
                    tps=t["predicted_per_second"], ttft_ms=t["ttft_ms"])
    results, wall = at_once(run, prompts)
    one = statistics.median(a["tokens"] / a["wall_s"] for a in alone)
    together = sum(r["tokens"] for r in results) / wall
    # the same from the server's own decode timings (first token to last, per stream): prompts
    # and HTTP left out; the streams run side by side, so their rates add up
    one_decode = statistics.median(a["tps"] for a in alone)
    together_decode = sum(r["tps"] for r in results)
    same = [a["text"] == r["text"] for a, r in zip(alone, results)]
    print(f"streams: one alone {one:.1f} tok/s (request wall), {len(prompts)} at once "
          f"{together:.1f} tok/s aggregate = {together / one:.2f}x; decode only (server timings) "
          f"{one_decode:.1f} and {together_decode:.1f} tok/s = {together_decode / one_decode:.2f}x; "
          f"identical to alone: {same}", flush=True)
    return dict(alone=alone, together=results, one_tps=one, aggregate_tps=together,
                ratio=together / one, one_decode_tps=one_decode,
                aggregate_decode_tps=together_decode, decode_ratio=together_decode / one_decode,
                identical=same)


def steps(args):
    """The decode step alone, in this process, no server: one stream's step (forward) against
    --streams streams' (forward_batch), caches at 100 tokens each, alternating for 60 steps
    (each cache rewound after its step, so every step is at the same depth)."""
    import numpy as np

    from selfattn.cache import KVCache
    from selfattn.model import Transformer, default_model_path

    m = Transformer.load(args.model or default_model_path())
    a, depth = m.args, 100
    prompt = np.arange(depth) % 1000 + 100

    def filled():
        c = KVCache.for_model(a, depth + 1)
        m.forward(prompt, c, 0)
        return c

    one, many = filled(), [filled() for _ in range(args.streams)]
    t1, tb = [], []
    for _ in range(60):
        for c in [one, *many]:
            c.length = depth
        t0 = time.perf_counter()
        m.forward(np.array([5]), one, depth)
        t1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        m.forward_batch(np.full(args.streams, 5), many)
        tb.append(time.perf_counter() - t0)
    one_ms, many_ms = 1e3 * statistics.median(t1), 1e3 * statistics.median(tb)
    print(f"steps in-process: one stream {one_ms:.2f} ms, {args.streams} streams {many_ms:.2f} ms "
          f"(medians of 60): {args.streams * one_ms / many_ms:.2f}x the tokens/s", flush=True)
    return dict(one_ms=one_ms, many_ms=many_ms, ratio=args.streams * one_ms / many_ms,
                one_samples_ms=[1e3 * t for t in t1], many_samples_ms=[1e3 * t for t in tb])


def versus_generate(url, args):
    """A plain completion, not streamed (a client woken for every token would take a core from
    the server's two here), whose first token no earlier request had, so that nothing is reused
    (cache_n says so), against `generate --raw --json` of the same text, the two in turn (which
    goes first alternates by repetition: a slow stretch of the host falls on both). The client's
    wall time beyond the server's TTFT and decode time is the HTTP overhead."""
    rows = []
    for rep in range(args.reps):
        prompt = f"{rep}. Once upon a time, in a small village by the sea,"
        cmd = [sys.executable, "-m", "selfattn.cli", "generate", prompt, "--raw", "--json",
               "--max-tokens", str(args.gen), "--ctx", str(args.ctx)] + (
                   ["--model", args.model] if args.model else [])

        def server():
            t0 = time.perf_counter()
            r = CLIENT.post(url + "/completions", json={
                "prompt": prompt, "max_tokens": args.gen, "temperature": 0})
            wall_ms = 1e3 * (time.perf_counter() - t0)
            r.raise_for_status()
            body = r.json()
            return {**body["timings"], "prompt_tokens": body["usage"]["prompt_tokens"]}, wall_ms

        def generate():
            return json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                             check=True).stdout)
        if rep % 2:
            g = generate()
            t, wall_ms = server()
        else:
            t, wall_ms = server()
            g = generate()
        rows.append(dict(server_prompt_tokens=t["prompt_tokens"],
                         generate_prompt_tokens=g["prompt_tokens"],
                         server_ttft_ms=t["ttft_ms"], server_cached=t["cache_n"],
                         server_tps=t["predicted_per_second"], tokens=t["predicted_n"],
                         http_overhead_ms=wall_ms - t["ttft_ms"] - t["predicted_ms"],
                         generate_ttft_ms=1e3 * g["ttft_s"], generate_tps=g["decode_tps"],
                         generate_tokens=g["generated_tokens"]))
        print(f"vs generate rep {rep}: TTFT server {t['ttft_ms']:.1f} ms ({t['cache_n']} cached) / "
              f"generate {1e3 * g['ttft_s']:.1f} ms; tok/s {t['predicted_per_second']:.1f} / "
              f"{g['decode_tps']:.1f}; HTTP beyond them {rows[-1]['http_overhead_ms']:.1f} ms",
              flush=True)
    return rows


def start_peer(args, path):
    """llama-cpp-python's OpenAI server (llama.cpp underneath) on the same file, --peer-python's
    interpreter, as many threads as selfattn's, its prompt cache on, a request arriving while
    another runs queued (its default would interrupt the running one); ready when /v1/models
    answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = str(os.cpu_count())
    cmd = [args.peer_python, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(args.ctx), "--n_threads", threads,
           "--n_threads_batch", threads, "--cache", "true", "--interrupt_requests", "false"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            if CLIENT.get(url + "/models").status_code == 200:
                return p, url
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise SystemExit(f"the peer server exited: {' '.join(cmd)}")
        time.sleep(0.1)
    p.kill()
    raise SystemExit("the peer server did not answer within 60 s")


def client_ttft(url, messages, max_tokens):
    """One streamed greedy chat as any OpenAI client sees it -> (text, TTFT s to the first
    content chunk); no server timings needed."""
    t0 = time.perf_counter()
    ttft, text = None, []
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with CLIENT.stream("POST", url + "/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:]).get("choices", []):
                    if c.get("delta", {}).get("content"):
                        ttft = ttft or time.perf_counter() - t0
                        text.append(c["delta"]["content"])
    return "".join(text), ttft


def whole_chat(url, messages, max_tokens):
    """One greedy chat, not streamed -> (completion tokens, wall s)."""
    t0 = time.perf_counter()
    r = CLIENT.post(url + "/chat/completions", json={"messages": messages, "max_tokens": max_tokens,
                                                     "temperature": 0})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - t0


def as_a_client(url, tok, args):
    """The same measurements for any OpenAI server, from the client's side alone: the follow-up
    turn's TTFT against the first's (streamed), and --streams whole chats at once against one
    at a time (tokens from usage over wall time)."""
    turns = []
    for rep in range(args.reps):
        messages = history(tok, args.history, 3000 * rep + 1500)  # not a conversation seen before
        text, first = client_ttft(url, messages, 32)
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": "Now say it in five words."}]
        _, follow = client_ttft(url, messages, 32)
        turns.append(dict(first_ms=1e3 * first, follow_ms=1e3 * follow, ratio=follow / first))
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:args.streams]]
    runs = []
    for rep in range(args.reps):
        alone = [whole_chat(url, m, args.gen) for m in prompts]
        results, wall = at_once(lambda m: whole_chat(url, m, args.gen), prompts)
        one = statistics.median(n / w for n, w in alone)
        runs.append(dict(one_tps=one, aggregate_tps=sum(n for n, _ in results) / wall,
                         ratio=sum(n for n, _ in results) / wall / one))
    out = dict(turns=turns, streams=runs,
               follow_ratio=statistics.median(t["ratio"] for t in turns),
               streams_ratio=statistics.median(r["ratio"] for r in runs))
    print(f"  follow-up TTFT / first (client): median {100 * out['follow_ratio']:.1f}% "
          f"(firsts {statistics.median(t['first_ms'] for t in turns):.0f} ms); {args.streams} whole "
          f"chats at once / one: median {out['streams_ratio']:.2f}x", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--history", type=int, default=2000)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--json")
    ap.add_argument("--peer-python", help="a Python with llama-cpp-python[server]: its OpenAI "
                    "server on the same file, measured from the client side as selfattn's is")
    args = ap.parse_args()
    if not 1 <= args.streams <= len(PROMPTS):
        raise SystemExit(f"--streams must be 1 .. {len(PROMPTS)}")
    from selfattn.model import Tokenizer, default_model_path
    from selfattn.model.gguf_file import open_gguf

    path = args.model or str(default_model_path())
    tok = Tokenizer.from_gguf(open_gguf(path), path)
    out = dict(model=path, cpu=_cpu(), threads=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
    p, url = start_server(args, args.streams)
    try:
        out["turns"] = turns(url, tok, args)
        out["streams"] = [streams(url, args) for _ in range(args.reps)]
        out["generate"] = versus_generate(url, args)
        if args.peer_python:
            print("selfattn serve, from the client side:", flush=True)
            out["client_side"] = {"selfattn": as_a_client(url, tok, args)}
    finally:
        stop_server(p)
    if args.peer_python:
        version = subprocess.run(
            [args.peer_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True, text=True).stdout.strip()
        print(f"llama-cpp-python {version} server, the same file, from the client side:",
              flush=True)
        q, peer_url = start_peer(args, path)
        try:
            out["client_side"][f"llama-cpp-python {version}"] = as_a_client(peer_url, tok, args)
        finally:
            q.terminate()
            q.wait(60)
    out["steps"] = steps(args)  # last: the model in this process could compete with the server
    r = [t["ratio"] for t in out["turns"]]
    print(f"follow-up TTFT / first TTFT: median {100 * statistics.median(r):.1f}% "
          f"(target <= 15%)")
    st = out["streams"]
    print(f"{args.streams} streams aggregate / one: median "
          f"{statistics.median(x['ratio'] for x in st):.2f}x by request wall, "
          f"{statistics.median(x['decode_ratio'] for x in st):.2f}x decode only (target >= 2.5x); "
          f"identical to alone in every run: {all(all(x['identical']) for x in st)}")
    print(f"the step alone, in-process: {out['steps']['ratio']:.2f}x")
    g = out["generate"]
    print(f"server vs generate: TTFT {statistics.median(x['server_ttft_ms'] for x in g):.1f} / "
          f"{statistics.median(x['generate_ttft_ms'] for x in g):.1f} ms (paired difference: "
          f"median {statistics.median(x['server_ttft_ms'] - x['generate_ttft_ms'] for x in g):+.1f}"
          f" ms), tok/s {statistics.median(x['server_tps'] for x in g):.1f} / "
          f"{statistics.median(x['generate_tps'] for x in g):.1f} (paired ratio: median "
          f"{statistics.median(x['server_tps'] / x['generate_tps'] for x in g):.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
