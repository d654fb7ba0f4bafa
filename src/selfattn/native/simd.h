/* AVX2 + FMA + F16C helpers shared by the kernels: block decoders (ggml's layouts), horizontal
 * sums, and (vec.h) the vector-width layer and exp. Only the kernel sources include it: setup.py
 * compiles them once per instruction-set level with that level's -m flags (AVX2 at least), or
 * at the portable level with SA_PORTABLE and portable.h's plain-C intrinsics, and module.c calls
 * a level's copy only on a CPU and OS that run it. */
#ifndef SELFATTN_SIMD_H
#define SELFATTN_SIMD_H

#if defined(SA_PORTABLE)
#include "portable.h" /* the same intrinsics in plain C, for any CPU */
#elif !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the x86 levels are compiled with AVX2, FMA and F16C at least (setup.py: LEVELS)"
#else
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define SA_INLINE static inline __attribute__((always_inline))

/* the cache lines at each step-aligned address (step a power of two, 64 or more) among bytes
 * p .. p + n - 1, into L2 only (hint T2): a stream's lines fetched far ahead of the L1 prefetches
 * that follow them, so those find them in L2 (attend.c, matvec.c: a core's fill buffers, not its
 * arithmetic, bounded their loops) */
SA_INLINE void sa_prefetch_l2(const uint8_t *p, int64_t n, int64_t step) {
    for (int64_t o = -(int64_t)((uintptr_t)p & (step - 1)) & (step - 1); o < n; o += step)
        _mm_prefetch((const char *)(p + o), _MM_HINT_T2);
}

SA_INLINE float sa_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 32 values of one KV-cache block at p -> w[0..3] (8 floats each, in order), exact as ggml
 * dequantizes: q8_0 d*q; q4_0 d*(n-8) (one rounding, as (n-8)*d: -8d is exact). The weight
 * types' decoders are in unpack.h. */
SA_INLINE void sa_block_q8_0(const uint8_t *p, __m256 w[4]) {
    __m256 d = _mm256_set1_ps(sa_half(p));
    for (int i = 0; i < 4; i++) {
        __m128i b = _mm_loadl_epi64((const __m128i *)(p + 2 + 8 * i));
        w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d);
    }
}

SA_INLINE void sa_nibbles(const uint8_t *qs, __m256 n[4]) {
    __m128i v = _mm_loadu_si128((const __m128i *)qs);
    __m128i m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    n[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    n[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    n[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    n[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

SA_INLINE void sa_block_q4_0(const uint8_t *p, __m256 w[4]) {
    float d = sa_half(p);
    __m256 dv = _mm256_set1_ps(d), off = _mm256_set1_ps(-8.0f * d);
    sa_nibbles(p + 2, w);
    for (int i = 0; i < 4; i++) w[i] = _mm256_fmadd_ps(w[i], dv, off);
}

/* a KV-cache row of n values (f32, f16: n a multiple of 8; q8_0, q4_0: of 32) -> dst floats */
SA_INLINE void sa_decode_row(const uint8_t *src, int fmt, int64_t n, float *dst) {
    __m256 w[4];
    if (fmt == SA_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (fmt == SA_F16) {
        for (int64_t i = 0; i < n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
    } else {
        int bytes = fmt == SA_Q8_0 ? 34 : 18;
        for (int64_t b = 0; b < n / 32; b++, src += bytes, dst += 32) {
            if (fmt == SA_Q8_0) sa_block_q8_0(src, w);
            else sa_block_q4_0(src, w);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(dst + 8 * i, w[i]);
        }
    }
}

SA_INLINE float sa_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* eight horizontal sums at once: lane i of the result = sum of a[i] */
SA_INLINE __m256 sa_hsum8(const __m256 a[8]) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

#include "vec.h"

#endif
