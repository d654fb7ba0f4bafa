/* One decode step (one token) through one llama-style layer, all in C: the same compiled kernels,
 * in the same order, as model/transformer.py's forward pass calls one by one from Python
 * (RMSNorm, the block matmuls, RoPE, the cache write, split-K attention, SwiGLU), so the result
 * is the same bits. At ~15 Python calls a layer, that loop's own overhead was about a third of
 * a token's time on the default model; here it is one call a layer.
 *
 *   h = rmsnorm(x) * attn_norm;  q, k, v = h Wq^T, h Wk^T, h Wv^T (+ bias);  rope(q), rope(k)
 *   cache[pos] = k, v (quantized to the cache's type);  o = attention(q * scale, cache[0..pos])
 *   x += o Wo^T;  h = rmsnorm(x) * ffn_norm;  x += swiglu(h Wgate^T, h Wup^T) Wdown^T
 *
 * Each matrix keeps its own type (a Q4_K_M file mixes Q4_K and Q6_K within a layer); the rows
 * of x @ W^T are computed one by one, so the q, k, v (and gate, up) products are the same bits
 * as one product with the matrices stacked.
 */
#include <stdlib.h>
#include <time.h>

#include "simd.h"

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* y (rows) = W x (cols), one row of x; its time added to *s */
static int mat(const sa_mat *m, int64_t rows, int64_t cols, const float *x, float *y, double *s) {
    const double t = seconds();
    const int rc = sa_matmul(m->w, m->fmt, rows, cols, m->row_bytes, x, 1, y);
    *s += seconds() - t;
    return rc;
}

/* Returns 0, or a kernel's error code; x (dim) is updated in place. Where the time went,
 * seconds: t[0] attention (the cache write included, as the Python path times it), t[1] the
 * weight matmuls, t[2] the whole step (the rest of it: norms, RoPE, SwiGLU, residual adds). */
int sa_layer_step(const sa_layer *L, float *x, double t[3]) {
    const double t_start = seconds();
    double *mat_s = &t[1];
    t[0] = t[1] = 0.0;
    const int64_t dim = L->dim, D = L->D, q_dim = L->H * D, kv_dim = L->H_kv * D, ffn = L->ffn;
    const int64_t n_qkv = q_dim + 2 * kv_dim;
    float *buf = malloc((size_t)(2 * dim + n_qkv + 2 * q_dim + 3 * ffn + L->H) * sizeof(float));
    if (!buf) return -2;
    float *h = buf, *y = h + dim, *qkv = y + dim, *qs = qkv + n_qkv, *o = qs + q_dim;
    float *gu = o + q_dim, *act = gu + 2 * ffn, *lse = act + ffn;
    int rc = 0;

    sa_rmsnorm(x, L->attn_norm, L->eps, 1, dim, h);
    if ((rc = mat(&L->q, q_dim, dim, h, qkv, mat_s)) ||
        (rc = mat(&L->k_proj, kv_dim, dim, h, qkv + q_dim, mat_s)) ||
        (rc = mat(&L->v_proj, kv_dim, dim, h, qkv + q_dim + kv_dim, mat_s)))
        goto out;
    if (L->b_qkv)
        for (int64_t i = 0; i < n_qkv; i++) qkv[i] += L->b_qkv[i];
    sa_rope(qkv, 1, L->H, D, L->rope_half, L->cos, L->sin, L->pos);
    sa_rope(qkv + q_dim, 1, L->H_kv, D, L->rope_half, L->cos, L->sin, L->pos);

    double t0 = seconds();
    const float *kv_new[2] = {qkv + q_dim, qkv + q_dim + kv_dim};
    uint8_t *cache[2] = {L->k, L->v};
    for (int c = 0; c < 2; c++) {
        uint8_t *row = cache[c] + L->pos * L->row_bytes;
        if (L->kv_fmt == SA_F32)
            for (int64_t g = 0; g < L->H_kv; g++)
                memcpy(row + g * L->S_max * L->row_bytes, kv_new[c] + g * D, (size_t)D * 4);
        else if ((rc = sa_quantize_rows(kv_new[c], 1, L->H_kv, D, L->kv_fmt, row, L->S_max * L->row_bytes,
                                        L->row_bytes)))
            goto out;
    }
    for (int64_t i = 0; i < q_dim; i++) qs[i] = qkv[i] * L->scale;
    rc = sa_decode_attention(qs, L->k, L->v, L->kv_fmt, 1, L->H_kv, L->H / L->H_kv, D, D, L->S_max,
                             L->row_bytes, L->row_bytes, L->pos + 1, 1, L->j_base, L->chunk, L->n_chunks,
                             L->left, 0, 0.0f, o, lse);
    t[0] = seconds() - t0;
    if (rc) goto out;

    if ((rc = mat(&L->o, dim, q_dim, o, y, mat_s))) goto out;
    for (int64_t i = 0; i < dim; i++) x[i] += y[i];
    sa_rmsnorm(x, L->ffn_norm, L->eps, 1, dim, h);
    if ((rc = mat(&L->gate, ffn, dim, h, gu, mat_s)) || (rc = mat(&L->up, ffn, dim, h, gu + ffn, mat_s)))
        goto out;
    sa_swiglu(gu, 1, ffn, act);
    if ((rc = mat(&L->down, dim, ffn, act, y, mat_s))) goto out;
    for (int64_t i = 0; i < dim; i++) x[i] += y[i];
out:
    free(buf);
    t[2] = seconds() - t_start;
    return rc;
}
