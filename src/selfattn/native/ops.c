/* The small per-token operations of a decode step, which in NumPy cost more in call overhead
 * (~2-15 us a call here) than in arithmetic: RMSNorm, RoPE (rotate-half), SwiGLU. Each has its
 * NumPy twin in model/transformer.py, which prompts use and the tests compare against. */
#include <math.h>

#include "simd.h"

/* out (T, n) = x * (1/sqrt(mean(x^2) + eps)) * w; the mean in double */
void sa_rmsnorm(const float *x, const float *w, float eps, int64_t T, int64_t n, float *out) {
    for (int64_t t = 0; t < T; t++, x += n, out += n) {
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
        float r = 1.0f / sqrtf((float)(ss / n) + eps);
        for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
    }
}

/* x (T, heads, D) in place: the first rope_dim/2 and the next rope_dim/2 values of each head
 * rotated by the angles of positions pos .. pos+T-1 (cos, sin: (positions, rope_dim/2)) */
void sa_rope(float *x, int64_t T, int64_t heads, int64_t D, int64_t half,
                       const float *cos_t, const float *sin_t, int64_t pos) {
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + (pos + t) * half, *s = sin_t + (pos + t) * half;
        for (int64_t h = 0; h < heads; h++) {
            float *a = x + (t * heads + h) * D, *b = a + half;
            for (int64_t i = 0; i < half; i++) {
                float x1 = a[i], x2 = b[i];
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/* gate, up (T, ffn) -> out (T, ffn) = silu(gate) * up */
void sa_swiglu_rows(const float *gate, const float *up, int64_t T, int64_t ffn, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t t = 0; t < T; t++, gate += ffn, up += ffn, out += ffn) {
        int64_t i = 0;
        for (; i + 8 <= ffn; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i);
            __m256 e = sa_exp_neg(_mm256_or_ps(g, sign)); /* exp(-|g|) <= 1 */
            __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
            __m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
            __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), neg); /* sigmoid(g) */
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
        }
        for (; i < ffn; i++) {
            float g = gate[i];
            out[i] = g / (1.0f + expf(-g)) * up[i];
        }
    }
}

/* gu (T, 2*ffn): gate then up -> out (T, ffn) = silu(gate) * up */
void sa_swiglu(const float *gu, int64_t T, int64_t ffn, float *out) {
    for (int64_t t = 0; t < T; t++) sa_swiglu_rows(gu + t * 2 * ffn, gu + t * 2 * ffn + ffn, 1, ffn, out + t * ffn);
}
