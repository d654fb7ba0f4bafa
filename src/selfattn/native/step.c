/* One decode step (one token of each of B sequences) through one llama-style layer, all in C:
 * the same compiled kernels, in the same order, as model/transformer.py's forward pass calls one
 * by one from Python (RMSNorm, the block matmuls, RoPE, the cache write, split-K attention,
 * SwiGLU), so the result is the same bits. At ~15 Python calls a layer, that loop's own overhead
 * was about a third of a token's time on the default model; here it is one call a layer, and
 * module.c's layer_step runs every layer of a step in one call from Python.
 *
 *   h = rmsnorm(x) * attn_norm;  q, k, v = h Wq^T, h Wk^T, h Wv^T (+ bias);  rope(q), rope(k)
 *   cache[pos] = k, v (quantized to the cache's type);  o = attention(q * scale, cache[0..pos])
 *   x += o Wo^T;  h = rmsnorm(x) * ffn_norm;  x += swiglu(h Wgate^T, h Wup^T) Wdown^T
 *
 * Each matrix keeps its own type (a Q4_K_M file mixes Q4_K and Q6_K within a layer). The B rows
 * of each product go through sa_matvecs, which reads each weight once for all of them and gives
 * each row the bits it gets alone; RoPE, the cache write and attention run per sequence, on its
 * own cache at its own position. So a sequence's token is the same bits at any B.
 */
#include <stdlib.h>
#include <time.h>

#include "simd.h"

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* y (B, rows) = x (B, cols) W^T, each row the bits it gets alone; its time added to *s */
static int mat(const sa_mat *m, int64_t rows, int64_t cols, const float *x, int64_t B, float *y,
               double *s) {
    const double t = seconds();
    const int rc = sa_matvecs(m->w, m->fmt, rows, cols, m->row_bytes, x, B, y);
    *s += seconds() - t;
    return rc;
}

/* the sequence's token: K/V (kv_dim each) into its cache at pos, quantized to its type */
static int write_kv(const sa_layer *L, const sa_seq *S, const float *k_new, const float *v_new) {
    const int64_t D = L->D;
    const float *kv_new[2] = {k_new, v_new};
    uint8_t *cache[2] = {S->k, S->v};
    for (int c = 0; c < 2; c++) {
        uint8_t *row = cache[c] + S->pos * S->row_bytes;
        if (S->kv_fmt == SA_F32) {
            for (int64_t g = 0; g < L->H_kv; g++)
                memcpy(row + g * S->S_max * S->row_bytes, kv_new[c] + g * D, (size_t)D * 4);
        } else {
            const int rc = sa_quantize_rows(kv_new[c], 1, L->H_kv, D, S->kv_fmt, row,
                                            S->S_max * S->row_bytes, S->row_bytes);
            if (rc) return rc;
        }
    }
    return 0;
}

/* Returns 0, or a kernel's error code; x (B, dim) is updated in place. Where the time went,
 * seconds: t[0] attention (the cache writes included, as the Python path times them), t[1] the
 * weight matmuls, t[2] the whole step (the rest of it: norms, RoPE, SwiGLU, residual adds). */
int sa_layer_step(const sa_layer *L, const sa_seq *seqs, int64_t B, float *x, double t[3]) {
    const double t_start = seconds();
    double *mat_s = &t[1];
    t[0] = t[1] = 0.0;
    const int64_t dim = L->dim, D = L->D, q_dim = L->H * D, kv_dim = L->H_kv * D, ffn = L->ffn;
    if (B < 1 || B > SA_MAX_T) return -1;
    float *buf = malloc((size_t)(B * (2 * dim + 3 * q_dim + 2 * kv_dim + 3 * ffn + L->H)) * sizeof(float));
    if (!buf) return -2;
    float *h = buf, *y = h + B * dim, *q = y + B * dim, *k = q + B * q_dim, *v = k + B * kv_dim;
    float *o = v + B * kv_dim, *gate = o + B * q_dim, *up = gate + B * ffn, *act = up + B * ffn;
    float *qs = act + B * ffn, *lse = qs + B * q_dim;
    sa_dec_call calls[SA_MAX_T];
    int rc = 0;

    sa_rmsnorm(x, L->attn_norm, L->eps, B, dim, h);
    if ((rc = mat(&L->q, q_dim, dim, h, B, q, mat_s)) || (rc = mat(&L->k_proj, kv_dim, dim, h, B, k, mat_s)) ||
        (rc = mat(&L->v_proj, kv_dim, dim, h, B, v, mat_s)))
        goto out;
    for (int64_t b = 0; b < B; b++) {
        const sa_seq *S = &seqs[b];
        float *qb = q + b * q_dim, *kb = k + b * kv_dim, *vb = v + b * kv_dim, *qsb = qs + b * q_dim;
        if (L->b_qkv) {
            for (int64_t i = 0; i < q_dim; i++) qb[i] += L->b_qkv[i];
            for (int64_t i = 0; i < kv_dim; i++) kb[i] += L->b_qkv[q_dim + i];
            for (int64_t i = 0; i < kv_dim; i++) vb[i] += L->b_qkv[q_dim + kv_dim + i];
        }
        sa_rope(qb, 1, L->H, D, L->rope_half, L->cos, L->sin, S->pos);
        sa_rope(kb, 1, L->H_kv, D, L->rope_half, L->cos, L->sin, S->pos);
        for (int64_t i = 0; i < q_dim; i++) qsb[i] = qb[i] * L->scale;
        const double t0 = seconds();
        rc = write_kv(L, S, kb, vb);
        t[0] += seconds() - t0;
        if (rc) goto out;
        calls[b] = (sa_dec_call){qsb, S->k, S->v, S->kv_fmt, 1, L->H_kv, L->H / L->H_kv, D, D, S->S_max,
                                 S->row_bytes, S->row_bytes, S->pos + 1, 1, S->j_base, S->chunk,
                                 S->n_chunks, S->left, 0, 0.0f, o + b * q_dim, lse + b * L->H};
    }
    const double t0 = seconds();
    rc = sa_decode_attentions(calls, B); /* every sequence's tasks in one pool run */
    t[0] += seconds() - t0;
    if (rc) goto out;

    if ((rc = mat(&L->o, dim, q_dim, o, B, y, mat_s))) goto out;
    for (int64_t i = 0; i < B * dim; i++) x[i] += y[i];
    sa_rmsnorm(x, L->ffn_norm, L->eps, B, dim, h);
    if ((rc = mat(&L->gate, ffn, dim, h, B, gate, mat_s)) || (rc = mat(&L->up, ffn, dim, h, B, up, mat_s)))
        goto out;
    sa_swiglu_rows(gate, up, B, ffn, act);
    if ((rc = mat(&L->down, dim, ffn, act, B, y, mat_s))) goto out;
    for (int64_t i = 0; i < B * dim; i++) x[i] += y[i];
out:
    free(buf);
    t[2] = seconds() - t_start;
    return rc;
}
