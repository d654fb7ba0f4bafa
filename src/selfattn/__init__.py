"""selfattn: exact self-attention for local inference, and figures on where its time goes."""

from .attention import (attention, attention_reference, attention_weights, merge, num_threads,
                        set_num_threads)

__version__ = "0.1.0"
__all__ = ["attention", "attention_reference", "attention_weights", "merge", "num_threads",
           "set_num_threads", "__version__"]
