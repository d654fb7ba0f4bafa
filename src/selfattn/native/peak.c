/* This machine's roofs: float32 FMA throughput, the arithmetic roof of every float32 kernel
 * here, and read bandwidth, the roof of every kernel that streams weights or K/V.
 *
 * NumPy's BLAS matmul, the roofline's other compute figure, is a kernel too (it loads, packs and
 * stores); this is the number of fused multiply-adds the cores retire when nothing else runs.
 * Each task runs `iters` steps of twelve independent FMA chains of SA_W lanes (enough to keep two
 * FMA pipes busy through a 4-5 cycle latency), registers only, at the level's widest vectors (on
 * an AVX-512 CPU 512-bit FMAs are the ceiling, twice the 256-bit one where it has two 512-bit
 * pipes). The chains start from different
 * values, so a compiler cannot fold them into one (identical chains are folded, and such a loop
 * reads 1.5x too fast here). */
#include "simd.h"

#define CHAINS 12

typedef struct {
    int64_t iters;
    float *sums; /* one a task: the chains' sum, so the loop's result is used */
} peak_args;

static void peak_task(const void *ctx, int64_t task) {
    const peak_args *A = ctx;
    const sa_vf m = vf_set1(0.999999f), c = vf_set1(1e-3f);
    sa_vf a[CHAINS];
    for (int i = 0; i < CHAINS; i++) a[i] = vf_set1((float)(i + 1));
    for (int64_t it = 0; it < A->iters; it++)
        for (int i = 0; i < CHAINS; i++) a[i] = vf_fmadd(a[i], m, c);
    sa_vf s = a[0];
    for (int i = 1; i < CHAINS; i++) s = vf_add(s, a[i]);
    A->sums[task] = vf_hsum(s);
}

/* tasks x iters x CHAINS FMAs of SA_W lanes on the pool's threads; sums (tasks) gets each task's
 * chain sum (a_n = m^n a_0 + c (1 - m^n) / (1 - m) per lane, up to rounding) */
void sa_fma_loop(int64_t iters, int64_t tasks, float *sums) {
    peak_args A = {iters, sums};
    sa_pool_run(peak_task, &A, tasks);
}

/* Read bandwidth: the sum of a large array, in tasks of READ_TASK bytes taken dynamically by the
 * pool's threads, eight independent accumulators of SA_W lanes a thread, as the decode kernels stream
 * (the numba reader this completes read 9.3 GB/s on a Zen 4 where the decode kernel reached
 * 18). Software prefetch made it slower here: 15-16 against 21-22 GB/s on one thread. */
#define READ_TASK (1 << 20)

typedef struct {
    const float *x;
    int64_t n;
    float *sums;
} read_args;

static void read_task(const void *ctx, int64_t task) {
    const read_args *A = ctx;
    const int64_t per = READ_TASK / 4, i0 = task * per, i1 = i0 + per < A->n ? i0 + per : A->n;
    sa_vf a[8];
    for (int k = 0; k < 8; k++) a[k] = vf_zero();
    int64_t i = i0;
    for (; i + 8 * SA_W <= i1; i += 8 * SA_W) {
        for (int k = 0; k < 8; k++) a[k] = vf_add(a[k], vf_loadu(A->x + i + SA_W * k));
    }
    float tail = 0.0f;
    for (; i < i1; i++) tail += A->x[i];
    for (int k = 1; k < 8; k++) a[0] = vf_add(a[0], a[k]);
    A->sums[task] = vf_hsum(a[0]) + tail;
}

/* x (n floats) read once on the pool's threads; sums (one a READ_TASK-byte task) gets each
 * task's sum, so the reads are used */
void sa_read_sum(const float *x, int64_t n, float *sums) {
    read_args A = {x, n, sums};
    sa_pool_run(read_task, &A, (n * 4 + READ_TASK - 1) / READ_TASK);
}
