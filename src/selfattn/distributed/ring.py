"""Context-parallel attention: ring prefill (zigzag split) and sharded-KV decode, exact.

Each rank holds some runs of positions: (start, count) pairs, ascending. Attention of a query
block over a key block at known positions is one `selfattn.attention` call with a band window
that puts both at their true positions; the (out, lse) of every key block a query sees merge
exactly by log-sum-exp (`selfattn.merge`).

Ring prefill: R ranks; the sequence is cut into 2R chunks and rank r holds chunks r and 2R-1-r
(ring-flash-attention's zigzag), so under a causal mask every rank scores about the same number
of pairs. In step s (0 .. R-1) a rank attends its queries to the K/V of rank r-s while it sends
that block on to rank r+1 and receives the next from rank r-1: R-1 transfers of 2·c·H_kv·row
bytes per rank and layer, c the rank's tokens.

Sharded decode: each rank attends the new query to its own slice of the cache; the (out, lse)
pairs are gathered and merged in rank order on every rank (the same bits everywhere).
"""

import time

import numpy as np

from ..attention import attention
from ..attention.api import _check_window
from ..attention.merge import merge_stacked


def zigzag(n: int, ranks: int) -> list[tuple[tuple[int, int], ...]]:
    """Per rank, the runs ((start, count), ...) it holds of n positions: chunks r and 2R-1-r of
    2R near-equal chunks (np.array_split's sizes). ValueError when a rank would get nothing."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if n < 2 * ranks:
        raise ValueError(f"{n} positions cannot be split over {ranks} ranks (two chunks each "
                         f"need at least {2 * ranks} positions)")
    sizes = [len(c) for c in np.array_split(np.arange(n), 2 * ranks)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [((starts[r], sizes[r]), (starts[2 * ranks - 1 - r], sizes[2 * ranks - 1 - r]))
            for r in range(ranks)]


def run_rows(runs) -> int:
    return sum(c for _, c in runs)


def positions(runs) -> np.ndarray:
    return np.concatenate([np.arange(s, s + c) for s, c in runs]) if runs else \
        np.zeros(0, np.int64)


def first_row_at(runs, p: int) -> int:
    """The first row (of rows laid out as ascending runs) at position p or later."""
    row = 0
    for s, c in runs:
        if s + c > p:
            return row + max(0, p - s)
        row += c
    return row


def block_attention(q, q_start: int, k, v, k_start: int, band, **flags):
    """q (1, H, T, D) at positions q_start.., k and v (1, H_kv, S, row) at k_start..; band
    (left, right): a query at p sees keys p-left .. p+right (None: unbounded on that side).
    -> (row0, out (1, H, rows, Dv), lse (1, H, rows)) for the query rows [row0, row0+rows) that
    can see a key of the block, or None. flags: softcap, scale, kv_format."""
    left, right = band
    q_end, k_end = q_start + q.shape[2], k_start + k.shape[2]
    k_hi = k_end if right is None else min(k_end, q_end + right)
    k_lo = k_start if left is None else max(k_start, q_start - left)
    q_lo = q_start if right is None else max(q_start, k_lo - right)
    q_hi = q_end if left is None else min(q_end, k_hi + left)
    if k_hi <= k_lo or q_hi <= q_lo:
        return None
    # bottom-right alignment puts query row i at key index S' - T' + i; its true position is
    # delta = q_hi - k_hi further right, so the band shifts by delta (both sides stay >= 0)
    delta = q_hi - k_hi
    shifted = (None if left is None else left - delta, None if right is None else right + delta)
    out, lse = attention(q[:, :, q_lo - q_start:q_hi - q_start],
                         k[:, :, k_lo - k_start:k_hi - k_start],
                         v[:, :, k_lo - k_start:k_hi - k_start], window=shifted,
                         return_lse=True, **flags)
    return q_lo - q_start, out, lse


def visibility(causal: bool, window):
    """(left, right) from attention's causal and window arguments (its conventions)."""
    left, right = _check_window(window)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


class Accumulator:
    """(out, lse) over the key blocks seen so far, for T query rows; merged one block at a time,
    in place: out = out·e^(lse-new) + out_b·e^(lse_b-new), new = log(e^lse + e^lse_b)."""

    def __init__(self, H: int, T: int, Dv: int):
        self.out = np.zeros((1, H, T, Dv), np.float32)
        self.lse = np.full((1, H, T), -np.inf, np.float32)

    def add(self, row0: int, out, lse):
        """out (1, H, rows, Dv), a fresh array (it is scaled in place), and its lse."""
        rows = slice(row0, row0 + out.shape[2])
        acc, acc_lse = self.out[:, :, rows], self.lse[:, :, rows]
        lse = lse.astype(np.float32, copy=False)
        new = np.logaddexp(acc_lse, lse)
        seen = np.isfinite(new)  # rows that saw no key in either part stay 0 / -inf
        safe = np.where(seen, new, 0)
        with np.errstate(invalid="ignore", over="ignore"):
            w_acc = np.where(seen, np.exp(acc_lse - safe), 0).astype(np.float32)[..., None]
            w_new = np.where(seen, np.exp(lse - safe), 0).astype(np.float32)[..., None]
        out = np.asarray(out, np.float32)
        np.multiply(out, w_new, out=out)
        np.multiply(acc, w_acc, out=acc)
        np.add(acc, out, out=acc)
        acc_lse[...] = new


def by_runs(x, runs) -> list:
    """x (1, heads, rows, row) laid out as runs -> one contiguous array per run."""
    parts, r = [], 0
    for _, c in runs:
        parts.append(np.ascontiguousarray(x[:, :, r:r + c]))
        r += c
    return parts


def attend_block(q_parts, q_runs, k, v, k_pos, acc: Accumulator, band, between=None,
                 **flags):
    """Add to acc the attention of the query runs (q_parts: one array per run, rows laid out as
    q_runs) over key rows k, v (1, H_kv, S, row) at ascending positions k_pos (S,).

    For each query run the rows every query of it sees are one contiguous range (positions
    ascend): one call, no mask. Only the rows near the run's band edges, seen by some of its
    queries, are attended run by run at their positions (block_attention). between(), if given,
    runs after each call (the ring's progress)."""
    left, right = band
    find = np.searchsorted
    qr = 0
    for q, (qs, qn) in zip(q_parts, q_runs):
        last = qs + qn - 1
        s0 = 0 if left is None else find(k_pos, qs - left)  # rows some query sees
        s1 = len(k_pos) if right is None else find(k_pos, last + right, "right")
        a0 = s0 if left is None else find(k_pos, last - left)  # rows all queries see
        a1 = s1 if right is None else find(k_pos, qs + right, "right")
        ranges = [(s0, s1)]
        if a0 < a1:
            out, lse = attention(q, k[:, :, a0:a1], v[:, :, a0:a1], return_lse=True, **flags)
            acc.add(qr, out, lse)
            if between is not None:
                between()
            ranges = [(s0, a0), (a1, s1)]
        for lo, hi in ranges:  # the edges, one run of consecutive positions at a time
            breaks = np.flatnonzero(np.diff(k_pos[lo:hi]) != 1) + 1 + lo
            for r0, r1 in zip([lo, *breaks], [*breaks, hi]):
                if r1 <= r0:
                    continue
                got = block_attention(q, qs, k[:, :, r0:r1], v[:, :, r0:r1], int(k_pos[r0]),
                                      band, **flags)
                if got is not None:
                    acc.add(qr + got[0], got[1], got[2])
                if between is not None:
                    between()
        qr += qn


def ring_attention(comm, q, q_runs, k, v, kv_runs, *, causal=True, window=None, softcap=None,
                   scale=None, kv_format=None, stats=None):
    """This rank's part of exact attention over all ranks' keys.

    q (1, H, T, D): this rank's queries at q_runs; k, v (1, H_kv, S, row): this rank's keys at
    kv_runs[comm.rank] (kv_runs: every rank's runs, the same list on each; a rank's runs may be
    many, e.g. a prompt's after decoded tokens). Returns (out (1, H, T, Dv) float32, lse
    (1, H, T)). stats (RingStats), if given, collects the bytes sent and the time the transfers
    were in flight and exposed."""
    R, r = comm.size, comm.rank
    flags = dict(softcap=softcap, scale=scale, kv_format=kv_format)
    band = visibility(causal, window)
    H, T = q.shape[1], q.shape[2]
    acc = Accumulator(H, T, q.shape[3])
    q_parts = by_runs(q, q_runs)
    n = run_rows(kv_runs[r])
    held = [np.ascontiguousarray(k[:, :, :n]), np.ascontiguousarray(v[:, :, :n])]
    for step in range(R):
        src = (r - step) % R
        reqs = []
        if step < R - 1:  # the next block (from rank r-step-1) arrives while this one is used
            rows = run_rows(kv_runs[(r - step - 1) % R])
            nxt = [np.empty(x.shape[:2] + (rows,) + x.shape[3:], x.dtype) for x in held]
            t_post = time.perf_counter()
            sent = comm.bytes_sent
            reqs = comm.ring_post(held, nxt, step)
        done = {"at": None}

        def between():
            if reqs and done["at"] is None and comm.progress(reqs):
                done["at"] = time.perf_counter()

        if held[0].shape[2]:
            attend_block(q_parts, q_runs, held[0], held[1], positions(kv_runs[src]), acc, band,
                         between, **flags)
        if reqs:
            t_compute = time.perf_counter()
            if done["at"] is None:
                comm.wait(reqs, f"ring step {step + 1} of {R - 1}")
                done["at"] = time.perf_counter()
            if stats is not None:
                stats.add(comm.bytes_sent - sent, done["at"] - t_post,
                          max(0.0, done["at"] - t_compute))
            held = nxt
    return acc.out, acc.lse


def sharded_decode(comm, q, q_pos: int, k, v, kv_runs_local, *, window=None, softcap=None,
                   scale=None, kv_format=None):
    """One query step q (1, H, T, D) at positions q_pos .. q_pos+T-1 over every rank's slice
    of the cache: this rank's slice k, v (1, H_kv, S, row), whose first rows are at
    kv_runs_local (ascending; rows past them are ignored, so a preallocated cache is read in
    place). Each rank attends locally; the (out, lse) pairs are gathered and merged in rank
    order, so every rank returns the same (out (1, H, T, Dv) float32, lse)."""
    H, T, Dv = q.shape[1], q.shape[2], q.shape[3]
    flags = dict(softcap=softcap, scale=scale, kv_format=kv_format)
    n = run_rows(kv_runs_local)
    if T == 1 and n and kv_runs_local[-1][0] + kv_runs_local[-1][1] <= q_pos + 1:
        # every local key is at or before the query: one call over the rows in the window,
        # which are a suffix of the local rows (ascending positions)
        lo = 0 if window is None else first_row_at(kv_runs_local, q_pos - window + 1)
        out = np.zeros((1, H, 1, Dv), np.float32)
        lse = np.full((1, H, 1), -np.inf, np.float32)
        if lo < n:
            kk, vv = (x[:, :, lo:n] if lo else x for x in (k, v))
            out, lse = attention(q, kk, vv, kv_len=n - lo, return_lse=True, **flags)
    else:
        acc = Accumulator(H, T, Dv)
        if n:
            attend_block([q], ((q_pos, T),), k[:, :, :n], v[:, :, :n], positions(kv_runs_local),
                         acc, visibility(True, window), **flags)
        out, lse = acc.out, acc.lse
    packed = np.concatenate([out.reshape(-1), lse.reshape(-1)]).astype(np.float32, copy=False)
    every = comm.allgather(packed, "the decode step's gather")
    size = out.size
    outs = every[:, :size].reshape((comm.size,) + out.shape)
    lses = every[:, size:].reshape((comm.size,) + lse.shape)
    return merge_stacked(outs, lses)


class RingStats:
    """What the ring's transfers cost: bytes this rank sent, seconds they were in flight, and
    the seconds of that which no compute covered (the rank waited)."""

    def __init__(self):
        self.bytes_sent = 0
        self.in_flight_s = 0.0
        self.exposed_s = 0.0
        self.transfers = 0

    def add(self, nbytes: int, in_flight_s: float, exposed_s: float):
        self.bytes_sent += nbytes
        self.in_flight_s += in_flight_s
        self.exposed_s += exposed_s
        self.transfers += 1

    @property
    def hidden_share(self) -> float:
        """The share of the transfers' time in flight that compute covered."""
        if self.in_flight_s <= 0:
            return 1.0
        return max(0.0, 1.0 - self.exposed_s / self.in_flight_s)

    def as_dict(self):
        return dict(bytes_sent=self.bytes_sent, in_flight_s=self.in_flight_s,
                    exposed_s=self.exposed_s, hidden_share=self.hidden_share,
                    transfers=self.transfers)
