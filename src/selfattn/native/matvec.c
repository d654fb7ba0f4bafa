/* y (T, rows) = x (T, cols) @ W^T with W kept in its GGUF type (every type in kernels.h's table).
 * Nothing is rounded that a float32 matmul over the exactly dequantized matrix would not round
 * in kind; only the order of the sums differs.
 *
 * Decoding one token reads every weight once, so this is a stream over the file's compact bytes
 * (Q4_K: 0.5625 bytes a weight, against 4 for a float32 copy). Two families of inner loops:
 *  - f32, f16, bf16, q4_0, q4_1, q8_0: each 32-weight block decoded in registers to its exact
 *    float32 values and multiplied with the activations;
 *  - the other quantized types: a (super-)block unpacked (unpack.h) to int8 integers and one
 *    scale and offset per group of 16 or 32; for one row of x each group's dot product is taken
 *    over the integers and scaled once, sum_g s_g * (q_g . x_g) - sum_g m_g * sum(x_g), with the
 *    sums of x per group formed once per call (x is shared by every row); for several rows of x
 *    the block's float32 values are formed once and used for each.
 * Several rows of x that must each get the bits they get alone (sa_matvecs: several sequences'
 * decode steps) take the one-row loops SA_DOT_ROWS rows a pass, each block's values formed once
 * for all of them.
 * Rows are cut into about TASKS_PER_THREAD contiguous tasks per pool thread (at least
 * MIN_TASK_ROWS rows each): long runs of consecutive rows keep each core's stream sequential
 * (16-row tasks handed out in turn cost ~20% in misses on two cores).
 */
#include <stdlib.h>

#include "unpack.h"

#define TASKS_PER_THREAD 4
#define MIN_TASK_ROWS 16
/* bytes fetched ahead of the block being decoded (past a matrix's end a prefetch is harmless):
 * without it ~10% more time for one token's matmuls on this project's 2-core machine (a
 * standalone C timing) */
#define PF_BYTES 1024
/* One row of x also prefetches FAR_BYTES ahead into L2 (hint T2), each line once: with only
 * the near prefetches into L1, a core's misses wait on its few fill buffers. One token's
 * matmuls over the first 8 layers of a Llama-3-8B Q4_K_M file (1.06 GB, from memory) took
 * 0.84-0.87 of the time on 1 and 2 threads (two builds in one process, calls alternated),
 * SmolLM2's Q4_1 file's 0.87-0.97 on 1 thread and 0.93-0.96 on 2 (its 96 MB mostly in L3); the
 * avx2 level 0.97-1.01. Four rows of x are bounded by their FMAs, and there it cost 9%: not for
 * them. */
#define FAR_BYTES 32768

typedef struct {
    const uint8_t *w;
    int64_t row_bytes, rows, cols, T, task_rows;
    int fmt;
    const float *x;  /* (T, cols), 64-byte aligned, q4_0 / q4_1: in NIBBLE_ORDER per block (AVX2);
                        several rows through the first family's one-token loops: in x_at's order */
    const float *xs; /* sums of each row of x over each group of sa_sub(fmt) values (each) */
    float *y;
    int each;        /* every row of x through the one-token loop (T = 1, sa_matvecs) */
} mv_args;

#if SA_W == 16
/* AVX-512: a block's 32 values are two 16-lane vectors, in order. A q4 block's 16 bytes widen to
 * 16 lanes in one instruction; their low nibbles are values 0-15 and the high ones 16-31, so a
 * mask and a shift give both vectors and x needs no reordering. Against the 8-lane loop below:
 * half the FMAs per row of x and a third of the decoding work per block. */
#define BLOCK_VECS 2
typedef __m512 blk_vec;
SA_INLINE blk_vec bv_zero(void) { return _mm512_setzero_ps(); }
SA_INLINE blk_vec bv_loadu(const float *x) { return _mm512_loadu_ps(x); }
SA_INLINE blk_vec bv_mul(blk_vec a, blk_vec b) { return _mm512_mul_ps(a, b); }
SA_INLINE blk_vec bv_add(blk_vec a, blk_vec b) { return _mm512_add_ps(a, b); }
SA_INLINE blk_vec bv_fmadd(blk_vec a, blk_vec b, blk_vec c) { return _mm512_fmadd_ps(a, b, c); }
SA_INLINE float bv_hsum(blk_vec a) { return _mm512_reduce_add_ps(a); }
static const int *const NIBBLE_ORDER = NULL; /* x keeps its order */

/* 32 values of a float or q4_0 / q4_1 / q8_0 block at p -> w[0..1], exact as gguf dequantizes:
 * q4_1 d * n + m fused (d * n is exact in float32: an f16 times a 4-bit integer, so one
 * rounding, as gguf's); q4_0 n * d - 8d (-8d exact); q8_0 q * d */
SA_INLINE void decode_block(const uint8_t *p, int fmt, blk_vec w[2]) {
    if (fmt == SA_Q4_1 || fmt == SA_Q4_0) {
        __m512 d, off;
        if (fmt == SA_Q4_1) {
            int32_t halves;
            memcpy(&halves, p, 4);
            __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(halves)); /* d, m */
            d = _mm512_broadcastss_ps(dm);
            off = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
        } else {
            const float h = sa_half(p);
            d = _mm512_set1_ps(h);
            off = _mm512_set1_ps(-8.0f * h);
        }
        /* the block's 16 possible values, d * n + off for n = 0..15, then each nibble's by a
         * lookup (vpermps reads the low 4 bits of each lane's index): one FMA a block instead
         * of two, and no mask or conversions; the same values, so the same bits */
        const __m512 table = _mm512_fmadd_ps(
            _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), d, off);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + (fmt == SA_Q4_1 ? 4 : 2))));
        w[0] = _mm512_permutexvar_ps(b, table);
        w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
    } else if (fmt == SA_Q8_0) {
        const __m512 d = _mm512_set1_ps(sa_half(p));
        for (int i = 0; i < 2; i++)
            w[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                     _mm_loadu_si128((const __m128i *)(p + 2 + 16 * i)))), d);
    } else if (fmt == SA_F16) {
        for (int i = 0; i < 2; i++) w[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32 * i)));
    } else if (fmt == SA_BF16) {
        for (int i = 0; i < 2; i++) {
            __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 32 * i)));
            w[i] = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
        }
    } else {
        for (int i = 0; i < 2; i++) w[i] = _mm512_loadu_ps((const float *)p + 16 * i);
    }
}
#else
#define BLOCK_VECS 4
typedef __m256 blk_vec;
SA_INLINE blk_vec bv_zero(void) { return _mm256_setzero_ps(); }
SA_INLINE blk_vec bv_loadu(const float *x) { return _mm256_loadu_ps(x); }
SA_INLINE blk_vec bv_mul(blk_vec a, blk_vec b) { return _mm256_mul_ps(a, b); }
SA_INLINE blk_vec bv_add(blk_vec a, blk_vec b) { return _mm256_add_ps(a, b); }
SA_INLINE blk_vec bv_fmadd(blk_vec a, blk_vec b, blk_vec c) { return _mm256_fmadd_ps(a, b, c); }
SA_INLINE float bv_hsum(blk_vec a) { return sa_hsum(a); }

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

/* 32 values of a float or q4_0 / q4_1 / q8_0 block at p -> w[0..3]. q4_1's d * n is exact in
 * float32 (an f16 times a 4-bit integer), so the fused d * n + m rounds once, as gguf's
 * (d * n) + m does: the same bits. */
SA_INLINE void decode_block(const uint8_t *p, int fmt, blk_vec w[4]) {
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
    } else if (fmt == SA_BF16) {
        for (int i = 0; i < 4; i++) {
            __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * i)));
            w[i] = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
        }
    } else {
        for (int i = 0; i < 4; i++) w[i] = _mm256_loadu_ps((const float *)p + 8 * i);
    }
}
#endif
#define BV_LANES (32 / BLOCK_VECS)

/* value i of a float row (the tail past the last whole 32 values) */
SA_INLINE float float_at(const uint8_t *row, int fmt, int64_t i) {
    if (fmt == SA_F32) {
        float f;
        memcpy(&f, row + 4 * i, 4);
        return f;
    }
    if (fmt == SA_F16) return sa_half(row + 2 * i);
    uint16_t h;
    memcpy(&h, row + 2 * i, 2);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Where value i of row t of x (T rows of cols values) goes in the copy the first family's
 * several-row loops read: rows in groups as row_dots takes them (SA_DOT_ROWS at a time, then
 * the rest together), and within a group of N rows block by block, each block's 32 values of
 * row 0, then of row 1, ...; then each row's tail past its last whole 32 values. So a block's
 * N x 32 values are one run, read with one pointer and constant offsets (rows `cols` apart
 * took indexed loads: four rows over SmolLM2's Q4_1 matrices ran in 0.92 of the time this way,
 * benchmarks/ab_kernels.py). For one row it is the identity. */
SA_INLINE int64_t x_at(int64_t t, int64_t i, int64_t T, int64_t cols) {
    const int64_t g0 = t / SA_DOT_ROWS * SA_DOT_ROWS, N = T - g0 < SA_DOT_ROWS ? T - g0 : SA_DOT_ROWS;
    const int64_t whole = cols / 32 * 32, base = g0 * cols, u = t - g0;
    return i < whole ? base + i / 32 * 32 * N + u * 32 + i % 32
                     : base + N * whole + u * (cols - whole) + (i - whole);
}

/* x (T, cols) -> xp in x_at's order, each block's values permuted by order (if not NULL) */
static void pack_rows(const float *x, int64_t T, int64_t cols, const int *order, float *xp) {
    const int64_t nb = cols / 32, whole = nb * 32, tl = cols - whole;
    for (int64_t g0 = 0; g0 < T; g0 += SA_DOT_ROWS) {
        const int64_t N = T - g0 < SA_DOT_ROWS ? T - g0 : SA_DOT_ROWS;
        float *out = xp + g0 * cols;
        for (int64_t b = 0; b < nb; b++)
            for (int64_t u = 0; u < N; u++, out += 32) {
                const float *in = x + (g0 + u) * cols + 32 * b;
                for (int j = 0; j < 32; j++) out[j] = in[order ? order[j] : j];
            }
        for (int64_t u = 0; u < N; u++, out += tl) memcpy(out, x + (g0 + u) * cols + whole, (size_t)tl * 4);
    }
}

SA_INLINE void prefetch_block(const uint8_t *p, int bb, const int N) {
    _mm_prefetch((const char *)(p + PF_BYTES), _MM_HINT_T0);
    if (N == 1) sa_prefetch_l2(p + FAR_BYTES, bb, 64);
}

/* a[t][i] += w[i] * (row t's part of a block of x in x_at's order), for the N rows */
SA_INLINE void fma_rows(const blk_vec w[BLOCK_VECS], const float *x, blk_vec a[][BLOCK_VECS],
                        const int N) {
    for (int t = 0; t < N; t++)
        for (int i = 0; i < BLOCK_VECS; i++)
            a[t][i] = bv_fmadd(w[i], bv_loadu(x + 32 * t + BV_LANES * i), a[t][i]);
}

/* one block-decoding pass over a row for the N rows of x of a group (x_at's order): each block
 * decoded once, and each row of x gets BLOCK_VECS accumulators (one per vector of the block), so
 * consecutive blocks do not wait on each other's FMA. Row t's FMAs are the same, in the same
 * order, for every N: y[t] has the bits a pass with that row alone gives. */
SA_INLINE void row_dotN(const uint8_t *p, int fmt, int bb, int64_t nb, const float *x, float *y,
                        const int N) {
    blk_vec a[4][BLOCK_VECS], w[BLOCK_VECS];
    for (int t = 0; t < N; t++)
        for (int i = 0; i < BLOCK_VECS; i++) a[t][i] = bv_zero();
    for (int64_t b = 0; b < nb; b++, p += bb, x += 32 * N) {
        prefetch_block(p, bb, N);
        decode_block(p, fmt, w);
        fma_rows(w, x, a, N);
    }
    for (int t = 0; t < N; t++) {
        blk_vec s = bv_add(a[t][0], a[t][1]);
        if (BLOCK_VECS == 4) s = bv_add(s, bv_add(a[t][2], a[t][3]));
        y[t] = bv_hsum(s);
    }
}


/* row_dotN for each of n rows of x (x_at's order), SA_DOT_ROWS at a time, then the rest
 * together; x advances cols values a row */
SA_INLINE void row_dots(const uint8_t *p, int fmt, int bb, int64_t nb, const float *x,
                        int64_t cols, float *y, int64_t n) {
    for (; n >= SA_DOT_ROWS; n -= SA_DOT_ROWS, x += SA_DOT_ROWS * cols, y += SA_DOT_ROWS)
        row_dotN(p, fmt, bb, nb, x, y, SA_DOT_ROWS);
    switch (n) {
    case 0: break;
    case 1: row_dotN(p, fmt, bb, nb, x, y, 1); break; /* one token's step: nothing to share */
#if SA_DOT_ROWS > 3
    case 3: row_dotN(p, fmt, bb, nb, x, y, 3); break;
#endif
    default: row_dotN(p, fmt, bb, nb, x, y, 2); break;
    }
}

/* bytes 32 values take in a type of the first family */
#define BYTES32(FMT) (32 * sa_block_bytes(FMT) / sa_block_values(FMT))

#define DEFINE_MV_TASK(NAME, FMT)                                                                \
    static void NAME(const void *ctx, int64_t task) {                                            \
        const mv_args *A = ctx;                                                                  \
        const int bb = BYTES32(FMT);                                                             \
        const int64_t nb = A->cols / 32, tail = nb * 32;                                         \
        int64_t r0 = task * A->task_rows, r1 = r0 + A->task_rows;                                \
        if (r1 > A->rows) r1 = A->rows;                                                          \
        for (int64_t r = r0; r < r1; r++) {                                                      \
            const uint8_t *row = A->w + r * A->row_bytes;                                        \
            if (A->each) {                                                                       \
                float ys[SA_MAX_T];                                                              \
                row_dots(row, FMT, bb, nb, A->x, A->cols, ys, A->T);                             \
                for (int64_t t = 0; t < A->T; t++) {                                             \
                    float y = ys[t];                                                             \
                    for (int64_t i = tail; i < A->cols; i++)                                     \
                        y += float_at(row, FMT, i) * A->x[x_at(t, i, A->T, A->cols)];            \
                    A->y[t * A->rows + r] = y;                                                   \
                }                                                                                \
                continue;                                                                        \
            }                                                                                    \
            blk_vec acc[SA_MAX_T], w[BLOCK_VECS];                                                \
            for (int64_t t = 0; t < A->T; t++) acc[t] = bv_zero();                               \
            const uint8_t *p = row;                                                              \
            for (int64_t b = 0; b < nb; b++, p += bb) {                                          \
                decode_block(p, FMT, w);                                                         \
                for (int64_t t = 0; t < A->T; t++) {                                             \
                    const float *x = A->x + t * A->cols + 32 * b;                                \
                    blk_vec s = bv_mul(w[0], bv_loadu(x));                                       \
                    for (int i = 1; i < BLOCK_VECS; i++)                                         \
                        s = bv_fmadd(w[i], bv_loadu(x + BV_LANES * i), s);                       \
                    acc[t] = bv_add(acc[t], s);                                                  \
                }                                                                                \
            }                                                                                    \
            for (int64_t t = 0; t < A->T; t++) {                                                 \
                float y = bv_hsum(acc[t]);                                                       \
                for (int64_t i = tail; i < A->cols; i++)                                         \
                    y += float_at(row, FMT, i) * A->x[t * A->cols + i];                          \
                A->y[t * A->rows + r] = y;                                                       \
            }                                                                                    \
        }                                                                                        \
    }

DEFINE_MV_TASK(mv_q4_1, SA_Q4_1)
DEFINE_MV_TASK(mv_q8_0, SA_Q8_0)
DEFINE_MV_TASK(mv_q4_0, SA_Q4_0)
DEFINE_MV_TASK(mv_f16, SA_F16)
DEFINE_MV_TASK(mv_bf16, SA_BF16)
DEFINE_MV_TASK(mv_f32, SA_F32)

/* The second family's integers, 32 at a time in one register: byte b of each 32-bit lane,
 * widened in place by shifts (no shuffles), 8 integers a vector; the values come out in
 * LANE_ORDER (vector b: values b, 4 + b, ..., 28 + b), and x is permuted the same way once per
 * call. A lane holds 4 consecutive values, so lanes 0-3 are the first 16 values, 4-7 the rest. */
static const int LANE_ORDER[32] = {0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29,
                                   2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31};

/* 32 integers (permuted as LANE_ORDER) widened to 4 float vectors */
SA_INLINE void widen32(__m256i q, __m256 w[4], const int UNSIGNED) {
    __m256i e[4];
    if (UNSIGNED) {
        const __m256i ff = _mm256_set1_epi32(0xFF);
        e[0] = _mm256_and_si256(q, ff);
        e[1] = _mm256_and_si256(_mm256_srli_epi32(q, 8), ff);
        e[2] = _mm256_and_si256(_mm256_srli_epi32(q, 16), ff);
        e[3] = _mm256_srli_epi32(q, 24);
    } else {
        e[0] = _mm256_srai_epi32(_mm256_slli_epi32(q, 24), 24);
        e[1] = _mm256_srai_epi32(_mm256_slli_epi32(q, 16), 24);
        e[2] = _mm256_srai_epi32(_mm256_slli_epi32(q, 8), 24);
        e[3] = _mm256_srai_epi32(q, 24);
    }
    for (int b = 0; b < 4; b++) w[b] = _mm256_cvtepi32_ps(e[b]);
}

/* 32 widened integers . 32 permuted x values, 8 partial sums */
SA_INLINE __m256 dot32(const __m256 w[4], const float *x) {
    __m256 s = _mm256_mul_ps(w[0], _mm256_load_ps(x));
    for (int b = 1; b < 4; b++) s = _mm256_fmadd_ps(w[b], _mm256_load_ps(x + 8 * b), s);
    return s;
}

#if SA_W == 16
/* q4_k, N rows of x (ld apart; their sums of groups lds apart), AVX-512, each block's values
 * formed once for all of them: two 32-byte chunks (128 values) a step, chunk c in lanes 0-7 and
 * chunk c + 1 in lanes 8-15, widened as below; x comes in q4k_wide's order (a 16-float load: a
 * part of chunk c's sub-block, then the same part of chunk c + 1's). A nibble becomes its float
 * by one lookup, and the sub-blocks' scales are looked up too (broadcasts and inserts of them
 * took a quarter of the loop's time). The sums go in another order than the avx2 loop's, so the
 * two levels differ in the last bits (each within a float32 dot product's bound). */
SA_INLINE void q4_k_dotN(const uint8_t *p, int64_t nu, const float *x, int64_t ld, const float *xs,
                         int64_t lds, float *y, const int N) {
    /* a nibble to its float by a lookup: vpermps reads the low 4 bits of each lane's index, so
     * one instruction stands for the mask and the conversion */
    const __m512 nib = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step2 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i one = _mm512_set1_epi32(1);
    sa_unpacked u;
    __m512 acc[4][2];
    __m256 macc[4];
    for (int t = 0; t < N; t++) {
        acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        macc[t] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nu; b++, p += 144, x += 256) {
        for (int o = 0; o < 144; o += 64) _mm_prefetch((const char *)(p + PF_BYTES + o), _MM_HINT_T0);
        if (N == 1) sa_prefetch_l2(p + FAR_BYTES, 144, 64);
        k_scales_mins(p, &u);
        const __m512 s8 = _mm512_castps256_ps512(_mm256_load_ps(u.s));
        for (int c = 0; c < 4; c += 2) {
            const __m512i v = _mm512_loadu_si512((const void *)(p + 16 + 32 * c));
            __m512 n[8]; /* the chunk pair's values: n[2k] low nibbles, n[2k + 1] high, for every row */
            for (int k = 0; k < 4; k++) {
                n[2 * k] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * k), nib);
                n[2 * k + 1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * k + 4), nib);
            }
            /* the sub-blocks' scales: 2c in lanes 0-7 and 2c + 2 in 8-15 (lo), 2c + 1 and 2c + 3 (hi) */
            const __m512i il = _mm512_add_epi32(_mm512_set1_epi32(2 * c), step2);
            const __m512 sl = _mm512_permutexvar_ps(il, s8), sh = _mm512_permutexvar_ps(_mm512_add_epi32(il, one), s8);
            for (int t = 0; t < N; t++) {
                const float *xl = x + t * ld + 64 * c, *xh = xl + 64;
                __m512 lo = _mm512_mul_ps(n[0], _mm512_load_ps(xl));
                __m512 hi = _mm512_mul_ps(n[1], _mm512_load_ps(xh));
                for (int k = 1; k < 4; k++) {
                    lo = _mm512_fmadd_ps(n[2 * k], _mm512_load_ps(xl + 16 * k), lo);
                    hi = _mm512_fmadd_ps(n[2 * k + 1], _mm512_load_ps(xh + 16 * k), hi);
                }
                acc[t][0] = _mm512_fmadd_ps(lo, sl, acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(hi, sh, acc[t][1]);
            }
        }
        for (int t = 0; t < N; t++)
            macc[t] = _mm256_fmadd_ps(_mm256_load_ps(u.m), _mm256_loadu_ps(xs + t * lds + b * 8), macc[t]);
    }
    for (int t = 0; t < N; t++)
        y[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])) - sa_hsum(macc[t]);
}

/* q6_k, N rows of x (ld apart; their sums of groups lds apart), AVX-512, each block's integers
 * formed once for all of them: per half h of the block, its 64 bytes of low bits and 32 of high
 * bits give the 6-bit integers u = q + 32 of values 128h + p: lane l of a 16-lane vector holds
 * those of p = 4l .. 4l + 3 (p < 64: low nibbles) or 64 + 4l .. (high nibbles), one a byte, the
 * high bits put in place by one shift per half (lanes 8-15 read the next 2 bits of the same
 * bytes). Byte k of every lane is widened in place, so x comes in q6k_wide's order. Groups of 16
 * are runs of 4 lanes: their scales are looked up; the -32 is taken out once a block, as
 * 32 sum_g s_g xs_g. Sums in another order than the avx2 loop's (within the same bound). */
SA_INLINE void q6_k_dotN(const uint8_t *p, int64_t nu, const float *x, int64_t ld, const float *xs,
                         int64_t lds, float *y, const int N) {
    const __m512i low4 = _mm512_set1_epi32(0x0F0F0F0F), bits45 = _mm512_set1_epi32(0x30303030);
    const __m512i ff = _mm512_set1_epi32(0xFF);
    const __m512i up_lo = _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i down_hi = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[4][2], moff[4];
    for (int t = 0; t < N; t++) acc[t][0] = acc[t][1] = moff[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nu; b++, p += 210, x += 256) {
        for (int o = 0; o < 210; o += 64) _mm_prefetch((const char *)(p + PF_BYTES + o), _MM_HINT_T0);
        if (N == 1) sa_prefetch_l2(p + FAR_BYTES, 210, 64);
        const __m512 s16 = _mm512_mul_ps(_mm512_set1_ps(sa_half(p + 208)),
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 192)))));
        for (int h = 0; h < 2; h++) {
            const __m512i v = _mm512_loadu_si512((const void *)(p + 64 * h));
            const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h)));
            const __m512i u[2] = {
                _mm512_or_si512(_mm512_and_si512(v, low4), _mm512_and_si512(_mm512_sllv_epi32(hb, up_lo), bits45)),
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(v, 4), low4),
                                _mm512_and_si512(_mm512_srlv_epi32(hb, down_hi), bits45))};
            for (int half = 0; half < 2; half++) {
                __m512 w[4]; /* byte k of every lane, for every row */
                for (int k = 0; k < 3; k++)
                    w[k] = _mm512_cvtepi32_ps(_mm512_and_si512(k ? _mm512_srli_epi32(u[half], 8 * k) : u[half], ff));
                w[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(u[half], 24));
                const __m512i g = _mm512_add_epi32(quarter, _mm512_set1_epi32(8 * h + 4 * half));
                const __m512 sg = _mm512_permutexvar_ps(g, s16);
                for (int t = 0; t < N; t++) {
                    const float *xq = x + t * ld + 128 * h + 64 * half;
                    __m512 d = _mm512_mul_ps(w[0], _mm512_load_ps(xq));
                    for (int k = 1; k < 4; k++) d = _mm512_fmadd_ps(w[k], _mm512_load_ps(xq + 16 * k), d);
                    acc[t][half] = _mm512_fmadd_ps(d, sg, acc[t][half]);
                }
            }
        }
        for (int t = 0; t < N; t++) moff[t] = _mm512_fmadd_ps(s16, _mm512_loadu_ps(xs + t * lds + 16 * b), moff[t]);
    }
    for (int t = 0; t < N; t++)
        y[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])) - 32.0f * _mm512_reduce_add_ps(moff[t]);
}

/* where value i of x goes for the loop above: within each run of 64, k * 16 + l holds 4l + k */
static int64_t q6k_wide(int64_t i) {
    const int64_t r = i % 64, k = r / 16, l = r % 16;
    return i - r + 4 * l + k;
}

/* where value i of x goes for the loop above: within each 256, per pair of chunks (c, c + 1),
 * the low nibbles' sub-blocks then the high ones', each as 4 parts of [8 of chunk c, 8 of c + 1];
 * a part is 8 values of LANE_ORDER */
static int64_t q4k_wide(int64_t i) {
    const int64_t blk = i / 256, r = i % 256, c = 2 * (r / 128), half = r % 128 / 64;
    const int64_t k = r % 64 / 16, l = r % 16;
    const int64_t sub = 2 * c + half + (l >= 8 ? 2 : 0), at = 32 * sub + 8 * k + l % 8;
    return blk * 256 + at / 32 * 32 + LANE_ORDER[at % 32];
}
#else
/* q4_k, N rows of x (ld apart; their sums of groups lds apart), each chunk's values formed once
 * for all of them: the nibbles go straight from the block's bytes into 32-bit lanes (value
 * 8b + 4h of a lane is nibble h of its byte b), without first splitting them into bytes: 14
 * integer operations for 64 values instead of 17, and no unpacked copy of the block. */
SA_INLINE void q4_k_dotN(const uint8_t *p, int64_t nu, const float *x, int64_t ld, const float *xs,
                         int64_t lds, float *y, const int N) {
    const __m256i f = _mm256_set1_epi32(0x0F);
    sa_unpacked u;
    __m256 acc[4][2], macc[4];
    for (int t = 0; t < N; t++) acc[t][0] = acc[t][1] = macc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nu; b++, p += 144, x += 256) {
        for (int o = 0; o < 144; o += 64) _mm_prefetch((const char *)(p + PF_BYTES + o), _MM_HINT_T0);
        if (N == 1) sa_prefetch_l2(p + FAR_BYTES, 144, 64);
        k_scales_mins(p, &u);
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * c));
            __m256 n[8]; /* nibble k of each lane's 32 bits, for every row */
            for (int k = 0; k < 7; k++)
                n[k] = _mm256_cvtepi32_ps(_mm256_and_si256(k ? _mm256_srli_epi32(v, 4 * k) : v, f));
            n[7] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
            const __m256 sl = _mm256_set1_ps(u.s[2 * c]), sh = _mm256_set1_ps(u.s[2 * c + 1]);
            for (int t = 0; t < N; t++) {
                const float *xl = x + t * ld + 64 * c, *xh = xl + 32;
                __m256 lo = _mm256_mul_ps(n[0], _mm256_load_ps(xl));
                __m256 hi = _mm256_mul_ps(n[1], _mm256_load_ps(xh));
                for (int k = 1; k < 4; k++) {
                    lo = _mm256_fmadd_ps(n[2 * k], _mm256_load_ps(xl + 8 * k), lo);
                    hi = _mm256_fmadd_ps(n[2 * k + 1], _mm256_load_ps(xh + 8 * k), hi);
                }
                acc[t][0] = _mm256_fmadd_ps(lo, sl, acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(hi, sh, acc[t][1]);
            }
        }
        for (int t = 0; t < N; t++)
            macc[t] = _mm256_fmadd_ps(_mm256_load_ps(u.m), _mm256_loadu_ps(xs + t * lds + b * 8), macc[t]);
    }
    for (int t = 0; t < N; t++) y[t] = sa_hsum(_mm256_add_ps(acc[t][0], acc[t][1])) - sa_hsum(macc[t]);
}
#endif

/* the second family, N rows of x (ld apart; their sums of groups lds apart): per group, the
 * integers' dot product with x, scaled once (groups of 16: lanes 0-3 by one scale, 4-7 by the
 * next); the offsets' share, sum_g m_g * xs_g, subtracted at the end. Two accumulators a row, so
 * consecutive groups do not wait on each other. A block is unpacked and its integers widened
 * once for all N rows; row t's operations are those of a pass with it alone. */
SA_INLINE void unit_dotN(const uint8_t *p, const int FMT, int64_t nu, const float *x, int64_t ld,
                         const float *xs, int64_t lds, float *y, const int N) {
    const int unit = (int)sa_block_values(FMT), bytes = (int)sa_block_bytes(FMT);
    const int sub = sa_sub(FMT), groups = unit / sub;
    sa_unpacked u;
    __m256 acc[4][2], macc[4], w[4];
    float mlast[4];
    for (int t = 0; t < N; t++) {
        acc[t][0] = acc[t][1] = macc[t] = _mm256_setzero_ps();
        mlast[t] = 0.0f;
    }
    for (int64_t b = 0; b < nu; b++, p += bytes, x += unit) {
        for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(p + PF_BYTES + o), _MM_HINT_T0);
        if (N == 1) sa_prefetch_l2(p + FAR_BYTES, bytes, 64);
        sa_unpack(p, FMT, &u);
        for (int i = 0; i < unit / 32; i++) {
            widen32(u.q[i], w, sa_unsigned_q(FMT));
            const __m256 sc = sub == 32 ? _mm256_set1_ps(u.s[i])
                                        : _mm256_set_m128(_mm_set1_ps(u.s[2 * i + 1]), _mm_set1_ps(u.s[2 * i]));
            for (int t = 0; t < N; t++)
                acc[t][i & 1] = _mm256_fmadd_ps(dot32(w, x + t * ld + 32 * i), sc, acc[t][i & 1]);
        }
        if (sa_has_min(FMT))
            for (int t = 0; t < N; t++) {
                if (groups >= 8)
                    for (int g = 0; g < groups; g += 8)
                        macc[t] = _mm256_fmadd_ps(_mm256_load_ps(u.m + g),
                                                  _mm256_loadu_ps(xs + t * lds + b * groups + g), macc[t]);
                else
                    mlast[t] += u.m[0] * xs[t * lds + b];
            }
    }
    for (int t = 0; t < N; t++) {
        const float v = sa_hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
        y[t] = sa_has_min(FMT) ? v - (sa_hsum(macc[t]) + mlast[t]) : v;
    }
}

/* the second family, T rows of x: the unit's float32 values (exact), then a dot for each row */
SA_INLINE void unit_dotT(const uint8_t *p, const int FMT, int64_t nu, const float *x, int64_t T,
                         int64_t cols, float *y, int64_t y_stride) {
    const int unit = (int)sa_block_values(FMT), bytes = (int)sa_block_bytes(FMT);
    sa_unpacked u;
    float w[SA_MAX_UNIT] __attribute__((aligned(32)));
    __m256 acc[SA_MAX_T];
    for (int64_t t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nu; b++, p += bytes) {
        for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(p + PF_BYTES + o), _MM_HINT_T0);
        sa_unpack(p, FMT, &u);
        sa_unpacked_values(&u, FMT, w);
        for (int k = 0; k < unit; k += 32) {
            __m256 w0 = _mm256_load_ps(w + k), w1 = _mm256_load_ps(w + k + 8);
            __m256 w2 = _mm256_load_ps(w + k + 16), w3 = _mm256_load_ps(w + k + 24);
            for (int64_t t = 0; t < T; t++) {
                const float *xt = x + t * cols + b * unit + k;
                __m256 s = _mm256_mul_ps(w0, _mm256_load_ps(xt));
                s = _mm256_fmadd_ps(w1, _mm256_load_ps(xt + 8), s);
                s = _mm256_fmadd_ps(w2, _mm256_load_ps(xt + 16), s);
                s = _mm256_fmadd_ps(w3, _mm256_load_ps(xt + 24), s);
                acc[t] = _mm256_add_ps(acc[t], s);
            }
        }
    }
    for (int64_t t = 0; t < T; t++) y[t * y_stride] = sa_hsum(acc[t]);
}

#if SA_W == 16
#define Q6_K_WIDE 1 /* q6_k rows of one token take q6_k_dotN, with x in q6k_wide's order */
#else
#define Q6_K_WIDE 0
#endif

/* N rows of x (ld apart, their sums of groups lds apart) through their type's N-row loop */
SA_INLINE void unit_dot(const uint8_t *p, const int FMT, int64_t nu, const float *x, int64_t ld,
                        const float *xs, int64_t lds, float *y, const int N) {
    if (FMT == SA_Q4_K) q4_k_dotN(p, nu, x, ld, xs, lds, y, N);
#if SA_W == 16
    else if (FMT == SA_Q6_K) q6_k_dotN(p, nu, x, ld, xs, lds, y, N);
#endif
    else unit_dotN(p, FMT, nu, x, ld, xs, lds, y, N);
}

/* n rows of x through unit_dot, SA_DOT_ROWS at a time: y[t] is the bits row t alone gets */
SA_INLINE void unit_rows(const uint8_t *p, const int FMT, int64_t nu, const float *x, int64_t ld,
                         const float *xs, int64_t lds, float *y, int64_t n) {
    for (; n > 0; x += SA_DOT_ROWS * ld, xs += SA_DOT_ROWS * lds, y += SA_DOT_ROWS,
                  n -= SA_DOT_ROWS) {
        switch (n < SA_DOT_ROWS ? n : SA_DOT_ROWS) {
        case 1: unit_dot(p, FMT, nu, x, ld, xs, lds, y, 1); break;
#if SA_DOT_ROWS > 2
        case 3: unit_dot(p, FMT, nu, x, ld, xs, lds, y, 3); break;
        case 4: unit_dot(p, FMT, nu, x, ld, xs, lds, y, 4); break;
#endif
        default: unit_dot(p, FMT, nu, x, ld, xs, lds, y, 2); break;
        }
    }
}

#define DEFINE_UNIT_TASK(NAME, FMT)                                                              \
    static void NAME(const void *ctx, int64_t task) {                                            \
        const mv_args *A = ctx;                                                                  \
        const int64_t nu = A->cols / sa_block_values(FMT);                                       \
        int64_t r0 = task * A->task_rows, r1 = r0 + A->task_rows;                                \
        if (r1 > A->rows) r1 = A->rows;                                                          \
        const int64_t n_xs = A->cols / sa_sub(FMT);                                              \
        for (int64_t r = r0; r < r1; r++) {                                                      \
            const uint8_t *row = A->w + r * A->row_bytes;                                        \
            if (!A->each) {                                                                      \
                unit_dotT(row, FMT, nu, A->x, A->T, A->cols, A->y + r, A->rows);                 \
                continue;                                                                        \
            }                                                                                    \
            float ys[SA_MAX_T];                                                                  \
            unit_rows(row, FMT, nu, A->x, A->cols, A->xs, n_xs, ys, A->T);                       \
            for (int64_t t = 0; t < A->T; t++) A->y[t * A->rows + r] = ys[t];                    \
        }                                                                                        \
    }

DEFINE_UNIT_TASK(mv_q5_0, SA_Q5_0)
DEFINE_UNIT_TASK(mv_q5_1, SA_Q5_1)
DEFINE_UNIT_TASK(mv_iq4_nl, SA_IQ4_NL)
DEFINE_UNIT_TASK(mv_q2_k, SA_Q2_K)
DEFINE_UNIT_TASK(mv_q3_k, SA_Q3_K)
DEFINE_UNIT_TASK(mv_q4_k, SA_Q4_K)
DEFINE_UNIT_TASK(mv_q5_k, SA_Q5_K)
DEFINE_UNIT_TASK(mv_q6_k, SA_Q6_K)
DEFINE_UNIT_TASK(mv_iq4_xs, SA_IQ4_XS)

static sa_task_fn mv_task(int fmt) {
    switch (fmt) {
    case SA_F32: return mv_f32;
    case SA_F16: return mv_f16;
    case SA_BF16: return mv_bf16;
    case SA_Q4_0: return mv_q4_0;
    case SA_Q4_1: return mv_q4_1;
    case SA_Q8_0: return mv_q8_0;
    case SA_Q5_0: return mv_q5_0;
    case SA_Q5_1: return mv_q5_1;
    case SA_IQ4_NL: return mv_iq4_nl;
    case SA_Q2_K: return mv_q2_k;
    case SA_Q3_K: return mv_q3_k;
    case SA_Q4_K: return mv_q4_k;
    case SA_Q5_K: return mv_q5_k;
    case SA_Q6_K: return mv_q6_k;
    case SA_IQ4_XS: return mv_iq4_xs;
    default: return NULL;
    }
}

/* each: every row of x through the one-token loop, so that each row of y has the bits a call
 * with that row alone gives (several sequences' decode steps at once: each weight is read from
 * memory once for all of them, and each sequence's tokens are what it gets alone) */
static int mv_run(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
                  const float *x, int64_t T, float *y, int each) {
    sa_task_fn fn = mv_task(fmt);
    if (!fn || rows < 1 || T < 1 || T > SA_MAX_T || !sa_row_bytes(fmt, cols) ||
        row_bytes != sa_row_bytes(fmt, cols))
        return -1;
    /* x copied to a 64-byte aligned buffer (every 32-byte load of it within one cache line), in
     * the order the integers are widened to (q4_0 / q4_1; the second family for one row of x),
     * several rows of the first family through the one-token loops block by block (x_at); then
     * the sums of its groups */
    const int first = fmt == SA_F32 || fmt == SA_F16 || fmt == SA_BF16 || fmt == SA_Q4_0 ||
                      fmt == SA_Q4_1 || fmt == SA_Q8_0;
    each = each || T == 1;
    const int sub = sa_sub(fmt), sums = each && !first && (sa_has_min(fmt) || (Q6_K_WIDE && fmt == SA_Q6_K));
    const int64_t n_x = T * cols, n_xs = sums ? T * cols / sub : 0;
    float *xp = aligned_alloc(64, (size_t)((n_x + n_xs) * 4 + 63) / 64 * 64);
    if (!xp) return -2;
    const int *order = fmt == SA_Q4_0 || fmt == SA_Q4_1 ? NIBBLE_ORDER : !first && each ? LANE_ORDER : NULL;
#if SA_W == 16
    if (fmt == SA_Q4_K && each)
        for (int64_t i = 0; i < n_x; i++) xp[i] = x[i / cols * cols + q4k_wide(i % cols)];
    else if (fmt == SA_Q6_K && each)
        for (int64_t i = 0; i < n_x; i++) xp[i] = x[i / cols * cols + q6k_wide(i % cols)];
    else
#endif
    if (first && each && T > 1)
        pack_rows(x, T, cols, order, xp);
    else
        for (int64_t i = 0; i < n_x; i++) xp[i] = x[order ? i / 32 * 32 + order[i % 32] : i];
    float *xs = xp + n_x;
    for (int64_t g = 0; g < n_xs; g++) {
        float s = 0.0f;
        for (int k = 0; k < sub; k++) s += x[g * sub + k];
        xs[g] = s;
    }
    const int64_t want = (int64_t)TASKS_PER_THREAD * sa_pool_threads();
    int64_t task_rows = (rows + want - 1) / want;
    if (task_rows < MIN_TASK_ROWS) task_rows = MIN_TASK_ROWS;
    mv_args A = {w, row_bytes, rows, cols, T, task_rows, fmt, xp, xs, y, each};
    sa_pool_run(fn, &A, (rows + task_rows - 1) / task_rows);
    free(xp);
    return 0;
}

/* w (rows, row_bytes) of type fmt, x (T, cols) float32 -> y (T, rows). Returns 0, -1 for
 * arguments the caller should have refused (checked again here: compiled code never trusts
 * them): an unknown type, cols not a whole number of blocks, row_bytes not the row's size, T
 * outside 1 .. SA_MAX_T; -2 when out of memory. */
int sa_matmul(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
              const float *x, int64_t T, float *y) {
    return mv_run(w, fmt, rows, cols, row_bytes, x, T, y, 0);
}

/* sa_matmul with each row of y exactly what a call with that row of x alone gives */
int sa_matvecs(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
               const float *x, int64_t T, float *y) {
    return mv_run(w, fmt, rows, cols, row_bytes, x, T, y, 1);
}
