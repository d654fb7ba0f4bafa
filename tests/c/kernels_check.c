/* The compiled kernels' outputs, one hash a case, for `make portable-check`: on x86 the avx2 and
 * portable levels, on aarch64 (under qemu-user) the portable level, must print the same lines,
 * bit for bit. The inputs are made here from a fixed seed: random floats, and weight blocks of
 * random bytes whose f16 scales are put in a sane range (so no case turns on NaN payloads, which
 * the two architectures propagate differently).
 *
 *   kernels_check            every level this build holds and this CPU runs
 *   kernels_check LEVEL      one of them
 *
 * Each line: level, case, the kernel's return code, and a 64-bit FNV-1a hash of its outputs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
extern const sa_kernels sa_table_avx2, sa_table_portable;
static const sa_kernels *const TABLES[] = {&sa_table_avx2, &sa_table_portable};
static int runs(const sa_kernels *t) {
    return strcmp(t->name, "avx2") ||
           (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"));
}
#else
extern const sa_kernels sa_table_portable;
static const sa_kernels *const TABLES[] = {&sa_table_portable};
static int runs(const sa_kernels *t) { return t != NULL; }
#endif

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t next(void) { /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1Dull;
}

static float uniform(void) { return (float)(next() >> 40) * (1.0f / 8388608.0f) - 1.0f; } /* [-1, 1) */

static float *floats(int64_t n) {
    float *x = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) x[i] = uniform();
    return x;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}

static const char *level;

static void report(const char *name, int rc, const void *a, size_t na, const void *b, size_t nb) {
    uint64_t h = fnv(0xCBF29CE484222325ull, a, na);
    if (b) h = fnv(h, b, nb);
    printf("%s %s rc=%d %016llx\n", level, name, rc, (unsigned long long)h);
}

static void put_half(uint8_t *p, int sign) { /* an f16 in +-[2^-7, 2^-6) */
    uint16_t h = (uint16_t)(0x2000 | (next() & 0x3FF) | (sign && (next() & 1) ? 0x8000 : 0));
    memcpy(p, &h, 2);
}

/* where each block type keeps its f16 scales (ggml's layouts) */
static void sane_scales(uint8_t *block, int fmt) {
    switch (fmt) {
    case SA_Q4_1: case SA_Q5_1: case SA_Q4_K: case SA_Q5_K:
        put_half(block, 1);
        put_half(block + 2, 0);
        break;
    case SA_Q2_K:
        put_half(block + 80, 1);
        put_half(block + 82, 0);
        break;
    case SA_Q3_K: put_half(block + 108, 1); break;
    case SA_Q6_K: put_half(block + 208, 1); break;
    default: put_half(block, 1); break; /* q4_0, q5_0, q8_0, iq4_nl, iq4_xs: d first */
    }
}

/* rows x cols of type fmt: random bytes, sane scales; float types: sane values */
static uint8_t *weights(int fmt, int64_t rows, int64_t cols) {
    const int64_t row_bytes = sa_row_bytes(fmt, cols), n = rows * row_bytes;
    uint8_t *w = malloc((size_t)n);
    for (int64_t i = 0; i < n; i++) w[i] = (uint8_t)next();
    if (fmt == SA_F32) {
        for (int64_t i = 0; i < rows * cols; i++) {
            float f = uniform();
            memcpy(w + 4 * i, &f, 4);
        }
    } else if (fmt == SA_F16) {
        for (int64_t i = 0; i < rows * cols; i++) put_half(w + 2 * i, 1);
    } else if (fmt == SA_BF16) {
        for (int64_t i = 0; i < rows * cols; i++) {
            uint16_t h = (uint16_t)(0x3F00 | (next() & 0x807F)); /* +-[0.5, 1) */
            memcpy(w + 2 * i, &h, 2);
        }
    } else {
        for (int64_t b = 0; b < n / sa_block_bytes(fmt); b++) sane_scales(w + b * sa_block_bytes(fmt), fmt);
    }
    return w;
}

static void check_weights(const sa_kernels *K) {
    static const int types[] = {SA_F32, SA_F16, SA_BF16, SA_Q4_0, SA_Q4_1, SA_Q5_0, SA_Q5_1, SA_Q8_0,
                                SA_IQ4_NL, SA_Q2_K, SA_Q3_K, SA_Q4_K, SA_Q5_K, SA_Q6_K, SA_IQ4_XS};
    const int64_t rows = 37, cols = 512;
    for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
        const int fmt = types[i];
        const int64_t row_bytes = sa_row_bytes(fmt, cols);
        uint8_t *w = weights(fmt, rows, cols);
        float *x = floats(21 * cols), *y = malloc(21 * rows * 4), *d = malloc(rows * cols * 4);
        char name[64];
        const int64_t Ts[] = {1, 3};
        for (int t = 0; t < 2; t++) {
            snprintf(name, sizeof name, "matmul-%d-T%lld", fmt, (long long)Ts[t]);
            int rc = K->matmul(w, fmt, rows, cols, row_bytes, x, Ts[t], y);
            report(name, rc, y, (size_t)(Ts[t] * rows * 4), NULL, 0);
        }
        snprintf(name, sizeof name, "matvecs-%d-T5", fmt);
        int rc = K->matvecs(w, fmt, rows, cols, row_bytes, x, 5, y);
        report(name, rc, y, 5 * rows * 4, NULL, 0);
        snprintf(name, sizeof name, "gemm-%d-T21", fmt);
        rc = K->gemm(w, fmt, rows, cols, row_bytes, x, 21, y);
        report(name, rc, y, 21 * rows * 4, NULL, 0);
        snprintf(name, sizeof name, "dequant_range-%d", fmt);
        rc = K->dequant_range(w, fmt, cols, row_bytes, 3, rows, d);
        report(name, rc, d, (size_t)((rows - 3) * cols * 4), NULL, 0);
        const int64_t idx[] = {5, 0, 36, 5};
        snprintf(name, sizeof name, "dequant_rows-%d", fmt);
        rc = K->dequant_rows(w, fmt, cols, row_bytes, idx, 4, d);
        report(name, rc, d, 4 * cols * 4, NULL, 0);
        free(w), free(x), free(y), free(d);
    }
}

static void check_attention(const sa_kernels *K) {
    static const int kv_types[] = {SA_F32, SA_F16, SA_Q8_0, SA_Q4_0};
    const int64_t H = 8, H_kv = 2, D = 64, S_max = 300, S = 257, T = 40;
    for (size_t i = 0; i < sizeof kv_types / sizeof *kv_types; i++) {
        const int fmt = kv_types[i];
        const int64_t row = sa_row_bytes(fmt, D);
        uint8_t *k = calloc((size_t)(H_kv * S_max * row), 1), *v = calloc((size_t)(H_kv * S_max * row), 1);
        float *kf = floats(S * H_kv * D), *vf = floats(S * H_kv * D);
        char name[64];
        int rc = 0;
        if (fmt == SA_F32) {
            for (int64_t s = 0; s < S; s++)
                for (int64_t g = 0; g < H_kv; g++) {
                    memcpy(k + (g * S_max + s) * row, kf + (s * H_kv + g) * D, (size_t)D * 4);
                    memcpy(v + (g * S_max + s) * row, vf + (s * H_kv + g) * D, (size_t)D * 4);
                }
        } else {
            rc = K->quantize_rows(kf, S, H_kv, D, fmt, k, S_max * row, row) |
                 K->quantize_rows(vf, S, H_kv, D, fmt, v, S_max * row, row);
        }
        snprintf(name, sizeof name, "quantize_rows-%d", fmt);
        report(name, rc, k, (size_t)(H_kv * S_max * row), v, (size_t)(H_kv * S_max * row));

        float *q = floats(H * T * D), *out = malloc((size_t)(H * T * D * 4)), *lse = malloc((size_t)(H * T * 4));
        /* decode: one query per head, all keys, then a window of 100 with a soft-cap */
        const float cap[2] = {0.0f, 30.0f};
        const int64_t left[2] = {S + 1, 99};
        for (int c = 0; c < 2; c++) {
            const int64_t j_base = S - 1 - left[c] > 0 ? S - 1 - left[c] : 0;
            rc = K->decode_attention(q, k, v, fmt, 1, H_kv, H / H_kv, D, D, S_max, row, row, S, 1, j_base,
                                     64, (S - j_base + 63) / 64, left[c], 0, cap[c], out, lse);
            snprintf(name, sizeof name, "decode-%d-%d", fmt, c);
            report(name, rc, out, (size_t)(H * D * 4), lse, (size_t)(H * 4));
        }
        /* prefill: T queries at the end of the S keys, causal, then a window of 64 */
        for (int c = 0; c < 2; c++) {
            rc = K->flash_attention(q, k, v, fmt, 1, H, H_kv, T, D, D, S_max, row, row, S,
                                    c ? 63 : S + T, 0, 0.125f, cap[c], out, lse);
            snprintf(name, sizeof name, "prefill-%d-%d", fmt, c);
            report(name, rc, out, (size_t)(H * T * D * 4), lse, (size_t)(H * T * 4));
        }
        free(k), free(v), free(kf), free(vf), free(q), free(out), free(lse);
    }
}

static void check_ops(const sa_kernels *K) {
    const int64_t T = 3, n = 200, heads = 4, D = 50, half = 16, ffn = 100;
    float *x = floats(T * n), *w = floats(n), *out = malloc((size_t)(T * n * 4));
    K->rmsnorm(x, w, 1e-5f, T, n, out);
    report("rmsnorm", 0, out, (size_t)(T * n * 4), NULL, 0);
    float *r = floats(T * heads * D), *cs = floats(10 * half), *sn = floats(10 * half);
    K->rope(r, T, heads, D, half, cs, sn, 4);
    report("rope", 0, r, (size_t)(T * heads * D * 4), NULL, 0);
    float *gu = floats(T * 2 * ffn);
    for (int64_t i = 0; i < T * 2 * ffn; i++) gu[i] *= 30.0f; /* both tails of the sigmoid */
    K->swiglu(gu, T, ffn, out);
    report("swiglu", 0, out, (size_t)(T * ffn * 4), NULL, 0);
    const int64_t big = 3 << 18; /* three of read_sum's 1 MiB tasks */
    float *a = floats(big), sums[3];
    K->read_sum(a, big, sums);
    report("read_sum", 0, sums, sizeof sums, NULL, 0);
    free(x), free(w), free(out), free(r), free(cs), free(sn), free(gu), free(a);
}

/* a step through two layers, three sequences at different depths, q8_0 / q4_k / q6_k matrices,
 * f16 caches */
static void check_layer_step(const sa_kernels *K) {
    const int64_t dim = 256, H = 4, H_kv = 2, D = 64, ffn = 512, half = 32, S_max = 64, B = 3;
    const int64_t q_dim = H * D, kv_dim = H_kv * D;
    const int fmts[7] = {SA_Q8_0, SA_Q4_K, SA_Q6_K, SA_Q8_0, SA_Q4_K, SA_Q4_K, SA_Q6_K};
    const int64_t shape[7][2] = {{q_dim, dim}, {kv_dim, dim}, {kv_dim, dim}, {dim, q_dim},
                                 {ffn, dim}, {ffn, dim}, {dim, ffn}};
    sa_mat m[7];
    for (int i = 0; i < 7; i++)
        m[i] = (sa_mat){weights(fmts[i], shape[i][0], shape[i][1]), fmts[i], sa_row_bytes(fmts[i], shape[i][1])};
    float *an = floats(dim), *fn = floats(dim), *bias = floats(q_dim + 2 * kv_dim);
    float *cs = floats(S_max * half), *sn = floats(S_max * half), *x = floats(B * dim);
    const sa_layer L = {dim, H, H_kv, D, ffn, half, 1e-5f, 0.125f, an, fn, bias,
                        m[0], m[1], m[2], m[3], m[4], m[5], m[6]};
    const sa_layer *layers[2] = {&L, &L}; /* two layers (the same weights), so each cache has two parts */
    const int64_t row = sa_row_bytes(SA_F16, D), pos[3] = {5, 40, 0}, part = H_kv * S_max * row;
    const int64_t bytes = 4 * B * part; /* per sequence: K of both layers, then V of both */
    uint8_t *cache = malloc((size_t)bytes);
    for (int64_t i = 0; i < bytes; i += 2) put_half(cache + i, 1);
    sa_seq seqs[3];
    for (int64_t b = 0; b < B; b++) {
        uint8_t *kb = cache + 4 * b * part;
        seqs[b] = (sa_seq){kb, kb + 2 * part, SA_F16, S_max, row, pos[b], pos[b] + 2, 0, pos[b] + 1, 1};
    }
    double t[3];
    int rc = K->layer_step(layers, 2, cs, sn, seqs, B, x, t);
    report("layer_step", rc, x, (size_t)(B * dim * 4), cache, (size_t)bytes);
    for (int i = 0; i < 7; i++) free((void *)m[i].w);
    free(an), free(fn), free(bias), free(cs), free(sn), free(x), free(cache);
}

int main(int argc, char **argv) {
    sa_set_threads(2);
    int found = 0;
    for (size_t i = 0; i < sizeof TABLES / sizeof *TABLES; i++) {
        const sa_kernels *K = TABLES[i];
        if ((argc > 1 && strcmp(argv[1], K->name)) || !runs(K)) continue;
        found = 1;
        level = K->name;
        rng = 0x9E3779B97F4A7C15ull; /* the same inputs for every level */
        check_weights(K);
        check_attention(K);
        check_ops(K);
        check_layer_step(K);
    }
    if (!found) {
        fprintf(stderr, "kernels_check: no level %s in this build runs here\n", argc > 1 ? argv[1] : "");
        return 2;
    }
    return 0;
}
