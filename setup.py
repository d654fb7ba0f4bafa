"""The compiled kernels (src/selfattn/native/*.c), built at install time. Everything else is in
pyproject.toml. The extension is optional: without a C compiler selfattn installs and runs on its
numba kernels alone (selfattn.native.available() is then False).

The kernel sources are compiled once per instruction-set level, ggml's way: each copy with its
level's -m flags and SA_ISA set, so that every entry point and the table of them take the level's
suffix (kernels.h). module.c picks one table at import from cpuid and the OS's enabled state."""

import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "src/selfattn/native"
# compiled once, at the baseline: the Python entry points, the thread pool, the page toucher
COMMON = ["module", "pool", "pages"]
# compiled once per level (isa.c: that level's table of entry points)
KERNELS = ["matvec", "attend", "ops", "quant", "dequant", "gemm", "step", "prefill", "peak", "isa"]
# level -> its flags; module.c's ISA table lists the same names. The portable level is the same
# sources over portable.h's plain-C intrinsics (SA_PORTABLE): on x86 beside the others, chosen
# only by SELFATTN_ISA=portable; on any other CPU (aarch64: NEON, by the compiler) the one level.
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
LEVELS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "portable": ["-DSA_PORTABLE", "-Wno-psabi"],
} if X86 else {"portable": ["-DSA_PORTABLE", "-Wno-psabi"]}
# -fno-wrapv undoes the -fwrapv that Python's own CFLAGS bring (signed overflow defined to wrap,
# which CPython needs and these kernels do not): with it gcc gave up loop optimizations that made
# the decode kernel 10-25% and the prefill kernel 2-6% slower here
FLAGS = ["-O3", "-std=gnu11", "-pthread", "-fno-math-errno", "-ffp-contract=off", "-fno-wrapv"]
HEADERS = [f"{NATIVE}/{h}.h" for h in ("simd", "vec", "kernels", "unpack", "portable")]


class BuildLevels(build_ext):
    """Compiles KERNELS once per level into its own folder, then links them into the extension."""

    def build_extension(self, ext):
        objects = []
        for level, flags in LEVELS.items():
            objects += self.compiler.compile(
                [f"{NATIVE}/{k}.c" for k in KERNELS],
                output_dir=os.path.join(self.build_temp, level), macros=[("SA_ISA", level)],
                extra_postargs=FLAGS + flags, depends=HEADERS)
        ext.extra_objects = objects
        super().build_extension(ext)


setup(cmdclass={"build_ext": BuildLevels}, ext_modules=[Extension(
    "selfattn.native._kernels",
    sources=[f"{NATIVE}/{name}.c" for name in COMMON],
    depends=HEADERS + [f"{NATIVE}/{k}.c" for k in KERNELS],
    extra_compile_args=FLAGS,
    extra_link_args=["-pthread"],
    optional=True,
)])
