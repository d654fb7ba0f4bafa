/* Prefill attention: blocked online softmax (FlashAttention-2), written once in vec.h's vectors
 * (8 lanes with AVX2, 16 with AVX-512; the same bits at both widths).
 *
 * The same contract as selfattn.attention.flash.flash_task (the numba + BLAS kernel beside it,
 * and the reference in reference.py, are what the tests hold it to), without masks: q (B, H, T, D)
 * float32, k (B, H_kv, S_max, D) and v (B, H_kv, S_max, Dv) stored rows (float32, or a compact KV
 * format: f16, q8_0, q4_0, each tile decoded to float32 once per task), the first S keys used;
 * query i sits at position S - T + i and sees keys p - left .. p + right. Tasks are (b, query
 * head, block of bm queries), the latest blocks (the costliest under a causal band) first.
 *
 * Everything is computed keys x queries, transposed from the usual layout: the task keeps its
 * queries as columns (qt: D x bm, pre-scaled), a tile's scores as st (keys x bm), its output as
 * ot (Dv x bm), each stored as blocks of QB = two vectors of columns (a block's rows contiguous:
 * qt's block is D x 16 with AVX2, 4 KB at D = 64, and stays in L1 while it is used; row-major
 * D x 128 rows were 512 bytes apart and measured 3-7% slower at n >= 4096). Then
 * - scores: NR keys x QB queries in 2 NR registers, each step one d: two loads of qt's row d, a
 *   broadcast of k_j[d] per key, 2 NR FMAs; K is read in place, never packed or copied;
 * - softmax: a query is a column, so its running maximum, sum and rescale factor are lanes of a
 *   vector and every step (tile maximum, exp, sums) runs down the columns: no horizontal reduction;
 * - values: NR values of d x QB queries in registers over the tile's keys, each step a key:
 *   two loads of st's row j, a broadcast of v_j[d] per d, 2 NR FMAs.
 * While a tile's keys are scored, the next tile's K rows are prefetched to L2, and its V rows
 * while the values are summed (at 8,192 tokens they come from L3 or memory: 5-12% faster
 * measured), a line per step of the register blocks.
 * The score matrix is never built: the extra memory is each running task's buffers (46 KB at
 * D = Dv = 64 with 64 queries a task, float32 rows; 92 KB with 128). NR is at most 6 with
 * AVX2's 16 registers (12 accumulators) and 12 with AVX-512's 32 (24).
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "simd.h"

/* queries per task (bm: 64, or BM_MAX for long prompts; a multiple of QB) and keys per tile:
 * speed was flat from 32 to 96 queries and 16 to 96 keys at n = 2048 on the 2-core AVX2 machine
 * the benchmarks ran on */
#define BM_MAX 128
#define BN 48
#if SA_W == 16
#define NR_MAX 12 /* keys (scores) or values of d (output) per register block */
#else
#define NR_MAX 6
#endif
#define QB (2 * SA_W) /* queries per column block: two vectors, the register block's width */
#define NR_CALLS(n) (((n) + NR_MAX - 1) / NR_MAX) /* register blocks for n keys or values of d */

typedef struct {
    const float *q;
    const uint8_t *k, *v;
    int fmt;
    int64_t B, H, H_kv, T, D, Dv, S_max, k_row, v_row, S, left, right, bm, blocks;
    float scale, softcap;
    float *out, *lse;
    _Atomic int *failed; /* set by a task that could not allocate its buffers */
} pf_args;

/* lines of the next tile's K or V rows to fetch into L2 during one register block's call, one a
 * step: spread over a tile's calls, as bursts of them (a tile's rows at once) stalled on the
 * fill buffers, 5% of the time in prefetch instructions */
typedef struct {
    const char *at;
    int64_t lines;
} prefetch_slice;

/* slice `call` of `lines` lines from `at`, `per` lines a call */
SA_INLINE prefetch_slice slice(const uint8_t *at, int64_t lines, int64_t per, int64_t call) {
    const int64_t first = call * per < lines ? call * per : lines;
    const prefetch_slice s = {(const char *)at + 64 * first, lines - first < per ? lines - first : per};
    return s;
}

/* the shared register block: a[r][0..1] += b_r[i] * x_i[0..15] for i < n, NR rows r; x_i is row
 * i of a column block (ld apart), b_r[i] sits at b + r * rs + i * is */
SA_INLINE void panel(sa_vf a[][2], const float *x, int64_t ld, const float *b, int64_t rs,
                     int64_t is, int64_t n, const prefetch_slice pf, const int NR) {
    for (int64_t i = 0; i < n; i++) {
        if (i < pf.lines) _mm_prefetch(pf.at + 64 * i, _MM_HINT_T1);
        sa_vf x0 = vf_load(x + i * ld), x1 = vf_load(x + i * ld + SA_W);
        for (int r = 0; r < NR; r++) {
            sa_vf bb = vf_set1(b[r * rs + i * is]);
            a[r][0] = vf_fmadd(bb, x0, a[r][0]);
            a[r][1] = vf_fmadd(bb, x1, a[r][1]);
        }
    }
}

SA_INLINE void store_panel(float *y, int64_t ld, sa_vf a[][2], const int NR) {
    for (int r = 0; r < NR; r++) {
        vf_store(y + r * ld, a[r][0]);
        vf_store(y + r * ld + SA_W, a[r][1]);
    }
}

/* st[r][0 .. QB-1] = q_c . k_r for NR keys (rows of K from krow, D apart) and a column block's
 * QB queries: qt (D x QB) and st with rows ld (QB) apart; each step one d */
SA_INLINE void scores(const float *qt, const float *krow, int64_t D, float *st, int64_t ld,
                      const prefetch_slice pf, const int NR) {
    sa_vf a[NR_MAX][2];
    for (int r = 0; r < NR; r++) a[r][0] = a[r][1] = vf_zero();
    panel(a, qt, ld, krow, D, 1, D, pf, NR);
    store_panel(st, ld, a, NR);
}

/* ot[d0 + r][c0 .. c0+QB-1] = alpha * ot + sum over keys j < nk of st[j][c] * v_j[d0 + r], for NR
 * values of d (st, ot and alpha already offset to the column block, vrow to v_0[d0]); each step
 * one key */
SA_INLINE void values(float *ot, const float *alpha, const float *st, const float *vrow,
                      int64_t Dv, int64_t nk, int64_t ld, const prefetch_slice pf, const int NR) {
    sa_vf a[NR_MAX][2];
    const sa_vf al0 = vf_load(alpha), al1 = vf_load(alpha + SA_W);
    for (int r = 0; r < NR; r++) {
        a[r][0] = vf_mul(vf_load(ot + r * ld), al0);
        a[r][1] = vf_mul(vf_load(ot + r * ld + SA_W), al1);
    }
    panel(a, st, ld, vrow, 1, Dv, nk, pf, NR);
    store_panel(ot, ld, a, NR);
}

#define BY_NR(CALL, n)              \
    switch (n) {                    \
    case 1: CALL(1); break;         \
    case 2: CALL(2); break;         \
    case 3: CALL(3); break;         \
    case 4: CALL(4); break;         \
    case 5: CALL(5); break;         \
    BY_NR_WIDE(CALL)                \
    default: CALL(NR_MAX); break;   \
    }
#if NR_MAX == 12
#define BY_NR_WIDE(CALL)            \
    case 6: CALL(6); break;         \
    case 7: CALL(7); break;         \
    case 8: CALL(8); break;         \
    case 9: CALL(9); break;         \
    case 10: CALL(10); break;       \
    case 11: CALL(11); break;
#else
#define BY_NR_WIDE(CALL)
#endif

/* one tile's online softmax, down the columns (nv vectors of SA_W queries; st in blocks of QB
 * columns, BN x QB each): scores outside the band (if `band`) become -inf, st becomes
 * p = exp(s - m_new), m and l are brought up to date and alpha = exp(m_old - m_new) is what the
 * output so far is scaled by */
SA_INLINE void softmax_tile(float *st, int64_t nk, int64_t nv, int band, int64_t j0,
                            int64_t p0, int64_t left, int64_t right, float softcap, float *m,
                            float *l, float *alpha) {
    if (softcap > 0.0f)
        for (int64_t j = 0; j < nk; j++)
            for (int64_t c = 0; c < SA_W * nv; c++) {
                float *x = st + (c / QB) * BN * QB + j * QB + c % QB;
                *x = softcap * sa_tanhf(*x / softcap);
            }
    const sa_vf ninf = vf_set1(-INFINITY), inf = vf_set1(INFINITY);
    for (int64_t cv = 0; cv < nv; cv++) {
        float *col = st + (cv / 2) * BN * QB + SA_W * (cv % 2); /* rows QB apart */
        if (band) { /* key j0 + j is hidden from query p when p > j + left or p < j - right */
            const sa_vi p = vi_add(vi_set1((int)(p0 + SA_W * cv)), vi_iota());
            for (int64_t j = 0; j < nk; j++) {
                const sa_vm hide = vm_or(vi_gt(p, vi_set1((int)(j0 + j + left))),
                                           vi_gt(vi_set1((int)(j0 + j - right)), p));
                vf_store(col + j * QB, vf_select(hide, ninf, vf_load(col + j * QB)));
            }
        }
        sa_vf mx = ninf;
        sa_vm bad = vm_none(); /* a NaN or +inf logit seen: NaN column */
        for (int64_t j = 0; j < nk; j++) {
            const sa_vf x = vf_load(col + j * QB);
            mx = vf_max(mx, x);
            bad = vm_or(bad, vf_nlt(x, inf));
        }
        const sa_vf m_old = vf_load(m + SA_W * cv), m_new = vf_max(m_old, mx);
        /* a column that has seen no key yet subtracts 0: exp(-inf - 0) = 0, never NaN */
        const sa_vf base = vf_select(vf_eq(m_new, ninf), vf_zero(), m_new);
        const sa_vf al = vf_exp_neg(vf_sub(m_old, base));
        sa_vf sum = vf_zero();
        for (int64_t j = 0; j < nk; j++) {
            sa_vf e = vf_exp_neg(vf_sub(vf_load(col + j * QB), base));
            vf_store(col + j * QB, e);
            sum = vf_add(sum, e);
        }
        vf_store(m + SA_W * cv, m_new);
        vf_store(l + SA_W * cv, vf_select(bad, vf_set1(NAN), vf_fmadd(vf_load(l + SA_W * cv), al, sum)));
        vf_store(alpha + SA_W * cv, al);
    }
}

static void pf_task(const void *ctx, int64_t task) {
    const pf_args *A = ctx;
    const int64_t D = A->D, Dv = A->Dv, T = A->T, S = A->S;
    const int64_t bm = A->bm, bh = task % (A->B * A->H), blk = A->blocks - 1 - task / (A->B * A->H);
    const int64_t b = bh / A->H, h = bh % A->H, g = h / (A->H / A->H_kv);
    const int64_t i0 = blk * bm, tq = T - i0 < bm ? T - i0 : bm;
    const int64_t np = (tq + QB - 1) / QB, nv = 2 * np; /* column blocks, vectors of queries */
    const int64_t p0 = S - T + i0, p1 = p0 + tq - 1;  /* positions of the first and last query */
    const float *q = A->q + (bh * T + i0) * D;
    const uint8_t *kh = A->k + (b * A->H_kv + g) * A->S_max * A->k_row;
    const uint8_t *vh = A->v + (b * A->H_kv + g) * A->S_max * A->v_row;
    /* the task's buffers, on the heap (a caller's thread may have a small stack): qt (D x bm),
     * st (BN x bm), ot (Dv x bm), each as bm / QB blocks of QB columns; m, l, alpha (bm each),
     * and for compact rows a tile of K and one of V decoded (BN x D, BN x Dv, D and Dv multiples
     * of 8); every part a multiple of 16 floats, so 64-byte aligned */
    const int64_t decoded = A->fmt == SA_F32 ? 0 : BN * (D + Dv);
    float *qt = aligned_alloc(64, (size_t)((D + BN + Dv + 3) * bm + decoded) * 4);
    if (!qt) {
        atomic_store(A->failed, 1);
        return;
    }
    float *st = qt + D * bm, *ot = st + BN * bm, *m = ot + Dv * bm, *l = m + bm, *alpha = l + bm;
    float *kbuf = alpha + bm, *vbuf = kbuf + BN * D;

    /* query by query, each read in order (d outermost, gcc gathered q and scattered qt: 2% of
     * the 1-thread prefill at D = 128) */
    for (int64_t c = 0; c < QB * np; c++) {
        float *col = qt + (c / QB) * D * QB + c % QB; /* rows QB apart */
        for (int64_t d = 0; d < D; d++) col[d * QB] = c < tq ? q[c * D + d] * A->scale : 0.0f;
    }
    for (int64_t c = 0; c < bm; c++) {
        m[c] = -INFINITY;
        l[c] = 0.0f;
    }
    memset(ot, 0, (size_t)(Dv * bm) * 4);

    /* keys any of the block's queries sees */
    const int64_t j_lo = p0 - A->left > 0 ? p0 - A->left : 0;
    const int64_t j_hi = p1 + A->right < S - 1 ? p1 + A->right : S - 1;
    for (int64_t j0 = j_lo; j0 <= j_hi; j0 += BN) {
        const int64_t nk = j_hi + 1 - j0 < BN ? j_hi + 1 - j0 : BN;
        const float *kt = (const float *)(kh + j0 * A->k_row), *vt = (const float *)(vh + j0 * A->v_row);
        if (A->fmt != SA_F32) { /* this tile's rows, decoded */
            for (int64_t j = 0; j < nk; j++) {
                sa_decode_row(kh + (j0 + j) * A->k_row, A->fmt, D, kbuf + j * D);
                sa_decode_row(vh + (j0 + j) * A->v_row, A->fmt, Dv, vbuf + j * Dv);
            }
            kt = kbuf;
            vt = vbuf;
        }
        /* the next tile's K rows go to L2 during this tile's scores, its V rows during the values */
        const int64_t nk_next = j_hi + 1 - (j0 + BN) < BN ? j_hi + 1 - (j0 + BN) : BN;
        const int64_t k_lines = nk_next > 0 ? (nk_next * A->k_row + 63) / 64 : 0;
        const int64_t v_lines = nk_next > 0 ? (nk_next * A->v_row + 63) / 64 : 0;
        const int64_t k_per = (k_lines + np * NR_CALLS(nk) - 1) / (np * NR_CALLS(nk));
        const int64_t v_per = (v_lines + np * NR_CALLS(Dv) - 1) / (np * NR_CALLS(Dv));
        const uint8_t *k_next = kh + (j0 + BN) * A->k_row, *v_next = vh + (j0 + BN) * A->v_row;
        /* the keys of the tile each column block sees some of, lo[c] .. hi[c] (none: hi < lo):
         * at the causal diagonal a column block skips the keys past its last query */
        int64_t lo[BM_MAX / QB], hi[BM_MAX / QB];
        for (int64_t c = 0; c < np; c++) {
            const int64_t first = p0 + QB * c - A->left, last = p0 + QB * c + QB - 1 + A->right;
            lo[c] = (first > j0 ? first : j0) - j0;
            hi[c] = (last < j0 + nk - 1 ? last : j0 + nk - 1) - j0;
        }
        /* a column block's queries against the tile's keys: its qt (D x QB, 16 KB at D = 128)
         * stays in L1 while the tile's K rows pass (5% faster than keys outermost at the Llama-3
         * shape, n = 4096; the same at D = 64). A register block of keys none of its queries
         * sees is skipped: its scores are left as they were and set to -inf by the band test. */
        for (int64_t c = 0, call = 0; c < np; c++)
            for (int64_t j = 0; j < nk; j += NR_MAX, call++) {
                const int64_t n = nk - j < NR_MAX ? nk - j : NR_MAX;
                const prefetch_slice pf = slice(k_next, k_lines, k_per, call);
                if (j + n - 1 < lo[c] || j > hi[c]) {
                    for (int64_t i = 0; i < pf.lines; i++) _mm_prefetch(pf.at + 64 * i, _MM_HINT_T1);
                    continue;
                }
#define SCORES(NR) scores(qt + c * D * QB, kt + j * D, D, st + c * BN * QB + j * QB, QB, pf, NR)
                BY_NR(SCORES, n)
#undef SCORES
            }
        /* the band test is needed unless every (query, key) of the tile is inside it (the block's
         * padding columns past tq, zero queries, are computed too and never written out) */
        const int band = j0 < p1 - A->left || j0 + nk - 1 > p0 + A->right;
        softmax_tile(st, nk, nv, band, j0, p0, A->left, A->right, A->softcap, m, l, alpha);
        for (int64_t d = 0, call = 0; d < Dv; d += NR_MAX) {
            const int64_t n = Dv - d < NR_MAX ? Dv - d : NR_MAX;
            for (int64_t c = 0; c < np; c++, call++) {
                const prefetch_slice pf = slice(v_next, v_lines, v_per, call);
                /* only the keys it sees: the others' weights are 0, and adding 0 * v changes no
                 * bit (a NaN value there would, which the non-finite convention leaves open) */
                const int64_t j = lo[c], nj = hi[c] >= lo[c] ? hi[c] + 1 - lo[c] : 0;
#define VALUES(NR) values(ot + c * Dv * QB + d * QB, alpha + QB * c, st + c * BN * QB + j * QB, vt + j * Dv + d, Dv, nj, QB, pf, NR)
                BY_NR(VALUES, n)
#undef VALUES
            }
        }
    }

    float *out = A->out + (bh * T + i0) * Dv, *lse = A->lse + bh * T + i0;
    for (int64_t c = 0; c < tq; c++) {
        if (isnan(l[c])) { /* a NaN or +inf logit among the keys it sees */
            for (int64_t d = 0; d < Dv; d++) out[c * Dv + d] = NAN;
            lse[c] = NAN;
        } else if (l[c] > 0.0f) {
            const float inv = 1.0f / l[c];
            for (int64_t d = 0; d < Dv; d++) out[c * Dv + d] = ot[(c / QB) * Dv * QB + d * QB + c % QB] * inv;
            lse[c] = m[c] + logf(l[c]);
        } else { /* no visible key */
            memset(out + c * Dv, 0, (size_t)Dv * 4);
            lse[c] = -INFINITY;
        }
    }
    free(qt);
}

/* Returns 0, -1 for shapes outside what this kernel takes (the caller checks first and uses
 * the numba kernel for them), -2 when out of memory. Positions, band edges and their sums must
 * fit int32 lanes. */
int sa_flash_attention(const float *q, const uint8_t *k, const uint8_t *v, int fmt, int64_t B,
                       int64_t H, int64_t H_kv, int64_t T, int64_t D, int64_t Dv, int64_t S_max,
                       int64_t k_row, int64_t v_row, int64_t S, int64_t left, int64_t right,
                       float scale, float softcap, float *out, float *lse) {
    const int64_t lim = (int64_t)1 << 29;
    if (B < 1 || H_kv < 1 || H % H_kv || T < 1 || S < 1 || S > S_max || D < 1 || Dv < 1 ||
        D > SA_MAX_DIM || Dv > SA_MAX_DIM || S + T > lim || left > lim || right > lim || left < -lim ||
        right < -lim)
        return -1;
    if (fmt != SA_F32 && fmt != SA_F16 && fmt != SA_Q8_0 && fmt != SA_Q4_0) return -1;
    /* a stored row holds D (K) and Dv (V) values of the format (never read past one; float32
     * rows are read in place, D and Dv apart); decoded rows go 8 or 32 values at a time */
    if (fmt != SA_F32 && (D % 8 || Dv % 8)) return -1;
    if (!sa_row_bytes(fmt, D) || !sa_row_bytes(fmt, Dv) || k_row < sa_row_bytes(fmt, D) ||
        v_row < sa_row_bytes(fmt, Dv) || (fmt == SA_F32 && (k_row != 4 * D || v_row != 4 * Dv)))
        return -1;
    /* long prompts take twice the queries per task: each K/V tile then serves 128 of them, which
     * measured 5-10% faster where K/V no longer fit in L3 (H_kv 8, D 128, n >= 4096) and 9% slower
     * at n = 512 */
    const int64_t bm = T >= 2048 && S >= 4096 ? BM_MAX : BM_MAX / 2;
    const int64_t blocks = (T + bm - 1) / bm;
    _Atomic int failed = 0;
    pf_args A = {q, k, v, fmt, B, H, H_kv, T, D, Dv, S_max, k_row, v_row, S, left, right, bm,
                 blocks, scale, softcap, out, lse, &failed};
    sa_pool_run(pf_task, &A, B * H * blocks);
    return atomic_load(&failed) ? -2 : 0;
}
