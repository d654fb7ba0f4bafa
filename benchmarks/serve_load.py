"""A bounded load test of `selfattn serve` (the CLI server as a subprocess, localhost only).

--clients threads for --seconds, each drawing requests from a seeded mix: short chats, streamed
and not; conversations that share a long system prompt and grow turn by turn; plain
completions of a few hundred tokens; streams the client leaves after a few chunks; and
malformed requests. Greedy throughout, so every prompt has one right answer: the first answer
to each prompt is kept and every later one must equal it (a stream mixed up with another, or cut
short, would not). Records per-request status, TTFT and tokens/s, and the server's RSS once a
second.

    python benchmarks/serve_load.py [--model PATH] [--clients 16] [--seconds 60] [--slots 4]
                                    [--seed 0] [--json out.json]

Passes when: no 5xx, no stream mixed up or cut short (other than by its own client), every
malformed request answered 4xx, and the server's RSS within what it was given: its RSS when it
started + the slots' KV caches (reserved whole, resident as positions are written) + the prefix
store's --prefix-cache-mib + 256 MiB of working memory. Past that bound memory would be leaking.
"""

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from serve import CLIENT, PROMPTS, start_server, stop_server  # noqa: E402

SYSTEM = ("You are a careful assistant for a public library. Answer briefly, name your sources "
          "when you can, and say so when you do not know. ") * 12
FOLLOW = ["Tell me more.", "Why?", "Give an example.", "Summarise that in one line."]
MALFORMED = [b"{", b"[]", b'{"messages": "hi"}', b'{"messages": [], "max_tokens": 5}',
             b'{"messages": [{"role": "user", "content": "x"}], "temperature": "warm"}',
             b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
             b'{"messages": [{"role": "user", "content": "x"}], "model": "nope"}',
             b'{"prompt": [99999999]}']


class Load:
    def __init__(self, url, args):
        self.url, self.args = url, args
        self.records, self.answers = [], {}
        self.lock = threading.Lock()
        self.deadline = time.time() + args.seconds

    def check_answer(self, key, text):
        with self.lock:
            want = self.answers.setdefault(key, text)
        return want == text

    def stream(self, path, body, leave_after=None):
        """-> (status, text, ttft s, timings or None, completed, left)"""
        t0, ttft, text, timings, done = time.perf_counter(), None, [], None, False
        with CLIENT.stream("POST", self.url + path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, "", None, None, False, False
            for i, line in enumerate(r.iter_lines()):
                if leave_after is not None and i >= leave_after:
                    return 200, "".join(text), ttft, None, False, True
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        return 500, "".join(text), ttft, None, False, False
                    for c in ev["choices"]:
                        piece = c.get("text") if path == "/completions" else \
                            c.get("delta", {}).get("content")
                        if piece:
                            ttft = ttft or time.perf_counter() - t0
                            text.append(piece)
                    timings = ev.get("timings", timings)
        return 200, "".join(text), ttft, timings, done and timings is not None, False

    def one(self, rng, conversation):
        kind = rng.choices(["chat", "chat_whole", "conversation", "completion", "leave", "bad"],
                           [3, 2, 3, 2, 1, 1])[0]
        rec = dict(kind=kind, t=time.time())
        if kind == "bad":
            body = rng.choice(MALFORMED)
            r = CLIENT.post(self.url + "/chat/completions", content=body)
            rec.update(status=r.status_code, ok=400 <= r.status_code < 500)
        elif kind == "chat_whole":
            p = rng.choice(PROMPTS)
            r = CLIENT.post(self.url + "/chat/completions", json={
                "messages": [{"role": "user", "content": p}], "max_tokens": 24,
                "temperature": 0})
            rec["status"] = r.status_code
            if r.status_code == 200:
                j = r.json()
                rec.update(ttft_ms=j["timings"]["ttft_ms"],
                           tps=j["timings"]["predicted_per_second"],
                           ok=self.check_answer(("chat", p), j["choices"][0]["message"]["content"]))
        else:
            if kind == "conversation":
                if len(conversation) > 6:
                    conversation[:] = []
                if not conversation:
                    conversation += [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": rng.choice(PROMPTS)}]
                body, path = {"messages": list(conversation), "max_tokens": 24}, "/chat/completions"
            elif kind == "completion":
                n = rng.randrange(200, 600)
                body, path = {"prompt": _text(n), "max_tokens": 16}, "/completions"
            else:
                body, path = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                              "max_tokens": 24}, "/chat/completions"
            body["temperature"] = 0
            leave = rng.randrange(2, 6) if kind == "leave" else None
            status, text, ttft, t, complete, left = self.stream(path, body, leave)
            key = (path, json.dumps(body["messages"] if "messages" in body else body["prompt"]))
            rec.update(status=status, left=left)
            if status == 200 and not left:
                rec.update(ttft_ms=t and t["ttft_ms"], tps=t and t["predicted_per_second"],
                           cached=t and t["cache_n"], complete=complete,
                           ok=complete and self.check_answer(key, text))
                if kind == "conversation":
                    conversation += [{"role": "assistant", "content": text},
                                     {"role": "user", "content": rng.choice(FOLLOW)}]
            else:
                rec["ok"] = left
        rec["duration_s"] = time.time() - rec["t"]
        with self.lock:
            self.records.append(rec)

    def client(self, i):
        rng, conversation = random.Random(self.args.seed * 1000 + i), []
        while time.time() < self.deadline:
            try:
                self.one(rng, conversation)
            except httpx.HTTPError as e:
                with self.lock:
                    self.records.append(dict(kind="transport", status=0, ok=False,
                                             error=f"{type(e).__name__}: {e}", t=time.time()))


_CORPUS = None


def _text(n_words):
    global _CORPUS
    if _CORPUS is None:
        from _corpus import english_text
        _CORPUS = english_text().split()
    return " ".join(_CORPUS[:n_words])


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix-mib", type=int, default=256, help="the server's --prefix-cache-mib")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.seconds <= 600):
        raise SystemExit("--clients 1..64, --seconds 1..600: this test stays bounded")
    args.streams = args.slots
    p, url = start_server(args, args.slots)
    print(f"server {url}, pid {p.pid}", flush=True)
    load, rss = Load(url, args), []
    try:
        threads = [threading.Thread(target=load.client, args=(i,)) for i in range(args.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.time() - t0, rss_mib(p.pid)))
            time.sleep(1)
        root = url.rsplit("/v1", 1)[0]
        health = httpx.get(root + "/health").json()
        metrics = httpx.get(root + "/metrics").text
    finally:
        stop_server(p)
    recs = load.records
    by = lambda k: [r for r in recs if r["kind"] == k]  # noqa: E731
    five = [r for r in recs if r["status"] >= 500 or r["status"] == 0]
    bad = [r for r in by("bad") if not r["ok"]]
    broken = [r for r in recs if r["kind"] not in ("bad", "leave") and r["status"] == 200
              and not r.get("ok")]
    kv = next(float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("selfattn_kv_cache_bytes"))
    bound = rss[0][1] + kv / 2**20 + args.prefix_mib + 256
    rss_ok = max(m for _, m in rss) <= bound
    ttft = [r["ttft_ms"] for r in recs if r.get("ttft_ms")]
    tps = [r["tps"] for r in recs if r.get("tps")]
    print(f"{len(recs)} requests by {args.clients} clients in {args.seconds:.0f} s, "
          f"{args.slots} slots: " + ", ".join(f"{k} {len(by(k))}" for k in
                                               ("chat", "chat_whole", "conversation",
                                                "completion", "leave", "bad")))
    print(f"5xx or transport errors: {len(five)}; streams mixed up or cut short: {len(broken)}; "
          f"malformed not answered 4xx: {len(bad)}")
    if ttft:
        print(f"TTFT ms median {statistics.median(ttft):.0f}, p90 "
              f"{sorted(ttft)[int(0.9 * (len(ttft) - 1))]:.0f}; tok/s per request median "
              f"{statistics.median(tps):.1f}")
    half = [m for s, m in rss if s >= args.seconds / 2]
    print(f"server RSS MiB: start {rss[0][1]:.0f}, at half time {half[0] if half else 0:.0f}, "
          f"max {max(m for _, m in rss):.0f}, end {rss[-1][1]:.0f}; bound {bound:.0f} (start + "
          f"KV {kv / 2**20:.0f} + prefix store {args.prefix_mib} + 256): "
          f"{'within' if rss_ok else 'PAST IT'}; health at the end: {health}")
    if p.log:
        print(f"the server's stderr ({len(p.log)} lines), last: {p.log[-1].strip()}")
    passed = not five and not broken and not bad and rss_ok
    print("PASS" if passed else "FAIL")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), records=recs, rss=rss, passed=passed,
                           metrics=metrics), f, indent=1)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
