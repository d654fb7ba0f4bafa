/* The compiled kernels' entry points (module.c calls them from Python through a table, step.c
 * chains them), the GGUF type ids they take, and the bytes a stored row of each type holds. Plain
 * C: no intrinsics, so module.c, pool.c and pages.c include it at the baseline instruction set.
 *
 * The kernel sources are compiled once per instruction-set level (setup.py: LEVELS), with SA_ISA
 * set to the level's name; every entry point below then takes the level as a suffix
 * (sa_matmul -> sa_matmul_avx512), so the copies link side by side, and isa.c gathers one
 * level's entry points into its table, sa_table_<level>. */
#ifndef SELFATTN_KERNELS_H
#define SELFATTN_KERNELS_H

#include <stdint.h>

#define SA_CAT_(a, b) a##_##b
#define SA_CAT(a, b) SA_CAT_(a, b)
#ifdef SA_ISA
#define sa_matmul SA_CAT(sa_matmul, SA_ISA)
#define sa_gemm SA_CAT(sa_gemm, SA_ISA)
#define sa_matvecs SA_CAT(sa_matvecs, SA_ISA)
#define sa_dequant_rows SA_CAT(sa_dequant_rows, SA_ISA)
#define sa_dequant_range SA_CAT(sa_dequant_range, SA_ISA)
#define sa_row_decoder SA_CAT(sa_row_decoder, SA_ISA)
#define sa_decode_attention SA_CAT(sa_decode_attention, SA_ISA)
#define sa_decode_attentions SA_CAT(sa_decode_attentions, SA_ISA)
#define sa_flash_attention SA_CAT(sa_flash_attention, SA_ISA)
#define sa_quantize_rows SA_CAT(sa_quantize_rows, SA_ISA)
#define sa_fma_loop SA_CAT(sa_fma_loop, SA_ISA)
#define sa_read_sum SA_CAT(sa_read_sum, SA_ISA)
#define sa_rmsnorm SA_CAT(sa_rmsnorm, SA_ISA)
#define sa_rope SA_CAT(sa_rope, SA_ISA)
#define sa_swiglu SA_CAT(sa_swiglu, SA_ISA)
#define sa_swiglu_rows SA_CAT(sa_swiglu_rows, SA_ISA)
#define sa_layer_step SA_CAT(sa_layer_step, SA_ISA)
#endif

/* the kernels' limits, exported to Python by module.c: head dims the attention kernels take, rows
 * (query heads of a group x tokens) one decode call takes, rows of x one matmul call takes */
#define SA_MAX_DIM 256
#define SA_MAX_ROWS 256
#define SA_MAX_T 16

/* ggml type ids (the GGUF tensor types) of the weight types the kernels read; the KV formats
 * reuse them: f32 0, f16 1, q4_0 2, q8_0 8 */
enum {
    SA_F32 = 0, SA_F16 = 1, SA_Q4_0 = 2, SA_Q4_1 = 3, SA_Q5_0 = 6, SA_Q5_1 = 7, SA_Q8_0 = 8,
    SA_Q2_K = 10, SA_Q3_K = 11, SA_Q4_K = 12, SA_Q5_K = 13, SA_Q6_K = 14, SA_IQ4_NL = 20,
    SA_IQ4_XS = 23, SA_BF16 = 30, SA_N_TYPES = 31
};

/* Values per block and bytes per block of each type, by type id; {0, 0}: a type the kernels do
 * not read. ggml's sizes (selfattn/formats.py holds the same table; a test compares them). */
static const struct { int16_t values, bytes; } SA_BLOCKS[SA_N_TYPES] = {
    [SA_F32] = {1, 4},      [SA_F16] = {1, 2},       [SA_BF16] = {1, 2},
    [SA_Q4_0] = {32, 18},   [SA_Q4_1] = {32, 20},    [SA_Q5_0] = {32, 22},
    [SA_Q5_1] = {32, 24},   [SA_Q8_0] = {32, 34},    [SA_IQ4_NL] = {32, 18},
    [SA_Q2_K] = {256, 84},  [SA_Q3_K] = {256, 110},  [SA_Q4_K] = {256, 144},
    [SA_Q5_K] = {256, 176}, [SA_Q6_K] = {256, 210},  [SA_IQ4_XS] = {256, 136},
};

/* values per block of type fmt (0: a type the kernels do not read) */
static inline int64_t sa_block_values(int fmt) {
    return fmt >= 0 && fmt < SA_N_TYPES ? SA_BLOCKS[fmt].values : 0;
}

/* bytes per block of type fmt (0: a type the kernels do not read) */
static inline int64_t sa_block_bytes(int fmt) {
    return fmt >= 0 && fmt < SA_N_TYPES ? SA_BLOCKS[fmt].bytes : 0;
}

/* bytes a row of n values of type fmt takes (0: an unknown type, n < 1, or n not a whole
 * number of blocks) */
static inline int64_t sa_row_bytes(int fmt, int64_t n) {
    int64_t b = sa_block_values(fmt);
    return b && n > 0 && n % b == 0 ? n / b * sa_block_bytes(fmt) : 0;
}

/* the thread pool (pool.c, one copy for every level): run fn(ctx, task) for task in 0 .. n-1 on
 * the pool's threads */
typedef void (*sa_task_fn)(const void *ctx, int64_t task);
void sa_pool_run(sa_task_fn fn, const void *ctx, int64_t n);
int sa_pool_threads(void);
int sa_set_threads(int n);
int sa_matmul(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
              const float *x, int64_t T, float *y);
int sa_matvecs(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
               const float *x, int64_t T, float *y);
int sa_dequant_rows(const uint8_t *w, int fmt, int64_t cols, int64_t row_bytes,
                    const int64_t *rows, int64_t n, float *out);
/* n values of a stored row (n a whole number of blocks) -> dst float32, exactly (dequant.c) */
typedef void (*sa_row_fn)(const uint8_t *src, int64_t n, float *dst);
sa_row_fn sa_row_decoder(int fmt);
int sa_gemm(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
            const float *x, int64_t T, float *y);
int sa_dequant_range(const uint8_t *w, int fmt, int64_t cols, int64_t row_bytes, int64_t r0,
                     int64_t r1, float *out);
int sa_decode_attention(const float *q, const uint8_t *k, const uint8_t *v, int fmt, int64_t B,
                        int64_t H_kv, int64_t R, int64_t D, int64_t Dv, int64_t S_max,
                        int64_t k_row, int64_t v_row, int64_t S, int64_t T, int64_t j_base,
                        int64_t chunk, int64_t C, int64_t left, int64_t right, float softcap,
                        float *out, float *lse);
/* one sa_decode_attention call's arguments, by name, for sa_decode_attentions: several calls
 * (several sequences' steps, each on its own cache) in one pool run */
typedef struct {
    const float *q;
    const uint8_t *k, *v;
    int fmt;
    int64_t B, H_kv, R, D, Dv, S_max, k_row, v_row, S, T, j_base, chunk, C, left, right;
    float softcap;
    float *out, *lse;
} sa_dec_call;
int sa_decode_attentions(const sa_dec_call *calls, int64_t n);
int sa_flash_attention(const float *q, const uint8_t *k, const uint8_t *v, int fmt, int64_t B,
                       int64_t H, int64_t H_kv, int64_t T, int64_t D, int64_t Dv, int64_t S_max,
                       int64_t k_row, int64_t v_row, int64_t S, int64_t left, int64_t right,
                       float scale, float softcap, float *out, float *lse);
int sa_quantize_rows(const float *x, int64_t T, int64_t H, int64_t D, int fmt, uint8_t *dst,
                     int64_t head_stride, int64_t row_stride);
void sa_fma_loop(int64_t iters, int64_t tasks, float *sums);
/* x (n floats) summed once per 1 MiB task on the pool; sums gets one value a task (peak.c) */
void sa_read_sum(const float *x, int64_t n, float *sums);
/* read one byte of every 4 KiB page of p (n bytes) from `readers` threads (pages.c) */
int sa_touch_pages(const uint8_t *p, int64_t n, int readers);
void sa_rmsnorm(const float *x, const float *w, float eps, int64_t T, int64_t n, float *out);
void sa_rope(float *x, int64_t T, int64_t heads, int64_t D, int64_t half, const float *cos_t,
             const float *sin_t, int64_t pos);
void sa_swiglu(const float *gu, int64_t T, int64_t ffn, float *out);
void sa_swiglu_rows(const float *gate, const float *up, int64_t T, int64_t ffn, float *out);

/* sa_layer_step's arguments (step.c): one layer's weights, and per sequence its cache and where
 * its token is */
typedef struct {
    const uint8_t *w; /* GGUF blocks, (rows, row_bytes) */
    int fmt;
    int64_t row_bytes;
} sa_mat;

typedef struct {
    int64_t dim, H, H_kv, D, ffn, rope_half;
    float eps, scale;
    const float *attn_norm, *ffn_norm, *b_qkv; /* b_qkv (q_dim + 2 kv_dim) may be NULL */
    /* q (H*D, dim), k and v (H_kv*D, dim), o (dim, H*D), gate and up (ffn, dim), down (dim, ffn) */
    sa_mat q, k_proj, v_proj, o, gate, up, down;
} sa_layer;

typedef struct {
    uint8_t *k, *v; /* the first layer's cache of the sequence, (H_kv, S_max, row_bytes) each; the
                       next layers' follow, H_kv * S_max * row_bytes apart */
    int kv_fmt;
    int64_t S_max, row_bytes;
    int64_t pos, left, j_base, chunk, n_chunks; /* the token's position; attention's band and split */
} sa_seq;

/* one token of each of B sequences (x (B, dim), in place) through n layers in turn, layer i on
 * part i of each sequence's cache; cos, sin: RoPE tables (positions > every pos, rope_half) */
int sa_layer_step(const sa_layer *const *layers, int64_t n, const float *cos, const float *sin,
                  const sa_seq *seqs, int64_t B, float *x, double t[3]);

/* one level's entry points (isa.c); module.c calls the kernels only through the chosen table */
typedef struct {
    const char *name; /* the level, as setup.py's LEVELS and SELFATTN_ISA name it */
    int lanes;        /* float32 lanes of the widest vectors its kernels use (fma_loop's width) */
    int dot_rows;     /* rows of x matvecs takes a pass, each block decoded once for them */
    __typeof__(sa_matmul) *matmul;
    __typeof__(sa_matvecs) *matvecs;
    __typeof__(sa_gemm) *gemm;
    __typeof__(sa_dequant_rows) *dequant_rows;
    __typeof__(sa_dequant_range) *dequant_range;
    __typeof__(sa_decode_attention) *decode_attention;
    __typeof__(sa_flash_attention) *flash_attention;
    __typeof__(sa_quantize_rows) *quantize_rows;
    __typeof__(sa_fma_loop) *fma_loop;
    __typeof__(sa_read_sum) *read_sum;
    __typeof__(sa_rmsnorm) *rmsnorm;
    __typeof__(sa_rope) *rope;
    __typeof__(sa_swiglu) *swiglu;
    __typeof__(sa_layer_step) *layer_step;
} sa_kernels;

#endif
