"""KV caches: the full cache (every position, in one of four formats), the streaming cache
(StreamingLLM's sinks plus a sliding window), and the memory arithmetic they share with the
planner."""

from .full import KVCache
from .memory import KV_BITS, available_memory, check_fits, kv_cache_bytes
from .policy import ContextPolicy, make_cache, parse_policy
from .streaming import StreamingCache

__all__ = ["KVCache", "StreamingCache", "ContextPolicy", "KV_BITS", "available_memory",
           "check_fits", "kv_cache_bytes", "make_cache", "parse_policy"]
