#!/usr/bin/env bash
# The portable level against the avx2 level, bit for bit, on x86 and on aarch64 (`make
# portable-check`; tests/test_portable.py runs it): tests/c/kernels_check.c built for x86 with
# both levels, and for aarch64 with the portable level (Debian's cross compiler, static), run
# under qemu-user. Every case must return 0 and the three sets of hashes (avx2, portable on x86,
# portable on aarch64) must be equal. Needs gcc-aarch64-linux-gnu and qemu-user.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=src/selfattn/native
OUT=build/portable-check
KERNELS="matvec attend ops quant dequant gemm step prefill peak isa"
# setup.py's FLAGS, -ffp-contract=off above all (GNU C would otherwise fuse a * b + c), but -O1 on
# x86: without -ffast-math the optimization level changes no result, and -O1 compiles faster;
# -O2 for aarch64, where gcc vectorizes (to NEON, checked below)
FLAGS="-std=gnu11 -pthread -fno-math-errno -ffp-contract=off -fno-wrapv -Wall -Wno-psabi -I$SRC"
AVX2="-mavx2 -mfma -mf16c"
for tool in gcc aarch64-linux-gnu-gcc qemu-aarch64; do
    command -v "$tool" >/dev/null || { echo "portable-check: $tool is missing (apt-get install gcc-aarch64-linux-gnu qemu-user)" >&2; exit 2; }
done
mkdir -p "$OUT/x86-avx2" "$OUT/x86-portable" "$OUT/arm64"

build() { # compiler, folder, level, flags...
    local cc=$1 dir=$2 level=$3
    shift 3
    for k in $KERNELS; do
        "$cc" $FLAGS "$@" -DSA_ISA="$level" -c "$SRC/$k.c" -o "$dir/$k.o" &
    done
    wait
}
build gcc "$OUT/x86-avx2" avx2 -O1 $AVX2
build gcc "$OUT/x86-portable" portable -O1 -DSA_PORTABLE
build aarch64-linux-gnu-gcc "$OUT/arm64" portable -O2 -DSA_PORTABLE
gcc -O1 $FLAGS tests/c/kernels_check.c "$SRC/pool.c" "$OUT"/x86-avx2/*.o "$OUT"/x86-portable/*.o -lm -o "$OUT/check-x86"
aarch64-linux-gnu-gcc -O1 -static $FLAGS tests/c/kernels_check.c "$SRC/pool.c" "$OUT"/arm64/*.o -lm -o "$OUT/check-arm64"
# NEON, not scalar code: the aarch64 build's fused multiply-adds are vector instructions
neon=$(aarch64-linux-gnu-objdump -d "$OUT/arm64/attend.o" | grep -c "fmla.*v[0-9]*\.4s" || true)
if [ "$neon" -lt 100 ]; then
    echo "portable-check: the aarch64 build has no NEON fmla in attend.o" >&2
    exit 1
fi

rm -f "$OUT"/*.txt
"$OUT/check-x86" portable > "$OUT/x86-portable.txt"
qemu-aarch64 "$OUT/check-arm64" > "$OUT/arm64-portable.txt"
others="x86-portable arm64-portable"
if "$OUT/check-x86" avx2 > "$OUT/avx2.txt" 2>/dev/null; then
    ref=avx2
else # a CPU without AVX2: the portable levels against each other
    rm -f "$OUT/avx2.txt"
    ref=x86-portable others=arm64-portable
    echo "portable-check: this CPU does not run the avx2 level; x86's portable level is the reference"
fi
n=$(wc -l < "$OUT/$ref.txt")
if grep -vh " rc=0 " "$OUT"/*.txt; then
    echo "portable-check: a kernel returned an error (above)" >&2
    exit 1
fi
fail=0
for other in $others; do
    if ! diff <(cut -d' ' -f2- "$OUT/$ref.txt") <(cut -d' ' -f2- "$OUT/$other.txt") >&2; then
        echo "portable-check: $other differs from $ref (lines above: < $ref, > $other)" >&2
        fail=1
    fi
done
[ "$fail" = 0 ] && echo "portable-check: $n cases, $ref = ${others// / = } (aarch64 under qemu), bit for bit"
exit "$fail"
