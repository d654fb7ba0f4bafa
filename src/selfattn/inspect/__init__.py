"""Look at the attention matrix: record it per layer and head, summarize it, draw it."""

from .record import MAX_RECORD_BYTES, MAX_TOKENS, AttentionRecord, parse_selection, record_attention
from .stats import HeadStats, head_stats

__all__ = ["AttentionRecord", "HeadStats", "MAX_RECORD_BYTES", "MAX_TOKENS", "head_stats",
           "parse_selection", "record_attention"]
