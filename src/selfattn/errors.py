"""Project exceptions. Both are ValueErrors: bad input, named, never a crash."""


class ModelError(ValueError):
    """A model file that cannot be used: missing, not GGUF, truncated, unsupported, incomplete."""


class ContextError(ValueError):
    """A request that does not fit the context (the KV cache) it would run in."""


class DistributedError(ValueError):
    """Context parallelism that cannot run: no MPI, too few ranks, or a rank that stopped
    answering (every wait on the others has a deadline)."""
