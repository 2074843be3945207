/*
 * The max-times product behind SiPP's max reduction, at GEMM speed.
 *
 *     out[i, j] = max(out[i, j], max over b, x of r[b, x, i] * a[b, x, j])
 *
 * r, a: float32 with any element strides (sb, sx, si / sb, sx, sj), so the accumulators' native
 * layouts ([batch, rows, points] conv reciprocals, [batch, inputs, points] patches) go in without
 * a transposed copy; out: [rows, cols] with row stride os and unit column stride.  The packing
 * turns any layout into the kernel's panels.  It is the GEMM recipe (packed panels,
 * a register tile of accumulators, one broadcast of r feeding a row of vector products) with
 * the fused multiply-add replaced by a multiply then a max.  On Zen 4 the multiply and the max
 * issue in the same cycle, so it can run at the fp32 FMA rate (docs/maxtimes.md in the design
 * notes measured 32-34 G/s on ResNet-50 shapes against about 2 G/s for the NumPy loop).
 *
 * Identical results to NumPy's `np.maximum(out, r[x, :, None] * a[x, None, :])` over x, for any
 * order of x: each product is one IEEE float32 multiply and max does not round.  The max is
 * written as `product > acc ? product : acc`, NumPy's tie rule (an equal value keeps `acc`), so
 * even the sign of a zero matches.  Only NaN inputs differ (NumPy propagates them, this keeps
 * the running value); the caller's inputs are reciprocals and split magnitudes, never NaN.
 *
 * Three bodies, chosen once at run time by what the CPU supports: AVX-512F (6 x 64 tile),
 * AVX2 (6 x 16 tile) and portable C (the compiler vectorises its contiguous inner loop).  The
 * module exports `max_times(r, rsb, rsx, rsi, a, asb, asx, asj, out, os, nb, n, rows, cols)`
 * taking buffer addresses and strides in elements as
 * integers (no NumPy headers at build time) and runs it with the GIL released, and `kernel()`
 * naming the body in use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SIPP_X86 1
#endif

typedef Py_ssize_t idx;

#define KC 256 /* points per packed block: the a panel (KC x 64 floats, 64 KB) stays in L2 */
#define MR 6   /* rows per register tile */

/* One operand: base address and element strides over (batch, point, row-or-column). */
typedef struct {
    const float *p;
    idx sb, sx, sk;
} operand;

/* Portable body: for each point the whole row range, no reduction in the inner loop. */
static void mt_portable(operand r, operand a, float *restrict out, idx os, idx nb, idx n, idx rows,
                        idx cols) {
    for (idx b = 0; b < nb; b++)
        for (idx i = 0; i < rows; i++) {
            float *restrict o = out + i * os;
            for (idx x = 0; x < n; x++) {
                const float u = r.p[b * r.sb + x * r.sx + i * r.sk];
                const float *restrict v = a.p + b * a.sb + x * a.sx;
                if (a.sk == 1) {
                    for (idx j = 0; j < cols; j++) {
                        const float q = u * v[j];
                        o[j] = q > o[j] ? q : o[j];
                    }
                } else {
                    for (idx j = 0; j < cols; j++) {
                        const float q = u * v[j * a.sk];
                        o[j] = q > o[j] ? q : o[j];
                    }
                }
            }
        }
}

/* The points of a block are t0 .. t0+kc-1 of all nb*n (batch entry b = t / n, point x = t % n):
 * blocks run across batch entries, so a layer whose entries hold one point each (a token model's
 * rows) still gets full KC-point panels.  Each helper walks the block in runs within one entry. */

/* Pack r's points t0..t0+kc-1, rows i0..i0+MR-1, as [kc][MR], zero rows past `rows` (their
 * outputs are discarded).  Reads along whichever axis is contiguous. */
static void pack_r(operand r, idx n, idx t0, idx kc, idx i0, idx rows, float *dst) {
    idx m = rows - i0 < MR ? rows - i0 : MR;
    if (m < MR)
        for (idx x = 0; x < kc; x++)
            for (idx k = m; k < MR; k++) dst[x * MR + k] = 0.0f;
    for (idx done = 0; done < kc;) {
        idx t = t0 + done, b = t / n, x = t % n, run = n - x < kc - done ? n - x : kc - done;
        const float *base = r.p + b * r.sb + x * r.sx + i0 * r.sk;
        float *d = dst + done * MR;
        if (r.sk == 1) {
            for (idx y = 0; y < run; y++)
                for (idx k = 0; k < m; k++) d[y * MR + k] = base[y * r.sx + k];
        } else {
            for (idx k = 0; k < m; k++)
                for (idx y = 0; y < run; y++) d[y * MR + k] = base[y * r.sx + k * r.sk];
        }
        done += run;
    }
}

/* Pack a's points t0..t0+kc-1 as panels [cols/nr][KC][nr], zero columns past `cols`; reads along
 * the contiguous axis (rows of points for [points, inputs], runs of points for [inputs, points]). */
static void pack_a(operand a, idx n, idx t0, idx kc, idx cols, idx nr, float *dst) {
    idx panels = (cols + nr - 1) / nr;
    if (cols % nr)
        for (idx x = 0; x < kc; x++) {
            float *d = dst + ((panels - 1) * KC + x) * nr;
            for (idx j = cols % nr; j < nr; j++) d[j] = 0.0f;
        }
    for (idx done = 0; done < kc;) {
        idx t = t0 + done, b = t / n, x = t % n, run = n - x < kc - done ? n - x : kc - done;
        const float *base = a.p + b * a.sb + x * a.sx;
        if (a.sk == 1) {
            for (idx y = 0; y < run; y++) {
                const float *src = base + y * a.sx;
                for (idx p = 0; p < panels; p++) {
                    idx j0 = p * nr, w = cols - j0 < nr ? cols - j0 : nr;
                    memcpy(dst + (p * KC + done + y) * nr, src + j0, (size_t)w * sizeof(float));
                }
            }
        } else {
            for (idx j = 0; j < cols; j++) {
                const float *src = base + j * a.sk;
                float *d = dst + (j / nr) * KC * nr + (done * nr) + (j % nr);
                for (idx y = 0; y < run; y++) d[y * nr] = src[y * a.sx];
            }
        }
        done += run;
    }
}

#ifdef SIPP_X86

/* One MR x 64 tile over kc packed points; `t` is the tile (row stride ts). */
__attribute__((target("avx512f"))) static void tile_avx512(const float *pr, const float *pa, idx kc,
                                                             float *t, idx ts) {
    __m512 c[MR][4];
    for (int i = 0; i < MR; i++)
        for (int k = 0; k < 4; k++) c[i][k] = _mm512_loadu_ps(t + i * ts + 16 * k);
    for (idx x = 0; x < kc; x++) {
        const float *v = pa + x * 64;
        const __m512 b0 = _mm512_loadu_ps(v), b1 = _mm512_loadu_ps(v + 16);
        const __m512 b2 = _mm512_loadu_ps(v + 32), b3 = _mm512_loadu_ps(v + 48);
        const float *u = pr + x * MR;
        for (int i = 0; i < MR; i++) {
            const __m512 s = _mm512_set1_ps(u[i]);
            /* max_ps(p, c) returns c unless p > c: NumPy's tie rule. */
            c[i][0] = _mm512_max_ps(_mm512_mul_ps(s, b0), c[i][0]);
            c[i][1] = _mm512_max_ps(_mm512_mul_ps(s, b1), c[i][1]);
            c[i][2] = _mm512_max_ps(_mm512_mul_ps(s, b2), c[i][2]);
            c[i][3] = _mm512_max_ps(_mm512_mul_ps(s, b3), c[i][3]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int k = 0; k < 4; k++) _mm512_storeu_ps(t + i * ts + 16 * k, c[i][k]);
}

__attribute__((target("avx2"))) static void tile_avx2(const float *pr, const float *pa, idx kc, float *t,
                                                       idx ts) {
    __m256 c[MR][2];
    for (int i = 0; i < MR; i++)
        for (int k = 0; k < 2; k++) c[i][k] = _mm256_loadu_ps(t + i * ts + 8 * k);
    for (idx x = 0; x < kc; x++) {
        const float *v = pa + x * 16;
        const __m256 b0 = _mm256_loadu_ps(v), b1 = _mm256_loadu_ps(v + 8);
        const float *u = pr + x * MR;
        for (int i = 0; i < MR; i++) {
            const __m256 s = _mm256_set1_ps(u[i]);
            c[i][0] = _mm256_max_ps(_mm256_mul_ps(s, b0), c[i][0]);
            c[i][1] = _mm256_max_ps(_mm256_mul_ps(s, b1), c[i][1]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int k = 0; k < 2; k++) _mm256_storeu_ps(t + i * ts + 8 * k, c[i][k]);
}

typedef void (*tile_fn)(const float *, const float *, idx, float *, idx);

/* The blocked driver shared by both vector bodies; nr is the tile width (64 or 16).  Per block
 * of KC points, r and a are packed whole (a read along its contiguous axis, so the hardware
 * prefetcher streams it; gathering one narrow panel at a time read it at a stride and ran at
 * half the speed on conv shapes), then every panel meets every row tile while it is in L1/L2. */
static int mt_blocked(tile_fn tile, idx nr, operand r, operand a, float *out, idx os, idx nb, idx n,
                      idx rows, idx cols) {
    idx row_tiles = (rows + MR - 1) / MR, panels = (cols + nr - 1) / nr;
    float *pr = (float *)malloc((size_t)(row_tiles * KC * MR) * sizeof(float));
    float *pa = (float *)malloc((size_t)(panels * KC * nr) * sizeof(float));
    if (!pr || !pa) {
        free(pr);
        free(pa);
        return -1;
    }
    float edge[MR * 64];
    idx total = nb * n;
    for (idx t0 = 0; t0 < total; t0 += KC) {
        idx kc = total - t0 < KC ? total - t0 : KC;
        for (idx t = 0; t < row_tiles; t++) pack_r(r, n, t0, kc, t * MR, rows, pr + t * KC * MR);
        pack_a(a, n, t0, kc, cols, nr, pa);
        for (idx p = 0; p < panels; p++) {
            idx j0 = p * nr, w = cols - j0 < nr ? cols - j0 : nr;
            const float *panel = pa + p * KC * nr;
            for (idx t = 0; t < row_tiles; t++) {
                idx i0 = t * MR, m = rows - i0 < MR ? rows - i0 : MR;
                float *o = out + i0 * os + j0;
                if (m == MR && w == nr) {
                    tile(pr + t * KC * MR, panel, kc, o, os);
                    continue;
                }
                /* Edge tile: through a full-size copy so no store leaves the output. */
                for (idx i = 0; i < MR; i++)
                    for (idx j = 0; j < nr; j++) edge[i * nr + j] = (i < m && j < w) ? o[i * os + j] : 0.0f;
                tile(pr + t * KC * MR, panel, kc, edge, nr);
                for (idx i = 0; i < m; i++) memcpy(o + i * os, edge + i * nr, (size_t)w * sizeof(float));
            }
        }
    }
    free(pr);
    free(pa);
    return 0;
}

#endif /* SIPP_X86 */

enum { BODY_PORTABLE = 0, BODY_AVX2 = 1, BODY_AVX512 = 2 };
static int body = BODY_PORTABLE;
static const char *body_names[] = {"c-portable", "c-avx2", "c-avx512"};

static int run(operand r, operand a, float *out, idx os, idx nb, idx n, idx rows, idx cols) {
#ifdef SIPP_X86
    if (body == BODY_AVX512) return mt_blocked(tile_avx512, 64, r, a, out, os, nb, n, rows, cols);
    if (body == BODY_AVX2) return mt_blocked(tile_avx2, 16, r, a, out, os, nb, n, rows, cols);
#endif
    mt_portable(r, a, out, os, nb, n, rows, cols);
    return 0;
}

static PyObject *py_max_times(PyObject *self, PyObject *args) {
    Py_ssize_t rp, rsb, rsx, rsi, ap, asb, asx, asj, out, os, nb, n, rows, cols;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnnnn", &rp, &rsb, &rsx, &rsi, &ap, &asb, &asx, &asj, &out, &os,
                          &nb, &n, &rows, &cols))
        return NULL;
    if (nb < 0 || n < 0 || rows < 0 || cols < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    operand r = {(const float *)rp, rsb, rsx, rsi}, a = {(const float *)ap, asb, asx, asj};
    int status;
    Py_BEGIN_ALLOW_THREADS status = run(r, a, (float *)out, os, nb, n, rows, cols);
    Py_END_ALLOW_THREADS if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_kernel(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(body_names[body]);
}

static PyObject *py_set_kernel(PyObject *self, PyObject *args) {
    /* Tests pin each body in turn; a body the CPU lacks is refused. */
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int b = 0; b < 3; b++) {
        if (strcmp(name, body_names[b])) continue;
#ifdef SIPP_X86
        if ((b == BODY_AVX512 && !__builtin_cpu_supports("avx512f")) ||
            (b == BODY_AVX2 && !__builtin_cpu_supports("avx2"))) {
            PyErr_Format(PyExc_ValueError, "this CPU cannot run %s", name);
            return NULL;
        }
#else
        if (b != BODY_PORTABLE) {
            PyErr_Format(PyExc_ValueError, "%s is not built on this platform", name);
            return NULL;
        }
#endif
        body = b;
        Py_RETURN_NONE;
    }
    PyErr_Format(PyExc_ValueError, "unknown kernel %s", name);
    return NULL;
}

static PyObject *py_kernels(PyObject *self, PyObject *args) {
    /* Every body this CPU can run, the chosen one last. */
    (void)self;
    (void)args;
    PyObject *names = PyList_New(0);
    if (!names) return NULL;
    for (int b = 0; b < 3; b++) {
        int ok = b == BODY_PORTABLE;
#ifdef SIPP_X86
        ok = ok || (b == BODY_AVX2 && __builtin_cpu_supports("avx2")) ||
             (b == BODY_AVX512 && __builtin_cpu_supports("avx512f"));
#endif
        if (ok) {
            PyObject *s = PyUnicode_FromString(body_names[b]);
            if (!s || PyList_Append(names, s)) {
                Py_XDECREF(s);
                Py_DECREF(names);
                return NULL;
            }
            Py_DECREF(s);
        }
    }
    return names;
}

static PyMethodDef methods[] = {
    {"max_times", py_max_times, METH_VARARGS,
     "max_times(r, rsb, rsx, rsi, a, asb, asx, asj, out, os, nb, n, rows, cols): out[i,j] = "
     "max(out[i,j], max_{b,x} r[b,x,i]*a[b,x,j]) on float32 buffers given by address and element strides."},
    {"kernel", py_kernel, METH_NOARGS, "The name of the body in use."},
    {"kernels", py_kernels, METH_NOARGS, "Every body this CPU can run."},
    {"set_kernel", py_set_kernel, METH_VARARGS, "Choose a body by name (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_maxtimes", "Compiled max-times product.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__maxtimes(void) {
#ifdef SIPP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        body = BODY_AVX512;
    else if (__builtin_cpu_supports("avx2"))
        body = BODY_AVX2;
#endif
    return PyModule_Create(&module);
}
