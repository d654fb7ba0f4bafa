"""Context parallelism over MPI: a sequence's attention split across ranks, exactly.

`ring_attention` (prefill: K/V blocks travel around a ring of ranks, the zigzag split balancing
causal work) and `sharded_decode` (each rank attends a new query to its slice of the cache, the
(out, lse) pairs merged) run on a `Comm`, an mpi4py communicator with a deadline on every wait.
Nothing here is imported by the single-machine paths; mpi4py is the optional extra
`selfattn[distributed]`.
"""

from .comm import Comm, mpi
from .ring import RingStats, ring_attention, sharded_decode, zigzag

__all__ = ["Comm", "RingStats", "mpi", "ring_attention", "sharded_decode", "zigzag"]
