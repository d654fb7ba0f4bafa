"""The compiled kernels (src/selfattn/native/*.c), built at install time. Everything else is in
pyproject.toml. The extension is optional: without a C compiler selfattn installs and runs on its
numba kernels alone (selfattn.native.available() is then False)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "selfattn.native._kernels",
    sources=[f"src/selfattn/native/{name}.c" for name in ("module", "pool", "matvec", "attend", "ops", "quant", "dequant", "gemm", "step", "prefill", "peak", "pages")],
    depends=["src/selfattn/native/simd.h", "src/selfattn/native/kernels.h",
             "src/selfattn/native/unpack.h"],
    # -fno-wrapv undoes the -fwrapv that Python's own CFLAGS bring (signed overflow defined to
    # wrap, which CPython needs and these kernels do not): with it gcc gave up loop optimizations
    # that made the decode kernel 10-25% and the prefill kernel 2-6% slower here
    extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-fno-math-errno", "-ffp-contract=off",
                        "-fno-wrapv"],
    extra_link_args=["-pthread"],
    optional=True,
)])
