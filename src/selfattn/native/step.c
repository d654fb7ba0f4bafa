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

/* one layer for the B sequences (seqs' caches: this layer's part); buf: layer_floats of scratch;
 * t[0] attention (the cache writes included, as the Python path times them) and t[1] the weight
 * matmuls, added to */
static int one_layer(const sa_layer *L, const float *cos, const float *sin, const sa_seq *seqs,
                     int64_t B, float *x, float *buf, double t[2]) {
    const int64_t dim = L->dim, D = L->D, q_dim = L->H * D, kv_dim = L->H_kv * D, ffn = L->ffn;
    double *mat_s = &t[1];
    float *h = buf, *y = h + B * dim, *q = y + B * dim, *k = q + B * q_dim, *v = k + B * kv_dim;
    float *o = v + B * kv_dim, *gate = o + B * q_dim, *up = gate + B * ffn, *act = up + B * ffn;
    float *qs = act + B * ffn, *lse = qs + B * q_dim;
    sa_dec_call calls[SA_MAX_T];
    int rc;

    sa_rmsnorm(x, L->attn_norm, L->eps, B, dim, h);
    if ((rc = mat(&L->q, q_dim, dim, h, B, q, mat_s)) || (rc = mat(&L->k_proj, kv_dim, dim, h, B, k, mat_s)) ||
        (rc = mat(&L->v_proj, kv_dim, dim, h, B, v, mat_s)))
        return rc;
    for (int64_t b = 0; b < B; b++) {
        const sa_seq *S = &seqs[b];
        float *qb = q + b * q_dim, *kb = k + b * kv_dim, *vb = v + b * kv_dim, *qsb = qs + b * q_dim;
        if (L->b_qkv) {
            for (int64_t i = 0; i < q_dim; i++) qb[i] += L->b_qkv[i];
            for (int64_t i = 0; i < kv_dim; i++) kb[i] += L->b_qkv[q_dim + i];
            for (int64_t i = 0; i < kv_dim; i++) vb[i] += L->b_qkv[q_dim + kv_dim + i];
        }
        sa_rope(qb, 1, L->H, D, L->rope_half, cos, sin, S->pos);
        sa_rope(kb, 1, L->H_kv, D, L->rope_half, cos, sin, S->pos);
        for (int64_t i = 0; i < q_dim; i++) qsb[i] = qb[i] * L->scale;
        const double t0 = seconds();
        rc = write_kv(L, S, kb, vb);
        t[0] += seconds() - t0;
        if (rc) return rc;
        calls[b] = (sa_dec_call){qsb, S->k, S->v, S->kv_fmt, 1, L->H_kv, L->H / L->H_kv, D, D, S->S_max,
                                 S->row_bytes, S->row_bytes, S->pos + 1, 1, S->j_base, S->chunk,
                                 S->n_chunks, S->left, 0, 0.0f, o + b * q_dim, lse + b * L->H};
    }
    const double t0 = seconds();
    rc = sa_decode_attentions(calls, B); /* every sequence's tasks in one pool run */
    t[0] += seconds() - t0;
    if (rc) return rc;

    if ((rc = mat(&L->o, dim, q_dim, o, B, y, mat_s))) return rc;
    for (int64_t i = 0; i < B * dim; i++) x[i] += y[i];
    sa_rmsnorm(x, L->ffn_norm, L->eps, B, dim, h);
    if ((rc = mat(&L->gate, ffn, dim, h, B, gate, mat_s)) || (rc = mat(&L->up, ffn, dim, h, B, up, mat_s)))
        return rc;
    sa_swiglu_rows(gate, up, B, ffn, act);
    if ((rc = mat(&L->down, dim, ffn, act, B, y, mat_s))) return rc;
    for (int64_t i = 0; i < B * dim; i++) x[i] += y[i];
    return 0;
}

/* floats of one_layer's scratch for B sequences */
static int64_t layer_floats(const sa_layer *L, int64_t B) {
    return B * (2 * L->dim + 3 * L->H * L->D + 2 * L->H_kv * L->D + 3 * L->ffn + L->H);
}

/* Returns 0, or a kernel's error code; x (B, dim) is updated in place. The scratch is allocated
 * once for the step, not once a layer. Where the time went, seconds, over the layers: t[0]
 * attention (with the cache writes), t[1] the weight matmuls, t[2] the whole step (the rest of
 * it: norms, RoPE, SwiGLU, residual adds). */
int sa_layer_step(const sa_layer *const *layers, int64_t n, const float *cos, const float *sin,
                  const sa_seq *seqs, int64_t B, float *x, double t[3]) {
    const double t_start = seconds();
    t[0] = t[1] = 0.0;
    if (B < 1 || B > SA_MAX_T || n < 1) return -1;
    int64_t floats = 0;
    for (int64_t i = 0; i < n; i++)
        if (layer_floats(layers[i], B) > floats) floats = layer_floats(layers[i], B);
    float *buf = malloc((size_t)floats * sizeof(float));
    if (!buf) return -2;
    sa_seq here[SA_MAX_T]; /* each sequence with its cache moved to the layer's part */
    memcpy(here, seqs, (size_t)B * sizeof *here);
    int rc = 0;
    for (int64_t i = 0; i < n && !rc; i++) {
        rc = one_layer(layers[i], cos, sin, here, B, x, buf, t);
        for (int64_t b = 0; b < B; b++) {
            const int64_t part = layers[i]->H_kv * here[b].S_max * here[b].row_bytes;
            here[b].k += part;
            here[b].v += part;
        }
    }
    free(buf);
    t[2] = seconds() - t_start;
    return rc;
}
