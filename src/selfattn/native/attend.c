/* Split-K decode attention over a float32 or compact KV cache (flash-decoding), AVX2.
 *
 * The same contract as selfattn.attention.decode.decode_chunks (the numba kernel beside it, and
 * the reference in reference.py, are what the tests hold it to): q (B, H_kv, R, D) pre-scaled,
 * R = G*T rows head-major; k, v (B, H_kv, S_max, row) stored rows; chunk c of C covers `chunk`
 * keys from j_base + c*chunk; query t of T sits at position S - T + t and sees keys
 * p - left .. p + right. Tasks are (b, kv head, chunk); each keeps its own online-softmax state
 * and the chunks are merged by log-sum-exp at the end.
 *
 * A tile of 32 keys is decoded to float32 once (compact rows: the bytes read from memory are the
 * compact bytes) and scored against all R rows while it is in L1, eight keys per set of
 * accumulators so that one horizontal-sum tree serves eight dot products.
 */
#include <math.h>
#include <stdlib.h>

#include "simd.h"

#define TILE 32
#define MAX_DIM 256
#define MAX_ROWS 256

typedef struct {
    const float *q;
    const uint8_t *k, *v;
    int fmt;
    int64_t B, H_kv, R, D, Dv, S_max, k_row, v_row, S, T, j_base, chunk, C, left, right;
    float softcap;
    float *acc, *m, *l;
} dec_args;

/* nk (<= TILE) stored rows from row j0 -> float rows; rows past nk are zero. Returns where row
 * jj is: dst + jj*n, or the cache itself for full float32 tiles. */
SA_INLINE const float *tile_rows(const uint8_t *base, int64_t row_bytes, int fmt, int64_t j0,
                                 int64_t nk, int64_t n, float *dst) {
    if (fmt == SA_F32 && nk == TILE && row_bytes == 4 * n)
        return (const float *)(base + j0 * row_bytes);
    for (int64_t jj = 0; jj < nk; jj++)
        sa_decode_row(base + (j0 + jj) * row_bytes, fmt, n, dst + jj * n);
    memset(dst + nk * n, 0, (size_t)((TILE - nk) * n) * 4);
    return dst;
}

/* one task; FMT is a constant in each instance below, so the row decoding inlines per format */
SA_INLINE void dec_task(const void *ctx, int64_t task, const int FMT) {
    const dec_args *A = ctx;
    const int64_t R = A->R, D = A->D, Dv = A->Dv, T = A->T, S = A->S;
    const int64_t b = task / (A->H_kv * A->C), g = (task / A->C) % A->H_kv, c = task % A->C;
    const int64_t j_start = A->j_base + c * A->chunk;
    const int64_t j_end = j_start + A->chunk < S ? j_start + A->chunk : S;
    const int64_t head = b * A->H_kv + g;
    const uint8_t *kh = A->k + head * A->S_max * A->k_row, *vh = A->v + head * A->S_max * A->v_row;
    const float *q = A->q + head * R * D;
    float *acc = A->acc + task * R * Dv, *mm = A->m + task * R, *ll = A->l + task * R;
    float kbuf[TILE * MAX_DIM] __attribute__((aligned(32)));
    float vbuf[TILE * MAX_DIM] __attribute__((aligned(32)));
    float s[MAX_ROWS * TILE] __attribute__((aligned(32)));
    float alpha[MAX_ROWS];
    unsigned char seen[MAX_ROWS];

    for (int64_t r = 0; r < R; r++) {
        mm[r] = -INFINITY;
        ll[r] = 0.0f;
    }
    memset(acc, 0, (size_t)(R * Dv) * 4);

    for (int64_t j0 = j_start; j0 < j_end; j0 += TILE) {
        const int64_t nk = j_end - j0 < TILE ? j_end - j0 : TILE;
        /* which rows see any key of this tile */
        int any = 0;
        for (int64_t r = 0; r < R; r++) {
            int64_t p = S - T + r % T;
            int64_t lo = p - A->left - j0, hi = p + A->right - j0 + 1;
            lo = lo < 0 ? 0 : lo > nk ? nk : lo;
            hi = hi > nk ? nk : hi < lo ? lo : hi;
            seen[r] = hi > lo;
            any |= seen[r];
        }
        if (!any) continue;

        const float *kt = tile_rows(kh, A->k_row, FMT, j0, nk, D, kbuf);
        for (int64_t r = 0; r < R; r++) {
            if (!seen[r]) continue;
            const float *qr = q + r * D;
            for (int64_t j8 = 0; j8 < nk; j8 += 8) {
                __m256 a[8];
                for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) {
                    __m256 qv = _mm256_loadu_ps(qr + d);
                    for (int i = 0; i < 8; i++)
                        a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kt + (j8 + i) * D + d), a[i]);
                }
                _mm256_store_ps(s + r * TILE + j8, sa_hsum8(a));
            }
        }

        /* online softmax per row: s becomes p (0 outside the row's visible keys) */
        for (int64_t r = 0; r < R; r++) {
            float *row = s + r * TILE;
            alpha[r] = 1.0f;
            if (!seen[r]) {
                memset(row, 0, TILE * 4);
                continue;
            }
            int64_t p = S - T + r % T;
            int64_t lo = p - A->left - j0, hi = p + A->right - j0 + 1;
            lo = lo < 0 ? 0 : lo;
            hi = hi > nk ? nk : hi;
            if (A->softcap > 0.0f)
                for (int64_t jj = lo; jj < hi; jj++) row[jj] = A->softcap * tanhf(row[jj] / A->softcap);
            for (int64_t jj = 0; jj < lo; jj++) row[jj] = -INFINITY;
            for (int64_t jj = hi; jj < TILE; jj++) row[jj] = -INFINITY;
            float mx = -INFINITY;
            for (int64_t jj = lo; jj < hi; jj++) mx = row[jj] > mx ? row[jj] : mx;
            float m_new = mm[r] > mx ? mm[r] : mx;
            alpha[r] = mm[r] == -INFINITY ? 0.0f : expf(mm[r] - m_new);
            mm[r] = m_new;
            __m256 mv = _mm256_set1_ps(m_new), sum = _mm256_setzero_ps();
            for (int j8 = 0; j8 < TILE; j8 += 8) {
                __m256 e = sa_exp_neg(_mm256_sub_ps(_mm256_load_ps(row + j8), mv));
                _mm256_store_ps(row + j8, e);
                sum = _mm256_add_ps(sum, e);
            }
            ll[r] = ll[r] * alpha[r] + sa_hsum(sum);
        }

        const float *vt = tile_rows(vh, A->v_row, FMT, j0, nk, Dv, vbuf);
        for (int64_t r = 0; r < R; r++) {
            if (!seen[r] && alpha[r] == 1.0f) continue;
            const float *pr = s + r * TILE;
            float *ar = acc + r * Dv;
            __m256 al = _mm256_set1_ps(alpha[r]);
            int64_t d0 = 0;
            for (; d0 + 64 <= Dv; d0 += 64) { /* 8 accumulators held in registers */
                __m256 o[8];
                for (int i = 0; i < 8; i++) o[i] = _mm256_mul_ps(_mm256_loadu_ps(ar + d0 + 8 * i), al);
                for (int64_t jj = 0; jj < nk; jj++) {
                    __m256 pj = _mm256_broadcast_ss(pr + jj);
                    const float *vr = vt + jj * Dv + d0;
                    for (int i = 0; i < 8; i++) o[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * i), o[i]);
                }
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(ar + d0 + 8 * i, o[i]);
            }
            for (; d0 < Dv; d0 += 8) { /* the rest of a head dim that is not a multiple of 64 */
                __m256 o = _mm256_mul_ps(_mm256_loadu_ps(ar + d0), al);
                for (int64_t jj = 0; jj < nk; jj++)
                    o = _mm256_fmadd_ps(_mm256_broadcast_ss(pr + jj), _mm256_loadu_ps(vt + jj * Dv + d0), o);
                _mm256_storeu_ps(ar + d0, o);
            }
        }
    }
}

#define DEFINE_DEC_TASK(NAME, FMT) \
    SA_TARGET static void NAME(const void *ctx, int64_t task) { dec_task(ctx, task, FMT); }
DEFINE_DEC_TASK(dec_f32, SA_F32)
DEFINE_DEC_TASK(dec_f16, SA_F16)
DEFINE_DEC_TASK(dec_q8_0, SA_Q8_0)
DEFINE_DEC_TASK(dec_q4_0, SA_Q4_0)

/* Returns 0, or -1 when the shapes are outside what this kernel handles (the caller falls back
 * to the numba kernel before ever calling with them). out (B, H, T, Dv), lse (B, H, T). */
int sa_decode_attention(const float *q, const uint8_t *k, const uint8_t *v, int fmt, int64_t B,
                        int64_t H_kv, int64_t R, int64_t D, int64_t Dv, int64_t S_max,
                        int64_t k_row, int64_t v_row, int64_t S, int64_t T, int64_t j_base,
                        int64_t chunk, int64_t C, int64_t left, int64_t right, float softcap,
                        float *out, float *lse) {
    if (D % 8 || Dv % 8 || D > MAX_DIM || Dv > MAX_DIM || R > MAX_ROWS || R % T || T < 1 ||
        S < 1 || S > S_max || chunk < 1 || C < 1)
        return -1;
    if (fmt != SA_F32 && (D % 32 || Dv != D)) return -1;
    if (fmt != SA_F32 && fmt != SA_F16 && fmt != SA_Q8_0 && fmt != SA_Q4_0) return -1;
    /* a stored row must hold D (K) and Dv (V) values of the format: never read past a row */
    const int64_t need_k = fmt == SA_F32 ? 4 * D : fmt == SA_F16 ? 2 * D : D / 32 * (fmt == SA_Q8_0 ? 34 : 18);
    const int64_t need_v = fmt == SA_F32 ? 4 * Dv : fmt == SA_F16 ? 2 * Dv : Dv / 32 * (fmt == SA_Q8_0 ? 34 : 18);
    if (k_row < need_k || v_row < need_v) return -1;
    /* each task's online-softmax state: acc (tasks, R, Dv), m and l (tasks, R) */
    const int64_t tasks = B * H_kv * C;
    float *acc = malloc((size_t)(tasks * R * (Dv + 2)) * sizeof(float));
    if (!acc) return -2;
    float *m = acc + tasks * R * Dv, *l = m + tasks * R;
    dec_args A = {q, k, v, fmt, B, H_kv, R, D, Dv, S_max, k_row, v_row, S, T, j_base, chunk, C,
                  left, right, softcap, acc, m, l};
    sa_task_fn fn = fmt == SA_F32 ? dec_f32 : fmt == SA_F16 ? dec_f16 : fmt == SA_Q8_0 ? dec_q8_0
                  : dec_q4_0;
    sa_pool_run(fn, &A, B * H_kv * C);

    const int64_t G = R / T;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < H_kv; g++)
            for (int64_t r = 0; r < R; r++) {
                int64_t base = (b * H_kv + g) * C;
                float M = -INFINITY;
                for (int64_t c = 0; c < C; c++) M = m[(base + c) * R + r] > M ? m[(base + c) * R + r] : M;
                int64_t h = g * G + r / T, t = r % T;
                float *o = out + ((b * H_kv * G + h) * T + t) * Dv;
                float *ls = lse + (b * H_kv * G + h) * T + t;
                memset(o, 0, (size_t)Dv * 4);
                if (M == -INFINITY) {
                    *ls = -INFINITY;
                    continue;
                }
                double total = 0.0;
                for (int64_t c = 0; c < C; c++) {
                    float lc = l[(base + c) * R + r];
                    if (lc > 0.0f) {
                        float w = expf(m[(base + c) * R + r] - M);
                        total += (double)w * lc;
                        const float *a = acc + ((base + c) * R + r) * Dv;
                        for (int64_t d = 0; d < Dv; d++) o[d] += w * a[d];
                    }
                }
                float inv = (float)(1.0 / total);
                for (int64_t d = 0; d < Dv; d++) o[d] *= inv;
                *ls = M + logf((float)total);
            }
    free(acc);
    return 0;
}
