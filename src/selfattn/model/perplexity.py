"""Perplexity of a model on a text, three ways.

- `windows` (llama-perplexity's method): the tokens are cut into non-overlapping windows of ctx;
  each window runs from an empty cache and only its second half is scored, so every scored token
  sees at least ctx/2 tokens of context.
- `stream`: the text is read as one stream through a streaming cache (window:W or sink:S,window:W)
  in chunks, never starting over; tokens from `first` on are scored.
- `recompute`: the slow exact baseline for a window of W: each scored token is predicted from a
  fresh forward over the W tokens before it (in steps of `stride` scored tokens, so that a token
  sees W - stride + 1 .. W tokens; stride 1 is the exact baseline).

Scores: the negative log-likelihood of each next token under float64 log-softmax of the logits;
perplexity = exp(mean NLL).
"""

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..cache import KVCache, StreamingCache


@dataclass
class Perplexity:
    method: str
    ppl: float
    nll: float  # mean negative log-likelihood, nats
    scored: int
    tokens: int
    seconds: float

    def as_dict(self):
        return asdict(self)


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits (n, vocab), targets (n,) -> -log p(target), float64."""
    z = logits.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return lse - z[np.arange(len(targets)), targets]


def _result(method, nll, n_tokens, t0):
    nll = np.asarray(nll)
    if nll.size == 0:
        raise ValueError("no token was scored: the text is too short for these settings")
    mean = float(nll.mean())
    return Perplexity(method, math.exp(mean), mean, int(nll.size), n_tokens,
                      time.perf_counter() - t0)


def _forward_all(model, ids, cache, chunk):
    """Logits of every position of ids (n, vocab), run in chunks after what the cache holds."""
    out = []
    for s in range(0, len(ids), chunk):
        part = ids[s:s + chunk]
        out.append(model.forward(part, cache, cache.length, all_logits=True))
    return np.concatenate(out)


def windows(model, ids, ctx: int, kv_dtype: str = "f32", on_step=None,
            cache=None) -> Perplexity:
    """cache: a context-parallel cache (distributed.ShardedKVCache) for ctx positions, else a
    KVCache is made. Under context parallelism each window is split across the ranks; each
    scores its own positions and every rank gets all the scores, in order."""
    ids = np.asarray(ids)
    if ctx < 4:
        raise ValueError(f"--ctx must be >= 4 for perplexity, got {ctx}")
    n_windows = len(ids) // ctx
    if n_windows == 0:
        raise ValueError(f"the text is {len(ids)} tokens, shorter than one window of {ctx}")
    cache = cache if cache is not None else KVCache.for_model(model.args, ctx, kv_dtype)
    t0 = time.perf_counter()
    nll = []
    first = ctx // 2
    for w in range(n_windows):
        seq = ids[w * ctx:(w + 1) * ctx]
        cache.length = 0
        if hasattr(cache, "split"):
            nll.append(_window_parallel(model, seq, cache, first))
        else:
            logits = _forward_all(model, seq, cache, 2048)
            nll.append(_nll(logits[first:-1], seq[first + 1:]))
        if on_step:
            on_step(w + 1, n_windows)
    return _result(f"windows of {ctx}", np.concatenate(nll), len(ids), t0)


def _window_parallel(model, seq, cache, first):
    """One window's scores for positions first .. len-2, each rank scoring its own share."""
    from ..distributed.ring import positions

    cache.reset()
    mine, runs = cache.split(seq)
    logits = model.forward(mine, cache, runs, all_logits=True)
    pos = positions(runs)
    keep = (pos >= first) & (pos < len(seq) - 1)
    scores = np.full(len(seq), np.nan)
    scores[pos[keep]] = _nll(logits[keep], seq[pos[keep] + 1])
    every = cache.comm.allgather(scores, "the window's scores")
    return np.where(np.isnan(every), 0.0, every).sum(axis=0)[first:-1]  # one rank each


def stream(model, ids, sinks: int, window: int, kv_dtype: str = "f32", first: int = 1,
           chunk: int = 256, on_step=None) -> Perplexity:
    ids = np.asarray(ids)
    cache = StreamingCache.for_model(model.args, sinks, window, chunk, kv_dtype)
    t0 = time.perf_counter()
    nll = []
    n_chunks = -(-len(ids) // chunk)
    for c in range(n_chunks):
        s = c * chunk
        part = ids[s:s + chunk]
        logits = model.forward(part, cache, cache.length, all_logits=True)
        # logits[i] predicts ids[s + i + 1]; keep targets at positions >= first
        targets = np.arange(s + 1, s + 1 + len(part))
        keep = (targets >= first) & (targets < len(ids))
        if keep.any():
            nll.append(_nll(logits[keep], ids[targets[keep]]))
        if on_step:
            on_step(c + 1, n_chunks)
    name = f"stream sink:{sinks},window:{window}" if sinks else f"stream window:{window}"
    return _result(name, np.concatenate(nll) if nll else [], len(ids), t0)


def recompute(model, ids, window: int, stride: int = 1, kv_dtype: str = "f32", first: int = 0,
              on_step=None) -> Perplexity:
    ids = np.asarray(ids)
    first = max(first, window)  # every scored token has a full window before it
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in 1 .. {window}, got {stride}")
    cache = KVCache.for_model(model.args, window, kv_dtype)
    t0 = time.perf_counter()
    nll = []
    ends = list(range(first, len(ids), stride))
    for n, t in enumerate(ends):
        last = min(t + stride, len(ids))  # score targets t .. last-1
        inputs = ids[last - 1 - window:last - 1]  # the W tokens before the last target
        cache.length = 0
        logits = _forward_all(model, inputs, cache, 2048)
        k = last - t  # the last k inputs predict the k targets
        nll.append(_nll(logits[-k:], ids[t:last]))
        if on_step:
            on_step(n + 1, len(ends))
    return _result(f"recompute window {window}, stride {stride}", np.concatenate(nll), len(ids),
                   t0)
