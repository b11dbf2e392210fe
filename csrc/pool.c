/* pool.c -- object pooling, docs/method.md §3.
 *
 * c_i^k = sum_n Qhat_i(n, k) z_i^n per view i, with Qhat the assignment whose columns
 * are L1-normalised within the view.  Hard labels make this a per-view segment mean
 * (O(N D), no matrix); soft weights go through one sgemm per (image, view).
 * Work is split over the 2B (image, view) pairs; each pair is one task. */
#include <string.h>

#include "blas.h"
#include "cribo.h"
#include "workspace.h"

/* ------------------------------------------------------------------ hard */

size_t cribo_pool_workspace_size(int64_t D, int64_t K)
{
    return cribo_align64((size_t)(K * D) * sizeof(double)) + cribo_align64((size_t)K * sizeof(int64_t));
}

typedef struct {
    float *out;          /* forward: (B,2,K,D); backward: dtokens (B,2,N,D) */
    const float *in;     /* forward: tokens;    backward: dout */
    const int64_t *labels;
    const float *weights;
    int64_t N, D, K;
    char *work;
    size_t ws;
} pool_job;

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

static void pool_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    pool_job *job = (pool_job *)ctx;
    const int64_t N = job->N, D = job->D, K = job->K;
    char *base = job->work + (size_t)tid * job->ws;
    double *acc = (double *)base;
    int64_t *cnt = (int64_t *)(base + cribo_align64((size_t)(K * D) * sizeof(double)));
    for (int64_t v = begin; v < end; v++) { /* v = b * 2 + i */
        const float *z = job->in + v * N * D;
        const int64_t *lab = job->labels + v * N;
        float *out = job->out + v * K * D;
        memset(acc, 0, (size_t)(K * D) * sizeof(double));
        count_members(cnt, lab, N, K);
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
            const double inv = cnt[k] > 0 ? 1.0 / (double)cnt[k] : 0.0;
            for (int64_t e = 0; e < D; e++) {
                out[k * D + e] = (float)(acc[k * D + e] * inv);
            }
        }
    }
}

void cribo_pool(float *out, const float *tokens, const int64_t *labels,
                        int64_t B, int64_t N, int64_t D, int64_t K,
                        void *work, int n_threads)
{
    pool_job job = {out, tokens, labels, NULL, N, D, K, (char *)work,
                    cribo_pool_workspace_size(D, K)};
    cribo_parallel_for(2 * B, n_threads, pool_task, &job);
}

static void pool_backward_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    pool_job *job = (pool_job *)ctx;
    const int64_t N = job->N, D = job->D, K = job->K;
    char *base = job->work + (size_t)tid * job->ws;
    int64_t *cnt = (int64_t *)(base + cribo_align64((size_t)(K * D) * sizeof(double)));
    for (int64_t v = begin; v < end; v++) {
        const float *dout = job->in + v * K * D;
        const int64_t *lab = job->labels + v * N;
        float *dz = job->out + v * N * D;
        count_members(cnt, lab, N, K);
        for (int64_t n = 0; n < N; n++) {
            float *dzn = dz + n * D;
            if (lab[n] < 0) {
                memset(dzn, 0, (size_t)D * sizeof(float));
                continue;
            }
            /* dz_n = dout_k / |k|: the same division the forward mean does. */
            const double inv = 1.0 / (double)cnt[lab[n]];
            const float *dk = dout + lab[n] * D;
            for (int64_t e = 0; e < D; e++) {
                dzn[e] = (float)((double)dk[e] * inv);
            }
        }
    }
}

void cribo_pool_backward(float *dtokens, const float *dout, const int64_t *labels,
                         int64_t B, int64_t N, int64_t D, int64_t K,
                         void *work, int n_threads)
{
    pool_job job = {dtokens, dout, labels, NULL, N, D, K, (char *)work,
                    cribo_pool_workspace_size(D, K)};
    cribo_parallel_for(2 * B, n_threads, pool_backward_task, &job);
}

/* ------------------------------------------------------------------ soft */

size_t cribo_pool_soft_workspace_size(int64_t N, int64_t K)
{
    return cribo_align64((size_t)(N * K) * sizeof(float)) + cribo_align64((size_t)K * sizeof(double));
}

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

static void pool_soft_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    pool_job *job = (pool_job *)ctx;
    const int64_t N = job->N, D = job->D, K = job->K;
    char *base = job->work + (size_t)tid * job->ws;
    float *qhat = (float *)base;
    double *colinv = (double *)(base + cribo_align64((size_t)(N * K) * sizeof(float)));
    for (int64_t v = begin; v < end; v++) {
        const float *z = job->in + v * N * D;
        const float *w = job->weights + v * N * K;
        float *out = job->out + v * K * D;
        normalized_weights(qhat, colinv, w, N, K);
        /* (K,D) = (N,K)^T @ (N,D) */
        cribo_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)K, (int)D, (int)N,
                    1.0f, qhat, (int)K, z, (int)D, 0.0f, out, (int)D);
    }
}

void cribo_pool_soft(float *out, const float *tokens, const float *weights,
                             int64_t B, int64_t N, int64_t D, int64_t K,
                             void *work, int n_threads)
{
    pool_job job = {out, tokens, NULL, weights, N, D, K, (char *)work,
                    cribo_pool_soft_workspace_size(N, K)};
    cribo_parallel_for(2 * B, n_threads, pool_soft_task, &job);
}

static void pool_soft_backward_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    pool_job *job = (pool_job *)ctx;
    const int64_t N = job->N, D = job->D, K = job->K;
    char *base = job->work + (size_t)tid * job->ws;
    float *qhat = (float *)base;
    double *colinv = (double *)(base + cribo_align64((size_t)(N * K) * sizeof(float)));
    for (int64_t v = begin; v < end; v++) {
        const float *dout = job->in + v * K * D;
        const float *w = job->weights + v * N * K;
        float *dz = job->out + v * N * D;
        normalized_weights(qhat, colinv, w, N, K);
        /* (N,D) = (N,K) @ (K,D) */
        cribo_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)N, (int)D, (int)K,
                    1.0f, qhat, (int)K, dout, (int)D, 0.0f, dz, (int)D);
    }
}

void cribo_pool_soft_backward(float *dtokens, const float *dout, const float *weights,
                              int64_t B, int64_t N, int64_t D, int64_t K,
                              void *work, int n_threads)
{
    pool_job job = {dtokens, dout, NULL, weights, N, D, K, (char *)work,
                    cribo_pool_soft_workspace_size(N, K)};
    cribo_parallel_for(2 * B, n_threads, pool_soft_backward_task, &job);
}
