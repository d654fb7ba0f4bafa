"""The transport under context parallelism: an MPI communicator (mpi4py) whose every wait has a
deadline, and which counts the bytes it sends.

MPI moves large messages only inside MPI calls (MPICH has no progress thread by default), so the
ring's compute calls `progress()` between blocks: a transfer then advances while the next block is
being computed, not only in the final wait. Waits poll with a short spin, then short sleeps, so a
rank oversubscribed on a core gives that core back to the others.
"""

import sys
import time

import numpy as np

from ..errors import DistributedError

TIMEOUT_S = 120.0  # a wait on the other ranks longer than this is an error, not a hang
ABORT_GRACE_S = 0.5  # what a failing rank wrote reaches mpiexec before MPI_Abort ends the launch
_SPIN_S = 1e-3


def mpi():
    """mpi4py's MPI module (importing it starts MPI); DistributedError naming what is missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DistributedError("context parallelism needs mpi4py and an MPI runtime: "
                               "pip install 'selfattn[distributed]' (mpi4py and MPICH's wheel), "
                               f"then launch with mpiexec -n R ({e})") from e
    except (RuntimeError, OSError) as e:  # mpi4py without a loadable libmpi
        raise DistributedError(f"mpi4py found no MPI library ({e}): pip install mpich (or "
                               "'selfattn[distributed]'), then launch with mpiexec -n R") from e
    return MPI


class Comm:
    """One rank's view of R ranks: rank, size, non-blocking ring exchange and gathers with
    deadlines, and the bytes this rank has sent."""

    def __init__(self, comm=None, timeout_s: float = TIMEOUT_S):
        MPI = mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        if not timeout_s > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.bytes_sent = 0
        self.wait_s = 0.0  # time blocked in wait() (communication not hidden by compute)
        self.before_first = None  # called once, before this rank's next exchange (the CLI's
        # check that every rank got through its set-up)

    def _first(self):
        hook, self.before_first = self.before_first, None
        if hook is not None:
            hook()

    def require(self, at_least: int = 2):
        if self.size < at_least:
            raise DistributedError(f"context parallelism runs on {at_least} or more MPI ranks, "
                                   f"this launch has {self.size}: start it with "
                                   f"mpiexec -n R (R >= {at_least})")

    def wait(self, requests, what: str):
        """Complete `requests`; DistributedError after timeout_s (a rank died or hangs)."""
        Request = self.MPI.Request
        t0 = time.perf_counter()
        deadline = t0 + self.timeout_s
        pause = 0.0
        while not Request.Testall(requests):
            now = time.perf_counter()
            if now > deadline:
                for r in requests:
                    try:
                        r.Cancel()
                    except Exception:  # noqa: BLE001 - cancelling is best effort here
                        pass
                raise DistributedError(f"rank {self.rank}: {what} had no answer from the other "
                                       f"ranks in {self.timeout_s:.0f} s (a rank stopped or "
                                       "hangs)")
            if now - t0 > _SPIN_S:
                pause = min(2 * pause or 5e-5, 2e-3)
                time.sleep(pause)
        self.wait_s += time.perf_counter() - t0

    def progress(self, requests) -> bool:
        """Let pending transfers move (one MPI test); True once all are done."""
        return bool(requests) and self.MPI.Request.Testall(requests)

    def ring_post(self, send: list, recv: list, step: int):
        """Start sending the arrays `send` to the next rank and receiving `recv` (preallocated,
        contiguous; as many, not necessarily as large) from the previous one. Returns the
        requests (wait() them)."""
        self._first()
        right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        reqs = []
        base = step * 1024  # a tag per array and step (a rank's runs: far fewer)
        for i, r in enumerate(recv):
            reqs.append(self.comm.Irecv([_bytes(r), self.MPI.BYTE], source=left, tag=base + i))
        for i, s in enumerate(send):
            reqs.append(self.comm.Isend([_bytes(s), self.MPI.BYTE], dest=right, tag=base + i))
            self.bytes_sent += s.nbytes
        return reqs

    def allgather(self, x: np.ndarray, what: str) -> np.ndarray:
        """Every rank's x (same shape and dtype) stacked in rank order: (R, *x.shape)."""
        self._first()
        x = np.ascontiguousarray(x)
        out = np.empty((self.size,) + x.shape, x.dtype)
        req = self.comm.Iallgather([_bytes(x), self.MPI.BYTE], [_bytes(out), self.MPI.BYTE])
        self.bytes_sent += x.nbytes * (self.size - 1)
        self.wait([req], what)
        return out

    def bcast(self, x: np.ndarray, root: int, what: str) -> np.ndarray:
        """root's x (same shape and dtype on every rank) on every rank."""
        self._first()
        x = np.ascontiguousarray(x)
        req = self.comm.Ibcast([_bytes(x), self.MPI.BYTE], root=root)
        if self.rank == root:
            self.bytes_sent += x.nbytes * (self.size - 1)
        self.wait([req], what)
        return x

    def bcast_object(self, obj, root: int, what: str):
        """root's obj (picklable) on every rank."""
        import pickle

        data = pickle.dumps(obj) if self.rank == root else b""
        size = self.bcast(np.array([len(data)], np.int64), root, what)[0]
        buf = np.frombuffer(data, np.uint8).copy() if self.rank == root else \
            np.empty(int(size), np.uint8)
        return pickle.loads(self.bcast(buf, root, what).tobytes())

    def barrier(self, what: str):
        self._first()
        self.wait([self.comm.Ibarrier()], what)

    def abort(self, code: int = 2):
        """End every rank of the launch (after an error that leaves the others waiting). What this
        rank wrote is flushed first and mpiexec given a moment to pass it on: MPI_Abort ends the
        launch at once, and on a loaded host lines still in mpiexec's pipes were lost (a
        traceback cut after its first line)."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)


def _bytes(x: np.ndarray) -> np.ndarray:
    """A contiguous array as a flat byte view (MPI counts bytes)."""
    return x.reshape(-1).view(np.uint8)
