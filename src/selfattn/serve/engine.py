"""The server's engine: one worker thread owns the model and runs every request on it.

K slots, each a KV cache of its own and the token ids that cache holds. A request goes to the
free slot whose tokens share the longest prefix with its prompt (or to a slot given back a kept
cache, `PrefixStore`), and only the rest of the prompt is prefilled: a chat resends its
whole history every turn, and the history's K/V is already there. Reuse is exact: the cached
positions hold what a fresh prefill writes, and the last prompt token always goes through the
model, so the first token's logits come from a forward call as they do without reuse.

Each turn of the loop runs one decode step for every decoding slot, as one batched forward
(`Transformer.forward_batch`: each weight read once for all of them, and each slot's logits the
bits it gets alone), then at most `PREFILL_STEP` prompt tokens (in arrival order: a chunk of the
first waiting prompt, and of the next ones as one forward while they fit,
`Transformer.forward_prompts`), so one long prompt does not freeze the other streams (when
nothing decodes, up to the model's prefill chunk). A request past the slots waits in a bounded
queue. A request whose client left (`Request.cancel`) is dropped at its next step.

Events reach the request through its `emit` callback, called on the worker thread:
("token", text) for each piece of text (when it streams), then ("done", Result) or ("error",
message).
"""

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from ..cache import KVCache
from ..errors import ContextError
from ..model import Sampler, StreamDecoder, Timings

PREFILL_STEP = 256  # prompt tokens per turn while other slots decode (when nothing else runs:
# the model's prefill chunk, as generate's)


class QueueFull(Exception):
    """Every slot is busy and the queue holds its limit."""


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    cached_tokens: int  # of prompt_tokens, served from cached K/V
    completion_tokens: int
    queue_ms: float
    prompt_ms: float  # the prefill of the prompt tokens not cached
    ttft_ms: float  # from arrival to the first token
    predicted_ms: float  # from the first token to the last
    attention_share: float  # of this request's forward time
    kv_bytes: int  # K/V bytes its positions hold

    def timings(self) -> dict:
        """llama-server's `timings` object, and selfattn's figures beside it."""
        prompt_n = self.prompt_tokens - self.cached_tokens
        dec_n = max(self.completion_tokens - 1, 0)
        return dict(prompt_n=prompt_n, prompt_ms=self.prompt_ms,
                    prompt_per_second=1e3 * prompt_n / self.prompt_ms if self.prompt_ms else 0.0,
                    predicted_n=self.completion_tokens, predicted_ms=self.predicted_ms,
                    predicted_per_second=1e3 * dec_n / self.predicted_ms
                    if dec_n and self.predicted_ms else 0.0,
                    cache_n=self.cached_tokens, ttft_ms=self.ttft_ms, queue_ms=self.queue_ms,
                    attention_share=self.attention_share, kv_bytes=self.kv_bytes)


@dataclass
class Request:
    prompt_ids: list
    max_tokens: int
    sampler: Sampler
    emit: object  # emit(kind, payload), called on the worker thread
    stop: tuple = ()
    stream: bool = True  # False: no ("token", text) events, only the Result (whose text is whole)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self):
        self.cancelled.set()


class PrefixStore:
    """Slots' caches kept for later requests that start with the same tokens, least recently
    used evicted past max_bytes (each counted by the positions it has held: its resident pages).
    A cache moves between a slot and the store whole, never copied: a request for another
    conversation does not wait for the K/V its slot held to be copied out (an 80-token slot of
    the default model took 2.7 ms; a 2,000-token one moves 92 MB)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self.entries = OrderedDict()  # tuple of token ids -> KVCache holding them

    def put(self, tokens, cache: KVCache) -> bool:
        """Keep cache (holding tokens) from now on, the least recently used evicted to make room;
        False, and nothing kept, if it alone passes max_bytes or those tokens are kept already."""
        key, size = tuple(tokens), cache.resident_bytes
        if not key or size > self.max_bytes or key in self.entries:
            return False
        while self.nbytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.resident_bytes
        self.entries[key] = cache
        self.nbytes += size
        return True

    def best(self, prompt) -> tuple:
        """-> (tokens, common prefix length) of the entry sharing the longest prefix."""
        best, n_best = None, 0
        for key in self.entries:
            n = common_prefix(key, prompt)
            if n > n_best:
                best, n_best = key, n
        return best, n_best

    def take(self, key) -> KVCache:
        """The entry's cache, out of the store (the caller's from now on)."""
        cache = self.entries.pop(key)
        self.nbytes -= cache.resident_bytes
        return cache

    def get(self, key) -> KVCache:
        """The entry's cache, marked as used now and left in the store (held by the caller, a
        later put evicting the entry does not take it away)."""
        self.entries.move_to_end(key)
        return self.entries[key]


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Slot:
    def __init__(self, cache: KVCache):
        self.cache = cache
        self.tokens = []  # ids whose K/V positions 0 .. len-1 of the cache hold
        self.req = None
        self.reset()

    def reset(self):
        self.pending = []  # prompt ids still to prefill
        self.decoder = None
        self.out_ids, self.text, self.sent = [], "", 0
        self.logits = None
        self.timings = Timings()
        self.t_admit = self.t_first = 0.0
        self.prompt_s = 0.0
        self.cached = 0


class Engine:
    def __init__(self, model, tokenizer, ctx: int, slots: int = 1, kv_dtype: str = "f32",
                 prefix_cache_bytes: int = 256 << 20, queue_max: int = 64):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model, self.tok, self.ctx, self.kv_dtype = model, tokenizer, ctx, kv_dtype
        self.slots = [Slot(KVCache.for_model(model.args, ctx, kv_dtype)) for _ in range(slots)]
        self.store = PrefixStore(prefix_cache_bytes)
        self.queue, self.queue_max = deque(), queue_max
        self.eos = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="selfattn-engine", daemon=True)
        self.on_finish = None  # on_finish(Result), for the metrics
        self.thread.start()

    # -- the caller's side ------------------------------------------------------------------

    def submit(self, req: Request):
        n = len(req.prompt_ids)
        if n < 1:
            raise ValueError("the prompt is empty: nothing to condition on")
        if n >= self.ctx:
            raise ValueError(f"the prompt is {n} tokens; the context is {self.ctx}")
        with self.cond:
            if len(self.queue) >= self.queue_max:
                raise QueueFull(f"{len(self.slots)} slots busy and {len(self.queue)} requests "
                                "waiting")
            self.queue.append(req)
            self.cond.notify()

    def close(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    @property
    def busy(self) -> int:
        return sum(s.req is not None for s in self.slots)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def kv_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self.slots)

    # -- the worker thread --------------------------------------------------------------------

    def _run(self):
        while True:
            with self.cond:
                while not self.stopping and not self.queue and not self.busy:
                    self.cond.wait()
                if self.stopping:
                    break
                self._admit()
            try:
                self._turn()
            except Exception as e:  # noqa: BLE001 - a bug: its requests fail, the server goes on
                for s in self.slots:
                    if s.req is not None:
                        self._finish(s, f"internal error, a bug in selfattn: "
                                        f"{type(e).__name__}: {e}")
        for r in [s.req for s in self.slots if s.req is not None] + list(self.queue):
            _emit(r, "error", "the server is shutting down")

    def _admit(self):
        """Waiting requests into free slots, each to the one holding most of its prompt."""
        while self.queue:
            free = [s for s in self.slots if s.req is None]
            if not free:
                return
            req = self.queue.popleft()
            if req.cancelled.is_set():
                continue
            slot = max(free, key=lambda s: common_prefix(s.tokens, req.prompt_ids))
            try:
                self._assign(slot, req)
            except Exception as e:  # noqa: BLE001 - a bug: this request fails, the rest go on
                slot.req, slot.tokens, slot.cache.length = None, [], 0
                _emit(req, "error", f"internal error, a bug in selfattn: {type(e).__name__}: {e}")

    def _assign(self, slot: Slot, req: Request):
        """req into slot, with the longest cached prefix of its prompt: the slot's own, or a
        kept one (the slot's content kept first, if it is not a prefix of the prompt): a kept
        cache whose every token starts the prompt moves into the slot; of one that parts from it
        sooner, the shared positions are copied and the entry stays."""
        prompt = req.prompt_ids
        n = common_prefix(slot.tokens, prompt)
        key, n_kept = self.store.best(prompt)
        if n_kept > n:
            if n_kept == len(key):
                kept = self.store.take(key)
                if slot.tokens:  # the slot's cache kept in turn (or dropped if it does not fit)
                    self.store.put(slot.tokens, slot.cache)
                slot.cache = kept
            else:
                kept = self.store.get(key)
                self._keep(slot, 0)  # may evict `key`'s entry: `kept` is held
                slot.cache.copy_prefix(kept, n_kept)
            slot.tokens, n = list(key), n_kept
        elif n < len(slot.tokens):
            self._keep(slot, n)
        n = min(n, len(prompt) - 1)  # the last prompt token always runs: its logits
        slot.tokens = slot.tokens[:n]
        slot.cache.length = n
        slot.reset()
        slot.req, slot.cached, slot.pending = req, n, list(prompt[n:])
        slot.decoder = StreamDecoder(self.tok)
        slot.t_admit = time.perf_counter()

    def _keep(self, slot: Slot, n: int):
        """The slot's cache into the store, and a fresh one in the slot holding its first n
        positions; if the store does not take it, or the memory has no room for a fresh cache
        now, the slot goes on with its own."""
        if not slot.tokens:
            return
        try:
            fresh = KVCache.for_model(self.model.args, self.ctx, self.kv_dtype)
        except ContextError:
            return
        if self.store.put(slot.tokens, slot.cache):
            kept, slot.cache = slot.cache, fresh
            slot.cache.copy_prefix(kept, n)

    def _turn(self):
        decoding = [s for s in self.slots if s.req is not None and not s.pending]
        prefilling = [s for s in self.slots if s.req is not None and s.pending]
        for s in decoding + prefilling:
            if s.req.cancelled.is_set():
                self._finish(s, None)
        decoding = [s for s in decoding if s.req is not None]
        if len(decoding) == 1:
            self._decode(decoding[0])
        elif decoding:
            self._decode_batch(decoding)
        prefilling = sorted((s for s in prefilling if s.req is not None),
                            key=lambda s: s.req.arrived)
        if prefilling:
            alone = not any(x.req is not None and not x.pending for x in self.slots)
            self._prefill(prefilling, self.model.prefill_chunk if alone else PREFILL_STEP)

    def _forward(self, s: Slot, ids):
        try:
            s.logits = self.model.forward(np.asarray(ids), s.cache, s.cache.length, s.timings)
        except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
            self._finish(s, f"{type(e).__name__}: {e}")
            return False
        s.tokens.extend(int(i) for i in ids)
        return True

    def _prefill(self, slots, budget: int):
        """A chunk of at most `budget` prompt tokens of the first waiting slot, with the chunks of
        the others joined to it in one forward (each weight read once for all of them) while they
        fit the budget and the model gives each the bits it gets alone (prompts_join)."""
        take = [(slots[0], min(budget, len(slots[0].pending)))]
        total = take[0][1]
        for s in slots[1:]:
            n = min(budget, len(s.pending))
            if total + n <= budget and self.model.prompts_join([m for _, m in take] + [n]):
                take.append((s, n))
                total += n
        t0 = time.perf_counter()
        if len(take) == 1:
            s, n = take[0]
            ids, s.pending = s.pending[:n], s.pending[n:]
            if not self._forward(s, ids):
                return
            s.prompt_s += time.perf_counter() - t0
            if not s.pending:
                self._sample(s)
            return
        chunks = [s.pending[:n] for s, n in take]
        t = Timings()
        try:
            logits = self.model.forward_prompts(chunks, [s.cache for s, _ in take], t)
        except Exception as e:  # noqa: BLE001 - these requests fail, the server goes on
            for s, _ in take:
                self._finish(s, f"{type(e).__name__}: {e}")
            return
        elapsed = time.perf_counter() - t0
        for (s, n), ids, row in zip(take, chunks, logits):  # each its share, by tokens
            s.pending = s.pending[n:]
            s.tokens.extend(int(i) for i in ids)
            s.prompt_s += elapsed * n / total
            _charge(s, t, n / total)
            s.logits = row
            if not s.pending:
                self._sample(s)

    def _decode(self, s: Slot):
        if self._forward(s, [s.out_ids[-1]]):
            self._sample(s)

    def _decode_batch(self, slots):
        ids = [s.out_ids[-1] for s in slots]
        t = Timings()
        try:
            logits = self.model.forward_batch(ids, [s.cache for s in slots], t)
        except Exception as e:  # noqa: BLE001 - these requests fail, the server goes on
            for s in slots:
                self._finish(s, f"{type(e).__name__}: {e}")
            return
        for s, i, row in zip(slots, ids, logits):  # each slot's share of the step's time
            _charge(s, t, 1 / len(slots))
            s.tokens.append(i)
            s.logits = row
            self._sample(s)

    def _sample(self, s: Slot):
        req = s.req
        token = req.sampler(s.logits)
        if not s.out_ids:
            s.t_first = time.perf_counter()
        s.out_ids.append(token)
        if token in self.eos:
            self._send(s, len(s.text))
            return self._finish(s, None, "stop")
        s.text += s.decoder.push(token)
        cut = _find_stop(s.text, req.stop, s.sent)
        if cut is not None:
            s.text = s.text[:cut]
            self._send(s, len(s.text))
            return self._finish(s, None, "stop")
        if len(s.out_ids) >= req.max_tokens or s.cache.length >= s.cache.max_len:
            self._send(s, len(s.text))
            return self._finish(s, None, "length")
        self._send(s, len(s.text) - _held_back(s.text, req.stop))

    def _send(self, s: Slot, upto: int):
        if upto > s.sent:
            if s.req.stream:
                _emit(s.req, "token", s.text[s.sent:upto])
            s.sent = upto

    def _finish(self, s: Slot, error, reason=""):
        req, now = s.req, time.perf_counter()
        s.req = None
        if error is not None or req.cancelled.is_set():
            if error is not None:
                _emit(req, "error", error)
            return
        t_first = s.t_first or now
        t = s.timings
        result = Result(
            text=s.text, finish_reason=reason, prompt_tokens=len(req.prompt_ids),
            cached_tokens=s.cached, completion_tokens=len(s.out_ids),
            queue_ms=1e3 * (s.t_admit - req.arrived), prompt_ms=1e3 * s.prompt_s,
            ttft_ms=1e3 * (t_first - req.arrived), predicted_ms=1e3 * (now - t_first),
            attention_share=t.attention_share,
            kv_bytes=s.cache.nbytes // s.cache.max_len * s.cache.length)
        if self.on_finish:
            self.on_finish(result)
        _emit(req, "done", result)


def _charge(s: Slot, t: Timings, share: float):
    """share of a forward shared by several slots (its Timings t) into slot s's own."""
    s.timings.forward_s += t.forward_s * share
    s.timings.attention_s += t.attention_s * share


def _emit(req: Request, kind, payload):
    """req.emit, and a request whose listener is gone (its event loop closed) is cancelled."""
    try:
        req.emit(kind, payload)
    except Exception:  # noqa: BLE001
        req.cancel()


def _find_stop(text: str, stops, sent: int):
    """Where the first stop string starts in text (searching from what may hold a new one)."""
    cut = None
    for stop in stops:
        i = text.find(stop, max(0, sent - len(stop) + 1))
        if i >= 0 and (cut is None or i < cut):
            cut = i
    return cut


def _held_back(text: str, stops) -> int:
    """Characters at the end of text that could begin a stop string: not sent yet."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold
