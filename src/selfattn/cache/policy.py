"""--context-policy: what happens when the stream is longer than the cache.

    full                 every position kept; past --ctx is an error (never silent truncation)
    window:W             the last W tokens (a ring); memory flat
    sink:S,window:W      the first S tokens plus the last W (StreamingLLM); memory flat
"""

from dataclasses import dataclass

from .full import KVCache
from .streaming import StreamingCache


@dataclass(frozen=True)
class ContextPolicy:
    kind: str  # "full" or "streaming"
    sinks: int = 0
    window: int = 0

    def __str__(self):
        if self.kind == "full":
            return "full"
        return f"sink:{self.sinks},window:{self.window}" if self.sinks else f"window:{self.window}"


def parse_policy(text: str) -> ContextPolicy:
    text = text.strip().replace(" ", "")
    if text == "full":
        return ContextPolicy("full")
    fields = {}
    for part in text.split(","):
        name, _, value = part.partition(":")
        if name not in ("sink", "window") or name in fields or not value.isdigit():
            raise ValueError(f"context policy must be full, window:W or sink:S,window:W, got "
                             f"{text!r}")
        fields[name] = int(value)
    if "window" not in fields or fields["window"] < 1:
        raise ValueError(f"context policy {text!r} needs window:W with W >= 1")
    return ContextPolicy("streaming", fields.get("sink", 0), fields["window"])


def make_cache(args, policy: ContextPolicy, ctx: int, kv_dtype: str = "f32", chunk: int = 512):
    """The cache a policy asks for: full for ctx positions, or a streaming one."""
    if policy.kind == "full":
        return KVCache.for_model(args, ctx, kv_dtype)
    return StreamingCache.for_model(args, policy.sinks, policy.window, chunk, kv_dtype)
