"""Exact self-attention: the reference (the spec), the flash prefill path, the split-K decode path."""

from .api import DECODE_MAX_T, IMPLS, attention, attention_weights, warmup
from .merge import merge
from .reference import attention_reference, band_mask
from .threads import num_threads, set_num_threads

__all__ = ["attention", "attention_weights", "merge", "attention_reference", "band_mask", "IMPLS",
           "DECODE_MAX_T",
           "num_threads", "set_num_threads", "warmup"]
