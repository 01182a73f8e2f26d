/* RMSNorm forward and backward for CPU tensors, one pass over each row.
 *
 * Built at first use by _cpu_kernel.py, compiled as C and linked into the torch operator around
 * it (_cpu_rms_norm_op.cpp). torch has a fused LayerNorm kernel for the CPU but no fused
 * RMSNorm: as a chain of torch ops an RMSNorm costs three or more passes over the activations
 * where LayerNorm costs one, so an exactly converted model (LayerNorm -> RMSNorm) ran slower
 * than the original.
 *
 * The same semantics as the torch path (rms_norm.py, _RMSNormCPU): statistics in double,
 * everything else in float32, the normalised row optionally rounded to bfloat16 before the
 * affine (cast_mode "input"/"weight" with bfloat16), one rounding to the output dtype.
 * Activations and parameters are float32 or bfloat16; the caller checks everything else
 * (contiguity, shapes, dtypes) and passes plain pointers, the dtypes and options packed in one
 * int of FLAG_* bits with the thread count above them. No torch headers here: the arithmetic
 * does not depend on torch's version.
 *
 * -ffp-contract=off (set by the builder): no fused multiply-adds, so every clone below rounds
 * the same way and a result does not depend on which CPU ran it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* one build for every x86-64 CPU: the loader picks the widest vectors the CPU has */
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* bits of `flags`: which of the tensors are bfloat16 (else float32), and whether the
 * normalised row is rounded to bfloat16 before the affine; the thread count is flags >> 8 */
enum { FLAG_X_BF16 = 1, FLAG_W_BF16 = 2, FLAG_B_BF16 = 4, FLAG_Y_BF16 = 8, FLAG_ROUND_N = 16, THREADS_SHIFT = 8 };

typedef union { uint32_t u; float f; } bits32;

static inline float bf16_to_f32(uint16_t h) {
    bits32 v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* round to nearest, ties to even (what torch's .to(torch.bfloat16) does); NaN stays NaN */
static inline uint16_t f32_to_bf16(float f) {
    bits32 v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* row i of a float32 or bfloat16 matrix as float32: the row itself, or converted into buf */
static inline const float *row_f32(const void *base, int bf16, int64_t i, int64_t n, float *buf) {
    if (!bf16) return (const float *)base + i * n;
    const uint16_t *h = (const uint16_t *)base + i * n;
    for (int64_t j = 0; j < n; j++) buf[j] = bf16_to_f32(h[j]);
    return buf;
}

/* row i of a bfloat16 matrix from float32 values (float32 rows are written in place instead) */
static inline void store_row_bf16(void *base, int64_t i, int64_t n, const float *v) {
    uint16_t *h = (uint16_t *)base + i * n;
    for (int64_t j = 0; j < n; j++) h[j] = f32_to_bf16(v[j]);
}

/* (offset + w) as float32, or NULL without a weight; b likewise without the offset */
static float *param_f32(const void *p, int bf16, float offset, int64_t n) {
    if (!p) return NULL;
    float *out = (float *)malloc((size_t)n * sizeof(float));
    if (!out) return NULL;
    for (int64_t j = 0; j < n; j++) {
        float v = bf16 ? bf16_to_f32(((const uint16_t *)p)[j]) : ((const float *)p)[j];
        out[j] = offset != 0.0f ? v + offset : v;
    }
    return out;
}

static inline float inv_rms(const float *xr, int64_t n, double eps) {
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < n; j++) ss += (double)xr[j] * (double)xr[j];
    return (float)(1.0 / sqrt(ss / (double)n + eps));
}

/* y = round?(x * rstd) * (offset + w) + b per row (y's dtype: FLAG_Y_BF16); rstd (may be NULL)
 * receives 1/rms per row. w and b may be NULL. Returns 0, or -1 when memory for the scratch
 * rows could not be had (the output is then incomplete, and the caller raises). */
CLONES
int rms_norm_forward(const void *x, const void *w, const void *b, void *y, float *rstd, int64_t m, int64_t n, double eps,
                     float offset, int flags) {
    const int x_bf16 = flags & FLAG_X_BF16, w_bf16 = flags & FLAG_W_BF16, b_bf16 = flags & FLAG_B_BF16;
    const int y_bf16 = flags & FLAG_Y_BF16, round_n = flags & FLAG_ROUND_N, threads = flags >> THREADS_SHIFT;
    (void)threads; /* unused where the build has no OpenMP */
    float *wf = param_f32(w, w_bf16, offset, n), *bf = param_f32(b, b_bf16, 0.0f, n);
    int failed = 0;
    if ((w && !wf) || (b && !bf)) {
        free(wf);
        free(bf);
        return -1;
    }
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float *in = (float *)malloc((size_t)n * sizeof(float)), *out = (float *)malloc((size_t)n * sizeof(float));
        if (!in || !out) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            if (failed) continue;
            const float *xr = row_f32(x, x_bf16, i, n, in);
            float *yr = y_bf16 ? out : (float *)y + i * n; /* float32 is written in place */
            float r = inv_rms(xr, n, eps);
            if (rstd) rstd[i] = r;
            for (int64_t j = 0; j < n; j++) {
                float v = xr[j] * r;
                if (round_n) v = round_bf16(v);
                if (wf) v = v * wf[j];
                if (bf) v = v + bf[j];
                yr[j] = v;
            }
            if (y_bf16) store_row_bf16(y, i, n, out);
        }
        free(in);
        free(out);
    }
    free(wf);
    free(bf);
    return failed ? -1 : 0;
}

/* rows summed in float32 before their sum is added to the float64 one */
#define SUM_BLOCK 32

static inline void flush_sums(double *dwp, float *fw, double *dbp, float *fb, int64_t n) {
    if (dwp)
        for (int64_t j = 0; j < n; j++) {
            dwp[j] += (double)fw[j];
            fw[j] = 0.0f;
        }
    if (dbp)
        for (int64_t j = 0; j < n; j++) {
            dbp[j] += (double)fb[j];
            fb[j] = 0.0f;
        }
}

static inline void store_param(void *p, int bf16, int64_t j, double v) {
    if (bf16)
        ((uint16_t *)p)[j] = f32_to_bf16((float)v);
    else
        ((float *)p)[j] = (float)v;
}

/* The closed-form backward. With n = x * rstd and g = dy * (offset + w) (g = dy without a weight):
 *   dx = rstd * (g - n * mean(g * n))      in x's dtype
 *   dw = sum over rows of dy * round?(n)   in w's dtype (FLAG_W_BF16)
 *   db = sum over rows of dy               in b's dtype (FLAG_B_BF16)
 * Each of dx, dw, db may be NULL (not wanted); dy's dtype is given by FLAG_Y_BF16. Each thread
 * sums its own rows into a float64 row of partial sums, which are added in thread order at the
 * end: the result depends on the thread count, not on scheduling. Returns 0, or -1 (no memory). */
CLONES
int rms_norm_backward(const void *dy, const void *x, const float *rstd, const void *w, void *dx, void *dw, void *db,
                      int64_t m, int64_t n, float offset, int flags) {
    const int x_bf16 = flags & FLAG_X_BF16, w_bf16 = flags & FLAG_W_BF16, b_bf16 = flags & FLAG_B_BF16;
    const int dy_bf16 = flags & FLAG_Y_BF16, round_n = flags & FLAG_ROUND_N;
    int threads = flags >> THREADS_SHIFT;
    if (threads < 1) threads = 1;
    float *wf = param_f32(w, w_bf16, offset, n);
    if (w && !wf) return -1;
    /* per thread: n partial sums for dw, then n for db */
    const int64_t sums = (dw ? n : 0) + (db ? n : 0);
    double *part = sums ? (double *)calloc((size_t)threads * (size_t)sums, sizeof(double)) : NULL;
    if (sums && !part) {
        free(wf);
        return -1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        double *dwp = dw ? part + (int64_t)t * sums : NULL, *dbp = db ? part + (int64_t)t * sums + (dw ? n : 0) : NULL;
        float *xb = (float *)malloc((size_t)n * sizeof(float)), *dyb = (float *)malloc((size_t)n * sizeof(float));
        float *out = (float *)malloc((size_t)n * sizeof(float));
        /* the parameter sums, in float32 over a block of rows, then added to the float64 ones:
         * float64 accuracy over many rows without a float64 operation per element */
        float *fw = (float *)calloc((size_t)n, sizeof(float)), *fb = (float *)calloc((size_t)n, sizeof(float));
        if (!xb || !dyb || !out || !fw || !fb) failed = 1;
        int64_t in_block = 0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            if (failed) continue;
            const float *xr = row_f32(x, x_bf16, i, n, xb), *dyr = row_f32(dy, dy_bf16, i, n, dyb);
            const float r = rstd[i];
            double s = 0.0; /* sum of g * n over the row */
            if (wf) {
#pragma omp simd reduction(+ : s)
                for (int64_t j = 0; j < n; j++) s += (double)((dyr[j] * wf[j]) * (xr[j] * r));
            } else {
#pragma omp simd reduction(+ : s)
                for (int64_t j = 0; j < n; j++) s += (double)(dyr[j] * (xr[j] * r));
            }
            if (dbp)
                for (int64_t j = 0; j < n; j++) fb[j] += dyr[j];
            if (dwp) {
                if (round_n)
                    for (int64_t j = 0; j < n; j++) fw[j] += dyr[j] * round_bf16(xr[j] * r);
                else
                    for (int64_t j = 0; j < n; j++) fw[j] += dyr[j] * (xr[j] * r);
            }
            if (++in_block == SUM_BLOCK) {
                flush_sums(dwp, fw, dbp, fb, n);
                in_block = 0;
            }
            if (!dx) continue;
            float *dxr = x_bf16 ? out : (float *)dx + i * n; /* float32 is written in place */
            const float mean = (float)(s / (double)n);
            if (wf)
                for (int64_t j = 0; j < n; j++) dxr[j] = (dyr[j] * wf[j] - (xr[j] * r) * mean) * r;
            else
                for (int64_t j = 0; j < n; j++) dxr[j] = (dyr[j] - (xr[j] * r) * mean) * r;
            if (x_bf16) store_row_bf16(dx, i, n, out);
        }
        if (!failed) flush_sums(dwp, fw, dbp, fb, n);
        free(xb);
        free(dyb);
        free(out);
        free(fw);
        free(fb);
    }
    if (!failed) {
        for (int t = 1; t < threads; t++)
            for (int64_t j = 0; j < sums; j++) part[j] += part[(int64_t)t * sums + j];
        for (int64_t j = 0; dw && j < n; j++) store_param(dw, w_bf16, j, part[j]);
        for (int64_t j = 0; db && j < n; j++) store_param(db, b_bf16, j, part[(dw ? n : 0) + j]);
    }
    free(part);
    free(wf);
    return failed ? -1 : 0;
}
