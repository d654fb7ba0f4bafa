"""numba's configuration: its cache in the user's cache folder (or off), its threading layer."""

import os
import subprocess
import sys

RUN_A_NUMBA_KERNEL = """
import numpy as np, numba
from selfattn import attention
from selfattn.attention import jit
q = np.ones((1, 2, 3, 32)); k = np.ones((1, 1, 40, 32))
attention(q, k, k, causal=True, impl="decode")  # float64: the numba kernel
print(jit.CACHE, numba.config.CACHE_DIR, numba.threading_layer())
"""


def _run(**settings):
    """The kernel in a fresh process with the user's cache settings replaced by `settings`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "NUMBA_THREADING_LAYER")}
    env.update(settings)
    return subprocess.run([sys.executable, "-c", RUN_A_NUMBA_KERNEL], capture_output=True,
                          text=True, env=env, timeout=600)


def test_numba_caches_in_the_users_cache_folder(tmp_path):
    r = _run(HOME=str(tmp_path))
    assert r.returncode == 0, r.stderr
    cache, where, layer = r.stdout.split()
    assert cache == "True" and where == str(tmp_path / ".cache" / "selfattn" / "numba")
    assert layer == "workqueue"
    assert any(name.endswith(".nbi") for _, _, files in os.walk(where) for name in files)


def test_no_writable_cache_folder_compiles_without_caching(tmp_path):
    home = tmp_path / "ro"
    home.mkdir()
    home.chmod(0o500)
    try:
        if os.access(home, os.W_OK):  # root writes anyway: point HOME at a file instead
            home = tmp_path / "a-file"
            home.write_text("")
        r = _run(HOME=str(home))
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == "False"
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_the_users_numba_settings_win(tmp_path):
    r = _run(NUMBA_CACHE_DIR=str(tmp_path / "mine"), NUMBA_THREADING_LAYER="workqueue")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == str(tmp_path / "mine")
