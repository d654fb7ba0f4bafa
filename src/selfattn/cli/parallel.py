"""--context-parallel: `mpiexec -n R selfattn generate --context-parallel ...`.

Every rank runs the same command. The prompt's attention is split across the ranks (ring
prefill) and the KV cache is sharded (decode); rank 0 prints. Before the ranks' first exchange,
whatever it is, `agree` asks whether every rank got through its set-up (arguments, files, the
model): if one did not, the lowest such rank reports its error in one line and all exit 2. An
error after that (a rank that stops answering, memory on one rank) is reported by the rank that
has it, and the launch is ended (MPI_Abort), so no rank waits for one that is gone.
"""

import contextlib
import sys

from .common import CLIError


class Parallel:
    """One rank's part in a launch: its Comm, whether it prints, its threads."""

    def __init__(self, args):
        from ..distributed import Comm
        from ..runtime import num_threads, set_num_threads

        self.comm = Comm(timeout_s=args.cp_timeout)
        self.comm.require(2)
        self.rank, self.size = self.comm.rank, self.comm.size
        self.talking = False
        self.wait_at_prefill = 0.0  # Comm.wait_s when the prompt was through (prefilled())
        # the cores this process may use, shared by the ranks on this machine (the ranks whose
        # host name is this one's, gathered with a deadline as every exchange here)
        import hashlib
        import socket

        import numpy as np

        me = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:8], "little",
                            signed=True)
        hosts = self.comm.allgather(np.array([me], np.int64), "the ranks' host names")
        self.local_ranks = int((hosts == me).sum())
        self.threads = max(1, num_threads() // self.local_ranks)
        self.comm.before_first = self.agree  # what the command exchanges first waits for it
        set_num_threads(self.threads)

    def prefilled(self):
        """The prompt is through: what the ranks wait for from here on is decode's."""
        self.wait_at_prefill = self.comm.wait_s

    @property
    def prints(self) -> bool:
        return self.rank == 0

    def agree(self):
        """The ranks' first exchange (Comm calls it before any other): did every rank get
        through its set-up? If not, exit 2, the failing rank saying why (`errors`)."""
        import numpy as np

        if self.talking:
            return
        ok = self.comm.allgather(np.ones(1, np.int8), "the ranks' start")
        self.talking = True
        if not ok.all():
            raise _OtherRankFailed()

    def shared_seed(self, seed):
        """The sampling seed every rank uses: the given one, or rank 0's fresh one."""
        import numpy as np

        if seed is not None:
            return seed
        mine = np.array([np.random.SeedSequence().entropy % (1 << 63)], np.int64)
        return int(self.comm.bcast(mine, 0, "the sampling seed")[0])

    def share(self, make, what: str):
        """make() on rank 0, its result on every rank (rank 0's roofline, say)."""
        return self.comm.bcast_object(make() if self.rank == 0 else None, 0, what)

    def cache(self, model_args, policy, ctx, kv_dtype):
        from ..distributed.cache import ShardedKVCache

        if policy.kind != "full":
            raise CLIError(f"--context-parallel keeps every position (the full policy); "
                           f"--context-policy {policy} is not supported with it")
        return ShardedKVCache.for_model(self.comm, model_args, ctx, kv_dtype)

    def figures(self, cache) -> dict:
        """What the ranks' attention cost in transfers, as rank 0 saw it."""
        ring, n_layers = cache.ring, cache.k.shape[0]
        return dict(ranks=self.size, threads_per_rank=self.threads,
                    kv_cache_bytes_per_rank=cache.nbytes,
                    ring_bytes_sent_per_layer=ring.bytes_sent // n_layers,
                    ring_hidden_share=ring.hidden_share,
                    ring_exposed_s=ring.exposed_s, ring_in_flight_s=ring.in_flight_s,
                    decode_wait_s=self.comm.wait_s - self.wait_at_prefill)

    @contextlib.contextmanager
    def errors(self, command: str):
        """Report an error the way the module docstring says."""
        import numpy as np

        try:
            yield
        except _OtherRankFailed:
            raise SystemExit(2) from None
        except BaseException as e:
            if isinstance(e, SystemExit) and not e.code:
                raise
            text = e if not isinstance(e, KeyboardInterrupt) else "interrupted"
            line = f"selfattn {command} (rank {self.rank} of {self.size}): " \
                   f"{' '.join(str(text).split())}"
            if not self.talking:  # set-up: the others learn it at their first exchange
                self.comm.before_first = None
                ok = self.comm.allgather(np.zeros(1, np.int8), "the ranks' start")
                if int(np.flatnonzero(ok == 0)[0]) != self.rank:
                    raise SystemExit(2) from None
                if self.rank == 0:
                    raise  # the usual one line
                print(line, file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            print(line, file=sys.stderr, flush=True)
            self.comm.abort(2)


class _OtherRankFailed(Exception):
    """Another rank's set-up failed (it says why)."""


def start(args):
    """A Parallel for --context-parallel, else None."""
    return Parallel(args) if getattr(args, "context_parallel", False) else None


def run(args, command: str, here):
    """here(args, cp): on this process (cp None), or as this rank of a --context-parallel
    launch, its errors reported as the module docstring says."""
    cp = start(args)
    if cp is None:
        return here(args, None)
    with cp.errors(command):
        return here(args, cp)


def options(parser):
    parser.add_argument("--context-parallel", action="store_true",
                        help="split the prompt's attention and the KV cache across the ranks "
                             "of an MPI launch: mpiexec -n R selfattn ... --context-parallel "
                             "(needs selfattn[distributed])")
    parser.add_argument("--cp-timeout", type=float, default=120.0, metavar="S",
                        help="with --context-parallel: seconds to wait for the other ranks "
                             "before giving up")
