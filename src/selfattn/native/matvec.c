/* y (T, rows) = x (T, cols) @ W^T with W kept in its GGUF type (f32, f16, q4_0, q4_1, q8_0):
 * each 32-weight block is decoded in registers to its exact float32 values (as gguf's dequantize
 * gives them) and multiplied with float32 activations. Nothing is rounded that a float32 matmul
 * over the dequantized matrix would not round; only the order of the sums differs.
 *
 * Decoding one token reads every weight once, so this is a stream over the file's compact bytes
 * (SmolLM2's Q4_1: 0.625 bytes a weight, against 4 for a float32 copy). Rows are cut into about
 * TASKS_PER_THREAD contiguous tasks per pool thread (at least MIN_TASK_ROWS rows each): long runs
 * of consecutive rows keep each core's stream sequential (16-row tasks handed out in turn cost
 * ~20% in misses on two cores).
 */
#include <stdlib.h>

#include "simd.h"

#define TASKS_PER_THREAD 4
#define MIN_TASK_ROWS 16
#define MAX_T 16
/* bytes fetched ahead of the block being decoded (past a matrix's end a prefetch is harmless):
 * without it ~10% more time for one token's matmuls on this project's 2-core machine (a
 * standalone C timing) */
#define PF_BYTES 1024

typedef struct {
    const uint8_t *w;
    int64_t row_bytes, rows, cols, T, task_rows;
    int fmt;
    const float *x;
    float *y;
} mv_args;

/* The 16 nibble bytes of a q4 block, four at a time: each 32-bit word broadcast to eight lanes
 * and shifted by a different amount per lane, so no cross-lane shuffle is needed (shuffles are
 * what limited the pmovzx version: 12.7 against 10 cycles a block here). The values come out in
 * NIBBLE_ORDER, and x is permuted the same way once per call. */
static const int NIBBLE_ORDER[32] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23,
                                     8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};

SA_INLINE void nibbles_permuted(const uint8_t *qs, __m256 n[4]) {
    const __m256i shift = _mm256_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28);
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    for (int i = 0; i < 4; i++) {
        int32_t word;
        memcpy(&word, qs + 4 * i, 4);
        __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32(word), shift);
        n[i] = _mm256_cvtepi32_ps(_mm256_and_si256(q, low4));
    }
}

SA_INLINE void decode_block(const uint8_t *p, int fmt, __m256 w[4]) {
    if (fmt == SA_Q4_1) {
        int32_t halves;
        memcpy(&halves, p, 4);
        __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(halves)); /* d, m */
        __m256 d = _mm256_broadcastss_ps(dm), m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
        nibbles_permuted(p + 4, w);
        for (int i = 0; i < 4; i++) w[i] = _mm256_fmadd_ps(w[i], d, m);
    } else if (fmt == SA_Q4_0) {
        float d = sa_half(p);
        __m256 dv = _mm256_set1_ps(d), off = _mm256_set1_ps(-8.0f * d);
        nibbles_permuted(p + 2, w);
        for (int i = 0; i < 4; i++) w[i] = _mm256_fmadd_ps(w[i], dv, off);
    } else if (fmt == SA_Q8_0) sa_block_q8_0(p, w);
    else if (fmt == SA_F16) {
        for (int i = 0; i < 4; i++) w[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * i)));
    } else {
        for (int i = 0; i < 4; i++) w[i] = _mm256_loadu_ps((const float *)p + 8 * i);
    }
}

/* one token: four accumulators, so consecutive blocks do not wait on each other's FMA */
SA_INLINE float row_dot1(const uint8_t *p, int fmt, int bb, int64_t nb, const float *x) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 w[4];
    for (int64_t b = 0; b < nb; b++, p += bb, x += 32) {
        _mm_prefetch((const char *)(p + PF_BYTES), _MM_HINT_T0);
        decode_block(p, fmt, w);
        for (int i = 0; i < 4; i++) a[i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + 8 * i), a[i]);
    }
    return sa_hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
}

#define DEFINE_MV_TASK(NAME, FMT)                                                                \
    SA_TARGET static void NAME(const void *ctx, int64_t task) {                                  \
        const mv_args *A = ctx;                                                                  \
        const int bb = sa_block_bytes(FMT);                                                      \
        const int64_t nb = A->cols / 32;                                                         \
        int64_t r0 = task * A->task_rows, r1 = r0 + A->task_rows;                                \
        if (r1 > A->rows) r1 = A->rows;                                                          \
        for (int64_t r = r0; r < r1; r++) {                                                      \
            const uint8_t *row = A->w + r * A->row_bytes;                                        \
            if (A->T == 1) {                                                                     \
                A->y[r] = row_dot1(row, FMT, bb, nb, A->x);                                      \
                continue;                                                                        \
            }                                                                                    \
            __m256 acc[MAX_T], w[4];                                                             \
            for (int64_t t = 0; t < A->T; t++) acc[t] = _mm256_setzero_ps();                     \
            const uint8_t *p = row;                                                              \
            for (int64_t b = 0; b < nb; b++, p += bb) {                                          \
                decode_block(p, FMT, w);                                                         \
                for (int64_t t = 0; t < A->T; t++) {                                             \
                    const float *x = A->x + t * A->cols + 32 * b;                                \
                    __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));                          \
                    s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), s);                        \
                    s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), s);                       \
                    s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), s);                       \
                    acc[t] = _mm256_add_ps(acc[t], s);                                           \
                }                                                                                \
            }                                                                                    \
            for (int64_t t = 0; t < A->T; t++) A->y[t * A->rows + r] = sa_hsum(acc[t]);          \
        }                                                                                        \
    }

DEFINE_MV_TASK(mv_q4_1, SA_Q4_1)
DEFINE_MV_TASK(mv_q8_0, SA_Q8_0)
DEFINE_MV_TASK(mv_q4_0, SA_Q4_0)
DEFINE_MV_TASK(mv_f16, SA_F16)
DEFINE_MV_TASK(mv_f32, SA_F32)

/* Returns 0, or -1 for arguments the caller should have refused (checked again here: compiled
 * code never trusts them). cols must be a multiple of 32, T in 1 .. MAX_T. */
int sa_matmul(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
              const float *x, int64_t T, float *y) {
    if (rows < 1 || cols < 32 || cols % 32 || T < 1 || T > MAX_T) return -1;
    if (row_bytes != cols / 32 * sa_block_bytes(fmt)) return -1;
    sa_task_fn fn;
    switch (fmt) {
    case SA_Q4_1: fn = mv_q4_1; break;
    case SA_Q8_0: fn = mv_q8_0; break;
    case SA_Q4_0: fn = mv_q4_0; break;
    case SA_F16: fn = mv_f16; break;
    case SA_F32: fn = mv_f32; break;
    default: return -1;
    }
    /* x copied to a 64-byte aligned buffer (every 32-byte load of it within one cache line), in
     * the order the nibbles decode to for the q4 types */
    float *xp = aligned_alloc(64, (size_t)((T * cols * 4 + 63) / 64 * 64));
    if (!xp) return -2;
    const int q4 = fmt == SA_Q4_0 || fmt == SA_Q4_1;
    for (int64_t i = 0; i < T * cols; i += 32)
        for (int j = 0; j < 32; j++) xp[i + j] = x[i + (q4 ? NIBBLE_ORDER[j] : j)];
    x = xp;
    const int64_t want = (int64_t)TASKS_PER_THREAD * sa_pool_threads();
    int64_t task_rows = (rows + want - 1) / want;
    if (task_rows < MIN_TASK_ROWS) task_rows = MIN_TASK_ROWS;
    mv_args A = {w, row_bytes, rows, cols, T, task_rows, fmt, x, y};
    sa_pool_run(fn, &A, (rows + task_rows - 1) / task_rows);
    free(xp);
    return 0;
}

/* rows of a block-typed matrix -> float32 (for gathering embedding rows): out (n, cols) */
SA_TARGET int sa_dequant_rows(const uint8_t *w, int fmt, int64_t cols, int64_t row_bytes,
                              const int64_t *rows, int64_t n, float *out) {
    if (cols % 32 || row_bytes != cols / 32 * sa_block_bytes(fmt)) return -1;
    for (int64_t i = 0; i < n; i++)
        sa_decode_row(w + rows[i] * row_bytes, fmt, cols, out + i * cols);
    return 0;
}
