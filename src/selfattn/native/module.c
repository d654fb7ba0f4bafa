/* selfattn.native._kernels: the Python entry points of the compiled kernels. Arrays arrive as
 * C-contiguous buffers (the Python wrappers in __init__.py check shapes and dtypes; here only
 * sizes are checked against the buffers, so a wrong call is an error, never a stray read). The
 * GIL is released while a kernel runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

int sa_matmul(const uint8_t *w, int fmt, int64_t rows, int64_t cols, int64_t row_bytes,
              const float *x, int64_t T, float *y);
int sa_dequant_rows(const uint8_t *w, int fmt, int64_t cols, int64_t row_bytes,
                    const int64_t *rows, int64_t n, float *out);
int sa_decode_attention(const float *q, const uint8_t *k, const uint8_t *v, int fmt, int64_t B,
                        int64_t H_kv, int64_t R, int64_t D, int64_t Dv, int64_t S_max,
                        int64_t k_row, int64_t v_row, int64_t S, int64_t T, int64_t j_base,
                        int64_t chunk, int64_t C, int64_t left, int64_t right, float softcap,
                        float *out, float *lse);
int sa_set_threads(int n);
void sa_rmsnorm(const float *x, const float *w, float eps, int64_t T, int64_t n, float *out);
void sa_rope(float *x, int64_t T, int64_t heads, int64_t D, int64_t half, const float *cos_t,
             const float *sin_t, int64_t pos);
void sa_swiglu(const float *gu, int64_t T, int64_t ffn, float *out);

static int cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

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

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    Py_buffer w, x, y;
    int fmt;
    long long rows, cols, row_bytes, T;
    if (!PyArg_ParseTuple(args, "y*iLLLy*Lw*", &w, &fmt, &rows, &cols, &row_bytes, &x, &T, &y))
        return NULL;
    int rc = -1;
    if (big_enough(&w, rows * row_bytes, "w") && big_enough(&x, T * cols * 4, "x") &&
        big_enough(&y, T * rows * 4, "y")) {
        Py_BEGIN_ALLOW_THREADS
        rc = sa_matmul(w.buf, fmt, rows, cols, row_bytes, x.buf, T, y.buf);
        Py_END_ALLOW_THREADS
        if (rc) PyErr_Format(PyExc_ValueError, "matmul: unsupported arguments (type %d, cols %lld, T %lld)", fmt, cols, T);
    }
    RELEASE(&w, &x, &y);
    return rc ? NULL : Py_NewRef(Py_None);
}

static PyObject *py_dequant_rows(PyObject *self, PyObject *args) {
    Py_buffer w, idx, out;
    int fmt;
    long long cols, row_bytes;
    if (!PyArg_ParseTuple(args, "y*iLLy*w*", &w, &fmt, &cols, &row_bytes, &idx, &out)) return NULL;
    long long n = idx.len / 8;
    int rc = -1;
    if (big_enough(&out, n * cols * 4, "out")) {
        const int64_t *rows = idx.buf;
        rc = 0;
        for (long long i = 0; i < n; i++)
            if (rows[i] < 0 || (rows[i] + 1) * row_bytes > w.len) rc = -1;
        if (!rc) rc = sa_dequant_rows(w.buf, fmt, cols, row_bytes, rows, n, out.buf);
        if (rc) PyErr_SetString(PyExc_ValueError, "dequant_rows: row index or type out of range");
    }
    RELEASE(&w, &idx, &out);
    return rc ? NULL : Py_NewRef(Py_None);
}

static PyObject *py_decode_attention(PyObject *self, PyObject *args) {
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
        rc = sa_decode_attention(q.buf, k.buf, v.buf, fmt, B, H_kv, R, D, Dv, S_max, k_row, v_row,
                                 S, T, j_base, chunk, C, left, right, softcap, out.buf, lse.buf);
        Py_END_ALLOW_THREADS
        if (rc) PyErr_SetString(PyExc_ValueError, "decode_attention: unsupported shapes");
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: chunks outside the keys");
    }
    RELEASE(&q, &k, &v, &out, &lse);
    return rc ? NULL : Py_NewRef(Py_None);
}

static PyObject *py_rmsnorm(PyObject *self, PyObject *args) {
    Py_buffer x, w, out;
    float eps;
    long long T, n;
    if (!PyArg_ParseTuple(args, "y*y*fLLw*", &x, &w, &eps, &T, &n, &out)) return NULL;
    int ok = big_enough(&x, T * n * 4, "x") && big_enough(&w, n * 4, "w") &&
             big_enough(&out, T * n * 4, "out");
    if (ok) sa_rmsnorm(x.buf, w.buf, eps, T, n, out.buf);
    RELEASE(&x, &w, &out);
    return ok ? Py_NewRef(Py_None) : NULL;
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
    Py_buffer x, c, s;
    long long T, heads, D, half, pos;
    if (!PyArg_ParseTuple(args, "w*LLLLy*y*L", &x, &T, &heads, &D, &half, &c, &s, &pos)) return NULL;
    int ok = big_enough(&x, T * heads * D * 4, "x") && big_enough(&c, (pos + T) * half * 4, "cos") &&
             big_enough(&s, (pos + T) * half * 4, "sin") && 2 * half <= D && pos >= 0;
    if (ok) sa_rope(x.buf, T, heads, D, half, c.buf, s.buf, pos);
    else if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "rope: bad sizes");
    RELEASE(&x, &c, &s);
    return ok ? Py_NewRef(Py_None) : NULL;
}

static PyObject *py_swiglu(PyObject *self, PyObject *args) {
    Py_buffer gu, out;
    long long T, ffn;
    if (!PyArg_ParseTuple(args, "y*LLw*", &gu, &T, &ffn, &out)) return NULL;
    int ok = big_enough(&gu, T * 2 * ffn * 4, "gu") && big_enough(&out, T * ffn * 4, "out");
    if (ok) sa_swiglu(gu.buf, T, ffn, out.buf);
    RELEASE(&gu, &out);
    return ok ? Py_NewRef(Py_None) : NULL;
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    return PyLong_FromLong(sa_set_threads(n));
}

static PyObject *py_cpu_ok(PyObject *self, PyObject *noargs) { return PyBool_FromLong(cpu_ok()); }

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "y (T, rows) = x (T, cols) @ W^T, W in GGUF blocks"},
    {"dequant_rows", py_dequant_rows, METH_VARARGS, "rows of W -> float32"},
    {"decode_attention", py_decode_attention, METH_VARARGS, "split-K decode attention"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "RMSNorm of T rows"},
    {"rope", py_rope, METH_VARARGS, "rotate-half RoPE in place"},
    {"swiglu", py_swiglu, METH_VARARGS, "silu(gate) * up"},
    {"set_threads", py_set_threads, METH_VARARGS, "threads the kernels use"},
    {"cpu_ok", py_cpu_ok, METH_NOARGS, "AVX2, FMA and F16C present"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "selfattn's compiled kernels", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
