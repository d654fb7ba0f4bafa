/* Every quantized weight type the kernels read, unpacked the same way: a block of `unit` values
 * (32, or 256 for the K-quants and IQ4_XS) -> its small integers q (int8, in value order) and,
 * per group of SUB values (16 or 32), a scale s and an offset m, such that
 *
 *     value l = s[l / SUB] * q[l] - m[l / SUB]    (float32: one product, then one difference)
 *
 * which is the arithmetic of gguf-py's numpy dequantizers (the layouts are ggml's). s and m are
 * themselves the float32 products gguf forms (d * sc, dmin * m); a sum (d * n) + m is written as
 * a difference with m negated, the same bits. Types without an offset leave m out (x - 0 is x).
 *
 * dequant.c turns these into float32 values; matvec.c keeps the integers and factors the scales
 * out of each group's dot product. The integers are built with 32-byte AVX2 operations.
 */
#ifndef SELFATTN_UNPACK_H
#define SELFATTN_UNPACK_H

#include "simd.h"

#define SA_MAX_UNIT 256

typedef struct {
    __m256i q[SA_MAX_UNIT / 32]; /* 32 int8 integers each, values 32i .. 32i + 31 in order */
    float s[SA_MAX_UNIT / 16] __attribute__((aligned(32)));
    float m[SA_MAX_UNIT / 16] __attribute__((aligned(32)));
} sa_unpacked;

/* values one scale covers */
static inline int sa_sub(int fmt) {
    return fmt == SA_Q2_K || fmt == SA_Q3_K || fmt == SA_Q6_K ? 16 : 32;
}

/* whether the type has offsets (m) */
static inline int sa_has_min(int fmt) {
    return fmt == SA_Q4_1 || fmt == SA_Q5_1 || fmt == SA_Q2_K || fmt == SA_Q4_K || fmt == SA_Q5_K;
}

/* the quantized types (not f32, f16, bf16) */
static inline int sa_is_quant(int fmt) { return sa_block_values(fmt) >= 32; }

static const int8_t SA_IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                         1,    13,   25,  38,  53,  69,  89,  113};

/* 16 bytes of nibbles -> 32 values: the low nibbles (values 0..15), then the high ones */
SA_INLINE __m256i nibbles32(const uint8_t *qs) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i v = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
}

/* the 32 high bits of q5_0 / q5_1 (bit l of the word at p) -> byte l = 16 or 0 */
SA_INLINE __m256i fifth_bits(const uint8_t *p) {
    int32_t word;
    memcpy(&word, p, 4);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(word), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, bit), _mm256_set1_epi8(16));
}

/* 16 unsigned (sign = 0) or signed bytes -> 16 floats, each times d (one rounding each) */
SA_INLINE void scale16(__m128i b, int sign, float d, float *out) {
    __m256i lo = sign ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
    __m256i hi = sign ? _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)) : _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    __m256 dv = _mm256_set1_ps(d);
    _mm256_store_ps(out, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(lo)));
    _mm256_store_ps(out + 8, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(hi)));
}

/* the 6-bit scales and mins of q4_k / q5_k (12 bytes at p): 8 of each, as bytes */
SA_INLINE void k_scales(const uint8_t *p, uint8_t sc[8], uint8_t mn[8]) {
    uint32_t a, b, c, u[2];
    memcpy(&a, p, 4);
    memcpy(&b, p + 4, 4);
    memcpy(&c, p + 8, 4);
    u[0] = a & 0x3F3F3F3F;
    u[1] = (c & 0x0F0F0F0F) | ((a >> 2) & 0x30303030);
    memcpy(sc, u, 8);
    u[0] = b & 0x3F3F3F3F;
    u[1] = ((c >> 4) & 0x0F0F0F0F) | ((b >> 2) & 0x30303030);
    memcpy(mn, u, 8);
}

SA_INLINE void scale8(const uint8_t b[8], float d, float *out) {
    __m128i v = _mm_loadl_epi64((const __m128i *)b);
    _mm256_store_ps(out, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))));
}

/* q4_k / q5_k: d and dmin (f16 at p, p + 2) times the 6-bit scales and mins at p + 4 */
SA_INLINE void k_scales_mins(const uint8_t *p, sa_unpacked *u) {
    uint8_t sc[8], mn[8];
    k_scales(p + 4, sc, mn);
    scale8(sc, sa_half(p), u->s);
    scale8(mn, sa_half(p + 2), u->m);
}

/* q8_0: d (f16), 32 int8 */
SA_INLINE void unpack_q8_0(const uint8_t *p, sa_unpacked *u) {
    u->s[0] = sa_half(p);
    u->q[0] = _mm256_loadu_si256((const __m256i *)(p + 2));
}

/* q4_0: d, 16 bytes of nibbles; q = n - 8 */
SA_INLINE void unpack_q4_0(const uint8_t *p, sa_unpacked *u) {
    u->s[0] = sa_half(p);
    u->q[0] = _mm256_sub_epi8(nibbles32(p + 2), _mm256_set1_epi8(8));
}

/* q4_1: d, m, nibbles; value (d * n) + m */
SA_INLINE void unpack_q4_1(const uint8_t *p, sa_unpacked *u) {
    u->s[0] = sa_half(p);
    u->m[0] = -sa_half(p + 2);
    u->q[0] = nibbles32(p + 4);
}

/* q5_0: d, 32 high bits, nibbles; q = (n | h << 4) - 16 */
SA_INLINE void unpack_q5_0(const uint8_t *p, sa_unpacked *u) {
    u->s[0] = sa_half(p);
    __m256i q = _mm256_or_si256(nibbles32(p + 6), fifth_bits(p + 2));
    u->q[0] = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
}

/* q5_1: d, m, 32 high bits, nibbles; value (d * (n | h << 4)) + m */
SA_INLINE void unpack_q5_1(const uint8_t *p, sa_unpacked *u) {
    u->s[0] = sa_half(p);
    u->m[0] = -sa_half(p + 2);
    u->q[0] = _mm256_or_si256(nibbles32(p + 8), fifth_bits(p + 4));
}

/* iq4_nl: d, nibbles indexing a table of 16 int8 values */
SA_INLINE void unpack_iq4_nl(const uint8_t *p, sa_unpacked *u) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)SA_IQ4_VALUES));
    u->s[0] = sa_half(p);
    u->q[0] = _mm256_shuffle_epi8(table, nibbles32(p + 2));
}

/* q2_k: 16 scale bytes (scale low nibble, min high nibble), 64 bytes of 2-bit values, d, dmin.
 * Value 128h + 32s + l is bits 2s..2s+1 of byte 32h + l; groups of 16. */
SA_INLINE void unpack_q2_k(const uint8_t *p, sa_unpacked *u) {
    const __m256i three = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * h));
        for (int s = 0; s < 4; s++)
            u->q[4 * h + s] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * s), three);
    }
    __m128i sc = _mm_loadu_si128((const __m128i *)p);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    scale16(_mm_and_si128(sc, low4), 0, sa_half(p + 80), u->s);
    scale16(_mm_and_si128(_mm_srli_epi16(sc, 4), low4), 0, sa_half(p + 82), u->m);
}

/* q3_k: 32 bytes of high bits, 64 bytes of 2-bit values, 12 bytes of 6-bit scales, d. Value
 * 128h + 32s + l: low bits as q2_k, high bit = bit 4h + s of byte l; q = low - 4 when that bit is
 * clear (low | bit << 2, minus 4). Scale i (groups of 16): low 4 bits from byte i % 8 (high
 * nibble when i >= 8), high 2 bits from byte 8 + i % 4 at bit 2 (i / 4); minus 32. */
SA_INLINE void unpack_q3_k(const uint8_t *p, sa_unpacked *u) {
    const __m256i three = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);
    __m256i hm = _mm256_loadu_si256((const __m256i *)p);
    for (int h = 0; h < 2; h++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 + 32 * h));
        for (int s = 0; s < 4; s++) {
            int b = 4 * h + s; /* bit b of the high-bit byte -> bit 2 */
            __m256i hb = b < 2 ? _mm256_slli_epi16(hm, 2 - b) : b == 2 ? hm : _mm256_srli_epi16(hm, b - 2);
            __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 2 * s), three),
                                        _mm256_and_si256(hb, four));
            u->q[4 * h + s] = _mm256_sub_epi8(q, four);
        }
    }
    const uint8_t *sp = p + 96;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i lo8 = _mm_loadl_epi64((const __m128i *)sp);
    __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(lo8, low4), _mm_and_si128(_mm_srli_epi16(lo8, 4), low4));
    int32_t w;
    memcpy(&w, sp + 8, 4);
    __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(w), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
    __m128i sc = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32));
    scale16(sc, 1, sa_half(p + 108), u->s);
}

/* q4_k: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles. Group 2c + k (32
 * values) is nibble k of bytes 32c .. 32c + 31; value (d * sc) * n - (dmin * mn). */
SA_INLINE void unpack_q4_k(const uint8_t *p, sa_unpacked *u) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * c));
        u->q[2 * c] = _mm256_and_si256(v, low4);
        u->q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
    k_scales_mins(p, u);
}

/* q5_k: as q4_k with 32 bytes of fifth bits after the scales: group i's bit is bit i of byte l */
SA_INLINE void unpack_q5_k(const uint8_t *p, sa_unpacked *u) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    __m256i hm = _mm256_loadu_si256((const __m256i *)(p + 16));
    for (int c = 0; c < 4; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(p + 48 + 32 * c));
        for (int k = 0; k < 2; k++) {
            int i = 2 * c + k; /* bit i -> bit 4 */
            __m256i hb = i < 4 ? _mm256_slli_epi16(hm, 4 - i) : i == 4 ? hm : _mm256_srli_epi16(hm, i - 4);
            __m256i n = k ? _mm256_srli_epi16(v, 4) : v;
            u->q[i] = _mm256_or_si256(_mm256_and_si256(n, low4), _mm256_and_si256(hb, bit4));
        }
    }
    k_scales_mins(p, u);
}

/* q6_k: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d. Value 128h + p
 * (p < 128): low nibble of byte 64h + p % 64, the high one when p >= 64; high bits 2 (p / 32)
 * of byte 128 + 32h + p % 32; q = (lo | hi << 4) - 32, groups of 16. */
SA_INLINE void unpack_q6_k(const uint8_t *p, sa_unpacked *u) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; h++) {
        __m256i hv = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h));
        for (int s = 0; s < 4; s++) {
            __m256i l = _mm256_loadu_si256((const __m256i *)(p + 64 * h + 32 * (s & 1)));
            if (s >= 2) l = _mm256_srli_epi16(l, 4);
            /* bits 2s, 2s+1 -> bits 4, 5 */
            __m256i hb = s == 0 ? _mm256_slli_epi16(hv, 4) : s == 1 ? _mm256_slli_epi16(hv, 2)
                       : s == 2 ? hv : _mm256_srli_epi16(hv, 2);
            __m256i q = _mm256_or_si256(_mm256_and_si256(l, low4), _mm256_and_si256(hb, bits45));
            u->q[4 * h + s] = _mm256_sub_epi8(q, _mm256_set1_epi8(32));
        }
    }
    scale16(_mm_loadu_si128((const __m128i *)(p + 192)), 1, sa_half(p + 208), u->s);
}

/* iq4_xs: d, 16 bits of high scale bits, 4 bytes of low scale nibbles, 128 bytes of nibbles
 * indexing IQ4 values. Group i (32 values) is bytes 16i .. 16i + 15, low nibbles then high;
 * its scale is (nibble i of the 4 bytes | bits 2i..2i+1 of the 16 << 4) - 32. */
SA_INLINE void unpack_iq4_xs(const uint8_t *p, sa_unpacked *u) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)SA_IQ4_VALUES));
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++) { /* groups 2j, 2j + 1 */
        __m256i v = _mm256_loadu_si256((const __m256i *)(p + 8 + 32 * j));
        __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low4));
        __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
        u->q[2 * j] = _mm256_permute2x128_si256(lo, hi, 0x20);
        u->q[2 * j + 1] = _mm256_permute2x128_si256(lo, hi, 0x31);
    }
    uint16_t sh;
    memcpy(&sh, p + 2, 2);
    int8_t sc[8];
    for (int i = 0; i < 8; i++)
        sc[i] = (int8_t)((((p[4 + i / 2] >> (4 * (i % 2))) & 0x0F) | (((sh >> (2 * i)) & 3) << 4)) - 32);
    __m128i v = _mm_loadl_epi64((const __m128i *)sc);
    _mm256_store_ps(u->s, _mm256_mul_ps(_mm256_set1_ps(sa_half(p)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))));
}

/* one block of a quantized type FMT (a constant where inlined) at p -> u */
SA_INLINE void sa_unpack(const uint8_t *p, const int FMT, sa_unpacked *u) {
    switch (FMT) {
    case SA_Q8_0: unpack_q8_0(p, u); break;
    case SA_Q4_0: unpack_q4_0(p, u); break;
    case SA_Q4_1: unpack_q4_1(p, u); break;
    case SA_Q5_0: unpack_q5_0(p, u); break;
    case SA_Q5_1: unpack_q5_1(p, u); break;
    case SA_IQ4_NL: unpack_iq4_nl(p, u); break;
    case SA_Q2_K: unpack_q2_k(p, u); break;
    case SA_Q3_K: unpack_q3_k(p, u); break;
    case SA_Q4_K: unpack_q4_k(p, u); break;
    case SA_Q5_K: unpack_q5_k(p, u); break;
    case SA_Q6_K: unpack_q6_k(p, u); break;
    case SA_IQ4_XS: unpack_iq4_xs(p, u); break;
    }
}

/* whether the integers are never negative (then widened without sign) */
static inline int sa_unsigned_q(int fmt) { return sa_has_min(fmt); }

/* the unit's float32 values, s * q - m, exactly: out (unit). The integers are widened from the
 * registers they were built in (reading them back from memory 8 bytes at a time stalled on
 * store forwarding: ~2 cycles a value, against ~0.5 this way). */
SA_INLINE void sa_unpacked_values(const sa_unpacked *u, const int FMT, float *out) {
    const int unit = (int)sa_block_values(FMT), sub = sa_sub(FMT);
    for (int i = 0; i < unit / 32; i++) {
        const __m128i half[2] = {_mm256_castsi256_si128(u->q[i]), _mm256_extracti128_si256(u->q[i], 1)};
        for (int j = 0; j < 4; j++) {
            const int k = 32 * i + 8 * j;
            __m128i b = j & 1 ? _mm_srli_si128(half[j >> 1], 8) : half[j >> 1];
            __m256 w = _mm256_mul_ps(_mm256_set1_ps(u->s[k / sub]), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
            if (sa_has_min(FMT)) w = _mm256_sub_ps(w, _mm256_set1_ps(u->m[k / sub]));
            _mm256_storeu_ps(out + k, w);
        }
    }
}

#endif
