"""Every path works in a forked child: the compiled kernels' pool, the prefill thread pool and the
numba layer, after the parent used them, and while another thread is inside a kernel."""

import multiprocessing
import os
import threading

import numpy as np
import pytest

from selfattn import attention, native

rng = np.random.default_rng(5)
Q = rng.standard_normal((1, 4, 40, 32), np.float32)
K = rng.standard_normal((1, 2, 300, 32), np.float32)
MASK = rng.random((1, 4, 40, 300)) < 0.8

PATHS = {  # each exercises a different pool or layer
    "compiled prefill": lambda: attention(Q, K, K, causal=True),
    "compiled decode": lambda: attention(Q[:, :, -2:], K, K, causal=True),
    "masked prefill (numba + thread pool)": lambda: attention(Q, K, K, mask=MASK, impl="flash"),
    "float64 decode (numba parallel)": lambda: attention(Q[:, :, -2:].astype(np.float64),
                                                         K.astype(np.float64), K.astype(np.float64),
                                                         causal=True, impl="decode"),
}


def _in_child(fn, timeout=120):
    """fn() in a forked child; its result, or the child's failure."""
    with multiprocessing.get_context("fork").Pool(1) as p:
        return p.apply_async(fn).get(timeout=timeout)


@pytest.mark.parametrize("name", list(PATHS))
def test_every_path_works_in_a_child_after_the_parent_used_them_all(name):
    want = {n: f() for n, f in PATHS.items()}  # the parent starts every pool and layer
    got = _in_child(_Call(name))
    np.testing.assert_array_equal(got, want[name])


class _Call:
    def __init__(self, name):
        self.name = name

    def __call__(self):
        return PATHS[self.name]()


def test_a_fork_while_another_thread_is_inside_a_kernel():
    """fork() waits for the kernel in flight, so the child's pool and lock are not left held."""
    if not native.available():
        pytest.skip("no compiled kernels")
    want = PATHS["compiled prefill"]()
    big_q = rng.standard_normal((1, 8, 1024, 64), np.float32)
    big_k = rng.standard_normal((1, 8, 1024, 64), np.float32)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            attention(big_q, big_k, big_k, causal=True)
    t = threading.Thread(target=busy)
    t.start()
    try:
        for _ in range(4):
            pid = os.fork()
            if pid == 0:  # the child: one kernel call, then report through the exit status
                try:
                    ok = np.array_equal(PATHS["compiled prefill"](), want)
                finally:
                    os._exit(0 if ok else 1)
            waited = 0.0
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if waited > 60:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child hung")
                threading.Event().wait(0.05)
                waited += 0.05
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        t.join()
