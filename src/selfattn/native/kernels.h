/* The compiled kernels' entry points (module.c calls them from Python, step.c chains them), the
 * GGUF type ids they take, and the bytes a stored row of each type holds. Plain C: no intrinsics,
 * so module.c can include it without AVX2. */
#ifndef SELFATTN_KERNELS_H
#define SELFATTN_KERNELS_H

#include <stdint.h>

/* ggml type ids (the GGUF tensor types); the KV formats reuse them: f32 0, f16 1, q4_0 2, q8_0 8 */
enum { SA_F32 = 0, SA_F16 = 1, SA_Q4_0 = 2, SA_Q4_1 = 3, SA_Q8_0 = 8 };

/* bytes that 32 values of type fmt take (0: a type the kernels do not read) */
static inline int64_t sa_block_bytes(int fmt) {
    switch (fmt) {
    case SA_F32: return 128;
    case SA_F16: return 64;
    case SA_Q4_0: return 18;
    case SA_Q4_1: return 20;
    case SA_Q8_0: return 34;
    default: return 0;
    }
}

/* bytes a row of n values of type fmt takes (0: an unknown type, or a block type with n not a
 * multiple of 32) */
static inline int64_t sa_row_bytes(int fmt, int64_t n) {
    if (fmt == SA_F32) return 4 * n;
    if (fmt == SA_F16) return 2 * n;
    return n % 32 ? 0 : n / 32 * sa_block_bytes(fmt);
}

int sa_set_threads(int n);
int sa_matmul(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
              const float *x, int64_t T, float *y);
int sa_dequant_rows(const uint8_t *w, int fmt, int64_t cols, int64_t row_bytes,
                    const int64_t *rows, int64_t n, float *out);
int sa_decode_attention(const float *q, const uint8_t *k, const uint8_t *v, int fmt, int64_t B,
                        int64_t H_kv, int64_t R, int64_t D, int64_t Dv, int64_t S_max,
                        int64_t k_row, int64_t v_row, int64_t S, int64_t T, int64_t j_base,
                        int64_t chunk, int64_t C, int64_t left, int64_t right, float softcap,
                        float *out, float *lse);
int sa_flash_attention(const float *q, const uint8_t *k, const uint8_t *v, int fmt, int64_t B,
                       int64_t H, int64_t H_kv, int64_t T, int64_t D, int64_t Dv, int64_t S_max,
                       int64_t k_row, int64_t v_row, int64_t S, int64_t left, int64_t right,
                       float scale, float softcap, float *out, float *lse);
int sa_quantize_rows(const float *x, int64_t T, int64_t H, int64_t D, int fmt, uint8_t *dst,
                     int64_t head_stride, int64_t row_stride);
void sa_fma_loop(int64_t iters, int64_t tasks, float *sums);
void sa_rmsnorm(const float *x, const float *w, float eps, int64_t T, int64_t n, float *out);
void sa_rope(float *x, int64_t T, int64_t heads, int64_t D, int64_t half, const float *cos_t,
             const float *sin_t, int64_t pos);
void sa_swiglu(const float *gu, int64_t T, int64_t ffn, float *out);

/* sa_layer_step's arguments (step.c): one layer's weights and cache, and where the token is */
typedef struct {
    const uint8_t *w; /* GGUF blocks, (rows, row_bytes) */
    int fmt;
    int64_t row_bytes;
} sa_mat;

typedef struct {
    int64_t dim, H, H_kv, D, ffn, rope_half;
    float eps, scale;
    const float *attn_norm, *ffn_norm, *b_qkv; /* b_qkv may be NULL */
    sa_mat qkv, wo, gate_up, down;
    const float *cos, *sin; /* RoPE tables (positions > pos, rope_half) */
    uint8_t *k, *v;         /* this layer's cache, (H_kv, S_max, row_bytes) each */
    int kv_fmt;
    int64_t S_max, row_bytes;
    int64_t pos, left, j_base, chunk, n_chunks; /* the token's position; attention's band and split */
} sa_layer;

int sa_layer_step(const sa_layer *L, float *x, double *attn_s);

#endif
