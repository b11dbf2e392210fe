/* pool.c -- object pooling, docs/method.md §3.
 *
 * c_i^k = sum_n Qhat_i(n, k) z_i^n per view i, with Qhat the assignment whose columns
 * are L1-normalised within the view.  Hard labels make this a per-view segment mean
 * (O(N D), no matrix); soft weights go through one sgemm per (image, view).
 * Work is split over the 2B (image, view) pairs; each pair is one task, in either
 * direction: forward (tokens -> objects) or backward (d objects -> d tokens). */
#include <string.h>

#include "blas.h"
#include "cribo.h"
#include "workspace.h"

/* ------------------------------------------------------------------ workspace */

/* Per thread: hard pooling keeps sums acc (K, D) in double and the member counts
 * cnt (K); soft pooling keeps Qhat (N, K) and its reciprocal column sums colinv (K). */
typedef struct {
    double *acc;
    int64_t *cnt;
    float *qhat;
    double *colinv;
} pool_ws;

static size_t carve(pool_ws *w, char *base, int soft, int64_t N, int64_t D, int64_t K)
{
    size_t off = 0;
    if (soft) {
        CRIBO_TAKE(qhat, float, N * K);
        CRIBO_TAKE(colinv, double, K);
    } else {
        CRIBO_TAKE(acc, double, K * D);
        CRIBO_TAKE(cnt, int64_t, K);
    }
    return off;
}

size_t cribo_pool_workspace_size(int64_t D, int64_t K)
{
    pool_ws w = {0};
    return carve(&w, NULL, 0, 0, D, K);
}

size_t cribo_pool_soft_workspace_size(int64_t N, int64_t K)
{
    pool_ws w = {0};
    return carve(&w, NULL, 1, N, 0, K);
}

/* ------------------------------------------------------------------ hard */

/* Members of each cluster in one view. */
static void count_members(int64_t *cnt, const int64_t *lab, int64_t N, int64_t K)
{
    memset(cnt, 0, (size_t)K * sizeof(int64_t));
    for (int64_t n = 0; n < N; n++) {
        if (lab[n] >= 0) {
            cnt[lab[n]]++;
        }
    }
}

/* out (K, D) = mean of the member rows of z (N, D), summed in double (zeros for an
 * empty cluster). */
static void segment_mean(float *out, const float *z, const int64_t *lab,
                         int64_t N, int64_t D, int64_t K, const pool_ws *w)
{
    double *acc = w->acc;
    memset(acc, 0, (size_t)(K * D) * sizeof(double));
    count_members(w->cnt, lab, N, K);
    for (int64_t n = 0; n < N; n++) {
        if (lab[n] < 0) {
            continue;
        }
        double *a = acc + lab[n] * D;
        const float *zn = z + n * D;
        for (int64_t e = 0; e < D; e++) {
            a[e] += (double)zn[e];
        }
    }
    for (int64_t k = 0; k < K; k++) {
        const double inv = w->cnt[k] > 0 ? 1.0 / (double)w->cnt[k] : 0.0;
        for (int64_t e = 0; e < D; e++) {
            out[k * D + e] = (float)(acc[k * D + e] * inv);
        }
    }
}

/* Its gradient: dz (N, D) row n = dout (K, D) row lab[n] / |lab[n]|, zeros for -1. */
static void segment_mean_backward(float *dz, const float *dout, const int64_t *lab,
                                  int64_t N, int64_t D, int64_t K, const pool_ws *w)
{
    count_members(w->cnt, lab, N, K);
    for (int64_t n = 0; n < N; n++) {
        float *dzn = dz + n * D;
        if (lab[n] < 0) {
            memset(dzn, 0, (size_t)D * sizeof(float));
            continue;
        }
        /* dz_n = dout_k / |k|: the same division the forward mean does. */
        const double inv = 1.0 / (double)w->cnt[lab[n]];
        const float *dk = dout + lab[n] * D;
        for (int64_t e = 0; e < D; e++) {
            dzn[e] = (float)((double)dk[e] * inv);
        }
    }
}

/* ------------------------------------------------------------------ soft */

/* qhat (N, K) = w with each column L1-normalised (sums and scaling in double; a
 * zero column stays zero).  Normalising before the sgemm keeps every product a
 * convex combination of the tokens: unnormalised weights of large finite
 * magnitude would overflow the sgemm (w^T z) before the division, and a float
 * reciprocal of a large column sum would underflow. */
static void normalized_weights(float *qhat, double *colinv, const float *w, int64_t N, int64_t K)
{
    for (int64_t k = 0; k < K; k++) {
        colinv[k] = 0.0;
    }
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k++) {
            colinv[k] += (double)w[n * K + k];
        }
    }
    for (int64_t k = 0; k < K; k++) {
        colinv[k] = colinv[k] > 0.0 ? 1.0 / colinv[k] : 0.0;
    }
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k++) {
            qhat[n * K + k] = (float)((double)w[n * K + k] * colinv[k]);
        }
    }
}

/* Forward: out (K, D) = Qhat^T @ in (N, D).  Backward: out (N, D) = Qhat @ in (K, D).
 * One sgemm; only Qhat's transposition and the row counts change with the direction. */
static void soft_pool(float *out, const float *in, const float *weights, int backward,
                      int64_t N, int64_t D, int64_t K, const pool_ws *w)
{
    normalized_weights(w->qhat, w->colinv, weights, N, K);
    const int64_t rows_out = backward ? N : K;
    const int64_t rows_in = backward ? K : N;
    cribo_sgemm(CblasRowMajor, backward ? CblasNoTrans : CblasTrans, CblasNoTrans,
                (int)rows_out, (int)D, (int)rows_in,
                1.0f, w->qhat, (int)K, in, (int)D, 0.0f, out, (int)D);
}

/* ------------------------------------------------------------------ batch */

typedef struct {
    float *out;             /* forward: objects (B,2,K,D); backward: dtokens (B,2,N,D) */
    const float *in;        /* forward: tokens (B,2,N,D);  backward: dout (B,2,K,D) */
    const int64_t *labels;  /* hard: (B,2,N), else NULL */
    const float *weights;   /* soft: (B,2,N,K), else NULL */
    int backward;
    int64_t N, D, K;
    char *work;
    size_t ws;
} pool_job;

static void pool_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    const pool_job *job = (const pool_job *)ctx;
    const int64_t N = job->N, D = job->D, K = job->K;
    const int soft = job->weights != NULL;
    const int64_t rows_in = job->backward ? K : N;
    const int64_t rows_out = job->backward ? N : K;
    pool_ws w = {0};
    carve(&w, job->work + (size_t)tid * job->ws, soft, N, D, K);
    for (int64_t v = begin; v < end; v++) { /* v = b * 2 + i */
        const float *in = job->in + v * rows_in * D;
        float *out = job->out + v * rows_out * D;
        if (soft) {
            soft_pool(out, in, job->weights + v * N * K, job->backward, N, D, K, &w);
        } else if (job->backward) {
            segment_mean_backward(out, in, job->labels + v * N, N, D, K, &w);
        } else {
            segment_mean(out, in, job->labels + v * N, N, D, K, &w);
        }
    }
}

/* The four entry points: labels or weights (the other NULL), in either direction. */
static void pool_run(float *out, const float *in, const int64_t *labels, const float *weights,
                     int backward, int64_t B, int64_t N, int64_t D, int64_t K,
                     void *work, int n_threads)
{
    pool_job job = {out, in, labels, weights, backward, N, D, K, (char *)work,
                    weights != NULL ? cribo_pool_soft_workspace_size(N, K)
                                    : cribo_pool_workspace_size(D, K)};
    cribo_parallel_for(2 * B, n_threads, pool_task, &job);
}

void cribo_pool(float *out, const float *tokens, const int64_t *labels,
                int64_t B, int64_t N, int64_t D, int64_t K,
                void *work, int n_threads)
{
    pool_run(out, tokens, labels, NULL, 0, B, N, D, K, work, n_threads);
}

void cribo_pool_backward(float *dtokens, const float *dout, const int64_t *labels,
                         int64_t B, int64_t N, int64_t D, int64_t K,
                         void *work, int n_threads)
{
    pool_run(dtokens, dout, labels, NULL, 1, B, N, D, K, work, n_threads);
}

void cribo_pool_soft(float *out, const float *tokens, const float *weights,
                     int64_t B, int64_t N, int64_t D, int64_t K,
                     void *work, int n_threads)
{
    pool_run(out, tokens, NULL, weights, 0, B, N, D, K, work, n_threads);
}

void cribo_pool_soft_backward(float *dtokens, const float *dout, const float *weights,
                              int64_t B, int64_t N, int64_t D, int64_t K,
                              void *work, int n_threads)
{
    pool_run(dtokens, dout, NULL, weights, 1, B, N, D, K, work, n_threads);
}
