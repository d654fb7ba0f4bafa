/* The decode kernel alone, from C, against a read of the same bytes (benchmarks/decode_kernel.sh
 * builds and runs it): sa_decode_attention over a float32 cache (T = 1, keys split as
 * attention/decode.py splits them) and the pool's sequential sum (sa_read_sum, the roofline's
 * reader). Medians of 15 calls after one, GB/s of K + V.
 *
 *     decode_kernel THREADS H_KV G D S
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "simd.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#define REPS 15
typedef double (*timed_fn)(void *);

static double median_gbs(timed_fn fn, void *ctx, double bytes) {
    double t[REPS];
    fn(ctx);
    for (int r = 0; r < REPS; r++) t[r] = fn(ctx);
    qsort(t, REPS, sizeof t[0], by_value);
    return bytes / t[REPS / 2] / 1e9;
}

typedef struct {
    const float *q, *k, *v;
    float *out, *lse, *kv, *sums;
    int64_t H_kv, G, D, S, chunk, C, n;
} bench;

static double run_decode(void *p) {
    bench *b = p;
    double t = now();
    if (sa_decode_attention(b->q, (const uint8_t *)b->k, (const uint8_t *)b->v, SA_F32, 1, b->H_kv, b->G,
                            b->D, b->D, b->S, 4 * b->D, 4 * b->D, b->S, 1, 0, b->chunk, b->C, b->S, 0,
                            0.0f, b->out, b->lse))
        exit(1);
    return now() - t;
}

static double run_sequential(void *p) {
    bench *b = p;
    double t = now();
    sa_read_sum(b->kv, b->n, b->sums);
    return now() - t;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: decode_kernel THREADS H_KV G D S\n");
        return 2;
    }
    const int threads = atoi(argv[1]);
    bench b = {.H_kv = atoll(argv[2]), .G = atoll(argv[3]), .D = atoll(argv[4]), .S = atoll(argv[5])};
    if (threads < 1 || b.H_kv < 1 || b.G < 1 || b.D < 8 || b.D % 8 || b.D > SA_MAX_DIM || b.S < 64) {
        fprintf(stderr, "decode_kernel: THREADS, H_KV, G >= 1; D a multiple of 8 up to %d; S >= 64\n", SA_MAX_DIM);
        return 2;
    }
    sa_set_threads(threads);
    /* K and V side by side in one buffer, so the readers read the kernel's bytes */
    b.n = 2 * b.H_kv * b.S * b.D;
    b.kv = aligned_alloc(64, (size_t)b.n * 4);
    float *q = aligned_alloc(64, (size_t)(b.H_kv * b.G * b.D) * 4);
    b.out = malloc((size_t)(b.H_kv * b.G * b.D) * 4);
    b.lse = malloc((size_t)(b.H_kv * b.G) * 4);
    b.sums = malloc((size_t)(b.n * 4 / (1 << 20) + 1) * 4); /* one a 1 MiB task */
    if (!b.kv || !q || !b.out || !b.lse || !b.sums) return 1;
    for (int64_t i = 0; i < b.n; i++) b.kv[i] = (float)((i * 7) % 23 - 11) * 0.05f;
    for (int64_t i = 0; i < b.H_kv * b.G * b.D; i++) q[i] = (float)(i % 17) * 0.01f;
    b.q = q, b.k = b.kv, b.v = b.kv + b.n / 2;
    /* attention/decode.py's split: at least 8 tasks a thread, chunks of at least 256 keys */
    const int64_t want = (8 * threads + b.H_kv - 1) / b.H_kv;
    b.chunk = (b.S + want - 1) / want < 256 ? 256 : (b.S + want - 1) / want;
    b.C = (b.S + b.chunk - 1) / b.chunk;
    const double bytes = (double)b.n * 4;
    const double dec = median_gbs(run_decode, &b, bytes);
    const double seq = median_gbs(run_sequential, &b, bytes);
    printf("%d %ld %ld %ld %ld %.1f %.1f %.1f\n", threads, (long)b.H_kv, (long)b.G, (long)b.D,
           (long)b.S, bytes / 1e6, dec, seq);
    return 0;
}
