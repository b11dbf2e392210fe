/* loss.c -- self-distillation losses, docs/method.md §5.
 *
 * For a student row s and teacher rows t (centre c, temperature tau_t):
 *   p_t = softmax((t - c) / tau_t),  log p_s = log_softmax(s / tau_s)
 *   H(p_t, p_s) = lse(s / tau_s) - sum_l p_t[l] s[l] / tau_s
 *   dH/ds = (softmax(s / tau_s) - p_t) / tau_s
 * One row at a time: pass 1 reads the logits from memory once (scaled copies into
 * per-thread scratch rows, maxima, a finiteness check); pass 2 exponentiates in the
 * scratch rows (cache-resident) and accumulates the normalisers and dot products
 * (float partial sums over blocks of 512, double across blocks); pass 3 writes the
 * gradient once.  Rows are independent and split statically over threads. */
#include <math.h>

#include "cribo.h"
#include "workspace.h"
#include "vmath.h"

size_t cribo_softmax_cross_entropy_workspace_size(int64_t L)
{
    return 3 * cribo_align64((size_t)L * sizeof(float));
}

typedef struct {
    float *loss_a;
    float *loss_b;
    float *grad;
    const float *s;
    const float *ta;
    const float *tb;
    const float *ca;
    const float *cb;
    const float *wa;
    const float *wb;
    int64_t L;
    double inv_s, inv_a, inv_b;
    char *work;
    size_t ws;
    int bad[CRIBO_MAX_THREADS]; /* per thread: the CRIBO_ENONFINITE_* code of its row */
} softmax_cross_entropy_job;

/* Pass 1 for one row: x[l] = (t[l] - c[l]) * a (c may be NULL: zero) and its
 * maximum in *max_out; returns 1 if every x[l] is finite. */
CRIBO_SIMD
static int scale_max_row(float *x, const float *t, const float *c, float a, int64_t L,
                         float *max_out)
{
    const cribo_vf av = vf_set1(a);
    cribo_vf m = vf_set1(-INFINITY);
    cribo_vi fin = (cribo_vi){0} - 1;
    int64_t l = 0;
    for (; l + CRIBO_VL <= L; l += CRIBO_VL) {
        cribo_vf v = vf_load(t + l);
        if (c != NULL) {
            v = v - vf_load(c + l);
        }
        v = v * av;
        vf_store(x + l, v);
        m = vf_max(m, v);
        fin &= vf_isfinite(v);
    }
    float mx = vf_hmax(m);
    int ok = 1;
    for (int i = 0; i < CRIBO_VL; i++) {
        ok &= fin[i] != 0;
    }
    for (; l < L; l++) {
        const float v = (t[l] - (c != NULL ? c[l] : 0.0f)) * a;
        x[l] = v;
        mx = v > mx ? v : mx;
        ok &= v - v == 0.0f;
    }
    *max_out = mx;
    return ok;
}

/* Pass 2: e[l] = exp(e[l] - m) in place; returns sum_l e[l] and, if y is not NULL,
 * sum_l e[l] * y[l] in *dot.  Partial sums run in float vectors over blocks of
 * EXP_BLOCK elements and are added in double across blocks. */
#define EXP_BLOCK 512
CRIBO_SIMD
static double exp_row(float *e, float m, const float *y, double *dot, int64_t L)
{
    const cribo_vf mv = vf_set1(m);
    double zs = 0.0;
    double ds = 0.0;
    int64_t l = 0;
    while (l + CRIBO_VL <= L) {
        const int64_t stop = l + EXP_BLOCK < L ? l + EXP_BLOCK : L;
        cribo_vf z = vf_set1(0.0f);
        cribo_vf d = vf_set1(0.0f);
        for (; l + CRIBO_VL <= stop; l += CRIBO_VL) {
            const cribo_vf v = vf_exp(vf_load(e + l) - mv);
            vf_store(e + l, v);
            z += v;
            if (y != NULL) {
                d += v * vf_load(y + l);
            }
        }
        for (int i = 0; i < CRIBO_VL; i++) {
            zs += (double)z[i];
            ds += (double)d[i];
        }
    }
    for (; l < L; l++) {
        const float v = cribo_expf(e[l] - m);
        e[l] = v;
        zs += (double)v;
        ds += y != NULL ? (double)(v * y[l]) : 0.0;
    }
    *dot = ds;
    return zs;
}

/* Pass 3: g = cs * es - ca * ea - cb * eb (eb may be NULL). */
CRIBO_SIMD
static void write_grad(float *g, const float *es, const float *ea, const float *eb,
                       float cs, float ca, float cb, int64_t L)
{
    const cribo_vf vs = vf_set1(cs);
    const cribo_vf va = vf_set1(ca);
    const cribo_vf vb = vf_set1(cb);
    int64_t l = 0;
    for (; l + CRIBO_VL <= L; l += CRIBO_VL) {
        cribo_vf v = vs * vf_load(es + l) - va * vf_load(ea + l);
        if (eb != NULL) {
            v = v - vb * vf_load(eb + l);
        }
        vf_store(g + l, v);
    }
    for (; l < L; l++) {
        float v = cs * es[l] - ca * ea[l];
        if (eb != NULL) {
            v = v - cb * eb[l];
        }
        g[l] = v;
    }
}

static void softmax_cross_entropy_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    softmax_cross_entropy_job *job = (softmax_cross_entropy_job *)ctx;
    const int64_t L = job->L;
    char *base = job->work + (size_t)tid * job->ws;
    float *xs = (float *)base;
    float *xa = (float *)(base + cribo_align64((size_t)L * sizeof(float)));
    float *xb = (float *)(base + 2 * cribo_align64((size_t)L * sizeof(float)));
    for (int64_t r = begin; r < end; r++) {
        const double wa = job->wa != NULL ? (double)job->wa[r] : 1.0;
        const double wb = job->wb != NULL ? (double)job->wb[r] : 0.0;
        const int use_b = job->tb != NULL && wb != 0.0;
        /* Pass 1: scaled logits, finiteness, maxima. */
        float ms = 0.0f;
        float ma = 0.0f;
        float mb = 0.0f;
        int bad = 0;
        if (!scale_max_row(xs, job->s + r * L, NULL, (float)job->inv_s, L, &ms)) {
            bad = CRIBO_ENONFINITE_S;
        } else if (!scale_max_row(xa, job->ta + r * L, job->ca, (float)job->inv_a, L, &ma)) {
            bad = CRIBO_ENONFINITE_TA;
        } else if (use_b &&
                   !scale_max_row(xb, job->tb + r * L, job->cb, (float)job->inv_b, L, &mb)) {
            bad = CRIBO_ENONFINITE_TB;
        }
        if (bad) {
            job->bad[tid] = bad;
            return;
        }
        /* Pass 2: exponentials, normalisers, sum_l e_t[l] * x_s[l]. */
        double dot_a = 0.0;
        double dot_b = 0.0;
        double unused = 0.0;
        const double za = exp_row(xa, ma, xs, &dot_a, L);
        const double zb = use_b ? exp_row(xb, mb, xs, &dot_b, L) : 1.0;
        const double zs = exp_row(xs, ms, NULL, &unused, L); /* last: xs is overwritten */
        const double lse = (double)ms + log(zs);
        job->loss_a[r] = (float)(lse - dot_a / za);
        if (job->loss_b != NULL) {
            job->loss_b[r] = use_b ? (float)(lse - dot_b / zb) : 0.0f;
        }
        /* Pass 3: grad = ((wa + wb) p_s - wa p_a - wb p_b) / tau_s. */
        if (job->grad != NULL) {
            const float cs = (float)((wa + (use_b ? wb : 0.0)) * job->inv_s / zs);
            const float ca = (float)(wa * job->inv_s / za);
            const float cb = use_b ? (float)(wb * job->inv_s / zb) : 0.0f;
            write_grad(job->grad + r * L, xs, xa, use_b ? xb : NULL, cs, ca, cb, L);
        }
    }
}

int cribo_softmax_cross_entropy(float *loss_a, float *loss_b, float *grad,
                                const float *s, const float *ta, const float *tb,
                                const float *ca, const float *cb,
                                const float *wa, const float *wb,
                                int64_t R, int64_t L,
                                double student_temp, double temp_a, double temp_b,
                                void *work, int n_threads)
{
    const int T = cribo_thread_count(R, n_threads);
    softmax_cross_entropy_job job = {
        .loss_a = loss_a, .loss_b = loss_b, .grad = grad,
        .s = s, .ta = ta, .tb = tb, .ca = ca, .cb = cb, .wa = wa, .wb = wb, .L = L,
        .inv_s = 1.0 / student_temp, .inv_a = 1.0 / temp_a, .inv_b = 1.0 / temp_b,
        .work = (char *)work, .ws = cribo_softmax_cross_entropy_workspace_size(L),
    }; /* bad[] starts zero */
    cribo_parallel_for(R, T, softmax_cross_entropy_task, &job);
    return cribo_first_error(job.bad, T);
}

/* ------------------------------------------------------------------ centre */

#define CENTER_COLS 1024

typedef struct {
    float *out;
    const float *center;
    const float *x;
    int64_t R, L;
    double momentum;
} center_job;

CRIBO_SIMD
static void center_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    (void)tid;
    center_job *job = (center_job *)ctx;
    double acc[CENTER_COLS];
    /* begin/end count chunks of CENTER_COLS columns. */
    for (int64_t chunk = begin; chunk < end; chunk++) {
        const int64_t c0 = chunk * CENTER_COLS;
        const int64_t nc = job->L - c0 < CENTER_COLS ? job->L - c0 : CENTER_COLS;
        for (int64_t c = 0; c < nc; c++) {
            acc[c] = 0.0;
        }
        for (int64_t r = 0; r < job->R; r++) {
            const float *row = job->x + r * job->L + c0;
            for (int64_t c = 0; c < nc; c++) {
                acc[c] += (double)row[c];
            }
        }
        const double m = job->momentum;
        const double w = (1.0 - m) / (double)job->R;
        for (int64_t c = 0; c < nc; c++) {
            const double prev = job->center != NULL ? (double)job->center[c0 + c] : 0.0;
            job->out[c0 + c] = (float)(m * prev + w * acc[c]);
        }
    }
}

void cribo_update_center(float *out, const float *center, const float *x,
                         int64_t R, int64_t L, double momentum, int n_threads)
{
    center_job job = {out, center, x, R, L, momentum};
    cribo_parallel_for((L + CENTER_COLS - 1) / CENTER_COLS, n_threads, center_task, &job);
}
