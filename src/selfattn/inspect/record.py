"""Record the attention weights of chosen layers and heads while a prompt runs through a model.

This is the one place selfattn builds the n x n matrix (with the reference, in float64, from the
very q and k the forward pass computed), so it refuses, before running anything, a prompt whose
recorded matrices would pass MAX_RECORD_BYTES, or a prompt longer than MAX_TOKENS.
"""

from dataclasses import dataclass

import numpy as np

from ..attention import attention_weights
from ..cache import KVCache

MAX_TOKENS = 2048  # the tallest matrix drawn or written; a picture of more is not readable anyway
MAX_RECORD_BYTES = 1 << 30  # float32 weights kept: layers x heads x n x n x 4 bytes


@dataclass
class AttentionRecord:
    """weights[a, b] is the (n, n) matrix of layer layers[a], head heads[b]: row i is how much
    token i draws from each token j (causal: zeros for j > i; each row sums to 1)."""
    token_ids: list[int]
    tokens: list[str]  # each token's text
    layers: list[int]
    heads: list[int]
    weights: np.ndarray  # (len(layers), len(heads), n, n) float32


def parse_selection(text: str, count: int, what: str) -> list[int]:
    """'all', or comma-separated indices (negative counts from the end) -> sorted unique list."""
    text = text.strip()
    if text == "all":
        return list(range(count))
    out = set()
    for part in text.split(","):
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f"{what}: expected 'all' or numbers separated by commas, got "
                             f"{text!r}") from None
        if not -count <= i < count:
            raise ValueError(f"{what}: {i} is out of range, the model has {count} (0 .. "
                             f"{count - 1})")
        out.add(i % count)
    return sorted(out)


def check_size(n_tokens: int, n_layers: int, n_heads: int):
    """ValueError, naming the figures, when a record of this size is refused."""
    if n_tokens > MAX_TOKENS:
        raise ValueError(f"the prompt is {n_tokens} tokens; inspect draws at most {MAX_TOKENS} "
                         "(it builds the n x n matrix): shorten the prompt")
    need = n_layers * n_heads * n_tokens * n_tokens * 4
    if need > MAX_RECORD_BYTES:
        raise ValueError(f"{n_layers} layers x {n_heads} heads x {n_tokens}² weights need "
                         f"{need / 2**20:,.0f} MiB, more than the {MAX_RECORD_BYTES >> 20} MiB "
                         "inspect keeps: choose fewer --layers or --heads, or a shorter prompt")


def record_attention(model, token_ids, tokens: list[str], layers: list[int],
                     heads: list[int]) -> AttentionRecord:
    """Run token_ids through model in one forward pass and keep the chosen weights."""
    n = len(token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    check_size(n, len(layers), len(heads))
    where = {layer: a for a, layer in enumerate(layers)}
    weights = np.zeros((len(layers), len(heads), n, n), np.float32)

    def observe(layer, q, k, kv_len, window):
        if layer in where:
            p = attention_weights(q, k, causal=True, window=window, kv_len=kv_len)  # (1, H, n, n)
            weights[where[layer]] = p[0, heads]

    model.forward(np.asarray(token_ids), KVCache.for_model(model.args, n), 0, observe=observe)
    return AttentionRecord(list(map(int, token_ids)), list(tokens), list(layers), list(heads),
                           weights)
