/* The vector-width layer: one float32 vector type and the operations the width-generic kernels
 * (prefill.c, peak.c) are written in, 16 lanes where the level has AVX-512 (F, BW, VL, DQ) and 8
 * otherwise. Every operation is the same IEEE operation at both widths, so a kernel gives the
 * same bits on either: lanes are independent and each lane sees the same sequence of roundings.
 * Masks are AVX-512's mask registers there and all-ones lanes of a float vector under AVX2. */
#ifndef SELFATTN_VEC_H
#define SELFATTN_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define SA_W 16
/* rows of x matvec.c's one-token loops take a pass: N x BLOCK_VECS accumulators and a block's
 * vectors fit the registers (AVX-512's 32: 4; AVX2's 16: 2, 8 accumulators and the block's 4) */
#define SA_DOT_ROWS 4
typedef __m512 sa_vf;
typedef __m512i sa_vi;
typedef __mmask16 sa_vm;
SA_INLINE sa_vf vf_load(const float *p) { return _mm512_load_ps(p); } /* 64-byte aligned */
SA_INLINE sa_vf vf_loadu(const float *p) { return _mm512_loadu_ps(p); }
SA_INLINE void vf_store(float *p, sa_vf x) { _mm512_store_ps(p, x); }
SA_INLINE sa_vf vf_set1(float x) { return _mm512_set1_ps(x); }
SA_INLINE sa_vf vf_zero(void) { return _mm512_setzero_ps(); }
SA_INLINE sa_vf vf_add(sa_vf a, sa_vf b) { return _mm512_add_ps(a, b); }
SA_INLINE sa_vf vf_sub(sa_vf a, sa_vf b) { return _mm512_sub_ps(a, b); }
SA_INLINE sa_vf vf_mul(sa_vf a, sa_vf b) { return _mm512_mul_ps(a, b); }
SA_INLINE sa_vf vf_max(sa_vf a, sa_vf b) { return _mm512_max_ps(a, b); }
SA_INLINE sa_vf vf_fmadd(sa_vf a, sa_vf b, sa_vf c) { return _mm512_fmadd_ps(a, b, c); }
SA_INLINE sa_vf vf_fnmadd(sa_vf a, sa_vf b, sa_vf c) { return _mm512_fnmadd_ps(a, b, c); }
SA_INLINE sa_vf vf_round(sa_vf x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* y * 2^n for n a whole number in -126 .. 127: one instruction (the product is exact before
 * its one rounding, as the 8-lane multiply by 2^n's bits is) */
SA_INLINE sa_vf vf_ldexp(sa_vf y, sa_vf n) { return _mm512_scalef_ps(y, n); }
SA_INLINE sa_vi vi_set1(int x) { return _mm512_set1_epi32(x); }
SA_INLINE sa_vi vi_iota(void) { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
SA_INLINE sa_vi vi_add(sa_vi a, sa_vi b) { return _mm512_add_epi32(a, b); }
SA_INLINE sa_vm vi_gt(sa_vi a, sa_vi b) { return _mm512_cmpgt_epi32_mask(a, b); }
SA_INLINE sa_vm vf_lt(sa_vf a, sa_vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
SA_INLINE sa_vm vf_eq(sa_vf a, sa_vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
SA_INLINE sa_vm vf_nlt(sa_vf a, sa_vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLT_UQ); }
SA_INLINE sa_vm vm_or(sa_vm a, sa_vm b) { return a | b; }
SA_INLINE sa_vm vm_none(void) { return 0; }
SA_INLINE sa_vf vf_select(sa_vm m, sa_vf yes, sa_vf no) { return _mm512_mask_blend_ps(m, no, yes); }
SA_INLINE float vf_hsum(sa_vf x) { return _mm512_reduce_add_ps(x); }
#else
#define SA_W 8
#define SA_DOT_ROWS 2
typedef __m256 sa_vf;
typedef __m256i sa_vi;
typedef __m256 sa_vm;
SA_INLINE sa_vf vf_load(const float *p) { return _mm256_load_ps(p); } /* 32-byte aligned */
SA_INLINE sa_vf vf_loadu(const float *p) { return _mm256_loadu_ps(p); }
SA_INLINE void vf_store(float *p, sa_vf x) { _mm256_store_ps(p, x); }
SA_INLINE sa_vf vf_set1(float x) { return _mm256_set1_ps(x); }
SA_INLINE sa_vf vf_zero(void) { return _mm256_setzero_ps(); }
SA_INLINE sa_vf vf_add(sa_vf a, sa_vf b) { return _mm256_add_ps(a, b); }
SA_INLINE sa_vf vf_sub(sa_vf a, sa_vf b) { return _mm256_sub_ps(a, b); }
SA_INLINE sa_vf vf_mul(sa_vf a, sa_vf b) { return _mm256_mul_ps(a, b); }
SA_INLINE sa_vf vf_max(sa_vf a, sa_vf b) { return _mm256_max_ps(a, b); }
SA_INLINE sa_vf vf_fmadd(sa_vf a, sa_vf b, sa_vf c) { return _mm256_fmadd_ps(a, b, c); }
SA_INLINE sa_vf vf_fnmadd(sa_vf a, sa_vf b, sa_vf c) { return _mm256_fnmadd_ps(a, b, c); }
SA_INLINE sa_vf vf_round(sa_vf x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* y * 2^n for n a whole number in -126 .. 127: 2^n built from its exponent bits */
SA_INLINE sa_vf vf_ldexp(sa_vf y, sa_vf n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}
SA_INLINE sa_vi vi_set1(int x) { return _mm256_set1_epi32(x); }
SA_INLINE sa_vi vi_iota(void) { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
SA_INLINE sa_vi vi_add(sa_vi a, sa_vi b) { return _mm256_add_epi32(a, b); }
SA_INLINE sa_vm vi_gt(sa_vi a, sa_vi b) { return _mm256_castsi256_ps(_mm256_cmpgt_epi32(a, b)); }
SA_INLINE sa_vm vf_lt(sa_vf a, sa_vf b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
SA_INLINE sa_vm vf_eq(sa_vf a, sa_vf b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
SA_INLINE sa_vm vf_nlt(sa_vf a, sa_vf b) { return _mm256_cmp_ps(a, b, _CMP_NLT_UQ); }
SA_INLINE sa_vm vm_or(sa_vm a, sa_vm b) { return _mm256_or_ps(a, b); }
SA_INLINE sa_vm vm_none(void) { return _mm256_setzero_ps(); }
SA_INLINE sa_vf vf_select(sa_vm m, sa_vf yes, sa_vf no) { return _mm256_blendv_ps(no, yes, m); }
SA_INLINE float vf_hsum(sa_vf x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif
#define SA_ALIGN (4 * SA_W) /* bytes: vf_load's alignment */

/* e^x for x <= 0 (softmax arguments; -inf gives 0), Cephes' polynomial: ~2 ulp */
SA_INLINE sa_vf vf_exp_neg(sa_vf x) {
    const sa_vf lo = vf_set1(-87.3365f);
    const sa_vm under = vf_lt(x, lo);
    x = vf_max(x, lo);
    const sa_vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    x = vf_fnmadd(n, vf_set1(0.693359375f), x);
    x = vf_fnmadd(n, vf_set1(-2.12194440e-4f), x);
    sa_vf y = vf_set1(1.9875691500E-4f);
    y = vf_fmadd(y, x, vf_set1(1.3981999507E-3f));
    y = vf_fmadd(y, x, vf_set1(8.3334519073E-3f));
    y = vf_fmadd(y, x, vf_set1(4.1665795894E-2f));
    y = vf_fmadd(y, x, vf_set1(1.6666665459E-1f));
    y = vf_fmadd(y, x, vf_set1(5.0000001201E-1f));
    y = vf_fmadd(y, vf_mul(x, x), vf_add(x, vf_set1(1.0f)));
    y = vf_ldexp(y, n);
    return vf_select(under, vf_zero(), y);
}

/* the same e^x for one float (x <= 0), step for step: fmaf for the fused steps, so the same bits
 * as a lane of vf_exp_neg */
SA_INLINE float sa_expf_neg(float x) {
    if (x < -87.3365f) return 0.0f; /* -inf too */
    const float n = __builtin_roundevenf(x * 1.44269504088896341f);
    x = __builtin_fmaf(-n, 0.693359375f, x);
    x = __builtin_fmaf(-n, -2.12194440e-4f, x);
    float y = 1.9875691500E-4f;
    y = __builtin_fmaf(y, x, 1.3981999507E-3f);
    y = __builtin_fmaf(y, x, 8.3334519073E-3f);
    y = __builtin_fmaf(y, x, 4.1665795894E-2f);
    y = __builtin_fmaf(y, x, 1.6666665459E-1f);
    y = __builtin_fmaf(y, x, 5.0000001201E-1f);
    y = __builtin_fmaf(y, x * x, x + 1.0f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float p;
    memcpy(&p, &bits, 4);
    return y * p;
}

/* tanh(x) for the soft-cap, in float32 operations alone (Cephes' tanhf: an odd polynomial below
 * 0.625, (1 - e^-2|x|) / (1 + e^-2|x|) above), so that every CPU gives the same bits: the C
 * library's tanhf differs in the last bit between x86-64 and aarch64. ~2 ulp. */
SA_INLINE float sa_tanhf(float x) {
    const float a = fabsf(x);
    float r;
    if (a >= 0.625f) {
        const float t = sa_expf_neg(-2.0f * a);
        r = (1.0f - t) / (1.0f + t);
    } else {
        const float z = a * a;
        float p = -5.70498872745E-3f;
        p = p * z + 2.06390887954E-2f;
        p = p * z - 5.37397155531E-2f;
        p = p * z + 1.33314422036E-1f;
        p = p * z - 3.33332819422E-1f;
        r = a + a * z * p;
    }
    return copysignf(r, x);
}

/* the same e^x on 8 lanes, for the 256-bit kernels (decode, ops) at either level: at AVX-512 the
 * 16-lane one on a zero-extended vector, the same bits lane for lane */
SA_INLINE __m256 sa_exp_neg(__m256 x) {
#if SA_W == 16
    return _mm512_castps512_ps256(vf_exp_neg(_mm512_zextps256_ps512(x)));
#else
    return vf_exp_neg(x);
#endif
}

#endif
