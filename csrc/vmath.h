/* vmath.h -- small branch-free math the compiler can vectorise without -ffast-math.
 *
 * Kernels compute elementwise results into arrays (vectorised loops) and reduce
 * them with fixed lane arrays (CRIBO_LANES partial sums combined in a fixed
 * order), so no reduction depends on the compiler reassociating floating point. */
#ifndef CRIBO_VMATH_H
#define CRIBO_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define CRIBO_LANES 16

/* Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
 * time (GCC function multi-versioning).  -std=c11 keeps -ffp-contract=off, so the
 * clones round identically. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(CRIBO_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define CRIBO_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CRIBO_SIMD
#endif

/* exp(x) in float to about 2 ulp (Cephes' expf polynomial on [-ln2/2, ln2/2]).
 * Returns 0 for x < -87 (results below FLT_MIN are flushed), +inf-free up to
 * x = 88, NaN for NaN.  Only used where the argument is <= 0 after a max shift. */
static inline float cribo_expf(float x)
{
    const float lo = -87.0f;
    const float hi = 88.0f;
    float xc = x >= lo ? x : lo; /* NaN -> lo: never converted to int below */
    xc = xc > hi ? hi : xc;
    /* n = round(x / ln 2) with the 1.5 * 2^23 trick (exact under round-to-nearest). */
    float n = xc * 1.44269504088896341f + 12582912.0f;
    n = n - 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    return x >= lo ? y : (x < lo ? 0.0f : x); /* x < lo -> 0, NaN -> NaN */
}

/* Reductions over fixed lanes: CRIBO_LANES partial results combined in order. */
static inline float cribo_lane_max(const float *x, int64_t n)
{
    float m[CRIBO_LANES];
    for (int l = 0; l < CRIBO_LANES; l++) {
        m[l] = -INFINITY;
    }
    int64_t i = 0;
    for (; i + CRIBO_LANES <= n; i += CRIBO_LANES) {
        for (int l = 0; l < CRIBO_LANES; l++) {
            m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
        }
    }
    float r = -INFINITY;
    for (; i < n; i++) {
        r = x[i] > r ? x[i] : r;
    }
    for (int l = 0; l < CRIBO_LANES; l++) {
        r = m[l] > r ? m[l] : r;
    }
    return r;
}

static inline float cribo_lane_min(const float *x, int64_t n)
{
    float m[CRIBO_LANES];
    for (int l = 0; l < CRIBO_LANES; l++) {
        m[l] = INFINITY;
    }
    int64_t i = 0;
    for (; i + CRIBO_LANES <= n; i += CRIBO_LANES) {
        for (int l = 0; l < CRIBO_LANES; l++) {
            m[l] = x[i + l] < m[l] ? x[i + l] : m[l];
        }
    }
    float r = INFINITY;
    for (; i < n; i++) {
        r = x[i] < r ? x[i] : r;
    }
    for (int l = 0; l < CRIBO_LANES; l++) {
        r = m[l] < r ? m[l] : r;
    }
    return r;
}

static inline double cribo_lane_sum(const float *x, int64_t n)
{
    double a[CRIBO_LANES] = {0};
    int64_t i = 0;
    for (; i + CRIBO_LANES <= n; i += CRIBO_LANES) {
        for (int l = 0; l < CRIBO_LANES; l++) {
            a[l] += (double)x[i + l];
        }
    }
    double r = 0.0;
    for (; i < n; i++) {
        r += (double)x[i];
    }
    for (int l = 0; l < CRIBO_LANES; l++) {
        r += a[l];
    }
    return r;
}

#endif /* CRIBO_VMATH_H */
