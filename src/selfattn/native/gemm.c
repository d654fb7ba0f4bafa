/* y (T, rows) = x (T, cols) @ W^T for a prompt, W kept in its GGUF type: each task decodes a
 * tile of MC rows x KC columns of W to float32 (dequant.c's exact row decoders) into a buffer
 * that stays in L2, and multiplies it with a register-blocked kernel. A float32 copy of W never
 * exists, and no BLAS runs: BLAS's threads and the kernels' pool, alternating tile by tile,
 * fought over the two cores (86 ms for a 14336 x 4096 Q4_K matrix and one token, against 13 ms
 * to decode it and 6 ms to multiply, timed apart).
 *
 * GotoBLAS's blocking: x is packed once per call, per KC-column block and group of NR tokens, to
 * [k][NR] (16 KB, 32 KB with AVX-512, in L1 while a tile's rows pass over it); W's tile is read
 * as decoded, row major, the kernel broadcasting one weight of each of MR rows per k. The kernel
 * is written in vec.h's vectors and keeps MR x NR sums in 2 MR registers: 6 x 16 in 12 with
 * AVX2 (12 FMAs per 2 loads and 6 broadcasts), 12 x 32 in 24 with AVX-512's 32 registers. Each
 * (row, token) sum takes the same steps at either width: the same bits at every level. On an
 * 8B-shaped 14336 x 4096 Q4_K matrix and 512 tokens this matches OpenBLAS's sgemm over a float32
 * copy (144-151 against 145-152 GFLOP/s, 2 cores of the AVX2 EPYC); on SmolLM2's small matrices (576 wide) it is
 * still 1.3-1.7x slower than that sgemm, matrix by matrix.
 * Sums over the columns are taken in another order than a BLAS would; nothing else differs
 * from a float32 matmul over the exactly decoded matrix.
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "simd.h"

#if SA_W == 16
#define MR 12       /* rows of W per kernel call */
#else
#define MR 6
#endif
#define NR (2 * SA_W) /* tokens per kernel call: two registers */
#define KC 256      /* columns per tile: one K-quant super-block, eight 32-value blocks */
#define LDW (KC + 8) /* a tile row's stride: with rows 1 KB apart the kernel's 6 broadcasts of one
                      * column hit the same L1 bank (SmolLM2's 576 x 576 matrix, 2048 tokens, one
                      * thread: 43 GFLOP/s at a stride of KC, 61 at this one) */
#define MC 96       /* rows of W per task (16 or 8 kernel calls) */
#define TB 256      /* tokens whose sums a task keeps at a time (96 KB) */
#define XP_MAX (1 << 24) /* floats of x's packed copy at most (64 MiB): longer prompts take
                          * several passes, each decoding the matrix again */

typedef struct {
    const uint8_t *w;
    sa_row_fn decode;
    int64_t rows, cols, row_bytes, unit_bytes, unit; /* unit: values per block */
    const float *xp; /* packed tokens t0 .. t0 + n_t - 1 (n_tg groups of NR) */
    int64_t n_t, n_tg, n_kb;
    float *y;        /* (T, rows): row t0 of y */
    _Atomic int failed; /* a task could not allocate its buffers */
} gemm_args;

typedef struct {
    const float *x; /* (T, cols): row t0 */
    float *xp;
    int64_t cols, n_t;
} pack_args;

/* The MC / MR kernel calls over one packed panel of x also prefetch the next panel into L2,
 * a slice each, one 64-byte line every PF_EVERY columns */
#define PF_EVERY (16 * MC / (MR * NR))

/* c (MR rows, ldc) += w (MR rows, ldw) . xp ([k][NR]) over kc columns, for the first NV (1 or
 * 2) registers of the group's tokens (a group of at most SA_W tokens: half the FMAs; each sum
 * takes the same steps either way); pf: this call's slice of the next panel */
SA_INLINE void kernel(int64_t kc, const float *w, int64_t ldw, const float *xp, float *c,
                      int64_t ldc, const float *pf, const int NV) {
    sa_vf acc[MR][2];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = vf_zero();
    for (int64_t k0 = 0; k0 < kc; k0 += PF_EVERY, pf += 16) {
        _mm_prefetch((const char *)pf, _MM_HINT_T1);
        const int64_t k1 = k0 + PF_EVERY < kc ? k0 + PF_EVERY : kc;
        for (int64_t k = k0; k < k1; k++, xp += NR) {
            sa_vf b[2];
            for (int v = 0; v < NV; v++) b[v] = vf_load(xp + SA_W * v);
            for (int i = 0; i < MR; i++) {
                const sa_vf a = vf_set1(w[i * ldw + k]);
                for (int v = 0; v < NV; v++) acc[i][v] = vf_fmadd(a, b[v], acc[i][v]);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++)
            vf_store(c + i * ldc + SA_W * v, vf_add(vf_load(c + i * ldc + SA_W * v), acc[i][v]));
}

/* x's tokens t0 .. t0 + n_t - 1, columns of block kb -> xp, zero past n_t */
static void pack_task(const void *ctx, int64_t kb) {
    const pack_args *a = ctx;
    const float *x = a->x;
    float *xp = a->xp;
    const int64_t cols = a->cols, n_t = a->n_t, n_tg = (n_t + NR - 1) / NR;
    const int64_t k0 = kb * KC, kc = cols - k0 < KC ? cols - k0 : KC;
    for (int64_t g = 0; g < n_tg; g++) {
        float *dst = xp + (kb * n_tg + g) * KC * NR;
        for (int64_t j = 0; j < NR; j++) {
            int64_t t = g * NR + j;
            for (int64_t k = 0; k < kc; k++) dst[k * NR + j] = t < n_t ? x[t * cols + k0 + k] : 0.0f;
        }
    }
}

static void gemm_task(const void *ctx, int64_t task) {
    gemm_args *A = (gemm_args *)ctx;
    const int64_t r0 = task * MC, nr = A->rows - r0 < MC ? A->rows - r0 : MC;
    float *tile = aligned_alloc(64, (size_t)MC * LDW * 4), *c = aligned_alloc(64, (size_t)MC * TB * 4);
    if (!tile || !c) {
        A->failed = 1;
        free(tile);
        free(c);
        return;
    }
    memset(tile, 0, (size_t)MC * LDW * 4); /* rows past nr stay zero */
    /* TB tokens at a time, so that the sums (MC x TB) stay in L2 beside the tile; the tile is
     * decoded again for each block of tokens */
    for (int64_t g0 = 0; g0 < A->n_tg; g0 += TB / NR) {
        const int64_t g1 = g0 + TB / NR < A->n_tg ? g0 + TB / NR : A->n_tg;
        memset(c, 0, (size_t)MC * TB * 4);
        for (int64_t kb = 0; kb < A->n_kb; kb++) {
            const int64_t k0 = kb * KC, kc = A->cols - k0 < KC ? A->cols - k0 : KC;
            for (int64_t r = 0; r < nr; r++)
                A->decode(A->w + (r0 + r) * A->row_bytes + k0 / A->unit * A->unit_bytes, kc,
                          tile + r * LDW);
            for (int64_t g = g0; g < g1; g++) {
                const float *xp = A->xp + (kb * A->n_tg + g) * KC * NR;
                const float *next = g + 1 < g1 ? xp + KC * NR
                                  : kb + 1 < A->n_kb ? A->xp + ((kb + 1) * A->n_tg + g0) * KC * NR
                                                     : xp;
                const int half = A->n_t - g * NR <= SA_W; /* a short prompt, or the last group */
                for (int64_t i = 0; i < nr; i += MR) {
                    float *ci = c + i * TB + (g - g0) * NR;
                    const float *pf = next + i / MR * (KC / PF_EVERY) * 16;
                    if (half) kernel(kc, tile + i * LDW, LDW, xp, ci, TB, pf, 1);
                    else kernel(kc, tile + i * LDW, LDW, xp, ci, TB, pf, 2);
                }
            }
        }
        const int64_t t0 = g0 * NR, t1 = g1 * NR < A->n_t ? g1 * NR : A->n_t;
        for (int64_t t = t0; t < t1; t++)
            for (int64_t r = 0; r < nr; r++) A->y[t * A->rows + r0 + r] = c[r * TB + t - t0];
    }
    free(tile);
    free(c);
}

/* w (rows, row_bytes) of type fmt, x (T, cols) float32 -> y (T, rows). Returns 0, -1 for
 * arguments the caller should have refused (an unknown type, cols not a whole number of blocks,
 * a wrong row_bytes, T < 1), -2 when out of memory. */
int sa_gemm(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
            const float *x, int64_t T, float *y) {
    sa_row_fn decode = sa_row_decoder(fmt);
    if (!decode || rows < 1 || T < 1 || !sa_row_bytes(fmt, cols) || row_bytes != sa_row_bytes(fmt, cols))
        return -1;
    const int64_t n_kb = (cols + KC - 1) / KC, unit = sa_block_values(fmt);
    int64_t tc = XP_MAX / (n_kb * KC) / NR * NR;
    if (tc < NR) tc = NR;
    if (tc > T) tc = T;
    const int64_t n_tg_max = (tc + NR - 1) / NR;
    float *xp = aligned_alloc(64, (size_t)n_kb * n_tg_max * KC * NR * 4);
    if (!xp) return -2;
    for (int64_t t0 = 0; t0 < T; t0 += tc) {
        const int64_t n_t = T - t0 < tc ? T - t0 : tc;
        pack_args P = {x + t0 * cols, xp, cols, n_t};
        sa_pool_run(pack_task, &P, n_kb);
        gemm_args A = {w, decode, rows, cols, row_bytes, sa_block_bytes(fmt), unit, xp, n_t,
                       (n_t + NR - 1) / NR, n_kb, y + t0 * rows, 0};
        sa_pool_run(gemm_task, &A, (rows + MC - 1) / MC);
        if (A.failed) {
            free(xp);
            return -2;
        }
    }
    free(xp);
    return 0;
}
