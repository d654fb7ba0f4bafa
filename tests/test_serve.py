"""`selfattn serve` on the default model: the OpenAI API through the official `openai` client
and raw HTTP, prompt K/V reuse (exact), streams at once, cancellation, errors, metrics."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (openai's own dependency)
import uvicorn  # noqa: E402

from selfattn.cache import KVCache  # noqa: E402
from selfattn.errors import ContextError  # noqa: E402
from selfattn.model import Sampler, Tokenizer, Transformer, default_model_path, generate  # noqa: E402
from selfattn.serve import Engine, QueueFull, Request, make_app  # noqa: E402

CTX = 1024


class Server:
    """make_app on uvicorn in a thread of this process, on a free localhost port."""

    def __init__(self, model, tok, slots=2, queue_max=8, prefix_cache_bytes=64 << 20):
        self.engine = Engine(model, tok, CTX, slots=slots, queue_max=queue_max,
                             prefix_cache_bytes=prefix_cache_bytes)
        app = make_app(self.engine, "smollm2", "test")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                                    timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()


@pytest.fixture(scope="module")
def loaded():
    path = default_model_path()
    return Transformer.load(path), Tokenizer.from_gguf(_reader(path), path)


def _reader(path):
    from selfattn.model.gguf_file import open_gguf
    return open_gguf(path)


@pytest.fixture(scope="module")
def server(loaded):
    s = Server(*loaded)
    yield s
    s.close()


def alone(model, tok, ids, n):
    """Greedy tokens of a fresh cache and prefill (what the server must match)."""
    cache = KVCache.for_model(model.args, CTX)
    eos = {tok.eos_id}
    stats = generate(model, ids, n, Sampler(), cache, eos)
    return [t for t in stats.token_ids if t not in eos]


def answer(engine, ids, n):
    """A greedy request of n tokens straight to the engine -> its Result (the engine must answer
    within a minute: a stop is a failure)."""
    done, out = threading.Event(), []

    def emit(kind, payload):
        if kind != "token":
            out.append((kind, payload))
            done.set()
    engine.submit(Request(ids, n, Sampler(), emit))
    assert done.wait(60), "no answer: the engine stopped"
    assert out[0][0] == "done", out
    return out[0][1]


def chat_ids(tok, messages):
    return tok.encode(tok.render_chat(messages))


QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_busy"] == 2


def test_chat_matches_a_fresh_generate(server, loaded):
    model, tok = loaded
    r = server.client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12,
                                              temperature=0)
    ids = chat_ids(tok, QUESTION)
    want = alone(model, tok, ids, 12)
    assert r.choices[0].message.content == tok.decode(want, skip_special=True)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want) + (r.choices[0].finish_reason == "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    t = r.model_extra["timings"]
    assert t["prompt_n"] + t["cache_n"] == len(ids)
    assert t["predicted_n"] == r.usage.completion_tokens
    assert 0 < t["ttft_ms"] and 0 < t["prompt_ms"] <= t["ttft_ms"]
    assert 0 < t["attention_share"] < 1 and t["kv_bytes"] > 0


def test_stream_equals_the_whole_answer(server):
    kw = dict(model="smollm2", messages=QUESTION, max_tokens=10, temperature=0)
    whole = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == \
        whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    assert "timings" in finish[0].model_extra


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0,
            "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["object"] == "text_completion" and last["usage"]["completion_tokens"] >= 1
    assert set(last["timings"]) >= {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n",
                                    "predicted_ms", "predicted_per_second", "ttft_ms"}


def test_completion_with_token_ids_and_stop(server, loaded):
    model, tok = loaded
    ids = tok.encode("One, two, three, four, five,")
    want = tok.decode(alone(model, tok, ids, 16), skip_special=True)
    r = server.client.completions.create(model="smollm2", prompt=ids, max_tokens=16,
                                         temperature=0)
    assert r.choices[0].text == want
    stop = want[len(want) // 2:len(want) // 2 + 2]
    r = server.client.completions.create(model="smollm2", prompt=ids, max_tokens=16,
                                         temperature=0, stop=[stop])
    assert r.choices[0].text == want[:want.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_second_turn_reuses_the_history_exactly(loaded):
    model, tok = loaded
    s = Server(model, tok, slots=1)
    try:
        history = [{"role": "system", "content": "You are terse. " * 40}] + QUESTION
        first = s.client.chat.completions.create(model="smollm2", messages=history,
                                                 max_tokens=8, temperature=0)
        history += [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And two more?"}]
        second = s.client.chat.completions.create(model="smollm2", messages=history,
                                                  max_tokens=8, temperature=0)
        cached = second.usage.prompt_tokens_details.cached_tokens
        ids = chat_ids(tok, history)
        assert cached >= len(chat_ids(tok, history[:2])) - 1
        assert second.model_extra["timings"]["prompt_n"] == len(ids) - cached
        assert second.choices[0].message.content == tok.decode(alone(model, tok, ids, 8),
                                                               skip_special=True)
        # the same prompt again: all but its last token come from the cache
        again = s.client.chat.completions.create(model="smollm2", messages=history,
                                                 max_tokens=8, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == len(ids) - 1
        assert again.choices[0].message.content == second.choices[0].message.content
    finally:
        s.close()


def test_a_kept_prefix_comes_back_after_its_slot_moved_on(loaded):
    model, tok = loaded
    s = Server(model, tok, slots=1)
    try:
        a = [{"role": "user", "content": "Tell me about owls. " * 20}]
        b = [{"role": "user", "content": "Something else entirely."}]
        s.client.chat.completions.create(model="smollm2", messages=a, max_tokens=4, temperature=0)
        s.client.chat.completions.create(model="smollm2", messages=b, max_tokens=4, temperature=0)
        r = s.client.chat.completions.create(model="smollm2", messages=a, max_tokens=4,
                                             temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == len(chat_ids(tok, a)) - 1
        assert s.engine.store.nbytes > 0
    finally:
        s.close()


def test_two_streams_at_once_get_their_own_tokens(server, loaded):
    model, tok = loaded
    prompts = ["Write a haiku about the sea.", "List the planets in order."]
    want = [tok.decode(alone(model, tok, chat_ids(tok, [{"role": "user", "content": p}]), 12),
                       skip_special=True) for p in prompts]
    got = [None, None]

    def ask(i):
        got[i] = server.client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompts[i]}], max_tokens=12,
            temperature=0).choices[0].message.content
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want


def test_a_client_that_leaves_frees_its_slot(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "messages": QUESTION, "max_tokens": 900, "temperature": 0, "stream": True},
            timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    deadline = time.time() + 30
    while httpx.get(server.url + "/health").json()["slots_busy"]:
        assert time.time() < deadline, "the slot stayed busy after its client left"
        time.sleep(0.05)


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages"),
    (json.dumps({"messages": QUESTION, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": QUESTION, "temperature": 7}).encode(), 400, "temperature"),
    (json.dumps({"messages": QUESTION, "max_tokens": True}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": QUESTION, "max_tokens": CTX}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": QUESTION, "n": 3}).encode(), 400, "n"),
    (json.dumps({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
    (json.dumps({"messages": QUESTION, "model": "gpt-9"}).encode(), 404, "model"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 3000}]}).encode(), 400,
     "messages"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     400, "messages"),
    (b"[" * 100000 + b"]" * 100000, 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param


def test_bad_completions_routes_and_bodies(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [-1, 5]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": {"a": 1}})
    assert r.status_code == 400
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    r = httpx.post(server.url + "/v1/completions", content=b"x" * ((16 << 20) + 1))
    assert r.status_code == 413
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="nope", messages=QUESTION)
    # the server still answers
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_metrics_count_what_was_served(server):
    server.client.completions.create(model="smollm2", prompt="Hello", max_tokens=3,
                                     temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("selfattn_requests_total", "selfattn_prompt_tokens_total",
                 "selfattn_prompt_tokens_cached_total", "selfattn_completion_tokens_total",
                 "selfattn_ttft_seconds_bucket", "selfattn_token_seconds_bucket",
                 "selfattn_slots_busy", "selfattn_queue_length", "selfattn_kv_cache_bytes",
                 "selfattn_prefix_cache_bytes"):
        assert name in text, name
    ok = [line for line in text.splitlines()
          if line.startswith('selfattn_requests_total{endpoint="completions",status="200"}')]
    assert ok and float(ok[0].split()[-1]) >= 1


def test_the_queue_is_bounded(loaded):
    model, tok = loaded
    engine = Engine(model, tok, CTX, slots=1, queue_max=1)
    events = []
    long = Request(tok.encode("Count to a thousand:"), 900, Sampler(), lambda *e: events.append(e))
    try:
        engine.submit(long)
        deadline = time.time() + 20
        while not engine.busy:
            assert time.time() < deadline
            time.sleep(0.01)
        waiting = Request([1, 2, 3], 2, Sampler(), lambda *e: None)
        engine.submit(waiting)
        with pytest.raises(QueueFull):
            engine.submit(Request([1, 2, 3], 2, Sampler(), lambda *e: None))
        with pytest.raises(ValueError, match="context"):
            engine.submit(Request([1] * CTX, 2, Sampler(), lambda *e: None))
        long.cancel()
        waiting.cancel()
    finally:
        engine.close()


def test_the_cli_serves_and_refuses_a_busy_port():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "selfattn.cli", "serve", "--port", "0", "--ctx",
                          "512", "--slots", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stderr.readline()
        assert line.startswith("selfattn serve: "), line
        url = line.split(" on ")[1].split()[0]
        r = httpx.post(url + "/completions", json={"prompt": "Hi", "max_tokens": 2,
                                                   "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        busy = subprocess.run([sys.executable, "-m", "selfattn.cli", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and "cannot listen" in busy.stderr
        assert busy.stderr.count("\n") == 1
    finally:
        p.send_signal(2)
        assert p.wait(30) == 0


def test_a_failing_request_does_not_stop_the_engine(loaded):
    model, tok = loaded
    engine = Engine(model, tok, CTX, slots=1)

    class Broken(Sampler):
        def __call__(self, logits):
            raise RuntimeError("sampler broke")

    def run(sampler):
        done, events = threading.Event(), []

        def emit(kind, payload):
            events.append((kind, payload))
            if kind != "token":
                done.set()
        engine.submit(Request(tok.encode("Hello there"), 3, sampler, emit))
        assert done.wait(60)
        return events[-1]
    try:
        kind, message = run(Broken())
        assert kind == "error" and "sampler broke" in message
        kind, result = run(Sampler())
        assert kind == "done" and result.completion_tokens >= 1
    finally:
        engine.close()


def test_the_chat_page_streams_and_shows_the_reuse(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from .test_inspect import _browser

    browser = _browser(tmp_path)
    try:
        browser.get(server.url + "/")
        body = browser.find_element(By.TAG_NAME, "body")
        WebDriverWait(browser, 30).until(lambda b: body.get_attribute("data-ready") == "1")
        assert "smollm2" in browser.find_element(By.ID, "model").text
        for turn, text in enumerate(["Name a colour.", "And another one?"], 1):
            box = browser.find_element(By.ID, "prompt")
            box.send_keys(text)
            browser.find_element(By.ID, "send").click()
            WebDriverWait(browser, 120).until(
                lambda b: body.get_attribute("data-replies") == str(turn)
                and body.get_attribute("data-busy") == "0")
        replies = browser.find_elements(By.CSS_SELECTOR, ".assistant")
        stats = browser.find_elements(By.CSS_SELECTOR, ".stats")
        assert len(replies) == 2 and all(r.text.strip() for r in replies)
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        assert len(stats) == 2 and float(stats[0].get_attribute("data-ttft")) > 0
        assert int(stats[1].get_attribute("data-cached")) > 0  # the first turn's K/V reused
        assert "tok/s" in stats[1].text and "reused" in stats[1].text
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
    finally:
        browser.quit()


def test_a_kept_prefix_survives_the_put_that_evicts_it(loaded):
    """One conversation's room in the prefix store: moving a slot from B back to A keeps B,
    which evicts A, whose K/V is being copied back; A still comes back whole, and the engine
    goes on."""
    model, tok = loaded
    a = tok.encode("Owls hunt at night and sleep by day. " * 12)
    b = tok.encode("Bees make honey from the nectar of flowers. " * 12)
    per_token = 2 * model.args.n_layers * model.args.n_kv_heads * model.args.head_dim * 4
    engine = Engine(model, tok, CTX, slots=1,
                    prefix_cache_bytes=int(1.5 * per_token * max(len(a), len(b)) + 4 * per_token))

    def run(ids):
        return answer(engine, ids, 2)
    try:
        run(a)
        run(b)  # a's K/V goes to the store
        again = run(a + tok.encode(" Why?"))  # b's K/V in, a's out, a's copied back
        assert again.cached_tokens >= len(a) - 1
        run(b)  # the engine still answers
    finally:
        engine.close()


def test_a_slot_moves_its_cache_to_the_store_and_back_without_a_copy(loaded, monkeypatch):
    """Another conversation in the one slot: the slot's cache object goes to the store as it is
    (no copy while the new request waits) and comes back as the same object when its
    conversation continues; a conversation sharing only a prefix gets those positions copied,
    and the kept entry stays whole. Every answer is the one a fresh generate gives."""
    model, tok = loaded
    a = tok.encode("Owls hunt at night and sleep by day. " * 6)
    b = tok.encode("Bees make honey from the nectar of flowers. " * 6)
    engine = Engine(model, tok, CTX, slots=1)

    def run(ids):
        result = answer(engine, ids, 3)
        assert result.text == tok.decode(alone(model, tok, ids, 3), skip_special=True)
        return result
    try:
        run(a)
        slot = engine.slots[0]
        first = slot.cache
        run(b)  # a's cache, the same object, into the store; a fresh one for b
        assert slot.cache is not first
        assert any(c is first for c in engine.store.entries.values())
        assert engine.store.nbytes == sum(c.resident_bytes for c in engine.store.entries.values())
        # a's conversation goes on (its answer, then more): a's cache moves back, all reused
        reply = list(alone(model, tok, a, 3))
        again = run(a + reply + tok.encode(" Why?"))
        assert slot.cache is first and again.cached_tokens == len(a) + 2
        shared = a[:len(a) // 2] + b  # only a's first half in common with what a slot holds
        part = run(shared)
        assert part.cached_tokens == len(a) // 2
        assert any(len(key) >= len(a) for key in engine.store.entries)  # a's entry still whole
        # no memory for a fresh cache: the slot goes on with its own, nothing is kept
        held, entries = slot.cache, dict(engine.store.entries)

        def no_room(*args, **kwargs):
            raise ContextError("no room")
        other = tok.encode("Something else entirely, about rivers and the sea.")
        want = tok.decode(alone(model, tok, other, 3), skip_special=True)
        monkeypatch.setattr(KVCache, "for_model", no_room)
        assert answer(engine, other, 3).text == want
        assert slot.cache is held and dict(engine.store.entries) == entries
    finally:
        engine.close()


def test_prompts_that_arrive_together_go_through_the_model_together(loaded):
    """Three requests admitted in the same turn: their prompts go through one forward
    (forward_prompts, where the model gives each the bits it gets alone), and each answer is the
    one a fresh generate gives it alone."""
    model, tok = loaded
    prompts = [chat_ids(tok, [{"role": "user", "content": c}]) for c in
               ("Name a red fruit.", "What is two plus two?", "Say hello in French.")]
    engine = Engine(model, tok, CTX, slots=3)
    calls = []
    joint = model.forward_prompts

    def spy(chunks, caches, timings=None):
        calls.append([len(c) for c in chunks])
        return joint(chunks, caches, timings)
    model.forward_prompts = spy
    done, results = threading.Event(), {}

    def emit_for(i):
        def emit(kind, payload):
            if kind != "token":
                results[i] = (kind, payload)
                if len(results) == len(prompts):
                    done.set()
        return emit
    try:
        with engine.cond:  # the engine admits all three in one turn
            for i, ids in enumerate(prompts):
                engine.submit(Request(ids, 6, Sampler(), emit_for(i)))
        assert done.wait(60), "no answer"
    finally:
        del model.forward_prompts
        engine.close()
    if model.prompts_join([len(p) for p in prompts]):
        assert calls and calls[0] == [len(p) for p in prompts]
    else:  # without the compiled GEMM (BLAS's rows depend on the call): one prompt a turn
        assert calls == []
    for i, ids in enumerate(prompts):
        kind, result = results[i]
        assert kind == "done", result
        assert result.text == tok.decode(alone(model, tok, ids, 6), skip_special=True)
        assert result.prompt_ms > 0
