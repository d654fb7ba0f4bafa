"""The portable level (the kernels over portable.h's plain-C intrinsics) gives the avx2 level's
bits on x86 and on aarch64: tests/c/portable_check.sh builds the C-level check for both (Debian's
gcc-aarch64-linux-gnu) and runs the aarch64 one under qemu-user. In-process, the levels' bits
are compared in test_native.py (test_every_level_gives_the_same_bits)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.environ.get("SELFATTN_NATIVE") == "0",
                    reason="a C-level check, the same in both passes: it runs in the compiled one")
def test_portable_level_matches_avx2_on_x86_and_aarch64():
    missing = [t for t in ("gcc", "aarch64-linux-gnu-gcc", "qemu-aarch64") if not shutil.which(t)]
    if missing:
        msg = (f"{', '.join(missing)} missing: Debian's gcc-aarch64-linux-gnu and qemu-user "
               "(.ci/run installs them)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    r = subprocess.run(["bash", str(ROOT / "tests/c/portable_check.sh")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bit for bit" in r.stdout
