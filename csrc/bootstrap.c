/* bootstrap.c -- blocked top-k cosine search, SPEC §4 (and the dense evaluation).
 *
 * sim(m, q) = <x_m / |x_m|, y_q / |y_q|>, 0 where either vector is zero.
 * Each block of CRIBO_TOPK_BROWS bank rows and each chunk of CRIBO_TOPK_QROWS
 * queries is first copied L2-normalised (norms in double, so any finite magnitude
 * works), then one sgemm gives their similarities and each row of the block
 * updates a sorted top-k list.  The bank is read once:
 * threads split the bank blocks statically, each block's similarities come from a
 * gemm of the same shape whatever the thread count, and the per-thread lists are
 * merged by (similarity desc, index asc) -- so results are independent of the
 * number of threads, and ties go to the lowest bank index. */
#include <math.h>
#include <string.h>

#include "blas.h"
#include "cribo.h"
#include "vmath.h"
#include "workspace.h"

/* Per-thread layout: sims (QROWS, BROWS), qn (QROWS, D), bn (BROWS, D),
 * list_sim (M, k), list_idx (M, k). */
typedef struct {
    float *sims;
    float *qn;
    float *bn;
    float *lsim;
    int64_t *lidx;
} topk_ws;

static size_t carve(topk_ws *w, char *base, int64_t M, int64_t D, int64_t k)
{
    size_t off = 0;
    CRIBO_TAKE(sims, float, (int64_t)CRIBO_TOPK_QROWS * CRIBO_TOPK_BROWS);
    CRIBO_TAKE(qn, float, (int64_t)CRIBO_TOPK_QROWS * D);
    CRIBO_TAKE(bn, float, (int64_t)CRIBO_TOPK_BROWS * D);
    CRIBO_TAKE(lsim, float, M * k);
    CRIBO_TAKE(lidx, int64_t, M * k);
    return off;
}

size_t cribo_topk_workspace_size(int64_t M, int64_t D, int64_t k, int n_threads)
{
    topk_ws w = {0};
    const int T = n_threads < 1 ? 1 : n_threads;
    return (size_t)T * carve(&w, NULL, M, D, k);
}

typedef struct {
    const float *queries;
    const float *bank;
    const int64_t *qids;
    const int64_t *bids;
    int64_t M, Q, D, k;
    char *work;
    size_t tb;          /* bytes per thread */
    int bad[256];       /* per thread: a non-finite norm was met */
} topk_job;

/* out (n, D) = rows of x L2-normalised (norms in double; a zero row stays zero).
 * Returns 0 if a row is not finite. */
CRIBO_SIMD
static int normalized_copy(float *out, const float *x, int64_t n, int64_t D)
{
    int ok = 1;
    for (int64_t i = 0; i < n; i++) {
        const float *r = x + i * D;
        double ss = 0.0;
        for (int64_t e = 0; e < D; e++) {
            ss += (double)r[e] * (double)r[e];
        }
        if (!(ss <= 1e300)) { /* NaN, inf, or beyond what a float row can hold */
            ok = 0;
            ss = 0.0;
        }
        const double inv = ss > 0.0 ? 1.0 / sqrt(ss) : 0.0;
        for (int64_t e = 0; e < D; e++) {
            out[i * D + e] = (float)((double)r[e] * inv);
        }
    }
    return ok;
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

static void search_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    topk_job *job = (topk_job *)ctx;
    const int64_t M = job->M, Q = job->Q, D = job->D, k = job->k;
    topk_ws w = {0};
    carve(&w, job->work + (size_t)tid * job->tb, M, D, k);
    for (int64_t i = 0; i < M * k; i++) {
        w.lsim[i] = -INFINITY;
        w.lidx[i] = -1;
    }
    for (int64_t blk = begin; blk < end; blk++) {
        const int64_t q0 = blk * CRIBO_TOPK_BROWS;
        const int64_t nb = Q - q0 < CRIBO_TOPK_BROWS ? Q - q0 : CRIBO_TOPK_BROWS;
        if (!normalized_copy(w.bn, job->bank + q0 * D, nb, D)) {
            job->bad[tid] = 1;
            return;
        }
        for (int64_t m0 = 0; m0 < M; m0 += CRIBO_TOPK_QROWS) {
            const int64_t mq = M - m0 < CRIBO_TOPK_QROWS ? M - m0 : CRIBO_TOPK_QROWS;
            if (!normalized_copy(w.qn, job->queries + m0 * D, mq, D)) {
                job->bad[tid] = 1;
                return;
            }
            /* (mq,nb) = (mq,D) @ (nb,D)^T */
            cribo_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mq, (int)nb, (int)D,
                        1.0f, w.qn, (int)D, w.bn, (int)D, 0.0f, w.sims, CRIBO_TOPK_BROWS);
            for (int64_t i = 0; i < mq; i++) {
                const int64_t m = m0 + i;
                const float *row = w.sims + i * CRIBO_TOPK_BROWS;
                float *ls = w.lsim + m * k;
                int64_t *li = w.lidx + m * k;
                if (li[k - 1] >= 0 && cribo_row_max(row, nb) <= ls[k - 1]) {
                    continue; /* nothing in this block beats the current k-th */
                }
                const int64_t qid = job->qids != NULL ? job->qids[m] : 0;
                for (int64_t j = 0; j < nb; j++) {
                    const float s = row[j];
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

/* True if (sa, ia) ranks before (sb, ib): higher similarity, then lower index. */
static int ranks_before(float sa, int64_t ia, float sb, int64_t ib)
{
    return sa > sb || (sa == sb && ia < ib);
}

int cribo_topk_cosine(int64_t *idx, float *sim, const float *queries, const float *bank,
                      const int64_t *query_ids, const int64_t *bank_ids,
                      int64_t M, int64_t Q, int64_t D, int64_t k,
                      void *work, int n_threads)
{
    int T = n_threads < 1 ? 1 : (n_threads > 256 ? 256 : n_threads);
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
    topk_ws w = {0};
    job.tb = carve(&w, NULL, M, D, k);

    cribo_parallel_for(n_blocks, T, search_task, &job);
    for (int t = 0; t < T; t++) {
        if (job.bad[t]) {
            return CRIBO_ENONFINITE;
        }
    }
    /* Merge the per-thread lists: repeatedly take the best head (thread t holds a
     * contiguous range of bank blocks, and ties go to the lower index). */
    topk_ws tw[256];
    for (int t = 0; t < T; t++) {
        carve(&tw[t], job.work + (size_t)t * job.tb, M, D, k);
    }
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
                const float s = tw[t].lsim[m * k + head[t]];
                const int64_t i = tw[t].lidx[m * k + head[t]];
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
