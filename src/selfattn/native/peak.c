/* This machine's float32 FMA throughput: the arithmetic roof of every float32 kernel here.
 *
 * NumPy's BLAS matmul, the roofline's other compute figure, is a kernel too (it loads, packs and
 * stores); this is the number of fused multiply-adds the cores retire when nothing else runs.
 * Each task runs `iters` steps of twelve independent FMA chains of 8 lanes (enough to keep two
 * FMA pipes busy through a 4-5 cycle latency), registers only. The chains start from different
 * values, so a compiler cannot fold them into one (identical chains are folded, and such a loop
 * reads 1.5x too fast here). */
#include "simd.h"

#define CHAINS 12

typedef struct {
    int64_t iters;
    float *sums; /* one a task: the chains' sum, so the loop's result is used */
} peak_args;

SA_TARGET static void peak_task(const void *ctx, int64_t task) {
    const peak_args *A = ctx;
    const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-3f);
    __m256 a[CHAINS];
    for (int i = 0; i < CHAINS; i++) a[i] = _mm256_set1_ps((float)(i + 1));
    for (int64_t it = 0; it < A->iters; it++)
        for (int i = 0; i < CHAINS; i++) a[i] = _mm256_fmadd_ps(a[i], m, c);
    __m256 s = a[0];
    for (int i = 1; i < CHAINS; i++) s = _mm256_add_ps(s, a[i]);
    A->sums[task] = sa_hsum(s);
}

/* tasks x iters x CHAINS FMAs of 8 lanes on the pool's threads; sums (tasks) gets each task's
 * chain sum (a_n = m^n a_0 + c (1 - m^n) / (1 - m) per lane, up to rounding) */
void sa_fma_loop(int64_t iters, int64_t tasks, float *sums) {
    peak_args A = {iters, sums};
    sa_pool_run(peak_task, &A, tasks);
}
