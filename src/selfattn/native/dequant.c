/* Stored weight rows -> their float32 values, exactly (bit for bit) what gguf-py's dequantize
 * gives, for every type the kernels read: f32, f16, bf16 as stored (converted), the quantized
 * types through unpack.h (s * q - m, the same float32 operations in the same order as gguf's
 * numpy code; built with -ffp-contract=off so nothing is fused).
 *
 * sa_dequant_range decodes a run of rows (a tile of a matrix, for prompts: dequantize, then a
 * float32 GEMM), sa_dequant_rows gathers rows by index (embedding lookups); both split the rows
 * over the kernels' thread pool. Each checks its type and row size again.
 */
#include "unpack.h"

/* values per task of the pool, at least: below this a task's start costs more than its work */
#define MIN_TASK_VALUES 16384
#define TASKS_PER_THREAD 4

static void row_f32(const uint8_t *src, int64_t n, float *dst) {
    memcpy(dst, src, (size_t)n * 4);
}

static void row_f16(const uint8_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
    for (; i < n; i++) dst[i] = sa_half(src + 2 * i);
}

/* bf16: the 16 bits are the top half of the float32 */
static void row_bf16(const uint8_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 2 * i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
    }
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        uint32_t bits = (uint32_t)h << 16;
        memcpy(dst + i, &bits, 4);
    }
}

#define DEFINE_ROW(NAME, FMT)                                                                    \
    static void NAME(const uint8_t *src, int64_t n, float *dst) {                                \
        const int64_t unit = sa_block_values(FMT), bytes = sa_block_bytes(FMT);                  \
        sa_unpacked u;                                                                           \
        for (int64_t b = 0; b < n / unit; b++) {                                                 \
            sa_unpack(src + b * bytes, FMT, &u);                                                 \
            sa_unpacked_values(&u, FMT, dst + b * unit);                                         \
        }                                                                                        \
    }

DEFINE_ROW(row_q4_0, SA_Q4_0)
DEFINE_ROW(row_q4_1, SA_Q4_1)
DEFINE_ROW(row_q5_0, SA_Q5_0)
DEFINE_ROW(row_q5_1, SA_Q5_1)
DEFINE_ROW(row_q8_0, SA_Q8_0)
DEFINE_ROW(row_iq4_nl, SA_IQ4_NL)
DEFINE_ROW(row_q2_k, SA_Q2_K)
DEFINE_ROW(row_q3_k, SA_Q3_K)
#if SA_W == 16
/* q4_k at AVX-512: 16 nibbles become their floats by one lookup (vpermps reads the low 4 bits of
 * each lane), then s * q - m as above: the same operations on the same values, so the same bits.
 * Against the 8-lane widening, the prompt GEMM over a 14336 x 4096 Q4_K matrix took 0.80-0.83 of
 * the time at 9-64 tokens (the tiles' decoding is half of it there) and 0.98 at 512. */
static void row_q4_k(const uint8_t *src, int64_t n, float *dst) {
    const __m512 nib = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    sa_unpacked u;
    for (int64_t b = 0; b < n / 256; b++, src += 144, dst += 256) {
        k_scales_mins(src, &u);
        for (int c = 0; c < 4; c++) { /* 32 bytes: values 64c .. 64c+31 low, 64c+32 .. 64c+63 high */
            const __m512 sl = _mm512_set1_ps(u.s[2 * c]), ml = _mm512_set1_ps(u.m[2 * c]);
            const __m512 sh = _mm512_set1_ps(u.s[2 * c + 1]), mh = _mm512_set1_ps(u.m[2 * c + 1]);
            for (int h = 0; h < 2; h++) {
                const __m128i bytes = _mm_loadu_si128((const __m128i *)(src + 16 + 32 * c + 16 * h));
                const __m512i q = _mm512_cvtepu8_epi32(bytes);
                const __m512 lo = _mm512_permutexvar_ps(q, nib);
                const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), nib);
                _mm512_storeu_ps(dst + 64 * c + 16 * h, _mm512_sub_ps(_mm512_mul_ps(sl, lo), ml));
                _mm512_storeu_ps(dst + 64 * c + 32 + 16 * h, _mm512_sub_ps(_mm512_mul_ps(sh, hi), mh));
            }
        }
    }
}
#else
DEFINE_ROW(row_q4_k, SA_Q4_K)
#endif
DEFINE_ROW(row_q5_k, SA_Q5_K)
DEFINE_ROW(row_q6_k, SA_Q6_K)
DEFINE_ROW(row_iq4_xs, SA_IQ4_XS)

/* the row decoder of type fmt; NULL for a type the kernels do not read */
sa_row_fn sa_row_decoder(int fmt) {
    switch (fmt) {
    case SA_F32: return row_f32;
    case SA_F16: return row_f16;
    case SA_BF16: return row_bf16;
    case SA_Q4_0: return row_q4_0;
    case SA_Q4_1: return row_q4_1;
    case SA_Q5_0: return row_q5_0;
    case SA_Q5_1: return row_q5_1;
    case SA_Q8_0: return row_q8_0;
    case SA_IQ4_NL: return row_iq4_nl;
    case SA_Q2_K: return row_q2_k;
    case SA_Q3_K: return row_q3_k;
    case SA_Q4_K: return row_q4_k;
    case SA_Q5_K: return row_q5_k;
    case SA_Q6_K: return row_q6_k;
    case SA_IQ4_XS: return row_iq4_xs;
    default: return NULL;
    }
}

typedef struct {
    const uint8_t *w;
    sa_row_fn fn;
    int64_t cols, row_bytes, r0, n, task_rows;
    const int64_t *index; /* NULL: rows r0 .. r0 + n - 1 */
    float *out;
} dq_args;

static void dq_task(const void *ctx, int64_t task) {
    const dq_args *A = ctx;
    int64_t i0 = task * A->task_rows, i1 = i0 + A->task_rows;
    if (i1 > A->n) i1 = A->n;
    for (int64_t i = i0; i < i1; i++) {
        int64_t r = A->index ? A->index[i] : A->r0 + i;
        A->fn(A->w + r * A->row_bytes, A->cols, A->out + i * A->cols);
    }
}

static void run(dq_args *A) {
    int64_t want = (int64_t)TASKS_PER_THREAD * sa_pool_threads();
    int64_t rows = (A->n + want - 1) / want, least = (MIN_TASK_VALUES + A->cols - 1) / A->cols;
    A->task_rows = rows > least ? rows : least;
    sa_pool_run(dq_task, A, (A->n + A->task_rows - 1) / A->task_rows);
}

/* Rows r0 .. r1-1 of a matrix of rows of row_bytes bytes, each cols values of type fmt -> out
 * (r1 - r0, cols) float32. The caller checks that the matrix holds row r1 - 1. Returns 0, or -1
 * for an unknown type, cols not a whole number of blocks, a wrong row_bytes or r1 < r0. */
int sa_dequant_range(const uint8_t *w, int fmt, int64_t cols, int64_t row_bytes, int64_t r0,
                     int64_t r1, float *out) {
    sa_row_fn fn = sa_row_decoder(fmt);
    if (!fn || !sa_row_bytes(fmt, cols) || row_bytes != sa_row_bytes(fmt, cols) || r0 < 0 || r1 < r0)
        return -1;
    dq_args A = {w, fn, cols, row_bytes, r0, r1 - r0, 0, NULL, out};
    if (A.n) run(&A);
    return 0;
}

/* Rows rows[0 .. n-1] (the caller checks each is in the matrix) -> out (n, cols) float32; the
 * same checks as sa_dequant_range. */
int sa_dequant_rows(const uint8_t *w, int fmt, int64_t cols, int64_t row_bytes,
                    const int64_t *rows, int64_t n, float *out) {
    sa_row_fn fn = sa_row_decoder(fmt);
    if (!fn || !sa_row_bytes(fmt, cols) || row_bytes != sa_row_bytes(fmt, cols) || n < 0) return -1;
    dq_args A = {w, fn, cols, row_bytes, 0, n, 0, rows, out};
    if (A.n) run(&A);
    return 0;
}
