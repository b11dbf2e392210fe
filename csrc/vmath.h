/* vmath.h -- the SIMD layer of the kernels, portable GCC/Clang vector extensions.
 *
 * cribo_vf holds CRIBO_VL = 8 floats: one AVX2 (or AVX-512VL) register, two SSE
 * registers in the baseline clone.  (16-float vectors are not used: GCC lowers
 * them badly for AVX2 targets.)  Hot loops
 * run over whole vectors and finish the tail with the scalar twin of each
 * function, which does the same operations in the same order, so a value never
 * depends on whether it fell in a vector or in the tail.  Reductions keep
 * per-lane partial results (sums in double) combined in a fixed order: nothing
 * relies on the compiler reassociating floating point. */
#ifndef CRIBO_VMATH_H
#define CRIBO_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
 * time (GCC function multi-versioning).  -std=c11 keeps -ffp-contract=off, so the
 * clones round identically. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(CRIBO_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define CRIBO_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CRIBO_SIMD
#endif

/* The vector helpers are always inlined, so passing 64-byte vectors never crosses
 * an ABI boundary; GCC's note that the ABI would differ is moot. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define CRIBO_VL 8
#define CRIBO_INLINE static inline __attribute__((always_inline))

typedef float cribo_vf __attribute__((vector_size(32)));
typedef int32_t cribo_vi __attribute__((vector_size(32)));
typedef double cribo_vd __attribute__((vector_size(32)));   /* 4 doubles */
typedef float cribo_vfh __attribute__((vector_size(16)));   /* half a cribo_vf */

CRIBO_INLINE cribo_vf vf_load(const float *p)
{
    cribo_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

CRIBO_INLINE void vf_store(float *p, cribo_vf v) { memcpy(p, &v, sizeof v); }

CRIBO_INLINE cribo_vf vf_set1(float x) { return (cribo_vf){0} + x; }

/* mask ? a : b, with mask lanes all-ones or zero (a comparison's result). */
CRIBO_INLINE cribo_vf vf_select(cribo_vi mask, cribo_vf a, cribo_vf b)
{
    return (cribo_vf)(((cribo_vi)a & mask) | ((cribo_vi)b & ~mask));
}

CRIBO_INLINE cribo_vf vf_max(cribo_vf a, cribo_vf b) { return vf_select(a > b, a, b); }
CRIBO_INLINE cribo_vf vf_min(cribo_vf a, cribo_vf b) { return vf_select(a < b, a, b); }

/* All-ones lanes where x is finite (x - x is 0 for finite x, NaN otherwise). */
CRIBO_INLINE cribo_vi vf_isfinite(cribo_vf x) { return (x - x) == vf_set1(0.0f); }

CRIBO_INLINE float vf_hmax(cribo_vf v)
{
    float r = v[0];
    for (int i = 1; i < CRIBO_VL; i++) {
        r = v[i] > r ? v[i] : r;
    }
    return r;
}

/* 4 doubles at p; 4 floats at p widened (exactly) to double. */
CRIBO_INLINE cribo_vd vd_load(const double *p)
{
    cribo_vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

CRIBO_INLINE void vd_store(double *p, cribo_vd v) { memcpy(p, &v, sizeof v); }

CRIBO_INLINE cribo_vd vd_widen(const float *p)
{
    cribo_vfh h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, cribo_vd);
}

/* acc[0..1] += v, widened to double. */
CRIBO_INLINE void vd_accumulate(cribo_vd acc[2], cribo_vf v)
{
    const float *f = (const float *)&v;
    acc[0] += vd_widen(f);
    acc[1] += vd_widen(f + CRIBO_VL / 2);
}

CRIBO_INLINE double vd_hsum(const cribo_vd acc[2])
{
    double r = 0.0;
    for (int i = 0; i < 4; i++) {
        r += acc[0][i] + acc[1][i];
    }
    return r;
}

/* exp(x) in float to about 2 ulp (Cephes' expf polynomial on [-ln2/2, ln2/2]),
 * branch-free.  0 for x < -87 (results below FLT_MIN are flushed); callers pass
 * finite arguments <= 88 (in practice <= 0, after a max shift). */
#define CRIBO_EXP_LO (-87.0f)
#define CRIBO_EXP_HI 88.0f

/* The steps both twins below take, written once as expressions that read the same
 * for a float and for a cribo_vf (a scalar operand is broadcast), so the scalar
 * tail and the vector lanes cannot drift apart:
 *   n = round(x / ln 2) with the 1.5 * 2^23 trick (exact under round-to-nearest),
 *   r = x - n ln 2 in two steps (ln 2 split in a short head and a tail),
 *   exp(r) for |r| <= ln2/2 by Cephes' polynomial in Horner form. */
#define CRIBO_EXP_ROUND(x) ((x) * 1.44269504088896341f + 12582912.0f - 12582912.0f)
#define CRIBO_EXP_REDUCE(x, n) ((x) - (n) * 0.693359375f - (n) * -2.12194440e-4f)
#define CRIBO_EXP_POLY(r)                                                              \
    ((((((1.9875691500e-4f * (r) + 1.3981999507e-3f) * (r) + 8.3334519073e-3f) * (r) + \
        4.1665795894e-2f) * (r) + 1.6666665459e-1f) * (r) + 5.0000001201e-1f) *        \
         ((r) * (r)) + (r) + 1.0f)

CRIBO_INLINE float cribo_expf(float x)
{
    const int ok = x >= CRIBO_EXP_LO;
    float xc = ok ? x : CRIBO_EXP_LO;
    xc = xc > CRIBO_EXP_HI ? CRIBO_EXP_HI : xc;
    const float n = CRIBO_EXP_ROUND(xc);
    const float r = CRIBO_EXP_REDUCE(xc, n);
    const float p = CRIBO_EXP_POLY(r);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return ok ? p * scale : 0.0f;
}

/* The same, CRIBO_VL lanes at a time (identical operations, so identical results). */
CRIBO_INLINE cribo_vf vf_exp(cribo_vf x)
{
    const cribo_vi ok = x >= vf_set1(CRIBO_EXP_LO);
    cribo_vf xc = vf_select(ok, x, vf_set1(CRIBO_EXP_LO));
    xc = vf_select(xc > vf_set1(CRIBO_EXP_HI), vf_set1(CRIBO_EXP_HI), xc);
    const cribo_vf n = CRIBO_EXP_ROUND(xc);
    const cribo_vf r = CRIBO_EXP_REDUCE(xc, n);
    const cribo_vf p = CRIBO_EXP_POLY(r);
    const cribo_vi bits = (__builtin_convertvector(n, cribo_vi) + 127) << 23;
    const cribo_vf y = p * (cribo_vf)bits;
    return (cribo_vf)((cribo_vi)y & ok);
}

/* ------------------------------------------------------------ row reductions */

/* *lo and *hi = the smallest and largest of x (+inf and -inf where n == 0): whole
 * vectors lane by lane, the lanes in order, then the tail -- one pass for both. */
CRIBO_INLINE void cribo_row_range(const float *x, int64_t n, float *lo, float *hi)
{
    int64_t i = 0;
    float rl = INFINITY;
    float rh = -INFINITY;
    if (n >= CRIBO_VL) {
        cribo_vf ml = vf_load(x);
        cribo_vf mh = ml;
        for (i = CRIBO_VL; i + CRIBO_VL <= n; i += CRIBO_VL) {
            const cribo_vf v = vf_load(x + i);
            ml = vf_min(ml, v);
            mh = vf_max(mh, v);
        }
        rl = ml[0];
        rh = mh[0];
        for (int l = 1; l < CRIBO_VL; l++) {
            rl = ml[l] < rl ? ml[l] : rl;
            rh = mh[l] > rh ? mh[l] : rh;
        }
    }
    for (; i < n; i++) {
        rl = x[i] < rl ? x[i] : rl;
        rh = x[i] > rh ? x[i] : rh;
    }
    *lo = rl;
    *hi = rh;
}

/* The largest of x (-inf where n == 0); the unused minimum is dead code, dropped
 * by the compiler (the function is always inlined). */
CRIBO_INLINE float cribo_row_max(const float *x, int64_t n)
{
    float lo;
    float hi;
    cribo_row_range(x, n, &lo, &hi);
    return hi;
}

/* sum of x in double lanes. */
CRIBO_INLINE double cribo_row_sum(const float *x, int64_t n)
{
    cribo_vd acc[2] = {{0}, {0}};
    int64_t i = 0;
    for (; i + CRIBO_VL <= n; i += CRIBO_VL) {
        vd_accumulate(acc, vf_load(x + i));
    }
    double r = vd_hsum(acc);
    for (; i < n; i++) {
        r += (double)x[i];
    }
    return r;
}

/* x[i] = exp(x[i] - m) in place; returns the sum in double lanes. */
CRIBO_INLINE double cribo_row_exp_sum(float *x, float m, int64_t n)
{
    cribo_vd acc[2] = {{0}, {0}};
    const cribo_vf mv = vf_set1(m);
    int64_t i = 0;
    for (; i + CRIBO_VL <= n; i += CRIBO_VL) {
        const cribo_vf e = vf_exp(vf_load(x + i) - mv);
        vf_store(x + i, e);
        vd_accumulate(acc, e);
    }
    double r = vd_hsum(acc);
    for (; i < n; i++) {
        x[i] = cribo_expf(x[i] - m);
        r += (double)x[i];
    }
    return r;
}

/* sum_i x[i] * y[i] in double, in one fixed order whatever the target or the
 * position of the rows in memory: lane l of the two 4-double accumulators sums
 * the products i = l (mod 8) of the whole 8-float vectors in increasing i, the
 * lanes are combined by vd_hsum, then the tail is added in increasing i.  Each
 * product of two floats is exact in double (24 + 24 <= 53 significant bits, and
 * no float product leaves the double range), so an FMA contraction could not
 * change it either: the only roundings are the additions, in the order above.
 * With x == y it is the squared norm, finite and free of underflow for every
 * finite float row ((2^128)^2 * 2^31 < 2^1024, and (2^-149)^2 is a normal double). */
CRIBO_INLINE double cribo_dot_f64(const float *x, const float *y, int64_t n)
{
    cribo_vd acc[2] = {{0}, {0}};
    int64_t i = 0;
    for (; i + CRIBO_VL <= n; i += CRIBO_VL) {
        acc[0] += vd_widen(x + i) * vd_widen(y + i);
        acc[1] += vd_widen(x + i + CRIBO_VL / 2) * vd_widen(y + i + CRIBO_VL / 2);
    }
    double r = vd_hsum(acc);
    for (; i < n; i++) {
        r += (double)x[i] * (double)y[i];
    }
    return r;
}

#endif /* CRIBO_VMATH_H */
