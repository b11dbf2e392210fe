/* bootstrap.c -- blocked top-k cosine search, SPEC §4 (and the dense evaluation).
 *
 * sim(m, q) = <x_m, y_q> / (|x_m| |y_q|), 0 where either vector is zero.
 * The raw products come from sgemm on blocks of CRIBO_TOPK_QROWS queries x
 * CRIBO_TOPK_BROWS bank rows, scaled by the inverse norms (computed in double),
 * then each row of the block updates a sorted top-k list.  The bank is read once:
 * threads split the bank blocks statically, each block's similarities come from a
 * gemm of the same shape whatever the thread count, and the per-thread lists are
 * merged by (similarity desc, index asc) -- so results are independent of the
 * number of threads, and ties go to the lowest bank index. */
#include <math.h>
#include <string.h>

#include "blas.h"
#include "cribo.h"
#include "vmath.h"

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Per-thread layout: sims (QROWS, BROWS), binv (BROWS), list_sim (M, k), list_idx (M, k).
 * Shared, after all threads: qinv (M). */
static size_t thread_bytes(int64_t M, int64_t k)
{
    return align64((size_t)CRIBO_TOPK_QROWS * CRIBO_TOPK_BROWS * sizeof(float)) +
           align64((size_t)CRIBO_TOPK_BROWS * sizeof(float)) +
           align64((size_t)(M * k) * sizeof(float)) +
           align64((size_t)(M * k) * sizeof(int64_t));
}

size_t cribo_topk_workspace_size(int64_t M, int64_t k, int n_threads)
{
    const int T = n_threads < 1 ? 1 : n_threads;
    return (size_t)T * thread_bytes(M, k) + align64((size_t)M * sizeof(float));
}

typedef struct {
    const float *queries;
    const float *bank;
    const int64_t *qids;
    const int64_t *bids;
    int64_t M, Q, D, k;
    char *work;
    size_t tb;          /* bytes per thread */
    float *qinv;        /* (M) */
    int bad[256];       /* per thread: a non-finite norm was met */
} topk_job;

/* Inverse L2 norm of each of n rows of x (n, D); returns 0 if one is not finite. */
static int inverse_norms(float *inv, const float *x, int64_t n, int64_t D)
{
    int ok = 1;
    for (int64_t i = 0; i < n; i++) {
        const float *r = x + i * D;
        double ss = 0.0;
        for (int64_t e = 0; e < D; e++) {
            ss += (double)r[e] * (double)r[e];
        }
        if (!(ss <= 1e300)) { /* NaN or inf */
            ok = 0;
            inv[i] = 0.0f;
            continue;
        }
        inv[i] = ss > 0.0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
    }
    return ok;
}

static void qnorm_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    topk_job *job = (topk_job *)ctx;
    if (!inverse_norms(job->qinv + begin, job->queries + begin * job->D, end - begin, job->D)) {
        job->bad[tid] = 1;
    }
}

/* Inserts (s, q) into the sorted list (ls, li) of length k if it beats the last entry.
 * Called with bank indices in increasing order, so an equal similarity never
 * displaces an earlier (lower) index. */
static void insert(float *ls, int64_t *li, int64_t k, float s, int64_t q)
{
    int64_t pos = k - 1;
    while (pos > 0 && ls[pos - 1] < s) {
        ls[pos] = ls[pos - 1];
        li[pos] = li[pos - 1];
        pos--;
    }
    ls[pos] = s;
    li[pos] = q;
}

/* max_j (raw[j] * qi) * binv[j]: the largest cosine similarity in one row of a block
 * (the same expression the scan below evaluates, so the two agree exactly). */
CRIBO_SIMD
static float scaled_row_max(const float *raw, float qi, const float *binv, int64_t nb)
{
    const cribo_vf q = vf_set1(qi);
    cribo_vf m = vf_set1(-INFINITY);
    int64_t j = 0;
    for (; j + CRIBO_VL <= nb; j += CRIBO_VL) {
        m = vf_max(m, (vf_load(raw + j) * q) * vf_load(binv + j));
    }
    float r = vf_hmax(m);
    for (; j < nb; j++) {
        const float v = (raw[j] * qi) * binv[j];
        r = v > r ? v : r;
    }
    return r;
}

static void search_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    topk_job *job = (topk_job *)ctx;
    const int64_t M = job->M, Q = job->Q, D = job->D, k = job->k;
    char *base = job->work + (size_t)tid * job->tb;
    float *sims = (float *)base;
    base += align64((size_t)CRIBO_TOPK_QROWS * CRIBO_TOPK_BROWS * sizeof(float));
    float *binv = (float *)base;
    base += align64((size_t)CRIBO_TOPK_BROWS * sizeof(float));
    float *lsim = (float *)base;
    base += align64((size_t)(M * k) * sizeof(float));
    int64_t *lidx = (int64_t *)base;

    for (int64_t i = 0; i < M * k; i++) {
        lsim[i] = -INFINITY;
        lidx[i] = -1;
    }
    for (int64_t blk = begin; blk < end; blk++) {
        const int64_t q0 = blk * CRIBO_TOPK_BROWS;
        const int64_t nb = Q - q0 < CRIBO_TOPK_BROWS ? Q - q0 : CRIBO_TOPK_BROWS;
        const float *bank = job->bank + q0 * D;
        if (!inverse_norms(binv, bank, nb, D)) {
            job->bad[tid] = 1;
            return;
        }
        for (int64_t m0 = 0; m0 < M; m0 += CRIBO_TOPK_QROWS) {
            const int64_t mq = M - m0 < CRIBO_TOPK_QROWS ? M - m0 : CRIBO_TOPK_QROWS;
            /* (mq,nb) = (mq,D) @ (nb,D)^T */
            cribo_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mq, (int)nb, (int)D,
                        1.0f, job->queries + m0 * D, (int)D, bank, (int)D,
                        0.0f, sims, CRIBO_TOPK_BROWS);
            for (int64_t i = 0; i < mq; i++) {
                const int64_t m = m0 + i;
                const float *row = sims + i * CRIBO_TOPK_BROWS;
                const float qi = job->qinv[m];
                float *ls = lsim + m * k;
                int64_t *li = lidx + m * k;
                if (li[k - 1] >= 0 && scaled_row_max(row, qi, binv, nb) <= ls[k - 1]) {
                    continue; /* nothing in this block beats the current k-th */
                }
                const int64_t qid = job->qids != NULL ? job->qids[m] : 0;
                for (int64_t j = 0; j < nb; j++) {
                    const float s = (row[j] * qi) * binv[j];
                    if (s > ls[k - 1] || li[k - 1] < 0) {
                        if (job->bids != NULL && job->bids[q0 + j] == qid) {
                            continue;
                        }
                        insert(ls, li, k, s, q0 + j);
                    }
                }
            }
        }
    }
}

/* True if (sa, ia) ranks before (sb, ib): higher similarity, then lower index; an
 * empty slot (index -1) ranks last. */
static int ranks_before(float sa, int64_t ia, float sb, int64_t ib)
{
    if (ia < 0) {
        return 0;
    }
    if (ib < 0) {
        return 1;
    }
    return sa > sb || (sa == sb && ia < ib);
}

int cribo_topk_cosine(int64_t *idx, float *sim, const float *queries, const float *bank,
                      const int64_t *query_ids, const int64_t *bank_ids,
                      int64_t M, int64_t Q, int64_t D, int64_t k,
                      void *work, int n_threads)
{
    int T = n_threads < 1 ? 1 : n_threads;
    if (T > 256) {
        T = 256;
    }
    const int64_t n_blocks = (Q + CRIBO_TOPK_BROWS - 1) / CRIBO_TOPK_BROWS;
    if ((int64_t)T > n_blocks) {
        T = (int)n_blocks;
    }
    topk_job job;
    memset(&job, 0, sizeof job);
    job.queries = queries;
    job.bank = bank;
    job.qids = query_ids;
    job.bids = bank_ids;
    job.M = M;
    job.Q = Q;
    job.D = D;
    job.k = k;
    job.work = (char *)work;
    job.tb = thread_bytes(M, k);
    job.qinv = (float *)((char *)work + (size_t)T * job.tb);

    cribo_parallel_for(M, T, qnorm_task, &job);
    for (int t = 0; t < T; t++) {
        if (job.bad[t]) {
            return CRIBO_ENONFINITE;
        }
    }
    cribo_parallel_for(n_blocks, T, search_task, &job);
    for (int t = 0; t < T; t++) {
        if (job.bad[t]) {
            return CRIBO_ENONFINITE;
        }
    }
    /* Merge the per-thread lists in thread order (each thread holds a contiguous
     * range of bank blocks, so ties are resolved by index either way). */
    for (int64_t m = 0; m < M; m++) {
        int64_t head[256];
        for (int t = 0; t < T; t++) {
            head[t] = 0;
        }
        for (int64_t r = 0; r < k; r++) {
            int best = -1;
            float bs = -INFINITY;
            int64_t bi = -1;
            for (int t = 0; t < T; t++) {
                if (head[t] >= k) {
                    continue;
                }
                char *base = (char *)work + (size_t)t * job.tb;
                base += align64((size_t)CRIBO_TOPK_QROWS * CRIBO_TOPK_BROWS * sizeof(float));
                base += align64((size_t)CRIBO_TOPK_BROWS * sizeof(float));
                const float *ls = (const float *)base + m * k;
                base += align64((size_t)(M * k) * sizeof(float));
                const int64_t *li = (const int64_t *)base + m * k;
                const float s = ls[head[t]];
                const int64_t i = li[head[t]];
                if (i >= 0 && (best < 0 || ranks_before(s, i, bs, bi))) {
                    best = t;
                    bs = s;
                    bi = i;
                }
            }
            idx[m * k + r] = bi;
            sim[m * k + r] = bi >= 0 ? bs : -INFINITY;
            if (best >= 0) {
                head[best]++;
            }
        }
    }
    return CRIBO_OK;
}
