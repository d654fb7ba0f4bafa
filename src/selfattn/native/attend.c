/* Split-K decode attention over a float32 or compact KV cache (flash-decoding), AVX2, with
 * 16-lane loops at AVX-512 that give the same bits (below).
 *
 * The same contract as selfattn.attention.decode.decode_chunks (the numba kernel beside it, and
 * the reference in reference.py, are what the tests hold it to): q (B, H_kv, R, D) pre-scaled,
 * R = G*T rows head-major; k, v (B, H_kv, S_max, row) stored rows; chunk c of C covers `chunk`
 * keys from j_base + c*chunk; query t of T sits at position S - T + t and sees keys
 * p - left .. p + right. Tasks are (b, kv head, chunk); each keeps its own online-softmax state
 * and the chunks are merged by log-sum-exp at the end.
 *
 * Keys go in tiles of up to TILE (a whole chunk of K rows, then its V rows: long sequential
 * runs). Scores: four keys (two for compact rows, or for a group of four float rows) against up
 * to three query rows at a time (four, row_group), each
 * 8-value chunk of a key loaded or decoded in registers straight from the stored row (compact
 * rows: the bytes read are the compact bytes, and nothing is written back) and used for every
 * row; each group of keys is scored against every group of rows before the next is read.
 * Values: VSUB keys at a time, up to three rows times four chunks of output held in registers
 * over them; a block's scale is folded into the softmax weights (p * d), so the integers are
 * only converted. Rows PF_KEYS keys ahead are prefetched while these are used.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "simd.h"

#define TILE 1024 /* keys per online-softmax step, at most: long runs of K rows, then of V rows */
#define VSUB 32  /* keys per pass of the value loops: rows read from memory once, reused from L1 */
#define MAX_BLOCKS (SA_MAX_DIM / 32)
/* rows fetched ahead of use, spread over the loops that use them (one tile ahead at once
 * stalls on the misses it starts; none leaves the stream to the hardware prefetcher, which
 * keeps up with neither the f32 nor the compact rows here; 32 rows measured 3-5% faster than
 * 64 or 128 on the Llama-3 shape, the same on SmolLM2's) */
#define PF_KEYS 32
/* A second prefetch, further on and into L2 (hint T2), for float rows at AVX-512: a core's
 * misses to L1 are bounded by its fill buffers, and that bound, not the FMAs, held the decode
 * loop at ~70% of a plain sequential read. One line in FAR_STEP bytes is enough: the L2's own
 * prefetchers follow it (every line cost 8-11% on SmolLM2's shape with K/V in L3). Paired
 * in-process timings against none, K/V in memory: 0.85-0.87 of the time on the Llama-3 shape,
 * 0.85-0.86 on SmolLM2's, 0.85-0.90 with f16 rows; in L3 0.94-0.96. Not for compact rows
 * (1.07-1.10: their decoding bounds them here) nor at AVX2 (1.07: its 8-lane loops issue twice
 * the instructions a byte). */
#define FAR_BYTES 32768
#define FAR_STEP 512

typedef struct {
    sa_dec_call c; /* the call's arguments (kernels.h) */
    float *acc, *m, *l;
    _Atomic int *failed; /* set by a task that could not allocate its scratch */
} dec_args;

/* what a key past the end of a tile is scored against (its scores are masked out) */
static const uint8_t zero_row[SA_MAX_DIM * 4] __attribute__((aligned(64)));

#define COMPACT(FMT) ((FMT) == SA_Q8_0 || (FMT) == SA_Q4_0)

/* the cache lines of a stored row (row_bytes 0: none); at AVX-512, for float rows, also each
 * FAR_STEP-aligned line among those FAR_BYTES further on, into L2 only (below) */
SA_INLINE void prefetch_row(const uint8_t *row, int64_t row_bytes, const int FMT) {
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch((const char *)(row + o), _MM_HINT_T0);
#if SA_W == 16
    if (!COMPACT(FMT)) sa_prefetch_l2(row + FAR_BYTES, row_bytes, FAR_STEP);
#endif
}

/* chunk c (values 8c .. 8c+7) of a stored row, before its block's scale: f32 and f16 values as
 * stored, q8_0 the integers, q4_0 the nibbles minus 8; all exact in float32, so times the scale
 * they are the values ggml's dequantize gives */
SA_INLINE __m256 ld_chunk(const uint8_t *row, int64_t c, const int FMT) {
    if (FMT == SA_F32) return _mm256_loadu_ps((const float *)row + 8 * c);
    if (FMT == SA_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 16 * c)));
    const int64_t b = c >> 2, i = c & 3;
    if (FMT == SA_Q8_0) {
        __m128i x = _mm_loadl_epi64((const __m128i *)(row + 34 * b + 2 + 8 * i));
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
    }
    /* q4_0: byte j of a block holds value j (low nibble) and value j + 16 (high nibble) */
    __m128i x = _mm_loadl_epi64((const __m128i *)(row + 18 * b + 2 + 8 * (i & 1)));
    if (i >= 2) x = _mm_srli_epi16(x, 4);
    x = _mm_and_si128(x, _mm_set1_epi8(0x0F));
    return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x)), _mm256_set1_ps(8.0f));
}

/* the dot products of four keys from their 8-lane partial sums a0..a3: s[0..3] */
SA_INLINE void sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3, float *s) {
    __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
}

/* ... of two keys, in another order (score2x4's): s[0..1] */
SA_INLINE void sum2(__m256 a0, __m256 a1, float *s) {
    __m256 u = _mm256_hadd_ps(a0, a1); /* per lane half: k0 k0 k1 k1 */
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
    v = _mm_hadd_ps(v, v); /* k0 k1 k0 k1 */
    _mm_storel_pi((__m64 *)s, v);
}

/* float rows (f32, f16): s[r*ts + j] = q_r . k_j for NR (<= 3) rows and the four keys
 * kp[0..3]; pf_row: the bytes of a row to prefetch PF_KEYS rows ahead (0: none) */
SA_INLINE void score4(const float *q, int64_t D, const uint8_t *const *kp, float *s, int64_t ts,
                      int64_t pf_row, const int NR, const int FMT) {
    __m256 a[4][3];
    for (int j = 0; j < 4; j++) prefetch_row(kp[j] + PF_KEYS * pf_row, pf_row, FMT);
    for (int j = 0; j < 4; j++)
        for (int r = 0; r < 3; r++) a[j][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D / 8; c++)
        for (int j = 0; j < 4; j++) {
            __m256 w = ld_chunk(kp[j], c, FMT);
            for (int r = 0; r < NR; r++)
                a[j][r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + 8 * c), w, a[j][r]);
        }
    for (int r = 0; r < NR; r++) sum4(a[0][r], a[1][r], a[2][r], a[3][r], s + r * ts);
}

/* float rows: the same for four rows and the two keys kp[0..1]: a group of four rows (GQA with
 * four query heads a kv head) is scored in one pass over the keys, not as three and one */
SA_INLINE void score2x4(const float *q, int64_t D, const uint8_t *const *kp, float *s, int64_t ts,
                        int64_t pf_row, const int FMT) {
    __m256 a[2][4];
    for (int j = 0; j < 2; j++) {
        prefetch_row(kp[j] + PF_KEYS * pf_row, pf_row, FMT);
        for (int r = 0; r < 4; r++) a[j][r] = _mm256_setzero_ps();
    }
    for (int64_t c = 0; c < D / 8; c++) {
        __m256 w0 = ld_chunk(kp[0], c, FMT), w1 = ld_chunk(kp[1], c, FMT);
        for (int r = 0; r < 4; r++) {
            __m256 qv = _mm256_loadu_ps(q + r * D + 8 * c);
            a[0][r] = _mm256_fmadd_ps(qv, w0, a[0][r]);
            a[1][r] = _mm256_fmadd_ps(qv, w1, a[1][r]);
        }
    }
    for (int r = 0; r < 4; r++) sum2(a[0][r], a[1][r], s + r * ts);
}

/* compact rows (q8_0, q4_0): the same for the two keys kp[0..1], each block's dot product taken
 * over the unscaled integers and scaled once, sum_b d_b * (q_b . n_b): no multiply per chunk, and
 * 4 NR accumulators (a block's, and the running sums) for two keys; NR <= 3 with AVX2's 16
 * registers (at AVX-512, score4_blocks takes four) */
SA_INLINE void score2_blocks(const float *q, int64_t D, const uint8_t *const *kp, float *s,
                             int64_t ts, int64_t pf_row, const int NR, const int FMT) {
    __m256 t[2][3];
    for (int j = 0; j < 2; j++) {
        prefetch_row(kp[j] + PF_KEYS * pf_row, pf_row, FMT);
        for (int r = 0; r < NR; r++) t[j][r] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < D / 32; b++) {
        __m256 a[2][3];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 2; j++) {
                __m256 w = ld_chunk(kp[j], 4 * b + i, FMT);
                for (int r = 0; r < NR; r++) {
                    __m256 qv = _mm256_loadu_ps(q + r * D + 32 * b + 8 * i);
                    a[j][r] = i == 0 ? _mm256_mul_ps(qv, w) : _mm256_fmadd_ps(qv, w, a[j][r]);
                }
            }
        for (int j = 0; j < 2; j++) {
            __m256 d = _mm256_set1_ps(sa_half(kp[j] + sa_block_bytes(FMT) * b));
            for (int r = 0; r < NR; r++) t[j][r] = _mm256_fmadd_ps(a[j][r], d, t[j][r]);
        }
    }
    for (int r = 0; r < NR; r++) sum2(t[0][r], t[1][r], s + r * ts);
}

/* acc_r[chunks c0 .. c0+NC) = alpha_r * acc_r + sum over keys j < nk of pw[r*ts + j] * v_j,
 * for NR rows (NR x NC <= 12 registers); v_j is stored row j from vt, pw the softmax weights (times the block's
 * scale for compact rows). Each key's step holds whichever of its chunks or its weights fits
 * beside the accumulators in 16 registers: for four rows x three chunks the weights did not, and
 * one accumulator lived on the stack (a store-to-load chain a key: 17% slower in L2) */
SA_INLINE void accum_v(float *acc, int64_t Dv, const float *alpha, const uint8_t *vt,
                       int64_t v_row, int64_t nk, const float *pw, int64_t ts, int64_t c0,
                       int64_t pf_row, const int NR, const int NC, const int FMT) {
    __m256 o[4][4];
    for (int r = 0; r < NR; r++) {
        __m256 al = _mm256_set1_ps(alpha[r]);
        for (int i = 0; i < NC; i++) o[r][i] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * Dv + 8 * (c0 + i)), al);
    }
    for (int64_t j = 0; j < nk; j++) {
        const uint8_t *row = vt + j * v_row;
        prefetch_row(row + PF_KEYS * pf_row, pf_row, FMT);
        if (NR * NC + NC + 1 <= 16) { /* the key's NC chunks in registers, one weight at a time */
            __m256 w[4];
            for (int i = 0; i < NC; i++) w[i] = ld_chunk(row, c0 + i, FMT);
            for (int r = 0; r < NR; r++) {
                const __m256 p = _mm256_broadcast_ss(pw + r * ts + j);
                for (int i = 0; i < NC; i++) o[r][i] = _mm256_fmadd_ps(p, w[i], o[r][i]);
            }
        } else { /* the NR weights in registers, one chunk at a time */
            __m256 p[4];
            for (int r = 0; r < NR; r++) p[r] = _mm256_broadcast_ss(pw + r * ts + j);
            for (int i = 0; i < NC; i++) {
                __m256 w = ld_chunk(row, c0 + i, FMT);
                for (int r = 0; r < NR; r++) o[r][i] = _mm256_fmadd_ps(p[r], w, o[r][i]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < NC; i++) _mm256_storeu_ps(acc + r * Dv + 8 * (c0 + i), o[r][i]);
}

#if SA_W == 16
/* AVX-512: the same operations in the same order, two 8-value chunks to a register, so the bits
 * are the 8-lane code's. Scores: two keys to a register (one in each half, against a query
 * chunk broadcast to both), eight float keys a step (each lane's chain and the sums after as
 * score4's, NR <= 3, or score2x4's, NR = 4) or four compact ones (score2_blocks'). Values: 16
 * values of d to a register (lanes are independent there). */

/* chunk c (values 8c .. 8c+7) of the stored float rows r0 (low half) and r1 (high half) */
SA_INLINE __m512 ld_pair(const uint8_t *r0, const uint8_t *r1, int64_t c, const int FMT) {
    if (FMT == SA_F32)
        return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps((const float *)r0 + 8 * c)),
                                  _mm256_loadu_ps((const float *)r1 + 8 * c), 1);
    return _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(r0 + 16 * c))),
        _mm_loadu_si128((const __m128i *)(r1 + 16 * c)), 1));
}

/* values 16c .. 16c+15 of a stored row, as ld_chunk gives them (compact rows: before the
 * block's scale) */
SA_INLINE __m512 ld16(const uint8_t *row, int64_t c, const int FMT) {
    if (FMT == SA_F32) return _mm512_loadu_ps((const float *)row + 16 * c);
    if (FMT == SA_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 32 * c)));
    const int64_t b = c >> 1, h = c & 1;
    if (FMT == SA_Q8_0)
        return _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 34 * b + 2 + 16 * h))));
    /* q4_0: values 0-15 of a block are its bytes' low nibbles, 16-31 their high ones */
    __m128i x = _mm_loadu_si128((const __m128i *)(row + 18 * b + 2));
    if (h) x = _mm_srli_epi16(x, 4);
    x = _mm_and_si128(x, _mm_set1_epi8(0x0F));
    return _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x)), _mm512_set1_ps(8.0f));
}

/* chunk c of two stored compact rows, r0's in the low half and r1's in the high, as ld_chunk
 * gives them */
SA_INLINE __m512 ld_pair_blocks(const uint8_t *r0, const uint8_t *r1, int64_t c, const int FMT) {
    const int64_t b = c >> 2, i = c & 3;
    const int64_t o = FMT == SA_Q8_0 ? 34 * b + 2 + 8 * i : 18 * b + 2 + 8 * (i & 1);
    __m128i x = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(r0 + o)),
                                   _mm_loadl_epi64((const __m128i *)(r1 + o)));
    if (FMT == SA_Q8_0) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x));
    if (i >= 2) x = _mm_srli_epi16(x, 4);
    x = _mm_and_si128(x, _mm_set1_epi8(0x0F));
    return _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x)), _mm512_set1_ps(8.0f));
}

/* score2_blocks for NR (<= 4) rows and the four keys kp[0..3], two to a register: the same
 * operations lane for lane, and the same sums after */
SA_INLINE void score4_blocks(const float *q, int64_t D, const uint8_t *const *kp, float *s,
                             int64_t ts, int64_t pf_row, const int NR, const int FMT) {
    __m512 t[2][4];
    for (int j = 0; j < 4; j++) prefetch_row(kp[j] + PF_KEYS * pf_row, pf_row, FMT);
    for (int p = 0; p < 2; p++)
        for (int r = 0; r < NR; r++) t[p][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < D / 32; b++) {
        __m512 a[2][4];
        for (int i = 0; i < 4; i++) {
            __m512 qv[4];
            for (int r = 0; r < NR; r++)
                qv[r] = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + r * D + 32 * b + 8 * i));
            for (int p = 0; p < 2; p++) {
                const __m512 w = ld_pair_blocks(kp[2 * p], kp[2 * p + 1], 4 * b + i, FMT);
                for (int r = 0; r < NR; r++)
                    a[p][r] = i == 0 ? _mm512_mul_ps(qv[r], w) : _mm512_fmadd_ps(qv[r], w, a[p][r]);
            }
        }
        const int64_t o = sa_block_bytes(FMT) * b;
        for (int p = 0; p < 2; p++) {
            const __m512 d = _mm512_insertf32x8(_mm512_set1_ps(sa_half(kp[2 * p] + o)),
                                                _mm256_set1_ps(sa_half(kp[2 * p + 1] + o)), 1);
            for (int r = 0; r < NR; r++) t[p][r] = _mm512_fmadd_ps(a[p][r], d, t[p][r]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int p = 0; p < 2; p++)
            sum2(_mm512_castps512_ps256(t[p][r]), _mm512_extractf32x8_ps(t[p][r], 1), s + r * ts + 2 * p);
}

/* s[r*ts + j] = q_r . k_j for NR (<= 4) rows and the eight keys kp[0..7] */
SA_INLINE void score8(const float *q, int64_t D, const uint8_t *const *kp, float *s, int64_t ts,
                      int64_t pf_row, const int NR, const int FMT) {
    __m512 a[4][4];
    for (int j = 0; j < 8; j++) prefetch_row(kp[j] + PF_KEYS * pf_row, pf_row, FMT);
    for (int p = 0; p < 4; p++)
        for (int r = 0; r < NR; r++) a[p][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D / 8; c++) {
        __m512 w[4];
        for (int p = 0; p < 4; p++) w[p] = ld_pair(kp[2 * p], kp[2 * p + 1], c, FMT);
        for (int r = 0; r < NR; r++) {
            const __m512 qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + r * D + 8 * c));
            for (int p = 0; p < 4; p++) a[p][r] = _mm512_fmadd_ps(qv, w[p], a[p][r]);
        }
    }
    for (int r = 0; r < NR; r++) {
        __m256 h[8];
        for (int p = 0; p < 4; p++) {
            h[2 * p] = _mm512_castps512_ps256(a[p][r]);
            h[2 * p + 1] = _mm512_extractf32x8_ps(a[p][r], 1);
        }
        if (NR == 4)
            for (int j = 0; j < 8; j += 2) sum2(h[j], h[j + 1], s + r * ts + j);
        else
            for (int j = 0; j < 8; j += 4) sum4(h[j], h[j + 1], h[j + 2], h[j + 3], s + r * ts + j);
    }
}

/* accum_v with 16 values a register: NC (<= 4) of them from 16*c0, for NR (<= 4) rows */
SA_INLINE void accum16(float *acc, int64_t Dv, const float *alpha, const uint8_t *vt, int64_t v_row,
                       int64_t nk, const float *pw, int64_t ts, int64_t c0, int64_t pf_row,
                       const int NR, const int NC, const int FMT) {
    __m512 o[4][4];
    for (int r = 0; r < NR; r++) {
        const __m512 al = _mm512_set1_ps(alpha[r]);
        for (int i = 0; i < NC; i++)
            o[r][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dv + 16 * (c0 + i)), al);
    }
    for (int64_t j = 0; j < nk; j++) {
        const uint8_t *row = vt + j * v_row;
        prefetch_row(row + PF_KEYS * pf_row, pf_row, FMT);
        __m512 w[4];
        for (int i = 0; i < NC; i++) w[i] = ld16(row, c0 + i, FMT);
        for (int r = 0; r < NR; r++) {
            const __m512 p = _mm512_set1_ps(pw[r * ts + j]);
            for (int i = 0; i < NC; i++) o[r][i] = _mm512_fmadd_ps(p, w[i], o[r][i]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < NC; i++) _mm512_storeu_ps(acc + r * Dv + 16 * (c0 + i), o[r][i]);
}

SA_INLINE void score_group16(const float *q, int64_t D, const uint8_t *const *kp, float *s,
                             int64_t ts, int64_t pf, int64_t nr, const int FMT) {
    if (COMPACT(FMT)) {
        switch (nr) {
        case 1: score4_blocks(q, D, kp, s, ts, pf, 1, FMT); break;
        case 2: score4_blocks(q, D, kp, s, ts, pf, 2, FMT); break;
        case 3: score4_blocks(q, D, kp, s, ts, pf, 3, FMT); break;
        default: score4_blocks(q, D, kp, s, ts, pf, 4, FMT); break;
        }
        return;
    }
    switch (nr) {
    case 1: score8(q, D, kp, s, ts, pf, 1, FMT); break;
    case 2: score8(q, D, kp, s, ts, pf, 2, FMT); break;
    case 3: score8(q, D, kp, s, ts, pf, 3, FMT); break;
    default: score8(q, D, kp, s, ts, pf, 4, FMT); break;
    }
}

#endif

SA_INLINE float hmax(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

/* online softmax of one row's tile of scores (n, a multiple of 8, of them; keys lo .. hi-1
 * visible): row becomes p (0 elsewhere); returns alpha, the factor the row's earlier state is
 * scaled by */
SA_INLINE float softmax_tile(float *row, int64_t n, int64_t lo, int64_t hi, float softcap,
                             float *m, float *l) {
    if (softcap > 0.0f)
        for (int64_t j = lo; j < hi; j++) row[j] = softcap * sa_tanhf(row[j] / softcap);
    int bad = 0; /* a NaN or +inf logit the row sees: the row is NaN (reference.py) */
    for (int64_t j = lo; j < hi; j++) bad |= !(row[j] < INFINITY);
    for (int64_t j = 0; j < lo; j++) row[j] = -INFINITY;
    for (int64_t j = hi; j < n; j++) row[j] = -INFINITY;
    __m256 mx = _mm256_load_ps(row);
    for (int64_t j = 8; j < n; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(row + j));
    const float tile_max = hmax(mx), m_new = *m > tile_max ? *m : tile_max;
    float alpha = *m == -INFINITY ? 0.0f : expf(*m - m_new);
    *m = m_new;
    __m256 mv = _mm256_set1_ps(m_new), sum = _mm256_setzero_ps();
    int64_t j = 0;
#if SA_W == 16 /* 16 exponentials at once, summed as two vectors of 8 in order: the same bits */
    for (; j + 16 <= n; j += 16) {
        __m512 e = vf_exp_neg(_mm512_sub_ps(_mm512_loadu_ps(row + j), _mm512_set1_ps(m_new)));
        _mm512_storeu_ps(row + j, e);
        sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
        sum = _mm256_add_ps(sum, _mm512_extractf32x8_ps(e, 1));
    }
#endif
    for (; j < n; j += 8) {
        __m256 e = sa_exp_neg(_mm256_sub_ps(_mm256_load_ps(row + j), mv));
        _mm256_store_ps(row + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    *l = bad ? NAN : *l * alpha + sa_hsum(sum); /* NaN stays NaN in later tiles */
    return alpha;
}

/* rows go in groups of three, or of four when R is a multiple of 4 and not of 3 (GQA with 4 or 8
 * query heads a kv head; compact rows at AVX-512 only, which has the registers for them); a
 * group is scored and accumulated in one pass, each of its K and V rows decoded once */
SA_INLINE int64_t row_group(int64_t R, const int FMT) {
    return (SA_W == 16 || !COMPACT(FMT)) && R % 3 && R % 4 == 0 ? 4 : 3;
}

/* keys a scoring step: two compact rows, four float rows (twice as many at AVX-512) */
SA_INLINE int64_t key_step(const int FMT) { return (COMPACT(FMT) ? 2 : 4) * (SA_W / 8); }

/* scores of nr (1 .. 4) rows from q against the key_step keys kp[0 ..], each case its own
 * register block */
SA_INLINE void score_group(const float *q, int64_t D, const uint8_t *const *kp, float *s,
                           int64_t ts, int64_t pf, int64_t nr, const int FMT) {
#if SA_W == 16
    score_group16(q, D, kp, s, ts, pf, nr, FMT);
#else
    if (COMPACT(FMT)) { /* groups of at most three rows here (row_group) */
        switch (nr) {
        case 1: score2_blocks(q, D, kp, s, ts, pf, 1, FMT); break;
        case 2: score2_blocks(q, D, kp, s, ts, pf, 2, FMT); break;
        default: score2_blocks(q, D, kp, s, ts, pf, 3, FMT); break;
        }
    } else if (nr == 4) {
        score2x4(q, D, kp, s, ts, pf, FMT);
        score2x4(q, D, kp + 2, s + 2, ts, pf, FMT);
    } else {
        switch (nr) {
        case 1: score4(q, D, kp, s, ts, pf, 1, FMT); break;
        case 2: score4(q, D, kp, s, ts, pf, 2, FMT); break;
        default: score4(q, D, kp, s, ts, pf, 3, FMT); break;
        }
    }
#endif
}

/* one pass of NR rows and NC chunks: accum16's chunks of 16 (WIDE) or accum_v's of 8 */
SA_INLINE void accum_pass(float *acc, int64_t Dv, const float *al, const uint8_t *vt, int64_t v_row,
                          int64_t ns, const float *w, int64_t ws, int64_t c0, int64_t pf,
                          const int NR, const int NC, const int FMT, const int WIDE) {
#if SA_W == 16
    if (WIDE) {
        accum16(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, NR, NC, FMT);
        return;
    }
#endif
    accum_v(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, NR, NC, FMT);
}

/* ... for nc chunks: four float rows take up to three chunks of 8 a pass; fewer rows, compact
 * rows (a block a pass) and chunks of 16 four */
SA_INLINE void accum_chunks(float *acc, int64_t Dv, const float *al, const uint8_t *vt,
                            int64_t v_row, int64_t ns, const float *w, int64_t ws, int64_t c0,
                            int64_t pf, const int NR, int64_t nc, const int FMT, const int WIDE) {
    switch (nc) {
    case 1: accum_pass(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, NR, 1, FMT, WIDE); break;
    case 2: accum_pass(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, NR, 2, FMT, WIDE); break;
    case 3: accum_pass(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, NR, 3, FMT, WIDE); break;
    default:
        accum_pass(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, NR, NR == 4 && !WIDE && !COMPACT(FMT) ? 3 : 4,
                   FMT, WIDE);
        break;
    }
}

/* ... for nr (1 .. 4) rows, each (rows, chunks) its own register block */
SA_INLINE void accum_group(float *acc, int64_t Dv, const float *al, const uint8_t *vt,
                           int64_t v_row, int64_t ns, const float *w, int64_t ws, int64_t c0,
                           int64_t pf, int64_t nr, int64_t nc, const int FMT, const int WIDE) {
    switch (nr) {
    case 1: accum_chunks(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, 1, nc, FMT, WIDE); break;
    case 2: accum_chunks(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, 2, nc, FMT, WIDE); break;
    case 4: accum_chunks(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, 4, nc, FMT, WIDE); break;
    default: accum_chunks(acc, Dv, al, vt, v_row, ns, w, ws, c0, pf, 3, nc, FMT, WIDE); break;
    }
}

/* which rows see a key of the tile j0 .. j0+nk-1, and which of its keys (lo[r] .. hi[r]-1);
 * returns whether any row does */
static int tile_rows(const dec_args *A, int64_t j0, int64_t nk, int64_t *lo, int64_t *hi,
                     unsigned char *seen) {
    int any = 0;
    for (int64_t r = 0; r < A->c.R; r++) {
        int64_t p = A->c.S - A->c.T + r % A->c.T;
        int64_t a = p - A->c.left - j0, z = p + A->c.right - j0 + 1;
        lo[r] = a < 0 ? 0 : a > nk ? nk : a;
        hi[r] = z > nk ? nk : z < lo[r] ? lo[r] : z;
        seen[r] = hi[r] > lo[r];
        any |= seen[r];
    }
    return any;
}

/* the tile's scores s (R rows of ts) for its nk keys kp[0 ..]: each group of keys is scored
 * against every group of rows while it is in L1 */
SA_INLINE void score_tile(const float *q, int64_t R, int64_t D, const uint8_t *const *kp,
                          int64_t nk, float *s, int64_t ts, const unsigned char *seen,
                          int64_t k_row, const int FMT) {
    const int64_t gr = row_group(R, FMT);
    for (int64_t j = 0; j < nk; j += key_step(FMT))
        for (int64_t r0 = 0; r0 < R; r0 += gr) {
            const int64_t nr = R - r0 < gr ? R - r0 : gr;
            int any_seen = 0;
            for (int64_t r = r0; r < r0 + nr; r++) any_seen |= seen[r];
            if (any_seen)
                score_group(q + r0 * D, D, kp + j, s + r0 * ts + j, ts, r0 ? 0 : k_row, nr, FMT);
        }
}

/* the tile's weights times its V rows (vt: the tile's first, nk of them) into acc, after each
 * row's earlier state is scaled by alpha: VSUB keys at a time, each sub-block used by every
 * row and output chunk before the next is read */
SA_INLINE void accumulate_tile(float *acc, int64_t R, int64_t Dv, const float *alpha,
                               const unsigned char *seen, const uint8_t *vt, int64_t v_row,
                               int64_t nk, const float *s, int64_t ts, const int FMT) {
    const int64_t nb = Dv / 32, bb = COMPACT(FMT) ? sa_block_bytes(FMT) : 0;
    const int64_t gr = row_group(R, FMT);
    /* at AVX-512: 16 values of d a register (accum16), when Dv is a multiple of 16 */
    const int wide = SA_W == 16 && Dv % 16 == 0;
    const int64_t lanes = wide ? 16 : 8;
    const float ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    float pw[4 * VSUB] __attribute__((aligned(32))); /* compact rows: a group's weights */
    float dv[MAX_BLOCKS * VSUB] __attribute__((aligned(32)));
    for (int64_t j1 = 0; j1 < nk; j1 += VSUB, vt += VSUB * v_row) {
        const int64_t ns = nk - j1 < VSUB ? nk - j1 : VSUB;
        if (COMPACT(FMT))
            for (int64_t k = 0; k < nb; k++)
                for (int64_t j = 0; j < VSUB; j++)
                    dv[k * VSUB + j] = j < ns ? sa_half(vt + j * v_row + bb * k) : 0.0f;
        for (int64_t r0 = 0; r0 < R; r0 += gr) {
            const int64_t nr = R - r0 < gr ? R - r0 : gr;
            /* chunks a pass: compact rows a block (its scale folded into the weights) */
            const int64_t step = COMPACT(FMT) ? 32 / lanes : !wide && nr == 4 ? 3 : 4;
            int touch = 0;
            for (int64_t r = r0; r < r0 + nr; r++) touch |= seen[r] || alpha[r] != 1.0f;
            if (!touch) continue;
            /* the earlier state is scaled once, with the tile's first sub-block */
            const float *al = j1 ? ones : alpha + r0;
            for (int64_t c0 = 0; c0 < Dv / lanes; c0 += step) {
                const float *w = s + r0 * ts + j1;
                int64_t wstride = ts;
                if (COMPACT(FMT)) { /* weights times this block's scales */
                    const float *d = dv + (c0 * lanes / 32) * VSUB;
                    for (int64_t r = 0; r < nr; r++)
                        for (int64_t j = 0; j < ns; j += 8) /* j1 + ns rounded up <= ts */
                            _mm256_store_ps(pw + r * VSUB + j, _mm256_mul_ps(_mm256_loadu_ps(w + r * ts + j),
                                                                             _mm256_load_ps(d + j)));
                    w = pw;
                    wstride = VSUB;
                }
                const int64_t nc = Dv / lanes - c0 < step ? Dv / lanes - c0 : step;
                const int64_t pf = r0 || c0 ? 0 : v_row;
                if (wide) /* each call its own copy, WIDE a constant in it */
                    accum_group(acc + r0 * Dv, Dv, al, vt, v_row, ns, w, wstride, c0, pf, nr, nc, FMT, 1);
                else
                    accum_group(acc + r0 * Dv, Dv, al, vt, v_row, ns, w, wstride, c0, pf, nr, nc, FMT, 0);
            }
        }
    }
}

/* one task: its chunk of keys in tiles of up to TILE, each scored (every K row read once), put
 * through the online softmax row by row, and accumulated (its V rows read once). FMT is a
 * constant in each instance below, so the row decoding inlines per format. */
SA_INLINE void dec_task(const void *ctx, int64_t task, const int FMT) {
    const dec_args *A = ctx;
    const int64_t R = A->c.R, D = A->c.D, Dv = A->c.Dv, S = A->c.S;
    const int64_t b = task / (A->c.H_kv * A->c.C), g = (task / A->c.C) % A->c.H_kv, c = task % A->c.C;
    const int64_t j_start = A->c.j_base + c * A->c.chunk;
    const int64_t j_end = j_start + A->c.chunk < S ? j_start + A->c.chunk : S;
    const int64_t head = b * A->c.H_kv + g, k_row = A->c.k_row, v_row = A->c.v_row;
    const uint8_t *kh = A->c.k + head * A->c.S_max * k_row, *vh = A->c.v + head * A->c.S_max * v_row;
    const float *q = A->c.q + head * R * D;
    float *acc = A->acc + task * R * Dv, *mm = A->m + task * R, *ll = A->l + task * R;
    /* the tile's scores: R rows of ts (the chunk's keys, rounded up to 8, at most TILE) */
    const int64_t span = j_end - j_start, ts = span < TILE ? (span + 7) / 8 * 8 : TILE;
    float *s = aligned_alloc(32, (size_t)(R * ts) * 4);
    if (!s) {
        atomic_store(A->failed, 1);
        return;
    }
    float alpha[SA_MAX_ROWS];
    unsigned char seen[SA_MAX_ROWS];
    const uint8_t *kp[TILE + 8];
    int64_t lo[SA_MAX_ROWS], hi[SA_MAX_ROWS];

    for (int64_t r = 0; r < R; r++) {
        mm[r] = -INFINITY;
        ll[r] = 0.0f;
    }
    memset(acc, 0, (size_t)(R * Dv) * 4);

    for (int64_t j0 = j_start; j0 < j_end; j0 += ts) {
        const int64_t nk = j_end - j0 < ts ? j_end - j0 : ts;
        if (!tile_rows(A, j0, nk, lo, hi, seen)) continue;
        for (int64_t j = 0; j < ts + 8; j++) kp[j] = j < nk ? kh + (j0 + j) * k_row : zero_row;
        score_tile(q, R, D, kp, nk, s, ts, seen, k_row, FMT);
        const int64_t n8 = (nk + 7) / 8 * 8;
        for (int64_t r = 0; r < R; r++) {
            alpha[r] = 1.0f;
            if (seen[r]) alpha[r] = softmax_tile(s + r * ts, n8, lo[r], hi[r], A->c.softcap, mm + r, ll + r);
            else memset(s + r * ts, 0, (size_t)n8 * 4);
        }
        accumulate_tile(acc, R, Dv, alpha, seen, vh + j0 * v_row, v_row, nk, s, ts, FMT);
    }
    free(s);
}

#define DEFINE_DEC_TASK(NAME, FMT) \
    static void NAME(const void *ctx, int64_t task) { dec_task(ctx, task, FMT); }
DEFINE_DEC_TASK(dec_f32, SA_F32)
DEFINE_DEC_TASK(dec_f16, SA_F16)
DEFINE_DEC_TASK(dec_q8_0, SA_Q8_0)
DEFINE_DEC_TASK(dec_q4_0, SA_Q4_0)

/* one call's (out, lse): per row, its chunks' partial results merged by log-sum-exp */
static void merge_chunks(const dec_args *A) {
    const int64_t B = A->c.B, H_kv = A->c.H_kv, R = A->c.R, C = A->c.C, T = A->c.T, Dv = A->c.Dv, G = R / T;
    float *out = A->c.out, *lse = A->c.lse;
    const float *m = A->m, *l = A->l, *acc = A->acc;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < H_kv; g++)
            for (int64_t r = 0; r < R; r++) {
                int64_t base = (b * H_kv + g) * C;
                float M = -INFINITY;
                for (int64_t c = 0; c < C; c++) M = m[(base + c) * R + r] > M ? m[(base + c) * R + r] : M;
                int64_t h = g * G + r / T, t = r % T;
                float *o = out + ((b * H_kv * G + h) * T + t) * Dv;
                float *ls = lse + (b * H_kv * G + h) * T + t;
                memset(o, 0, (size_t)Dv * 4);
                int poisoned = 0;
                for (int64_t c = 0; c < C; c++) poisoned |= isnan(l[(base + c) * R + r]);
                if (poisoned) {
                    for (int64_t d = 0; d < Dv; d++) o[d] = NAN;
                    *ls = NAN;
                    continue;
                }
                if (M == -INFINITY) {
                    *ls = -INFINITY;
                    continue;
                }
                double total = 0.0;
                for (int64_t c = 0; c < C; c++) {
                    float lc = l[(base + c) * R + r];
                    if (lc > 0.0f) {
                        float w = expf(m[(base + c) * R + r] - M);
                        total += (double)w * lc;
                        const float *a = acc + ((base + c) * R + r) * Dv;
                        for (int64_t d = 0; d < Dv; d++) o[d] += w * a[d];
                    }
                }
                float inv = (float)(1.0 / total);
                for (int64_t d = 0; d < Dv; d++) o[d] *= inv;
                *ls = M + logf((float)total);
            }
}

/* several calls' tasks in one pool run: task t belongs to the call whose range holds it */
typedef struct {
    int64_t n, first[SA_MAX_T + 1];
    const dec_args *A;
    sa_task_fn fn[SA_MAX_T];
} dec_calls;

static void calls_task(const void *ctx, int64_t t) {
    const dec_calls *D = ctx;
    int64_t i = 0;
    while (t >= D->first[i + 1]) i++;
    D->fn[i](&D->A[i], t - D->first[i]);
}

/* a call's arguments, outside what this kernel handles? */
static int dec_refused(const sa_dec_call *c) {
    if (c->D % 8 || c->Dv % 8 || c->D > SA_MAX_DIM || c->Dv > SA_MAX_DIM || c->R > SA_MAX_ROWS ||
        c->T < 1 || c->R % c->T || c->S < 1 || c->S > c->S_max || c->chunk < 1 || c->C < 1 || c->B < 1 ||
        c->H_kv < 1)
        return 1;
    if (c->fmt != SA_F32 && (c->D % 32 || c->Dv != c->D)) return 1;
    if (c->fmt != SA_F32 && c->fmt != SA_F16 && c->fmt != SA_Q8_0 && c->fmt != SA_Q4_0) return 1;
    /* a stored row must hold D (K) and Dv (V) values of the format: never read past a row */
    return c->k_row < sa_row_bytes(c->fmt, c->D) || c->v_row < sa_row_bytes(c->fmt, c->Dv);
}

/* n (1 .. SA_MAX_T) calls of sa_decode_attention, their tasks in one pool run: several
 * sequences' decode steps, each on its own cache, pay for one wake-up of the pool instead of
 * one each (at a few hundred keys a call's work is a few microseconds). Returns what
 * sa_decode_attention returns, for the first call refused or all. */
int sa_decode_attentions(const sa_dec_call *calls, int64_t n) {
    if (n < 1 || n > SA_MAX_T) return -1;
    dec_args A[SA_MAX_T];
    dec_calls all = {.n = n, .A = A};
    int64_t floats = 0;
    for (int64_t i = 0; i < n; i++) {
        const sa_dec_call *c = &calls[i];
        if (dec_refused(c)) return -1;
        const int64_t tasks = c->B * c->H_kv * c->C;
        all.first[i + 1] = all.first[i] + tasks;
        floats += tasks * c->R * (c->Dv + 2);
        all.fn[i] = c->fmt == SA_F32 ? dec_f32 : c->fmt == SA_F16 ? dec_f16 : c->fmt == SA_Q8_0 ? dec_q8_0
                  : dec_q4_0;
    }
    /* each task's online-softmax state: acc (tasks, R, Dv), m and l (tasks, R) */
    float *scratch = malloc((size_t)floats * sizeof(float));
    if (!scratch) return -2;
    _Atomic int failed = 0;
    float *at = scratch;
    for (int64_t i = 0; i < n; i++) {
        const sa_dec_call *c = &calls[i];
        const int64_t tasks = all.first[i + 1] - all.first[i];
        float *acc = at, *m = acc + tasks * c->R * c->Dv, *l = m + tasks * c->R;
        at = l + tasks * c->R;
        A[i] = (dec_args){*c, acc, m, l, &failed};
    }
    sa_pool_run(calls_task, &all, all.first[n]);
    if (!atomic_load(&failed))
        for (int64_t i = 0; i < n; i++) merge_chunks(&A[i]);
    free(scratch);
    return atomic_load(&failed) ? -2 : 0;
}

/* Returns 0, -1 when the shapes are outside what this kernel handles (the caller falls back
 * to the numba kernel before ever calling with them), -2 when out of memory. out (B, H, T, Dv),
 * lse (B, H, T). */
int sa_decode_attention(const float *q, const uint8_t *k, const uint8_t *v, int fmt, int64_t B,
                        int64_t H_kv, int64_t R, int64_t D, int64_t Dv, int64_t S_max,
                        int64_t k_row, int64_t v_row, int64_t S, int64_t T, int64_t j_base,
                        int64_t chunk, int64_t C, int64_t left, int64_t right, float softcap,
                        float *out, float *lse) {
    const sa_dec_call c = {q, k, v, fmt, B, H_kv, R, D, Dv, S_max, k_row, v_row, S, T, j_base, chunk,
                           C, left, right, softcap, out, lse};
    return sa_decode_attentions(&c, 1);
}
