"""Generation: prefill the prompt in chunks, then decode one token at a time.

TTFT runs from the tokenized prompt to the first sampled token (prefill + first sample).
decode_tps counts the tokens after the first over their time. Load time is separate.
"""

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..cache import KVCache
from .transformer import Timings

PREFILL_CHUNK = 2048  # prompt tokens per forward call at most: larger chunks than 512 cut
# SmolLM2's TTFT at 4,000 tokens from 19.6 s to 17.3 s (fewer, larger calls)
ACTIVATIONS_MAX = 256 << 20  # bytes one chunk's activations may take: an 8B model gets 1,024
# tokens a call (2,048 took ~0.9 GiB beside its cache), SmolLM2 the whole 2,048 (~60 MB)


def activation_floats(dim: int, ffn_dim: int, q_dim: int, kv_dim: int) -> int:
    """float32 values a prompt token's activations take in a forward call: x, h, the attention
    output and the FFN's output (dim each), q (q_dim), k and v (kv_dim), gate, up and their
    product (ffn_dim each)."""
    return 4 * dim + 3 * ffn_dim + q_dim + 2 * kv_dim


def prefill_chunk(dim: int, ffn_dim: int, q_dim: int, kv_dim: int) -> int:
    """Prompt tokens per forward call: PREFILL_CHUNK, or fewer (a multiple of 256) where their
    activations would pass ACTIVATIONS_MAX."""
    per_token = 4 * activation_floats(dim, ffn_dim, q_dim, kv_dim)
    return max(256, min(PREFILL_CHUNK, ACTIVATIONS_MAX // per_token // 256 * 256))


@dataclass
class Sampler:
    temperature: float = 0.0  # 0: greedy (deterministic)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")
        if self.top_k:
            order = order[:self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self.rng.choice(len(order), p=p)])


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    token_ids: list = field(default_factory=list)
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    attention_share: float = 0.0
    prefill_attention_share: float = 0.0
    decode_attention_share: float = 0.0
    kv_cache_bytes: int = 0
    attention_pairs: int = 0  # (query, key) pairs scored, over all heads and layers
    stop_reason: str = ""
    prompt_timings: Timings = field(default_factory=Timings)  # where ttft_s went
    decode_timings: Timings = field(default_factory=Timings)  # where decode_s went

    def as_dict(self):
        return asdict(self)


def prefill(model, tokens, cache: KVCache, timings: Timings | None = None,
            chunk: int | None = None, on_chunk=None) -> np.ndarray:
    """Run the prompt through the model in chunks (default: the model's `prefill_chunk`);
    returns the last position's logits. on_chunk(done, total), if given, is called before each
    chunk and after the last. A context-parallel cache (distributed.ShardedKVCache) takes the
    prompt whole: each rank runs its share of it, and every rank gets the last logits."""
    if hasattr(cache, "split"):
        if on_chunk:
            on_chunk(0, len(tokens))
        mine, runs = cache.split(np.asarray(tokens))
        logits = cache.last_logits(model.forward(mine, cache, runs, timings))
        if on_chunk:
            on_chunk(len(tokens), len(tokens))
        return logits
    logits = None
    chunk = min(chunk or model.prefill_chunk, cache.max_chunk)
    for start in range(0, len(tokens), chunk):
        if on_chunk:
            on_chunk(start, len(tokens))
        logits = model.forward(tokens[start:start + chunk], cache, cache.length, timings)
    if on_chunk:
        on_chunk(len(tokens), len(tokens))
    return logits


def generate(model, prompt_ids, max_tokens: int, sampler: Sampler, cache: KVCache,
             eos_ids=(), on_token=None, on_prefill=None) -> GenerationStats:
    """Sample up to max_tokens after prompt_ids; on_token(id) is called as each one is chosen,
    on_prefill(done, total) as the prompt's chunks go through."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: nothing to condition on")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    stats = GenerationStats(prompt_tokens=len(prompt_ids), generated_tokens=0,
                            kv_cache_bytes=cache.nbytes)
    pre_t, dec_t = stats.prompt_timings, stats.decode_timings
    t0 = time.perf_counter()
    logits = prefill(model, np.asarray(prompt_ids), cache, pre_t, on_chunk=on_prefill)
    t_s = time.perf_counter()
    token = sampler(logits)
    stats.ttft_s = time.perf_counter() - t0
    pre_t.sampling_s = stats.ttft_s - (t_s - t0)
    stats.prefill_s = pre_t.forward_s
    stats.token_ids.append(token)
    if on_token:
        on_token(token)
    stats.stop_reason = "max_tokens"
    t1 = time.perf_counter()
    while len(stats.token_ids) < max_tokens and token not in eos_ids:
        if cache.length >= cache.max_len:
            stats.stop_reason = "context_full"
            break
        logits = model.forward(np.array([token]), cache, cache.length, dec_t)
        t_s = time.perf_counter()
        token = sampler(logits)
        dec_t.sampling_s += time.perf_counter() - t_s
        stats.token_ids.append(token)
        if on_token:
            on_token(token)
    if token in eos_ids:
        stats.stop_reason = "eos"
    stats.decode_s = time.perf_counter() - t1
    stats.generated_tokens = len(stats.token_ids)
    stats.prefill_tps = len(prompt_ids) / stats.ttft_s if stats.ttft_s > 0 else 0.0
    n_dec = stats.generated_tokens - 1
    stats.decode_tps = n_dec / stats.decode_s if n_dec > 0 and stats.decode_s > 0 else 0.0
    total = pre_t.forward_s + dec_t.forward_s
    stats.attention_share = (pre_t.attention_s + dec_t.attention_s) / total if total else 0.0
    stats.prefill_attention_share = pre_t.attention_share
    stats.decode_attention_share = dec_t.attention_share
    stats.attention_pairs = pre_t.attention_pairs + dec_t.attention_pairs
    return stats
