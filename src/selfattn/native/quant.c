/* New K/V rows -> a KV cache's stored rows (f16, q8_0, q4_0) with ggml's reference rounding, bit
 * for bit (attention.kvformat._quantize_blocks is the twin the tests hold it to). A decode step
 * writes one row per kv head and layer; in NumPy the call cost more than the attention over a
 * few hundred keys. Built with -ffp-contract=off: q4_0's x*inv + 8.5 must round twice, as ggml. */
#include <math.h>

#include "simd.h"

static void put_half(uint8_t *p, float f) {
    uint16_t h = _cvtss_sh(f, 0); /* round to nearest even, as NumPy's astype(float16) */
    memcpy(p, &h, 2);
}

/* quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x / d) (half away from zero) */
static void block_q8_0(const float *x, uint8_t *out) {
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float d = amax / 127.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
    put_half(out, d);
    for (int i = 0; i < 32; i++) out[2 + i] = (uint8_t)(int8_t)roundf(x[i] * inv);
}

/* quantize_row_q4_0_ref: d = (the first value of largest magnitude) / -8, n = min(15, (int)(x/d + 8.5)) */
static void block_q4_0(const float *x, uint8_t *out) {
    float amax = -1.0f, mx = 0.0f;
    for (int i = 0; i < 32; i++)
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            mx = x[i];
        }
    const float d = mx / -8.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
    put_half(out, d);
    for (int i = 0; i < 16; i++) {
        float a = truncf(x[i] * inv + 8.5f), b = truncf(x[16 + i] * inv + 8.5f);
        int lo = a < 0.0f ? 0 : a > 15.0f ? 15 : (int)a, hi = b < 0.0f ? 0 : b > 15.0f ? 15 : (int)b;
        out[2 + i] = (uint8_t)(lo | hi << 4);
    }
}

/* x (T, H, D) float32; row (t, h) -> dst + h*head_stride + t*row_stride in fmt. Returns 0, or -1
 * for a format or head dim this does not take. */
int sa_quantize_rows(const float *x, int64_t T, int64_t H, int64_t D, int fmt,
                               uint8_t *dst, int64_t head_stride, int64_t row_stride) {
    if (fmt != SA_F16 && ((fmt != SA_Q8_0 && fmt != SA_Q4_0) || D % 32)) return -1;
    if (fmt == SA_F16 && D % 8) return -1;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            const float *src = x + (t * H + h) * D;
            uint8_t *row = dst + h * head_stride + t * row_stride;
            if (fmt == SA_F16) {
                for (int64_t i = 0; i < D; i += 8)
                    _mm_storeu_si128((__m128i *)(row + 2 * i),
                                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
            } else {
                for (int64_t b = 0; b < D / 32; b++)
                    if (fmt == SA_Q8_0) block_q8_0(src + 32 * b, row + 34 * b);
                    else block_q4_0(src + 32 * b, row + 18 * b);
            }
        }
    return 0;
}
