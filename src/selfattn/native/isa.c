/* One instruction-set level's table of entry points: this file is compiled once per level with
 * the kernels (setup.py: LEVELS), and kernels.h gives every name below that level's suffix. */
#include "simd.h"

#define SA_STR_(x) #x
#define SA_STR(x) SA_STR_(x)

const sa_kernels SA_CAT(sa_table, SA_ISA) = {
    .name = SA_STR(SA_ISA),
    .lanes = SA_W,
    .dot_rows = SA_DOT_ROWS,
    .matmul = sa_matmul,
    .matvecs = sa_matvecs,
    .gemm = sa_gemm,
    .dequant_rows = sa_dequant_rows,
    .dequant_range = sa_dequant_range,
    .decode_attention = sa_decode_attention,
    .flash_attention = sa_flash_attention,
    .quantize_rows = sa_quantize_rows,
    .fma_loop = sa_fma_loop,
    .read_sum = sa_read_sum,
    .rmsnorm = sa_rmsnorm,
    .rope = sa_rope,
    .swiglu = sa_swiglu,
    .layer_step = sa_layer_step,
};
