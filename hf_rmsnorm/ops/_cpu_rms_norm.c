/* RMSNorm forward and backward for CPU tensors, one pass over each row.
 *
 * Built at first use by _cpu_kernel.py with the C compiler found on the machine, loaded with
 * ctypes. torch has a fused LayerNorm kernel for the CPU but no fused RMSNorm: as a chain of
 * torch ops an RMSNorm costs three or more passes over the activations where LayerNorm costs
 * one, so an exactly converted model (LayerNorm -> RMSNorm) ran slower than the original.
 *
 * The same semantics as the torch path (rms_norm.py, _RMSNormCPU): statistics in double,
 * everything else in float32, the normalised row optionally rounded to bfloat16 before the
 * affine (cast_mode "input"/"weight" with bfloat16), one rounding to the output dtype.
 * Activations and parameters are float32 (dtype code 0) or bfloat16 (code 1); the caller
 * checks everything else (contiguity, shapes, dtypes) and passes plain pointers.
 *
 * -ffp-contract=off (set by the builder): no fused multiply-adds, so every clone below rounds
 * the same way and a result does not depend on which CPU ran it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* one build for every x86-64 CPU: the loader picks the widest vectors the CPU has */
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

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

static inline void store_row(void *base, int bf16, int64_t i, int64_t n, const float *v) {
    if (bf16) {
        uint16_t *h = (uint16_t *)base + i * n;
        for (int64_t j = 0; j < n; j++) h[j] = f32_to_bf16(v[j]);
    } else {
        memcpy((float *)base + i * n, v, (size_t)n * sizeof(float));
    }
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

/* y = round?(x * rstd) * (offset + w) + b per row; rstd (may be NULL) receives 1/rms per row.
 * Returns 0, or -1 when memory for the scratch rows could not be had (the output is then
 * incomplete, and the caller raises). */
CLONES
int rms_norm_forward(const void *x, int x_bf16, const void *w, int w_bf16, const void *b, int b_bf16, float offset,
                     void *y, int y_bf16, float *rstd, int64_t m, int64_t n, double eps, int round_n, int threads) {
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
            float r = inv_rms(xr, n, eps);
            if (rstd) rstd[i] = r;
            for (int64_t j = 0; j < n; j++) {
                float v = xr[j] * r;
                if (round_n) v = round_bf16(v);
                if (wf) v = v * wf[j];
                if (bf) v = v + bf[j];
                out[j] = v;
            }
            store_row(y, y_bf16, i, n, out);
        }
        free(in);
        free(out);
    }
    free(wf);
    free(bf);
    return failed ? -1 : 0;
}

/* The closed-form backward. With n = x * rstd and g = dy * (offset + w) (g = dy without a weight):
 *   dx = rstd * (g - n * mean(g * n))             (dx may be NULL: not needed)
 *   dw = sum over rows of dy * round?(n)          (dw_part: threads x n doubles, or NULL)
 *   db = sum over rows of dy                      (db_part likewise)
 * Each thread sums its own rows into its row of the partials; the caller adds the rows, so
 * the result depends on the thread count, not on scheduling. Returns 0, or -1 (no memory). */
CLONES
int rms_norm_backward(const void *dy, int dy_bf16, const void *x, int x_bf16, const float *rstd, const void *w,
                      int w_bf16, float offset, int round_n, void *dx, int dx_bf16, double *dw_part, double *db_part,
                      int64_t m, int64_t n, int threads) {
    float *wf = param_f32(w, w_bf16, offset, n);
    int failed = 0;
    if (w && !wf) return -1;
    if (threads < 1) threads = 1;
    if (dw_part) memset(dw_part, 0, (size_t)threads * (size_t)n * sizeof(double));
    if (db_part) memset(db_part, 0, (size_t)threads * (size_t)n * sizeof(double));
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        double *dwp = dw_part ? dw_part + (int64_t)t * n : NULL, *dbp = db_part ? db_part + (int64_t)t * n : NULL;
        float *xb = (float *)malloc((size_t)n * sizeof(float)), *dyb = (float *)malloc((size_t)n * sizeof(float));
        float *nb = (float *)malloc((size_t)n * sizeof(float)), *gb = (float *)malloc((size_t)n * sizeof(float));
        if (!xb || !dyb || !nb || !gb) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            if (failed) continue;
            const float *xr = row_f32(x, x_bf16, i, n, xb), *dyr = row_f32(dy, dy_bf16, i, n, dyb);
            float r = rstd[i];
            for (int64_t j = 0; j < n; j++) nb[j] = xr[j] * r;
            if (dbp)
                for (int64_t j = 0; j < n; j++) dbp[j] += (double)dyr[j];
            if (dwp) {
                if (round_n)
                    for (int64_t j = 0; j < n; j++) dwp[j] += (double)(dyr[j] * round_bf16(nb[j]));
                else
                    for (int64_t j = 0; j < n; j++) dwp[j] += (double)(dyr[j] * nb[j]);
            }
            if (!dx) continue;
            const float *g = dyr;
            if (wf) {
                for (int64_t j = 0; j < n; j++) gb[j] = dyr[j] * wf[j];
                g = gb;
            }
            double s = 0.0;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < n; j++) s += (double)(g[j] * nb[j]);
            float mean = (float)(s / (double)n);
            for (int64_t j = 0; j < n; j++) gb[j] = (g[j] - nb[j] * mean) * r;
            store_row(dx, dx_bf16, i, n, gb);
        }
        free(xb);
        free(dyb);
        free(nb);
        free(gb);
    }
    free(wf);
    return failed ? -1 : 0;
}
