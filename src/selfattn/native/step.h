/* sa_layer_step's arguments (step.c): one layer's weights and cache, and where the token is */
#ifndef SELFATTN_STEP_H
#define SELFATTN_STEP_H
#include <stdint.h>

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
