/* selfattn.native._kernels: the Python entry points of the compiled kernels. Arrays arrive as
 * C-contiguous buffers (the Python wrappers in __init__.py check shapes and dtypes; here only
 * sizes are checked against the buffers, so a wrong call is an error, never a stray read). The
 * GIL is released while a kernel runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include <string.h>

#include "kernels.h"

/* Every level's table (isa.c, compiled once per level), widest first; the portable level (plain
 * C, any CPU) last, and on a CPU other than x86 alone. */
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

extern const sa_kernels sa_table_avx512, sa_table_avx2, sa_table_portable;
static const sa_kernels *const LEVELS[] = {&sa_table_avx512, &sa_table_avx2, &sa_table_portable};

/* the OS's enabled register state (XCR0): the CPU may have instructions whose registers the OS
 * does not save, and then they must not run */
static uint64_t xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* whether this CPU and OS run a level's kernels: cpuid's feature bits, then XCR0 */
static int level_runs(const sa_kernels *t) {
    if (!strcmp(t->name, "portable")) return 1;
    unsigned a, b, c, d, b7 = 0, c7, d7;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int fma = c >> 12 & 1, osxsave = c >> 27 & 1, avx = c >> 28 & 1, f16c = c >> 29 & 1;
    if (!(fma && osxsave && avx && f16c)) return 0;
    if (__get_cpuid_max(0, NULL) >= 7) __cpuid_count(7, 0, a, b7, c7, d7);
    const uint64_t x = xcr0();
    const int avx2 = (b7 >> 5 & 1) && (x & 0x6) == 0x6; /* XMM and YMM state */
    if (!strcmp(t->name, "avx2")) return avx2;
    if (!strcmp(t->name, "avx512")) /* F, DQ, BW, VL; opmask, ZMM_Hi256 and Hi16_ZMM state */
        return avx2 && (b7 >> 16 & 1) && (b7 >> 17 & 1) && (b7 >> 30 & 1) && (b7 >> 31 & 1) &&
               (x & 0xE6) == 0xE6;
    return 0;
}
#else
extern const sa_kernels sa_table_portable;
static const sa_kernels *const LEVELS[] = {&sa_table_portable};
static int level_runs(const sa_kernels *t) { return !strcmp(t->name, "portable"); }
#endif
#define N_LEVELS (int)(sizeof LEVELS / sizeof *LEVELS)

/* the level the kernels run at: the widest this CPU runs, until set_isa; NULL: none runs */
static const sa_kernels *K;

/* On x86 the portable level is never the default: on a CPU without AVX2 and FMA its fused
 * multiply-adds are library calls, so selfattn keeps its NumPy and numba paths there, and
 * SELFATTN_ISA=portable asks for it. Elsewhere it is the only level. */
static const sa_kernels *widest(void) {
    for (int i = 0; i < N_LEVELS; i++)
        if (level_runs(LEVELS[i]) && (N_LEVELS == 1 || strcmp(LEVELS[i]->name, "portable")))
            return LEVELS[i];
    return NULL;
}

static int cpu_ok(void) { return widest() != NULL; }

/* every entry point that runs a kernel starts with this: an error, never a call through NULL */
#define NEED_K                                                                                   \
    do {                                                                                         \
        if (!K) {                                                                                \
            PyErr_SetString(PyExc_RuntimeError, "no instruction-set level of the kernels runs " \
                            "on this CPU");                                                      \
            return NULL;                                                                         \
        }                                                                                        \
    } while (0)

/* every buffer must hold at least `need` bytes */
static int big_enough(Py_buffer *b, Py_ssize_t need, const char *name) {
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, the call needs %zd", name, b->len, need);
        return 0;
    }
    return 1;
}

#define RELEASE(...)                                                                             \
    do {                                                                                         \
        Py_buffer *bs_[] = {__VA_ARGS__};                                                        \
        for (size_t i_ = 0; i_ < sizeof bs_ / sizeof *bs_; i_++) PyBuffer_Release(bs_[i_]);     \
    } while (0)

typedef int (*product_fn)(const uint8_t *, int, int64_t, int64_t, int64_t, const float *, int64_t,
                          float *);

/* matmul and gemm: the same arguments, the same checks */
static PyObject *product(PyObject *args, product_fn fn, const char *name) {
    Py_buffer w, x, y;
    int fmt;
    long long rows, cols, row_bytes, T;
    if (!PyArg_ParseTuple(args, "y*iLLLy*Lw*", &w, &fmt, &rows, &cols, &row_bytes, &x, &T, &y))
        return NULL;
    int rc = -1;
    if (big_enough(&w, rows * row_bytes, "w") && big_enough(&x, T * cols * 4, "x") &&
        big_enough(&y, T * rows * 4, "y")) {
        Py_BEGIN_ALLOW_THREADS
        rc = fn(w.buf, fmt, rows, cols, row_bytes, x.buf, T, y.buf);
        Py_END_ALLOW_THREADS
        if (rc == -2) PyErr_NoMemory();
        else if (rc) PyErr_Format(PyExc_ValueError, "%s: unsupported arguments (type %d, cols %lld, "
                                  "row_bytes %lld, T %lld)", name, fmt, cols, row_bytes, T);
    }
    RELEASE(&w, &x, &y);
    return rc ? NULL : Py_NewRef(Py_None);
}

static PyObject *py_matmul(PyObject *self, PyObject *args) { NEED_K; return product(args, K->matmul, "matmul"); }

static PyObject *py_matvecs(PyObject *self, PyObject *args) { NEED_K; return product(args, K->matvecs, "matvecs"); }

static PyObject *py_gemm(PyObject *self, PyObject *args) { NEED_K; return product(args, K->gemm, "gemm"); }

static PyObject *py_dequant_rows(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer w, idx, out;
    int fmt;
    long long cols, row_bytes;
    if (!PyArg_ParseTuple(args, "y*iLLy*w*", &w, &fmt, &cols, &row_bytes, &idx, &out)) return NULL;
    long long n = idx.len / 8;
    int rc = -1;
    if (big_enough(&out, n * cols * 4, "out")) {
        const int64_t *rows = idx.buf;
        rc = row_bytes < 1 ? -1 : 0;
        for (long long i = 0; i < n && !rc; i++)
            if (rows[i] < 0 || rows[i] >= w.len / row_bytes) rc = -1;
        if (!rc) {
            Py_BEGIN_ALLOW_THREADS
            rc = K->dequant_rows(w.buf, fmt, cols, row_bytes, rows, n, out.buf);
            Py_END_ALLOW_THREADS
        }
        if (rc) PyErr_Format(PyExc_ValueError, "dequant_rows: a row index, or type %d with rows of "
                             "%lld values in %lld bytes, out of range", fmt, cols, row_bytes);
    }
    RELEASE(&w, &idx, &out);
    return rc ? NULL : Py_NewRef(Py_None);
}

static PyObject *py_dequant_range(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer w, out;
    int fmt;
    long long cols, row_bytes, r0, r1;
    if (!PyArg_ParseTuple(args, "y*iLLLLw*", &w, &fmt, &cols, &row_bytes, &r0, &r1, &out)) return NULL;
    int rc = -1;
    if (r0 < 0 || r1 < r0 || row_bytes < 1 || r1 > w.len / row_bytes)
        PyErr_Format(PyExc_ValueError, "dequant_range: rows %lld .. %lld outside the matrix", r0, r1);
    else if (big_enough(&out, (r1 - r0) * cols * 4, "out")) {
        Py_BEGIN_ALLOW_THREADS
        rc = K->dequant_range(w.buf, fmt, cols, row_bytes, r0, r1, out.buf);
        Py_END_ALLOW_THREADS
        if (rc) PyErr_Format(PyExc_ValueError, "dequant_range: type %d with rows of %lld values in "
                             "%lld bytes", fmt, cols, row_bytes);
    }
    RELEASE(&w, &out);
    return rc ? NULL : Py_NewRef(Py_None);
}

static PyObject *py_block_size(PyObject *self, PyObject *args) {
    int fmt;
    if (!PyArg_ParseTuple(args, "i", &fmt)) return NULL;
    return Py_BuildValue("LL", (long long)sa_block_values(fmt), (long long)sa_block_bytes(fmt));
}

static PyObject *py_decode_attention(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer q, k, v, out, lse;
    int fmt;
    long long B, H_kv, R, D, Dv, S_max, k_row, v_row, S, T, j_base, chunk, C, left, right;
    float softcap;
    if (!PyArg_ParseTuple(args, "y*y*y*iLLLLLLLLLLLLLLLfw*w*", &q, &k, &v, &fmt, &B, &H_kv, &R,
                          &D, &Dv, &S_max, &k_row, &v_row, &S, &T, &j_base, &chunk, &C, &left,
                          &right, &softcap, &out, &lse))
        return NULL;
    int rc = -1;
    long long heads = B * H_kv;
    if (big_enough(&q, heads * R * D * 4, "q") && big_enough(&k, heads * S_max * k_row, "k") &&
        big_enough(&v, heads * S_max * v_row, "v") && big_enough(&out, heads * R * Dv * 4, "out") &&
        big_enough(&lse, heads * R * 4, "lse") && j_base >= 0 && (j_base + (C - 1) * chunk) < S) {
        Py_BEGIN_ALLOW_THREADS
        rc = K->decode_attention(q.buf, k.buf, v.buf, fmt, B, H_kv, R, D, Dv, S_max, k_row, v_row,
                                 S, T, j_base, chunk, C, left, right, softcap, out.buf, lse.buf);
        Py_END_ALLOW_THREADS
        if (rc == -2) PyErr_NoMemory();
        else if (rc) PyErr_SetString(PyExc_ValueError, "decode_attention: unsupported shapes");
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: chunks outside the keys");
    }
    RELEASE(&q, &k, &v, &out, &lse);
    return rc ? NULL : Py_NewRef(Py_None);
}

static PyObject *py_flash_attention(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer q, k, v, out, lse;
    int fmt;
    long long B, H, H_kv, T, D, Dv, S_max, k_row, v_row, S, left, right;
    float scale, softcap;
    if (!PyArg_ParseTuple(args, "y*y*y*iLLLLLLLLLLLLffw*w*", &q, &k, &v, &fmt, &B, &H, &H_kv, &T,
                          &D, &Dv, &S_max, &k_row, &v_row, &S, &left, &right, &scale, &softcap,
                          &out, &lse))
        return NULL;
    int rc = -1;
    if (big_enough(&q, B * H * T * D * 4, "q") && big_enough(&k, B * H_kv * S_max * k_row, "k") &&
        big_enough(&v, B * H_kv * S_max * v_row, "v") && big_enough(&out, B * H * T * Dv * 4, "out") &&
        big_enough(&lse, B * H * T * 4, "lse")) {
        Py_BEGIN_ALLOW_THREADS
        rc = K->flash_attention(q.buf, k.buf, v.buf, fmt, B, H, H_kv, T, D, Dv, S_max, k_row, v_row,
                                S, left, right, scale, softcap, out.buf, lse.buf);
        Py_END_ALLOW_THREADS
        if (rc == -2) PyErr_NoMemory();
        else if (rc) PyErr_SetString(PyExc_ValueError, "flash_attention: unsupported shapes");
    }
    RELEASE(&q, &k, &v, &out, &lse);
    return rc ? NULL : Py_NewRef(Py_None);
}

static PyObject *py_rmsnorm(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer x, w, out;
    float eps;
    long long T, n;
    if (!PyArg_ParseTuple(args, "y*y*fLLw*", &x, &w, &eps, &T, &n, &out)) return NULL;
    int ok = big_enough(&x, T * n * 4, "x") && big_enough(&w, n * 4, "w") &&
             big_enough(&out, T * n * 4, "out");
    if (ok) K->rmsnorm(x.buf, w.buf, eps, T, n, out.buf);
    RELEASE(&x, &w, &out);
    return ok ? Py_NewRef(Py_None) : NULL;
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer x, c, s;
    long long T, heads, D, half, pos;
    if (!PyArg_ParseTuple(args, "w*LLLLy*y*L", &x, &T, &heads, &D, &half, &c, &s, &pos)) return NULL;
    int ok = big_enough(&x, T * heads * D * 4, "x") && big_enough(&c, (pos + T) * half * 4, "cos") &&
             big_enough(&s, (pos + T) * half * 4, "sin") && 2 * half <= D && pos >= 0;
    if (ok) K->rope(x.buf, T, heads, D, half, c.buf, s.buf, pos);
    else if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "rope: bad sizes");
    RELEASE(&x, &c, &s);
    return ok ? Py_NewRef(Py_None) : NULL;
}

static PyObject *py_swiglu(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer gu, out;
    long long T, ffn;
    if (!PyArg_ParseTuple(args, "y*LLw*", &gu, &T, &ffn, &out)) return NULL;
    int ok = big_enough(&gu, T * 2 * ffn * 4, "gu") && big_enough(&out, T * ffn * 4, "out");
    if (ok) K->swiglu(gu.buf, T, ffn, out.buf);
    RELEASE(&gu, &out);
    return ok ? Py_NewRef(Py_None) : NULL;
}

static PyObject *py_quantize_rows(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer x, dst;
    int fmt;
    long long T, H, D, offset, head_stride, row_stride, row_bytes;
    if (!PyArg_ParseTuple(args, "y*LLLiw*LLLL", &x, &T, &H, &D, &fmt, &dst, &offset, &head_stride,
                          &row_stride, &row_bytes))
        return NULL;
    int rc = -1;
    if (T < 1 || H < 1 || D < 1 || offset < 0 || head_stride < row_bytes || row_stride < row_bytes ||
        fmt == SA_F32 || !sa_row_bytes(fmt, D) || row_bytes < sa_row_bytes(fmt, D))
        PyErr_SetString(PyExc_ValueError, "quantize_rows: bad layout");
    else if (big_enough(&x, T * H * D * 4, "x") &&
             big_enough(&dst, offset + (H - 1) * head_stride + (T - 1) * row_stride + row_bytes, "dst")) {
        Py_BEGIN_ALLOW_THREADS
        rc = K->quantize_rows(x.buf, T, H, D, fmt, (uint8_t *)dst.buf + offset, head_stride, row_stride);
        Py_END_ALLOW_THREADS
        if (rc) PyErr_Format(PyExc_ValueError, "quantize_rows: type %d with head dim %lld", fmt, D);
    }
    RELEASE(&x, &dst);
    return rc ? NULL : Py_NewRef(Py_None);
}

/* a matrix of `rows` rows of `cols` values of type fmt, exactly the buffer's size */
static int matrix(Py_buffer *b, int fmt, long long rows, long long cols, const char *name, sa_mat *m) {
    m->w = b->buf;
    m->fmt = fmt;
    m->row_bytes = sa_row_bytes(fmt, cols);
    if (!m->row_bytes || b->len != rows * m->row_bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes are not %lld rows of %lld values of type %d",
                     name, b->len, rows, cols, fmt);
        return 0;
    }
    return 1;
}

/* A layer as the compiled step takes it (step_layer: built once per layer, kept by StepLayer):
 * the sa_layer struct and the buffers its pointers point into, held until the capsule goes. */
#define STEP_BUFS 10
typedef struct {
    sa_layer L;
    Py_buffer bufs[STEP_BUFS];
} step_layer;

static void step_layer_free(PyObject *capsule) {
    step_layer *S = PyCapsule_GetPointer(capsule, "selfattn.step_layer");
    if (!S) return;
    for (int i = 0; i < STEP_BUFS; i++)
        if (S->bufs[i].obj) PyBuffer_Release(&S->bufs[i]);
    PyMem_Free(S);
}

/* step_layer(attn_norm, ffn_norm, b_qkv or None, w_q, f_q, ... w_down, f_down, dim, H, H_kv, D,
 * ffn, rope_half, eps, scale) -> a capsule: every size checked here, once */
static PyObject *py_step_layer(PyObject *self, PyObject *args) {
    step_layer *S = PyMem_Calloc(1, sizeof *S);
    if (!S) return PyErr_NoMemory();
    Py_buffer *b = S->bufs; /* attn_norm, ffn_norm, the 7 matrices, b_qkv */
    PyObject *bias_obj, *capsule = NULL;
    int f[7];
    long long dim, H, H_kv, D, ffn, half;
    float eps, scale;
    if (!PyArg_ParseTuple(args, "y*y*Oy*iy*iy*iy*iy*iy*iy*iLLLLLLff", &b[0], &b[1], &bias_obj, &b[2],
                          &f[0], &b[3], &f[1], &b[4], &f[2], &b[5], &f[3], &b[6], &f[4], &b[7], &f[5],
                          &b[8], &f[6], &dim, &H, &H_kv, &D, &ffn, &half, &eps, &scale))
        goto fail;
    if (bias_obj != Py_None && PyObject_GetBuffer(bias_obj, &b[9], PyBUF_SIMPLE)) goto fail;
    sa_layer *L = &S->L;
    *L = (sa_layer){dim, H, H_kv, D, ffn, half, eps, scale, b[0].buf, b[1].buf, b[9].obj ? b[9].buf : NULL};
    const long long q_dim = H * D, kv_dim = H_kv * D;
    if (dim < 1 || H < 1 || H_kv < 1 || H % H_kv || D < 8 || D % 8 || D > SA_MAX_DIM ||
        H / H_kv > SA_MAX_ROWS || ffn < 1 || half < 0 || 2 * half > D) {
        PyErr_SetString(PyExc_ValueError, "step_layer: bad dimensions");
        goto fail;
    }
    if (!(big_enough(&b[0], dim * 4, "attn_norm") && big_enough(&b[1], dim * 4, "ffn_norm") &&
          (!b[9].obj || big_enough(&b[9], (q_dim + 2 * kv_dim) * 4, "bias")) &&
          matrix(&b[2], f[0], q_dim, dim, "w_q", &L->q) && matrix(&b[3], f[1], kv_dim, dim, "w_k", &L->k_proj) &&
          matrix(&b[4], f[2], kv_dim, dim, "w_v", &L->v_proj) && matrix(&b[5], f[3], dim, q_dim, "w_o", &L->o) &&
          matrix(&b[6], f[4], ffn, dim, "w_gate", &L->gate) && matrix(&b[7], f[5], ffn, dim, "w_up", &L->up) &&
          matrix(&b[8], f[6], dim, ffn, "w_down", &L->down)))
        goto fail;
    capsule = PyCapsule_New(S, "selfattn.step_layer", step_layer_free);
    if (capsule) return capsule;
fail:
    for (int i = 0; i < STEP_BUFS; i++)
        if (S->bufs[i].obj) PyBuffer_Release(&S->bufs[i]);
    PyMem_Free(S);
    return NULL;
}

/* one sequence's part of a step: its cache (k, v, kv_fmt, S_max, row_bytes: all layers' caches,
 * (n_layers, 1, H_kv, S_max, row) or one layer's) and where its token goes (pos, left, j_base,
 * chunk, n_chunks), checked against the first layer's sizes for `layers` layers */
static int step_seq(PyObject *item, const sa_layer *L, long long layers, Py_buffer *k, Py_buffer *v,
                    sa_seq *S) {
    long long S_max, row_bytes, pos, left, j_base, chunk, C;
    if (!PyArg_ParseTuple(item, "w*w*iLLLLLLL;layer_step: a sequence is (k, v, kv_fmt, S_max, "
                          "row_bytes, pos, left, j_base, chunk, n_chunks)", k, v, &S->kv_fmt, &S_max,
                          &row_bytes, &pos, &left, &j_base, &chunk, &C))
        return 0;
    const int f = S->kv_fmt, kv_type = f == SA_F32 || f == SA_F16 || f == SA_Q8_0 || f == SA_Q4_0;
    if (!kv_type || pos < 0 || pos >= S_max || !row_bytes || row_bytes != sa_row_bytes(f, L->D)) {
        PyErr_SetString(PyExc_ValueError, "layer_step: bad cache layout or position");
        return 0;
    }
    const long long layer_bytes = L->H_kv * S_max * row_bytes;
    if (!big_enough(k, layers * layer_bytes, "k") || !big_enough(v, layers * layer_bytes, "v")) return 0;
    if (j_base < 0 || chunk < 1 || C < 1 || j_base + (C - 1) * chunk > pos) {
        PyErr_SetString(PyExc_ValueError, "layer_step: chunks outside the keys");
        return 0;
    }
    *S = (sa_seq){k->buf, v->buf, f, S_max, row_bytes, pos, left, j_base, chunk, C};
    return 1;
}

/* layer_step(x (B, dim), layers (step_layer capsules), cos, sin, seqs): one token of each of B
 * sequences through the layers in turn, layer i on part i of each sequence's cache, the GIL
 * released once for all of them (a server's other threads take it between steps, not between
 * layers). Returns seconds (attention, matmuls, the whole step), summed over the layers. */
static PyObject *py_layer_step(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer x, cs, sn, ks[SA_MAX_T] = {{0}}, vs[SA_MAX_T] = {{0}};
    sa_seq seqs[SA_MAX_T];
    PyObject *layer_obj, *seq_obj;
    long long B = 0, max_pos = 0;
    if (!PyArg_ParseTuple(args, "w*O!y*y*O!", &x, &PyTuple_Type, &layer_obj, &cs, &sn, &PyTuple_Type, &seq_obj))
        return NULL;
    const Py_ssize_t n_layers = PyTuple_GET_SIZE(layer_obj);
    const sa_layer **layers = PyMem_Calloc(n_layers ? n_layers : 1, sizeof *layers);
    double t[3] = {0.0, 0.0, 0.0};
    int rc = -1;
    if (!layers) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_layers; i++) {
        const step_layer *S = PyCapsule_GetPointer(PyTuple_GET_ITEM(layer_obj, i), "selfattn.step_layer");
        if (!S) goto done;
        layers[i] = &S->L;
        if (S->L.dim != layers[0]->dim || S->L.H_kv != layers[0]->H_kv || S->L.D != layers[0]->D ||
            S->L.rope_half != layers[0]->rope_half) {
            PyErr_SetString(PyExc_ValueError, "layer_step: the layers differ in their sizes");
            goto done;
        }
    }
    if (n_layers < 1 || PyTuple_GET_SIZE(seq_obj) < 1 || PyTuple_GET_SIZE(seq_obj) > SA_MAX_T) {
        PyErr_Format(PyExc_ValueError, "layer_step: 1 or more layers and 1 to %d sequences, got %zd "
                     "and %zd", SA_MAX_T, n_layers, PyTuple_GET_SIZE(seq_obj));
        goto done;
    }
    for (; B < PyTuple_GET_SIZE(seq_obj); B++) {
        if (!step_seq(PyTuple_GET_ITEM(seq_obj, B), layers[0], n_layers, &ks[B], &vs[B], &seqs[B])) goto done;
        if (seqs[B].pos > max_pos) max_pos = seqs[B].pos;
        for (long long b = 0; b < B; b++)
            if (seqs[b].k == seqs[B].k || seqs[b].v == seqs[B].v) {
                PyErr_SetString(PyExc_ValueError, "layer_step: each sequence needs a cache of its own");
                goto done;
            }
    }
    const long long half = layers[0]->rope_half;
    if (!(big_enough(&x, B * layers[0]->dim * 4, "x") && big_enough(&cs, (max_pos + 1) * half * 4, "cos") &&
          big_enough(&sn, (max_pos + 1) * half * 4, "sin")))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = K->layer_step(layers, n_layers, cs.buf, sn.buf, seqs, B, x.buf, t);
    Py_END_ALLOW_THREADS
    if (rc == -2) PyErr_NoMemory();
    else if (rc) PyErr_Format(PyExc_ValueError, "layer_step: a kernel refused its arguments (%d)", rc);
done:
    PyMem_Free(layers);
    for (long long b = 0; b < SA_MAX_T; b++) {
        if (ks[b].obj) PyBuffer_Release(&ks[b]);
        if (vs[b].obj) PyBuffer_Release(&vs[b]);
    }
    RELEASE(&x, &cs, &sn);
    return rc ? NULL : Py_BuildValue("(ddd)", t[0], t[1], t[2]);
}

static PyObject *py_fma_loop(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer sums;
    long long iters, tasks;
    if (!PyArg_ParseTuple(args, "LLw*", &iters, &tasks, &sums)) return NULL;
    int ok = iters >= 0 && tasks >= 1 && big_enough(&sums, tasks * 4, "sums");
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        K->fma_loop(iters, tasks, sums.buf);
        Py_END_ALLOW_THREADS
    } else if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "fma_loop: bad sizes");
    PyBuffer_Release(&sums);
    return ok ? Py_NewRef(Py_None) : NULL;
}

static PyObject *py_read_sum(PyObject *self, PyObject *args) {
    NEED_K;
    Py_buffer x, sums;
    if (!PyArg_ParseTuple(args, "y*w*", &x, &sums)) return NULL;
    const int64_t n = x.len / 4, tasks = (x.len + (1 << 20) - 1) / (1 << 20);
    int ok = big_enough(&sums, tasks * 4, "sums");
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        K->read_sum(x.buf, n, sums.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&sums);
    return ok ? Py_NewRef(Py_None) : NULL;
}

static PyObject *py_touch_pages(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int readers, rc;
    if (!PyArg_ParseTuple(args, "y*i", &buf, &readers)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = sa_touch_pages(buf.buf, buf.len, readers);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (rc) PyErr_SetString(PyExc_ValueError, "touch_pages: readers must be >= 1");
    return rc ? NULL : Py_NewRef(Py_None);
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    return PyLong_FromLong(sa_set_threads(n));
}

static PyObject *py_cpu_ok(PyObject *self, PyObject *noargs) { return PyBool_FromLong(cpu_ok()); }

static PyObject *py_isa(PyObject *self, PyObject *noargs) {
    return K ? PyUnicode_FromString(K->name) : Py_NewRef(Py_None);
}

static PyObject *py_lanes(PyObject *self, PyObject *noargs) { return PyLong_FromLong(K ? K->lanes : 0); }

static PyObject *py_dot_rows(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(K ? K->dot_rows : 0);
}

static PyObject *py_isas(PyObject *self, PyObject *noargs) {
    PyObject *out = PyList_New(0);
    for (int i = 0; out && i < N_LEVELS; i++)
        if (level_runs(LEVELS[i])) {
            PyObject *name = PyUnicode_FromString(LEVELS[i]->name);
            if (!name || PyList_Append(out, name)) Py_CLEAR(out);
            Py_XDECREF(name);
        }
    return out;
}

/* set_isa(name): run the named level's kernels from now on (the caller holds the kernels' lock) */
static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int i = 0; i < N_LEVELS; i++)
        if (!strcmp(LEVELS[i]->name, name)) {
            if (!level_runs(LEVELS[i])) {
                PyErr_Format(PyExc_ValueError, "this CPU (or its OS) does not run %s kernels", name);
                return NULL;
            }
            K = LEVELS[i];
            return Py_NewRef(Py_None);
        }
    PyErr_Format(PyExc_ValueError, "unknown instruction-set level %R", PyTuple_GET_ITEM(args, 0));
    return NULL;
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "y (T, rows) = x (T, cols) @ W^T, W in GGUF blocks"},
    {"matvecs", py_matvecs, METH_VARARGS, "matmul, each row of y as that row of x alone gives"},
    {"gemm", py_gemm, METH_VARARGS, "the same for many rows of x: tiles of W decoded, then multiplied"},
    {"dequant_rows", py_dequant_rows, METH_VARARGS, "rows of W by index -> float32"},
    {"dequant_range", py_dequant_range, METH_VARARGS, "rows r0 .. r1-1 of W -> float32"},
    {"block_size", py_block_size, METH_VARARGS, "(values, bytes) per block of a type id; 0, 0: unread"},
    {"decode_attention", py_decode_attention, METH_VARARGS, "split-K decode attention"},
    {"flash_attention", py_flash_attention, METH_VARARGS, "blocked online-softmax prefill attention"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "RMSNorm of T rows"},
    {"rope", py_rope, METH_VARARGS, "rotate-half RoPE in place"},
    {"swiglu", py_swiglu, METH_VARARGS, "silu(gate) * up"},
    {"quantize_rows", py_quantize_rows, METH_VARARGS, "new K/V rows -> f16/q8_0/q4_0 cache rows"},
    {"step_layer", py_step_layer, METH_VARARGS, "a llama layer's weights, checked, for layer_step"},
    {"layer_step", py_layer_step, METH_VARARGS, "one token of each of B sequences through the layers"},
    {"fma_loop", py_fma_loop, METH_VARARGS, "iters x 12 FMAs of lanes() lanes per task, on the pool"},
    {"read_sum", py_read_sum, METH_VARARGS, "read an array once on the pool: the bandwidth roof"},
    {"touch_pages", py_touch_pages, METH_VARARGS, "fault a mapping's pages in from several threads"},
    {"set_threads", py_set_threads, METH_VARARGS, "threads the kernels use"},
    {"cpu_ok", py_cpu_ok, METH_NOARGS, "whether this CPU and OS run any level's kernels"},
    {"isa", py_isa, METH_NOARGS, "the level the kernels run at (None: none runs here)"},
    {"lanes", py_lanes, METH_NOARGS, "float32 lanes of that level's widest vectors"},
    {"dot_rows", py_dot_rows, METH_NOARGS, "rows of x that level's matvecs takes a pass"},
    {"isas", py_isas, METH_NOARGS, "the levels this CPU and OS run, widest first"},
    {"set_isa", py_set_isa, METH_VARARGS, "run the named level's kernels from now on"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "selfattn's compiled kernels", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    K = widest();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "MAX_DIM", SA_MAX_DIM) ||
              PyModule_AddIntConstant(m, "MAX_ROWS", SA_MAX_ROWS) ||
              PyModule_AddIntConstant(m, "MAX_T", SA_MAX_T)))
        Py_CLEAR(m);
    return m;
}
