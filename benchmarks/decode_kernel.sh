#!/usr/bin/env bash
# The decode kernel alone, from C (no Python between calls), beside the sequential sum the
# roofline measures read bandwidth with, over the same bytes. Built at the widest level this CPU
# runs (the kernels' own sources and flags, setup.py's LEVELS); K/V float32, one query token.
#
#     bash benchmarks/decode_kernel.sh [THREADS ...]      (default: 1 2)
#
# Rows: from L2 (one kv head, 1,024 keys) to memory (eight kv heads, 65,536 keys, 512 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=src/selfattn/native
OUT=build/decode-kernel
FLAGS="-O3 -std=gnu11 -pthread -fno-math-errno -ffp-contract=off -fno-wrapv -I$SRC"
if grep -qw avx512f /proc/cpuinfo && grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo \
    && grep -qw avx512dq /proc/cpuinfo; then
    LEVEL=avx512 ISA="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c"
elif grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo; then
    LEVEL=avx2 ISA="-mavx2 -mfma -mf16c"
else
    echo "decode_kernel: this CPU has no AVX2 + FMA" >&2
    exit 2
fi
mkdir -p "$OUT"
for k in attend peak; do gcc $FLAGS $ISA -DSA_ISA=$LEVEL -c "$SRC/$k.c" -o "$OUT/$k.o"; done
gcc $FLAGS $ISA -DSA_ISA=$LEVEL benchmarks/c/decode_kernel.c "$SRC/pool.c" "$OUT/attend.o" "$OUT/peak.o" \
    -lm -o "$OUT/decode_kernel"
echo "$(date -u +%F) · $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') · level $LEVEL · $(nproc) cores"
echo "medians of 15 calls, GB/s of K + V"
printf "%-8s %-6s %-3s %-4s %-6s %9s %8s %11s %11s\n" threads H_kv G D S "K+V MB" decode sequential "decode/seq"
for t in ${@:-1 2}; do
    for shape in "1 4 128 1024" "3 3 64 4096" "8 4 128 16384" "3 3 64 65536" "8 4 128 65536"; do
        "$OUT/decode_kernel" "$t" $shape | awk '{printf "%-8s %-6s %-3s %-4s %-6s %9s %8s %11s %10.0f%%\n", $1, $2, $3, $4, $5, $6, $7, $8, 100 * $7 / $8}'
    done
done
