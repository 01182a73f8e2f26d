/* RMSNorm forward and backward for CPU tensors, one pass over each row; the gated RMSNorm's
 * likewise (the second half of this file).
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
 * the same way and a result does not depend on which CPU ran it (checked: the gated forward's
 * bits equal from the AVX-512, AVX2 and SSE builds and an unoptimised scalar one).
 * -fno-trapping-math lets the selects in the loops vectorise without AVX-512's masks.
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

/* round to nearest, ties to even (what torch's .to(torch.bfloat16) does); NaN stays NaN (quiet).
 * A select, not a branch: a branch kept every loop that rounds from vectorising */
static inline uint16_t f32_to_bf16(float f) {
    bits32 v;
    v.f = f;
    const uint32_t rounded = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16, nan = (v.u >> 16) | 0x40u;
    return (uint16_t)((v.u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* the n values from element `start` of float32 or bfloat16 memory as float32: in place, or
 * converted into buf (a row: start = i * its row stride) */
static inline const float *row_f32(const void *base, int bf16, int64_t start, int64_t n, float *buf) {
    if (!bf16) return (const float *)base + start;
    const uint16_t *h = (const uint16_t *)base + start;
    for (int64_t j = 0; j < n; j++) buf[j] = bf16_to_f32(h[j]);
    return buf;
}

/* n bfloat16 values from element `start` on, from float32 ones (float32 rows are written in
 * place instead) */
static inline void store_row_bf16(void *base, int64_t start, int64_t n, const float *v) {
    uint16_t *h = (uint16_t *)base + start;
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
            const float *xr = row_f32(x, x_bf16, i * n, n, in);
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
            if (y_bf16) store_row_bf16(y, i * n, n, out);
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

/* the threads a call asks for (flags >> THREADS_SHIFT, at least 1), and this thread's number */
static inline int thread_count(int flags) { return flags >> THREADS_SHIFT > 1 ? flags >> THREADS_SHIFT : 1; }

static inline int thread_num(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* each thread's row of `sums` float64 sums added into the first, in thread order: the result
 * depends on the thread count, not on scheduling */
static void add_thread_sums(double *part, int threads, int64_t sums) {
    for (int t = 1; t < threads; t++)
        for (int64_t j = 0; j < sums; j++) part[j] += part[(int64_t)t * sums + j];
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
    const int threads = thread_count(flags);
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
        const int t = thread_num();
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
            const float *xr = row_f32(x, x_bf16, i * n, n, xb), *dyr = row_f32(dy, dy_bf16, i * n, n, dyb);
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
            if (x_bf16) store_row_bf16(dx, i * n, n, out);
        }
        if (!failed) flush_sums(dwp, fw, dbp, fb, n);
        free(xb);
        free(dyb);
        free(out);
        free(fw);
        free(fb);
    }
    if (!failed) {
        add_thread_sums(part, threads, sums);
        for (int64_t j = 0; dw && j < n; j++) store_param(dw, w_bf16, j, part[j]);
        for (int64_t j = 0; db && j < n; j++) store_param(db, b_bf16, j, part[(dw ? n : 0) + j]);
    }
    free(part);
    free(wf);
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * The gated RMSNorm (gated_rms_norm.py has the maths and the semantics; the Triton kernels in
 * _triton_gated.py compute the same): each group of s elements of a row normalised on its own,
 * with the gate act(z) multiplied in before the norm (Mamba2) or after it (Qwen3-Next, Kimi).
 * As torch ops the HF classes make up to nine passes over the activations forward and autograd
 * as many again backward; here one pass per row each way. Rows are read with their own stride
 * (Mamba2's gate is a slice of its projection); the outputs are contiguous.
 * ------------------------------------------------------------------------------------------- */

/* more bits of `flags` for the gated functions: the gate's dtype (the bias's bit: the gated norm
 * has none), the weighted row rounded to bfloat16 before the gate, the gate's order, sigmoid
 * (else silu) */
enum { FLAG_Z_BF16 = 4, FLAG_ROUND_M = 32, FLAG_NORM_BEFORE_GATE = 64, FLAG_SIGMOID = 128 };

/* e^t within a few ulps, for the sigmoid below: t is clamped to [-87, 88], where the sigmoid has
 * long saturated (so 2^e below is a normal float), and beyond float's range (88.72) the result is
 * infinite, as expf's, so that the sigmoid is 0 there and silu(-inf) NaN, as torch's; NaN stays
 * NaN. The C library's expf is a call per element that does not vectorise without -ffast-math,
 * and it cost more than the rest of the norm; this is arithmetic, bit moves and selects only, so
 * the loops around it vectorise. */
static inline float exp_clamped(float t_in) {
    const float t = t_in < -87.0f ? -87.0f : (t_in > 88.0f ? 88.0f : t_in);
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it leaves round(t / ln 2) in the low bits */
    bits32 k;
    k.f = t * 1.44269504f + shifter;
    const int32_t e = (int32_t)(k.u - 0x4B400000u);
    const float kf = k.f - shifter;
    /* t - k ln 2 in two steps: ln 2's high part has few bits, so k times it is exact */
    const float r = (t - kf * 0.693145752f) - kf * 1.42860677e-6f;
    /* e^r for |r| <= ln(2)/2: Taylor to r^7, whose remainder is below 1e-8 relative */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    bits32 scale;
    scale.u = (uint32_t)(e + 127) << 23; /* 2^e */
    return t_in > 88.7228394f ? INFINITY : p * scale.f;
}

/* act(z) into g and act'(z) into dg (dg may be NULL) for n values of z: sigmoid, or
 * silu(z) = z sigma(z), silu' = sigma(z) (1 + z (1 - sigma(z))) (as the Triton kernels) */
static inline void gate_row(const float *z, int64_t n, int sigmoid, float *g, float *dg) {
    /* a loop per case: a branch inside one kept it from vectorising (the exponential then took
     * 3 ns an element) */
    if (dg)
        for (int64_t j = 0; j < n; j++) {
            const float s = 1.0f / (1.0f + exp_clamped(-z[j]));
            g[j] = sigmoid ? s : z[j] * s;
            dg[j] = sigmoid ? s * (1.0f - s) : s * (1.0f + z[j] * (1.0f - s));
        }
    else
        for (int64_t j = 0; j < n; j++) {
            const float s = 1.0f / (1.0f + exp_clamped(-z[j]));
            g[j] = sigmoid ? s : z[j] * s;
        }
}

/* Forward, over m rows of n = groups * s values; x's rows sx elements apart, z's sz (z, the gate,
 * may be NULL; so may w, to which offset is added). y: contiguous, bfloat16 or float32
 * (FLAG_Y_BF16); rstd (may be NULL):
 * 1/rms per row and group, row-major. With h = x act(z) (gate first) or x, and n = h rstd:
 *   y = round_m?(round_n?(n) w) act(z)   (gate after), else round_n?(n) w
 * Returns 0, or -1 (no memory for the scratch rows). */
CLONES
int gated_rms_norm_forward(const void *x, int64_t sx, const void *z, int64_t sz, const void *w, void *y, float *rstd,
                           int64_t m, int64_t n, int64_t s, double eps, float offset, int flags) {
    const int x_bf16 = flags & FLAG_X_BF16, z_bf16 = flags & FLAG_Z_BF16, w_bf16 = flags & FLAG_W_BF16;
    const int y_bf16 = flags & FLAG_Y_BF16, round_n = flags & FLAG_ROUND_N, round_m = flags & FLAG_ROUND_M;
    const int before = flags & FLAG_NORM_BEFORE_GATE, sigmoid = flags & FLAG_SIGMOID, threads = flags >> THREADS_SHIFT;
    (void)threads;
    const int64_t groups = n / s;
    float *wf = param_f32(w, w_bf16, offset, n);
    if (w && !wf) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float *xb = (float *)malloc((size_t)n * sizeof(float)), *zb = (float *)malloc((size_t)n * sizeof(float));
        float *g = (float *)malloc((size_t)n * sizeof(float)), *hb = (float *)malloc((size_t)n * sizeof(float));
        float *out = (float *)malloc((size_t)n * sizeof(float));
        if (!xb || !zb || !g || !hb || !out) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            if (failed) continue;
            const float *xr = row_f32(x, x_bf16, i * sx, n, xb), *h = xr;
            float *yr = y_bf16 ? out : (float *)y + i * n; /* float32 is written in place */
            if (z) {
                gate_row(row_f32(z, z_bf16, i * sz, n, zb), n, sigmoid, g, NULL);
                if (!before) {
                    for (int64_t j = 0; j < n; j++) hb[j] = xr[j] * g[j];
                    h = hb;
                }
            }
            for (int64_t k = 0; k < groups; k++) {
                const int64_t o = k * s;
                const float r = inv_rms(h + o, s, eps);
                if (rstd) rstd[i * groups + k] = r;
                for (int64_t j = o; j < o + s; j++) {
                    float v = h[j] * r;
                    if (round_n) v = round_bf16(v);
                    if (wf) v = v * wf[j];
                    if (z && before) v = (round_m ? round_bf16(v) : v) * g[j];
                    yr[j] = v;
                }
            }
            if (y_bf16) store_row_bf16(y, i * n, n, out);
        }
        free(xb);
        free(zb);
        free(g);
        free(hb);
        free(out);
    }
    free(wf);
    return failed ? -1 : 0;
}

/* Backward of the forward above, dy's rows sdy elements apart in y's dtype (FLAG_Y_BF16). With
 * nr = round_n?(n) and dm = dy act(z) (gate after) or dy:
 *   dw = sum over rows of dm nr                  in w's dtype
 *   dn = dm w;  dh = rstd (dn - n mean(dn n)) per group
 *   dx = dh act(z), dz = dh x act'(z)            (gate first)
 *   dx = dh,        dz = dy round_m?(nr w) act'(z)  (gate after)
 * in x's and z's dtypes. The roundings are taken as exact, as the Triton kernels take them. dx,
 * dz, dw may each be NULL (not wanted). The weight's sums as rms_norm_backward's: float32 over
 * blocks of rows, float64 per thread, added in thread order. Returns 0, or -1 (no memory). */
CLONES
int gated_rms_norm_backward(const void *dy, int64_t sdy, const void *x, int64_t sx, const void *z, int64_t sz,
                            const void *w, const float *rstd, void *dx, void *dz, void *dw, int64_t m, int64_t n,
                            int64_t s, float offset, int flags) {
    const int x_bf16 = flags & FLAG_X_BF16, z_bf16 = flags & FLAG_Z_BF16, w_bf16 = flags & FLAG_W_BF16;
    const int dy_bf16 = flags & FLAG_Y_BF16, round_n = flags & FLAG_ROUND_N, round_m = flags & FLAG_ROUND_M;
    const int before = flags & FLAG_NORM_BEFORE_GATE, sigmoid = flags & FLAG_SIGMOID;
    const int threads = thread_count(flags);
    const int64_t groups = n / s;
    float *wf = param_f32(w, w_bf16, offset, n);
    if (w && !wf) return -1;
    double *part = dw ? (double *)calloc((size_t)threads * (size_t)n, sizeof(double)) : NULL;
    if (dw && !part) {
        free(wf);
        return -1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        const int t = thread_num();
        double *dwp = dw ? part + (int64_t)t * n : NULL;
        /* scratch rows: converted inputs, the gate's act and act', h, n, round_n?(n), dm, dn, and
         * bfloat16 outputs' staging */
        float *buf[12];
        for (int b = 0; b < 12; b++) buf[b] = (float *)malloc((size_t)n * sizeof(float));
        float *xb = buf[0], *dyb = buf[1], *zb = buf[2], *g = buf[3], *dg = buf[4], *hb = buf[5], *nb = buf[6];
        float *nrb = buf[7], *dmb = buf[8], *dn = buf[9], *dxo = buf[10], *dzo = buf[11];
        float *fw = (float *)calloc((size_t)n, sizeof(float));
        for (int b = 0; b < 12; b++)
            if (!buf[b]) failed = 1;
        if (!fw) failed = 1;
        int64_t in_block = 0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            if (failed) continue;
            const float *xr = row_f32(x, x_bf16, i * sx, n, xb), *dyr = row_f32(dy, dy_bf16, i * sdy, n, dyb);
            float *dxr = x_bf16 || !dx ? dxo : (float *)dx + i * n; /* float32 is written in place */
            float *dzr = z_bf16 || !dz ? dzo : (float *)dz + i * n;
            const float *h = xr, *dm = dyr;
            if (z) {
                gate_row(row_f32(z, z_bf16, i * sz, n, zb), n, sigmoid, g, dg);
                if (!before) {
                    for (int64_t j = 0; j < n; j++) hb[j] = xr[j] * g[j];
                    h = hb;
                } else {
                    for (int64_t j = 0; j < n; j++) dmb[j] = dyr[j] * g[j];
                    dm = dmb;
                }
            }
            /* one simple loop per step (a branch inside a loop kept it from vectorising: 7 ns an
             * element where these take under 1) */
            for (int64_t k = 0; k < groups; k++) {
                const int64_t o = k * s, e = o + s;
                const float r = rstd[i * groups + k];
                for (int64_t j = o; j < e; j++) nb[j] = h[j] * r;
                const float *nr = nb;
                if (round_n) {
                    for (int64_t j = o; j < e; j++) nrb[j] = round_bf16(nb[j]);
                    nr = nrb;
                }
                if (z && before) { /* y = m act(z), m = round_m?(nr w): dz = dy m act'(z) */
                    if (wf && round_m)
                        for (int64_t j = o; j < e; j++) dzr[j] = dyr[j] * round_bf16(nr[j] * wf[j]) * dg[j];
                    else if (wf)
                        for (int64_t j = o; j < e; j++) dzr[j] = dyr[j] * (nr[j] * wf[j]) * dg[j];
                    else
                        for (int64_t j = o; j < e; j++) dzr[j] = dyr[j] * nr[j] * dg[j];
                }
                const float *dnr = dm;
                if (wf) {
                    for (int64_t j = o; j < e; j++) fw[j] += dm[j] * nr[j];
                    for (int64_t j = o; j < e; j++) dn[j] = dm[j] * wf[j];
                    dnr = dn;
                }
                double c = 0.0;
#pragma omp simd reduction(+ : c)
                for (int64_t j = o; j < e; j++) c += (double)(dnr[j] * nb[j]);
                const float mean = (float)(c / (double)s);
                if (z && !before) { /* h = x act(z): dx = dh act(z), dz = dh x act'(z) */
                    for (int64_t j = o; j < e; j++) {
                        const float dh = (dnr[j] - nb[j] * mean) * r;
                        dxr[j] = dh * g[j];
                        dzr[j] = dh * xr[j] * dg[j];
                    }
                } else {
                    for (int64_t j = o; j < e; j++) dxr[j] = (dnr[j] - nb[j] * mean) * r;
                }
            }
            if (dx && x_bf16) store_row_bf16(dx, i * n, n, dxo);
            if (dz && z_bf16) store_row_bf16(dz, i * n, n, dzo);
            if (dwp && ++in_block == SUM_BLOCK) {
                flush_sums(dwp, fw, NULL, NULL, n);
                in_block = 0;
            }
        }
        if (!failed && dwp) flush_sums(dwp, fw, NULL, NULL, n);
        for (int b = 0; b < 12; b++) free(buf[b]);
        free(fw);
    }
    if (!failed && dw) {
        add_thread_sums(part, threads, n);
        for (int64_t j = 0; j < n; j++) store_param(dw, w_bf16, j, part[j]);
    }
    free(part);
    free(wf);
    return failed ? -1 : 0;
}
