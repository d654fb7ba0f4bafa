"""A KV cache sharded across MPI ranks, for a whole model under context parallelism.

Each rank stores its own positions' K/V (rows ascending by position) and knows every rank's
runs. A prompt is split zigzag (`split`), after whatever the cache holds: each rank runs its two
chunks through the model, and every layer's attention goes around the ring (each rank's old and
new rows). `cache.length = n` rewinds to the first n positions, as for a KVCache. A decode step
is computed by every rank alike; its K/V is stored by the rank holding the fewest positions,
and attention gathers the ranks' (out, lse) pairs, so all ranks keep the same hidden state and
sample the same tokens.

It takes the place of `KVCache` in `Transformer.forward` (the same reserve / attend / commit);
a prompt's `pos` is then this rank's runs ((start, count), ...) rather than one start.
"""

import numpy as np

from ..attention import kvformat
from ..cache import KVCache
from ..cache.memory import aligned_zeros, check_fits
from ..errors import ContextError
from .ring import RingStats, ring_attention, run_rows, sharded_decode, zigzag


SLACK = 4  # positions a rank's share holds beyond max_len / R


def extend(runs: list, start: int, count: int):
    """Append positions start .. start+count-1 to ascending runs, merging with the last."""
    if runs and runs[-1][0] + runs[-1][1] == start:
        runs[-1] = (runs[-1][0], runs[-1][1] + count)
    else:
        runs.append((start, count))


class ShardedKVCache:
    def __init__(self, comm, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 kv_dtype: str = "f32"):
        if max_len < 1:
            raise ContextError(f"context length must be >= 1, got {max_len}")
        comm.require(2)
        R = comm.size
        # a prompt's chunks differ by one position at most and go to the ranks holding fewest,
        # decoded tokens to the emptiest rank: the ranks stay within a few positions
        self.local_max = -(-max_len // R) + SLACK
        items, dtype = kvformat.row_shape(kv_dtype, head_dim)
        check_fits(n_layers, n_kv_heads, head_dim, self.local_max, kv_dtype)
        shape = (n_layers, 1, n_kv_heads, self.local_max, items)
        self.k, self.v = aligned_zeros(shape, dtype), aligned_zeros(shape, dtype)
        self.comm, self.kv_dtype, self.head_dim = comm, kv_dtype, head_dim
        self.max_len = self.max_chunk = max_len
        self._length = 0  # positions held over all ranks
        self.runs = [[] for _ in range(R)]  # every rank's runs, ascending
        self._pending = None  # each rank's runs of the prompt going through, until commit
        self.ring = RingStats()  # the prompts' ring transfers, over their layers

    @classmethod
    def for_model(cls, comm, args, max_len: int, kv_dtype: str = "f32") -> "ShardedKVCache":
        return cls(comm, args.n_layers, args.n_kv_heads, args.head_dim, max_len, kv_dtype)

    @property
    def nbytes(self) -> int:
        """This rank's K and V bytes."""
        return self.k.nbytes + self.v.nbytes

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, n: int):
        """Keep positions 0 .. n-1 only (as `cache.length = n` rewinds a KVCache)."""
        if not 0 <= n <= self._length:
            raise ContextError(f"a cache of {self._length} positions cannot be set to {n}")
        self.runs = [[(s, min(c, n - s)) for s, c in runs if s < n] for runs in self.runs]
        self._length, self._pending = n, None

    def reset(self):
        """Empty, for the next sequence (the memory stays)."""
        self.length = 0

    def rows(self, rank: int | None = None) -> int:
        return run_rows(self.runs[self.comm.rank if rank is None else rank])

    def split(self, tokens: np.ndarray):
        """A prompt (the same on every rank), going after the positions held -> (this rank's
        tokens, its runs). The zigzag split: 2R chunks, pairs (i, 2R-1-i), the largest pairs to
        the ranks holding fewest positions."""
        n, start = len(tokens), self._length
        if start + n > self.max_len:
            raise ContextError(f"{start + n} tokens do not fit a context of {self.max_len}")
        pairs = zigzag(n, self.comm.size)  # pair r: chunks r and 2R-1-r
        order = sorted(range(len(pairs)), key=lambda i: -run_rows(pairs[i]))
        ranks = sorted(range(len(pairs)), key=lambda r: (self.rows(r), r))
        pending = [None] * len(pairs)
        for i, r in zip(order, ranks):
            pending[r] = tuple((start + s, c) for s, c in pairs[i])
        full = [r for r, p in enumerate(pending) if self.rows(r) + run_rows(p) > self.local_max]
        if full:
            raise ContextError(f"rank {full[0]}'s share of the cache is full ({self.local_max} "
                               "positions): a larger context")
        self._pending = pending
        mine = pending[self.comm.rank]
        return np.concatenate([tokens[s - start:s - start + c] for s, c in mine]), mine

    def last_logits(self, logits: np.ndarray) -> np.ndarray:
        """After the prompt: the logits of its last position, from the rank that holds it."""
        last = self._length - 1
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
        if T != 1 or pos != self._length:
            raise ContextError(f"a context-parallel cache takes a prompt from split() or one "
                               f"token at position {self._length} (got {T} at {pos})")
        if pos + 1 > self.max_len:
            raise ContextError(f"{pos + 1} tokens do not fit a context of {self.max_len}")
        if self.rows(self.owner()) >= self.local_max:
            raise ContextError(f"rank {self.owner()}'s share of the cache is full "
                               f"({self.local_max} positions): a larger context")

    def attend(self, layer: int, pos, q: np.ndarray, k: np.ndarray, v: np.ndarray, window,
               rotate=None, softcap=None, scale=None) -> np.ndarray:
        """Write this rank's k, v (T, H_kv, D) and return causal attention of q (1, H, T, D)
        over every rank's positions up to each query's (rotate: unused, the streaming cache's)."""
        flags = dict(window=window, softcap=softcap, scale=scale,
                     kv_format=None if self.kv_dtype == "f32" else self.kv_dtype)
        r = self.comm.rank
        K, V = self.k[layer], self.v[layer]
        have = self.rows()
        if isinstance(pos, tuple):  # a prompt: this rank's new rows after its old ones, the ring
            kvformat.write_rows(k, K, have, self.kv_dtype)
            kvformat.write_rows(v, V, have, self.kv_dtype)
            every = [old + list(new) for old, new in zip(self.runs, self._pending)]
            out, _ = ring_attention(self.comm, q, pos, K, V, every, causal=True,
                                    stats=self.ring, **flags)
            return out
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
            for runs, new in zip(self.runs, self._pending):
                for run in new:
                    extend(runs, *run)
            self._length += sum(run_rows(r) for r in self._pending)
            self._pending = None
            return
        extend(self.runs[self.owner()], pos, 1)
        self._length = pos + 1

    keys_seen = KVCache.keys_seen  # keys a causal query at each position sees, over all ranks

    def decoded_keys(self, layer: int, kv_len: int):
        raise ContextError("attention maps are drawn in one process, not under context "
                           "parallelism")
