/* The portable level: the x86 intrinsics the AVX2 kernels use, written in plain C (GCC's vector
 * extensions), so that the same kernel sources compile for any CPU. Each one is the same IEEE
 * operation on the same lanes in the same order as the instruction it stands for (fused
 * multiply-adds through fmaf, round-to-nearest-even conversions, x86's max and shift rules), so
 * the portable kernels give the avx2 kernels' bits. GCC maps the vector types to the target's
 * registers: on aarch64 each 8-float vector is two NEON registers and most of these lines become
 * one or two NEON instructions.
 *
 * Only what the AVX2 paths of the kernels call is here; a kernel that calls another intrinsic
 * fails to compile at this level, which `make portable-check` builds. */
#ifndef SELFATTN_PORTABLE_H
#define SELFATTN_PORTABLE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define SA_PI static inline __attribute__((always_inline))

typedef float __m256 __attribute__((vector_size(32), aligned(32)));
typedef float __m128 __attribute__((vector_size(16), aligned(16)));
typedef long long __m256i __attribute__((vector_size(32), aligned(32)));
typedef long long __m128i __attribute__((vector_size(16), aligned(16)));
typedef long long __m64 __attribute__((vector_size(8)));
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef int8_t v32i8 __attribute__((vector_size(32)));
typedef uint8_t v32u8 __attribute__((vector_size(32)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef uint32_t v4u __attribute__((vector_size(16)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));

#define _MM_HINT_T0 3
#define _MM_HINT_T1 2
#define _MM_HINT_T2 1
#define _MM_FROUND_TO_NEAREST_INT 0x00
#define _MM_FROUND_NO_EXC 0x08
#define _CMP_EQ_OQ 0x00
#define _CMP_LT_OQ 0x11
#define _CMP_NLT_UQ 0x15

SA_PI void _mm_prefetch(const void *p, int hint) {
    (void)hint;
    __builtin_prefetch(p);
}

/* -- half precision, exactly as F16C converts ------------------------------------------------ */

SA_PI float sa_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = h >> 10 & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F)
        bits = sign | 0x7F800000 | (man << 13) | (man ? 0x00400000 : 0); /* NaNs come out quiet */
    else if (exp)
        bits = sign | (exp + 112) << 23 | man << 13;
    else if (!man)
        bits = sign;
    else { /* subnormal: normalised, exactly */
        uint32_t e = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            e--;
        }
        bits = sign | e << 23 | (man & 0x3FF) << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* round to nearest even; overflow to infinity; NaNs quiet, their payload's top bits kept */
SA_PI uint16_t sa_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = x >> 16 & 0x8000, ax = x & 0x7FFFFFFF;
    if (ax > 0x7F800000) return (uint16_t)(sign | 0x7E00 | (ax >> 13 & 0x3FF));
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00); /* 65520 and up: infinity */
    if (ax >= 0x38800000) {                                  /* a normal half */
        uint32_t r = ax - 0x38000000;
        r += 0x0FFF + (r >> 13 & 1);
        return (uint16_t)(sign | r >> 13);
    }
    float a; /* subnormal or zero: |f| * 2^24, exact, rounded to the nearest even integer */
    memcpy(&a, &ax, 4);
    return (uint16_t)(sign | (uint32_t)__builtin_roundevenf(a * 16777216.0f));
}

SA_PI float _cvtsh_ss(uint16_t h) { return sa_half_to_float(h); }
SA_PI uint16_t _cvtss_sh(float f, int rounding) {
    (void)rounding; /* the kernels ask for round-to-nearest-even only */
    return sa_float_to_half(f);
}

/* -- 128-bit ------------------------------------------------------------------------------- */

SA_PI __m128i _mm_loadu_si128(const void *p) {
    __m128i r;
    memcpy(&r, p, 16);
    return r;
}
SA_PI __m128i _mm_loadl_epi64(const void *p) {
    __m128i r = {0, 0};
    memcpy(&r, p, 8);
    return r;
}
SA_PI void _mm_storeu_si128(void *p, __m128i a) { memcpy(p, &a, 16); }
SA_PI void _mm_storeu_ps(float *p, __m128 a) { memcpy(p, &a, 16); }
SA_PI void _mm_storel_pi(void *p, __m128 a) { memcpy(p, &a, 8); }
SA_PI __m128i _mm_and_si128(__m128i a, __m128i b) { return a & b; }
SA_PI __m128i _mm_or_si128(__m128i a, __m128i b) { return a | b; }
SA_PI __m128i _mm_set1_epi8(char x) {
    v16u8 r;
    for (int i = 0; i < 16; i++) r[i] = (uint8_t)x;
    return (__m128i)r;
}
SA_PI __m128i _mm_set1_epi32(int x) { return (__m128i)(v4i){x, x, x, x}; }
SA_PI __m128i _mm_setr_epi32(int a, int b, int c, int d) { return (__m128i)(v4i){a, b, c, d}; }
SA_PI __m128i _mm_cvtsi32_si128(int x) { return (__m128i)(v4i){x, 0, 0, 0}; }
SA_PI __m128i _mm_srli_epi16(__m128i a, int n) {
    return n > 15 ? (__m128i){0, 0} : (__m128i)((v8u16)a >> (uint16_t)n);
}
SA_PI __m128i _mm_slli_epi16(__m128i a, int n) {
    return n > 15 ? (__m128i){0, 0} : (__m128i)((v8u16)a << (uint16_t)n);
}
SA_PI __m128i _mm_srli_si128(__m128i a, int n) { /* bytes, zeros shifted in */
    v16u8 b = (v16u8)a, r = {0};
    for (int i = 0; i + n < 16; i++) r[i] = b[i + n];
    return (__m128i)r;
}
SA_PI __m128i _mm_sub_epi8(__m128i a, __m128i b) { return (__m128i)((v16u8)a - (v16u8)b); }
SA_PI __m128i _mm_unpacklo_epi64(__m128i a, __m128i b) { return (__m128i){a[0], b[0]}; }
SA_PI __m128i _mm_srlv_epi32(__m128i a, __m128i count) {
    v4u x = (v4u)a, c = (v4u)count, r;
    for (int i = 0; i < 4; i++) r[i] = c[i] > 31 ? 0 : x[i] >> c[i];
    return (__m128i)r;
}
SA_PI __m128 _mm_cvtph_ps(__m128i a) {
    v8u16 h = (v8u16)a;
    return (__m128){sa_half_to_float(h[0]), sa_half_to_float(h[1]), sa_half_to_float(h[2]),
                    sa_half_to_float(h[3])};
}
SA_PI __m128 _mm_set1_ps(float x) { return (__m128){x, x, x, x}; }
SA_PI __m128 _mm_add_ps(__m128 a, __m128 b) { return a + b; }
SA_PI __m128 _mm_add_ss(__m128 a, __m128 b) {
    a[0] = a[0] + b[0];
    return a;
}
SA_PI float sa_maxf(float a, float b) { return a > b ? a : b; } /* x86: b when either is NaN */
SA_PI __m128 _mm_max_ps(__m128 a, __m128 b) {
    for (int i = 0; i < 4; i++) a[i] = sa_maxf(a[i], b[i]);
    return a;
}
SA_PI __m128 _mm_max_ss(__m128 a, __m128 b) {
    a[0] = sa_maxf(a[0], b[0]);
    return a;
}
SA_PI __m128 _mm_movehl_ps(__m128 a, __m128 b) { return (__m128){b[2], b[3], a[2], a[3]}; }
SA_PI __m128 _mm_movehdup_ps(__m128 a) { return (__m128){a[1], a[1], a[3], a[3]}; }
SA_PI __m128 _mm_hadd_ps(__m128 a, __m128 b) {
    return (__m128){a[0] + a[1], a[2] + a[3], b[0] + b[1], b[2] + b[3]};
}
SA_PI float _mm_cvtss_f32(__m128 a) { return a[0]; }

/* -- 256-bit floats ------------------------------------------------------------------------ */

SA_PI __m256 _mm256_load_ps(const float *p) {
    __m256 r;
    memcpy(&r, p, 32);
    return r;
}
SA_PI __m256 _mm256_loadu_ps(const float *p) { return _mm256_load_ps(p); }
SA_PI void _mm256_store_ps(float *p, __m256 a) { memcpy(p, &a, 32); }
SA_PI void _mm256_storeu_ps(float *p, __m256 a) { memcpy(p, &a, 32); }
SA_PI __m256 _mm256_set1_ps(float x) { return (__m256){x, x, x, x, x, x, x, x}; }
SA_PI __m256 _mm256_setzero_ps(void) { return (__m256){0}; }
SA_PI __m256 _mm256_broadcast_ss(const float *p) { return _mm256_set1_ps(*p); }
SA_PI __m256 _mm256_broadcastss_ps(__m128 a) { return _mm256_set1_ps(a[0]); }
SA_PI __m256 _mm256_add_ps(__m256 a, __m256 b) { return a + b; }
SA_PI __m256 _mm256_sub_ps(__m256 a, __m256 b) { return a - b; }
SA_PI __m256 _mm256_mul_ps(__m256 a, __m256 b) { return a * b; }
SA_PI __m256 _mm256_div_ps(__m256 a, __m256 b) { return a / b; }
SA_PI __m256 _mm256_max_ps(__m256 a, __m256 b) {
    for (int i = 0; i < 8; i++) a[i] = sa_maxf(a[i], b[i]);
    return a;
}
SA_PI __m256 _mm256_fmadd_ps(__m256 a, __m256 b, __m256 c) { /* one rounding, as FMA */
    for (int i = 0; i < 8; i++) c[i] = __builtin_fmaf(a[i], b[i], c[i]);
    return c;
}
SA_PI __m256 _mm256_fnmadd_ps(__m256 a, __m256 b, __m256 c) {
    for (int i = 0; i < 8; i++) c[i] = __builtin_fmaf(-a[i], b[i], c[i]);
    return c;
}
SA_PI __m256 _mm256_hadd_ps(__m256 a, __m256 b) {
    return (__m256){a[0] + a[1], a[2] + a[3], b[0] + b[1], b[2] + b[3],
                    a[4] + a[5], a[6] + a[7], b[4] + b[5], b[6] + b[7]};
}
SA_PI __m256 _mm256_round_ps(__m256 a, int mode) {
    (void)mode; /* the kernels ask for round-to-nearest-even only */
    for (int i = 0; i < 8; i++) a[i] = __builtin_roundevenf(a[i]);
    return a;
}
SA_PI __m256 _mm256_cmp_ps(__m256 a, __m256 b, int pred) { /* all-ones lanes where true */
    v8i r;
    for (int i = 0; i < 8; i++)
        r[i] = pred == _CMP_EQ_OQ ? -(a[i] == b[i]) : pred == _CMP_LT_OQ ? -(a[i] < b[i]) : -!(a[i] < b[i]);
    return (__m256)r;
}
SA_PI __m256 _mm256_blendv_ps(__m256 a, __m256 b, __m256 mask) { /* b where mask's sign is set */
    v8i m = (v8i)mask;
    for (int i = 0; i < 8; i++) a[i] = m[i] < 0 ? b[i] : a[i];
    return a;
}
SA_PI __m256 _mm256_or_ps(__m256 a, __m256 b) { return (__m256)((v8i)a | (v8i)b); }
SA_PI __m256 _mm256_castsi256_ps(__m256i a) { return (__m256)a; }
SA_PI __m128 _mm256_castps256_ps128(__m256 a) { return (__m128){a[0], a[1], a[2], a[3]}; }
SA_PI __m128 _mm256_extractf128_ps(__m256 a, int hi) {
    return hi ? (__m128){a[4], a[5], a[6], a[7]} : (__m128){a[0], a[1], a[2], a[3]};
}
SA_PI __m256 _mm256_set_m128(__m128 hi, __m128 lo) {
    return (__m256){lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]};
}
SA_PI __m256 _mm256_permute2f128_ps(__m256 a, __m256 b, int imm) {
    __m128 part[4] = {_mm256_extractf128_ps(a, 0), _mm256_extractf128_ps(a, 1),
                      _mm256_extractf128_ps(b, 0), _mm256_extractf128_ps(b, 1)};
    __m128 zero = {0}, lo = imm & 0x08 ? zero : part[imm & 3], hi = imm & 0x80 ? zero : part[imm >> 4 & 3];
    return _mm256_set_m128(hi, lo);
}
SA_PI __m256 _mm256_cvtepi32_ps(__m256i a) { return __builtin_convertvector((v8i)a, v8f); }
SA_PI __m256i _mm256_cvtps_epi32(__m256 a) { /* nearest even; out of range or NaN: INT32_MIN */
    v8i r;
    for (int i = 0; i < 8; i++) {
        float x = __builtin_roundevenf(a[i]);
        r[i] = x >= -2147483648.0f && x < 2147483648.0f ? (int32_t)x : INT32_MIN;
    }
    return (__m256i)r;
}
SA_PI __m256 _mm256_cvtph_ps(__m128i a) {
    v8u16 h = (v8u16)a;
    __m256 r;
    for (int i = 0; i < 8; i++) r[i] = sa_half_to_float(h[i]);
    return r;
}
SA_PI __m128i _mm256_cvtps_ph(__m256 a, int rounding) {
    (void)rounding; /* the kernels ask for round-to-nearest-even only */
    v8u16 r;
    for (int i = 0; i < 8; i++) r[i] = sa_float_to_half(a[i]);
    return (__m128i)r;
}

/* -- 256-bit integers ---------------------------------------------------------------------- */

SA_PI __m256i _mm256_loadu_si256(const void *p) {
    __m256i r;
    memcpy(&r, p, 32);
    return r;
}
SA_PI __m256i _mm256_and_si256(__m256i a, __m256i b) { return a & b; }
SA_PI __m256i _mm256_or_si256(__m256i a, __m256i b) { return a | b; }
SA_PI __m256i _mm256_set1_epi8(char x) {
    v32u8 r;
    for (int i = 0; i < 32; i++) r[i] = (uint8_t)x;
    return (__m256i)r;
}
SA_PI __m256i _mm256_set1_epi32(int x) { return (__m256i)(v8i){x, x, x, x, x, x, x, x}; }
SA_PI __m256i _mm256_set1_epi64x(long long x) { return (__m256i){x, x, x, x}; }
SA_PI __m256i _mm256_setr_epi32(int a, int b, int c, int d, int e, int f, int g, int h) {
    return (__m256i)(v8i){a, b, c, d, e, f, g, h};
}
#define _mm256_setr_epi8(...) ((__m256i)(v32i8){__VA_ARGS__})
SA_PI __m256i _mm256_add_epi32(__m256i a, __m256i b) { return (__m256i)((v8u)a + (v8u)b); }
SA_PI __m256i _mm256_sub_epi8(__m256i a, __m256i b) { return (__m256i)((v32u8)a - (v32u8)b); }
SA_PI __m256i _mm256_srli_epi32(__m256i a, int n) {
    return n > 31 ? (__m256i){0} : (__m256i)((v8u)a >> (uint32_t)n);
}
SA_PI __m256i _mm256_slli_epi32(__m256i a, int n) {
    return n > 31 ? (__m256i){0} : (__m256i)((v8u)a << (uint32_t)n);
}
SA_PI __m256i _mm256_srai_epi32(__m256i a, int n) { return (__m256i)((v8i)a >> (n > 31 ? 31 : n)); }
SA_PI __m256i _mm256_srli_epi16(__m256i a, int n) {
    return n > 15 ? (__m256i){0} : (__m256i)((v16u16)a >> (uint16_t)n);
}
SA_PI __m256i _mm256_slli_epi16(__m256i a, int n) {
    return n > 15 ? (__m256i){0} : (__m256i)((v16u16)a << (uint16_t)n);
}
SA_PI __m256i _mm256_srlv_epi32(__m256i a, __m256i count) {
    v8u x = (v8u)a, c = (v8u)count, r;
    for (int i = 0; i < 8; i++) r[i] = c[i] > 31 ? 0 : x[i] >> c[i];
    return (__m256i)r;
}
SA_PI __m256i _mm256_cmpgt_epi32(__m256i a, __m256i b) { return (__m256i)((v8i)a > (v8i)b); }
SA_PI __m256i _mm256_cmpeq_epi8(__m256i a, __m256i b) { return (__m256i)((v32i8)a == (v32i8)b); }
SA_PI __m256i _mm256_shuffle_epi8(__m256i a, __m256i b) { /* within each 16-byte half */
    v32u8 x = (v32u8)a, idx = (v32u8)b, r;
    for (int i = 0; i < 32; i++) r[i] = idx[i] & 0x80 ? 0 : x[(i & 16) + (idx[i] & 15)];
    return (__m256i)r;
}
SA_PI __m256i _mm256_cvtepu8_epi32(__m128i a) {
    v16u8 b = (v16u8)a;
    return (__m256i)(v8i){b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]};
}
SA_PI __m256i _mm256_cvtepi8_epi32(__m128i a) {
    v16u8 b = (v16u8)a;
    v8i r;
    for (int i = 0; i < 8; i++) r[i] = (int8_t)b[i];
    return (__m256i)r;
}
SA_PI __m256i _mm256_cvtepu16_epi32(__m128i a) {
    v8u16 h = (v8u16)a;
    return (__m256i)(v8i){h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]};
}
SA_PI __m128i _mm256_castsi256_si128(__m256i a) { return (__m128i){a[0], a[1]}; }
SA_PI __m128i _mm256_extracti128_si256(__m256i a, int hi) {
    return hi ? (__m128i){a[2], a[3]} : (__m128i){a[0], a[1]};
}
SA_PI __m256i _mm256_set_m128i(__m128i hi, __m128i lo) { return (__m256i){lo[0], lo[1], hi[0], hi[1]}; }
SA_PI __m256i _mm256_broadcastsi128_si256(__m128i a) { return _mm256_set_m128i(a, a); }
SA_PI __m256i _mm256_permute2x128_si256(__m256i a, __m256i b, int imm) {
    __m128i part[4] = {_mm256_extracti128_si256(a, 0), _mm256_extracti128_si256(a, 1),
                       _mm256_extracti128_si256(b, 0), _mm256_extracti128_si256(b, 1)};
    __m128i zero = {0, 0}, lo = imm & 0x08 ? zero : part[imm & 3], hi = imm & 0x80 ? zero : part[imm >> 4 & 3];
    return _mm256_set_m128i(hi, lo);
}

#endif
