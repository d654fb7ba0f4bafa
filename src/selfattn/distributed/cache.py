"""A KV cache sharded across MPI ranks, for a whole model under context parallelism.

Each rank stores its own positions' K/V (rows ascending by position) and knows every rank's
runs. The prompt is split zigzag (`split`): each rank runs its two chunks through the model, and
every layer's attention goes around the ring. A decode step is computed by every rank alike; its
K/V is stored by the rank holding the fewest positions, and attention gathers the ranks'
(out, lse) pairs, so all ranks keep the same hidden state and sample the same tokens.

It takes the place of `KVCache` in `Transformer.forward` (the same reserve / attend / commit);
a prompt's `pos` is then this rank's runs ((start, count), ...) rather than one start.
"""

import numpy as np

from ..attention import kvformat
from ..cache.memory import aligned_zeros, check_fits
from ..errors import ContextError
from .ring import RingStats, ring_attention, run_rows, sharded_decode, zigzag


class ShardedKVCache:
    def __init__(self, comm, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 kv_dtype: str = "f32"):
        if max_len < 1:
            raise ContextError(f"context length must be >= 1, got {max_len}")
        comm.require(2)
        R = comm.size
        # zigzag chunks differ by one position at most, decode tokens go to the emptiest rank
        self.local_max = -(-max_len // R) + 2
        items, dtype = kvformat.row_shape(kv_dtype, head_dim)
        check_fits(n_layers, n_kv_heads, head_dim, self.local_max, kv_dtype)
        shape = (n_layers, 1, n_kv_heads, self.local_max, items)
        self.k, self.v = aligned_zeros(shape, dtype), aligned_zeros(shape, dtype)
        self.comm, self.kv_dtype, self.head_dim = comm, kv_dtype, head_dim
        self.max_len = self.max_chunk = max_len
        self.length = 0  # positions held over all ranks
        self.runs = [[] for _ in range(R)]  # every rank's runs, ascending
        self._pending = None  # the layout of the prompt going through, until commit
        self.ring = RingStats()  # the prompt's ring transfers, over its layers

    @classmethod
    def for_model(cls, comm, args, max_len: int, kv_dtype: str = "f32") -> "ShardedKVCache":
        return cls(comm, args.n_layers, args.n_kv_heads, args.head_dim, max_len, kv_dtype)

    @property
    def nbytes(self) -> int:
        """This rank's K and V bytes."""
        return self.k.nbytes + self.v.nbytes

    def reset(self):
        """Empty, for the next sequence (the memory stays)."""
        self.length = 0
        self.runs = [[] for _ in self.runs]
        self._pending = None

    def rows(self, rank: int | None = None) -> int:
        return run_rows(self.runs[self.comm.rank if rank is None else rank])

    def split(self, tokens: np.ndarray):
        """A whole prompt (the same on every rank) -> (this rank's tokens, its runs): the
        zigzag split. The cache must be empty."""
        if self.length:
            raise ContextError("a context-parallel prompt goes into an empty cache "
                               f"(this one holds {self.length} positions)")
        n = len(tokens)
        if n > self.max_len:
            raise ContextError(f"{n} tokens do not fit a context of {self.max_len}")
        self._pending = zigzag(n, self.comm.size)
        mine = self._pending[self.comm.rank]
        return np.concatenate([tokens[s:s + c] for s, c in mine]), mine

    def last_logits(self, logits: np.ndarray) -> np.ndarray:
        """After the prompt: the logits of its last position, from the rank that holds it."""
        last = self.length - 1
        holder = next(r for r, runs in enumerate(self.runs)
                      if any(s <= last < s + c for s, c in runs))
        return self.comm.bcast(np.ascontiguousarray(logits, np.float32), holder,
                               "the prompt's last logits")

    def owner(self) -> int:
        """The rank that stores the next decode position: the one holding fewest (lowest wins)."""
        counts = [run_rows(r) for r in self.runs]
        return counts.index(min(counts))

    def reserve(self, pos, T: int):
        if isinstance(pos, tuple):
            if self._pending is None or pos != self._pending[self.comm.rank]:
                raise ContextError("a context-parallel prompt's positions come from "
                                   "ShardedKVCache.split")
            return
        if T != 1 or pos != self.length:
            raise ContextError(f"after the prompt, a context-parallel cache takes one token at "
                               f"a time at position {self.length} (got {T} at {pos})")
        if pos + 1 > self.max_len:
            raise ContextError(f"{pos + 1} tokens do not fit a context of {self.max_len}")

    def attend(self, layer: int, pos, q: np.ndarray, k: np.ndarray, v: np.ndarray, window,
               rotate=None, softcap=None, scale=None) -> np.ndarray:
        """Write this rank's k, v (T, H_kv, D) and return causal attention of q (1, H, T, D)
        over every rank's positions up to each query's (rotate: unused, the streaming cache's)."""
        flags = dict(window=window, softcap=softcap, scale=scale,
                     kv_format=None if self.kv_dtype == "f32" else self.kv_dtype)
        r = self.comm.rank
        K, V = self.k[layer], self.v[layer]
        if isinstance(pos, tuple):  # the prompt: this rank's rows, then the ring
            n = k.shape[0]
            kvformat.write_rows(k, K, 0, self.kv_dtype)
            kvformat.write_rows(v, V, 0, self.kv_dtype)
            out, _ = ring_attention(self.comm, q, pos, K[:, :, :n], V[:, :, :n], self._pending,
                                    causal=True, stats=self.ring, **flags)
            return out
        have = self.rows()
        if self.owner() == r:
            kvformat.write_rows(k, K, have, self.kv_dtype)
            kvformat.write_rows(v, V, have, self.kv_dtype)
            runs = self.runs[r] + [(pos, 1)]
            have += 1
        else:
            runs = self.runs[r]
        out, _ = sharded_decode(self.comm, q, pos, K, V, runs, **flags)
        return out

    def commit(self, pos, T: int):
        if isinstance(pos, tuple):
            self.runs = [list(r) for r in self._pending]
            self.length = sum(run_rows(r) for r in self._pending)
            self._pending = None
            return
        owner = self.runs[self.owner()]
        if owner and owner[-1][0] + owner[-1][1] == pos:
            owner[-1] = (owner[-1][0], owner[-1][1] + 1)
        else:
            owner.append((pos, 1))
        self.length = pos + 1

    def keys_seen(self, positions: np.ndarray, window) -> np.ndarray:
        """Keys a causal query at each position attends to, over all ranks."""
        seen = positions + 1
        return seen if window is None else np.minimum(seen, window)

    def decoded_keys(self, layer: int, kv_len: int):
        raise ContextError("attention maps are drawn in one process, not under context "
                           "parallelism")
