/* queue.c -- blocked top-k cosine search with an exact ranking, docs/method.md §4 (and
 * the dense evaluation).
 *
 * The score.  For a query row x and a bank row y (the caller's float rows),
 *   score(x, y) = dot(x, y) / (|x| |y|),   0 where either row is zero,
 * with dot = cribo_dot_f64 (vmath.h: products exact in double, sums in one fixed
 * order) and |x| = sqrt(cribo_dot_f64(x, x)).  It depends on the values of the two
 * rows alone, so equal rows score bit-equally wherever they sit: in any tile, on
 * any thread, under any query chunking, CPU or BLAS kernel.  The result is the k
 * best bank rows by (score desc, index asc), and sim = the score rounded to float.
 *
 * The scan.  Each block of CRIBO_TOPK_BROWS bank rows and each chunk of
 * CRIBO_TOPK_QROWS queries are copied L2-normalised to float, and one sgemm gives
 * their approximate similarities s~ (the bank is read once).  Each thread keeps,
 * per query, a list of the k best (score, index) met so far, sorted by (score desc,
 * index asc).  A candidate is re-scored with `score` unless
 *   the list is full and s~ + E < t,   t = the list's k-th (exact) score,
 * where E bounds |s~ - score| whatever the BLAS kernel does (below).  A skipped
 * row has score < t, so it could not enter; a row scoring exactly t could not
 * either, since bank indices arrive in increasing order and an equal score never
 * displaces a lower index.  So each list is exactly the top k of its thread's
 * rows, by construction.  A whole row of the tile is skipped when its maximum
 * plus E is below t.  Near-ties are all re-scored (a bank of identical rows
 * re-scores every row: correct, only slower); nothing is allocated.
 *
 * Threads split the bank blocks statically and their lists are merged by
 * (score desc, index asc): the result does not depend on the number of threads.
 *
 * The bound E (the scan's only use of floating-point error analysis).  Notation:
 * u = 2^-24 and v = 2^-53 the unit roundoffs of float and double, eta = 2^-150 the
 * largest absolute error of a float result that falls in the subnormal range
 * (half the subnormal spacing), gamma_n = n u / (1 - n u), D the row length;
 * xh = x / |x| and yh = y / |y| in exact arithmetic, c = <xh, yh> in [-1, 1].
 *  (a) The normalised copies.  |x|^2 = cribo_dot_f64(x, x) is within gamma_D(v) of
 *      the truth (D - 1 additions of exact products), its sqrt within half that
 *      plus v, then the reciprocal and the product x_i / |x| add v each: the
 *      double value is xh_i (1 + e), |e| <= nu = (D + 4) v.  Rounded to float:
 *        xn_i = xh_i (1 + th_i) + a_i,  |th_i| <= rho = u + nu (1 + u),  |a_i| <= eta
 *      (a_i only where the result is subnormal), so |xn| <= N = 1 + rho + eta sqrt(D).
 *  (b) The copies' exact dot P = sum xn_i yn_i against c (Cauchy-Schwarz:
 *      sum |xh_i yh_i| <= 1, sum |xh_i| <= sqrt(D)):
 *        |P - c| <= (2 rho + rho^2) + 2 (1 + rho) eta sqrt(D) + D eta^2.
 *  (c) The sgemm: s~ is a float dot product of xn and yn in any order of summation,
 *      blocked or not, with or without FMA; each of the D products reaches s~
 *      through at most D roundings.  With the standard model with gradual
 *      underflow, fl(a op b) = (a op b)(1 + d) + e, |d| <= u, |e| <= eta (e = 0 for
 *      additions, whose subnormal results are exact), the classical bound for a
 *      dot product in any order (Higham, Accuracy and Stability of Numerical
 *      Algorithms, 2nd ed., §3.1) gives
 *        |s~ - P| <= gamma_D sum |xn_i yn_i| + D eta (1 + gamma_D)
 *                 <= gamma_D N^2 + D eta (1 + gamma_D).
 *  (d) The score against c: the dot is within gamma_D(v) |x| |y| (its products are
 *      0 or at least 2^-298 in magnitude: no underflow), the norms within
 *      (D / 2 + 1) v each, the product of the norms and the division add v each:
 *        |score - c| <= 4 (D + 4) v.
 *  E = (b) + (c) + (d), enlarged by a relative 2^-20 and an absolute 2^-40 that
 *  cover the roundings of E itself, of t - E and of the comparison (all in double,
 *  |t| <= 2).  For D u > 1/2 the bound is void and E = +inf: every row is re-scored.
 *  At D = 384, E = 2.3e-5 (gamma_D dominates).  A bank without near-ties re-scores
 *  about k (1 + ln(Q / k)) rows per query -- the updates of a running top k (294
 *  of 200 000 rows at k = 30, 13 at k = 1, measured) -- a cost negligible next to
 *  the sgemm's Q D per query. */
#include <math.h>

#include "blas.h"
#include "cribo.h"
#include "vmath.h"
#include "workspace.h"

/* Per-thread layout: sims (QROWS, BROWS), qn (QROWS, D), bn (BROWS, D), the norms
 * qnrm (QROWS) and bnrm (BROWS), list_score (M, k) double, list_idx (M, k). */
typedef struct {
    float *sims;
    float *qn;
    float *bn;
    double *qnrm;
    double *bnrm;
    double *lsc;
    int64_t *lidx;
} topk_ws;

static size_t carve(topk_ws *w, char *base, int64_t M, int64_t D, int64_t k)
{
    size_t off = 0;
    CRIBO_TAKE(sims, float, (int64_t)CRIBO_TOPK_QROWS * CRIBO_TOPK_BROWS);
    CRIBO_TAKE(qn, float, (int64_t)CRIBO_TOPK_QROWS * D);
    CRIBO_TAKE(bn, float, (int64_t)CRIBO_TOPK_BROWS * D);
    CRIBO_TAKE(qnrm, double, CRIBO_TOPK_QROWS);
    CRIBO_TAKE(bnrm, double, CRIBO_TOPK_BROWS);
    CRIBO_TAKE(lsc, double, M * k);
    CRIBO_TAKE(lidx, int64_t, M * k);
    return off;
}

size_t cribo_topk_workspace_size(int64_t M, int64_t D, int64_t k, int n_threads)
{
    topk_ws w = {0};
    const int T = n_threads < 1 ? 1 : n_threads;
    return (size_t)T * carve(&w, NULL, M, D, k);
}

double cribo_topk_error_bound(int64_t D)
{
    const double u = 0x1p-24, v = 0x1p-53, eta = 0x1p-150;
    const double d = (double)D;
    if (!(d * u <= 0.5)) {
        return INFINITY;
    }
    const double sd = sqrt(d);
    const double nu = (d + 4.0) * v;
    const double rho = u + nu * (1.0 + u);
    const double gamma = d * u / (1.0 - d * u);
    const double N = 1.0 + rho + eta * sd;
    const double copies = (2.0 * rho + rho * rho) + 2.0 * (1.0 + rho) * eta * sd + d * eta * eta;
    const double gemm = gamma * N * N + d * eta * (1.0 + gamma);
    const double exact = 4.0 * (d + 4.0) * v;
    return (copies + gemm + exact) * (1.0 + 0x1p-20) + 0x1p-40;
}

typedef struct {
    const float *queries;
    const float *bank;
    const int64_t *qids;
    const int64_t *bids;
    int64_t M, Q, D, k;
    double bound;       /* E */
    char *work;
    size_t tb;          /* bytes per thread */
    int bad[CRIBO_MAX_THREADS]; /* per thread: CRIBO_ENONFINITE once a non-finite row is met */
} topk_job;

/* out (n, D) = rows of x L2-normalised, nrm (n) = their norms sqrt(cribo_dot_f64(r, r))
 * (a zero row stays zero, norm 0).  Returns 0 if a row is not finite. */
CRIBO_SIMD
static int normalized_copy(float *out, double *nrm, const float *x, int64_t n, int64_t D)
{
    int ok = 1;
    for (int64_t i = 0; i < n; i++) {
        const float *r = x + i * D;
        double ss = cribo_dot_f64(r, r, D);
        if (!(ss <= 1e300)) { /* NaN or inf: a finite float row stays below 2^287 */
            ok = 0;
            ss = 0.0;
        }
        const double norm = sqrt(ss);
        const double inv = norm > 0.0 ? 1.0 / norm : 0.0;
        nrm[i] = norm;
        for (int64_t e = 0; e < D; e++) {
            out[i * D + e] = (float)((double)r[e] * inv);
        }
    }
    return ok;
}

/* Inserts (s, q) into the sorted list (ls, li) of length k; the caller has checked
 * that it beats the last entry or that the list is not full.  Bank indices come in
 * increasing order, so an equal score never displaces an earlier (lower) index. */
static void insert(double *ls, int64_t *li, int64_t k, double s, int64_t q)
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

/* One query row x (norm nx) against one block of nb bank rows starting at q0:
 * row (nb) the sgemm similarities, ls/li the query's list. */
CRIBO_SIMD
static void scan_row(const topk_job *job, const float *row, const float *x, double nx,
                     const double *bnrm, int64_t q0, int64_t nb, int64_t qid,
                     double *ls, int64_t *li)
{
    const int64_t k = job->k, D = job->D;
    const float *bank = job->bank + q0 * D;
    /* A candidate is re-scored unless its s~ is below thr = t - E. */
    double thr = li[k - 1] >= 0 ? ls[k - 1] - job->bound : -INFINITY;
    if ((double)cribo_row_max(row, nb) < thr) {
        return; /* nothing in this block can reach the current k-th */
    }
    for (int64_t j = 0; j < nb; j++) {
        if ((double)row[j] < thr) {
            continue;
        }
        if (job->bids != NULL && job->bids[q0 + j] == qid) {
            continue;
        }
        const double ny = bnrm[j];
        const double s = nx > 0.0 && ny > 0.0 ? cribo_dot_f64(x, bank + j * D, D) / (nx * ny)
                                              : 0.0;
        if (li[k - 1] < 0 || s > ls[k - 1]) {
            insert(ls, li, k, s, q0 + j);
            if (li[k - 1] >= 0) {
                thr = ls[k - 1] - job->bound;
            }
        }
    }
}

static void search_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    topk_job *job = (topk_job *)ctx;
    const int64_t M = job->M, Q = job->Q, D = job->D, k = job->k;
    topk_ws w = {0};
    carve(&w, job->work + (size_t)tid * job->tb, M, D, k);
    for (int64_t i = 0; i < M * k; i++) {
        w.lsc[i] = -INFINITY;
        w.lidx[i] = -1;
    }
    for (int64_t blk = begin; blk < end; blk++) {
        const int64_t q0 = blk * CRIBO_TOPK_BROWS;
        const int64_t nb = Q - q0 < CRIBO_TOPK_BROWS ? Q - q0 : CRIBO_TOPK_BROWS;
        if (!normalized_copy(w.bn, w.bnrm, job->bank + q0 * D, nb, D)) {
            job->bad[tid] = CRIBO_ENONFINITE;
            return;
        }
        for (int64_t m0 = 0; m0 < M; m0 += CRIBO_TOPK_QROWS) {
            const int64_t mq = M - m0 < CRIBO_TOPK_QROWS ? M - m0 : CRIBO_TOPK_QROWS;
            if (!normalized_copy(w.qn, w.qnrm, job->queries + m0 * D, mq, D)) {
                job->bad[tid] = CRIBO_ENONFINITE;
                return;
            }
            /* (mq,nb) = (mq,D) @ (nb,D)^T */
            cribo_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mq, (int)nb, (int)D,
                        1.0f, w.qn, (int)D, w.bn, (int)D, 0.0f, w.sims, CRIBO_TOPK_BROWS);
            for (int64_t i = 0; i < mq; i++) {
                const int64_t m = m0 + i;
                scan_row(job, w.sims + i * CRIBO_TOPK_BROWS, job->queries + m * D, w.qnrm[i],
                         w.bnrm, q0, nb, job->qids != NULL ? job->qids[m] : 0,
                         w.lsc + m * k, w.lidx + m * k);
            }
        }
    }
}

/* True if (sa, ia) ranks before (sb, ib): higher score, then lower index. */
static int ranks_before(double sa, int64_t ia, double sb, int64_t ib)
{
    return sa > sb || (sa == sb && ia < ib);
}

int cribo_topk_cosine(int64_t *idx, float *sim, const float *queries, const float *bank,
                      const int64_t *query_ids, const int64_t *bank_ids,
                      int64_t M, int64_t Q, int64_t D, int64_t k,
                      void *work, int n_threads)
{
    const int64_t n_blocks = (Q + CRIBO_TOPK_BROWS - 1) / CRIBO_TOPK_BROWS;
    const int T = cribo_thread_count(n_blocks, n_threads);
    topk_ws w = {0};
    topk_job job = {
        .queries = queries, .bank = bank, .qids = query_ids, .bids = bank_ids,
        .M = M, .Q = Q, .D = D, .k = k, .bound = cribo_topk_error_bound(D),
        .work = (char *)work, .tb = carve(&w, NULL, M, D, k),
    }; /* bad[] starts zero */

    cribo_parallel_for(n_blocks, T, search_task, &job);
    const int err = cribo_first_error(job.bad, T);
    if (err != CRIBO_OK) {
        return err;
    }
    /* Merge the per-thread lists: repeatedly take the best head (thread t holds a
     * contiguous range of bank blocks, and ties go to the lower index). */
    topk_ws tw[CRIBO_MAX_THREADS];
    for (int t = 0; t < T; t++) {
        carve(&tw[t], job.work + (size_t)t * job.tb, M, D, k);
    }
    for (int64_t m = 0; m < M; m++) {
        int64_t head[CRIBO_MAX_THREADS];
        for (int t = 0; t < T; t++) {
            head[t] = 0;
        }
        for (int64_t r = 0; r < k; r++) {
            int best = -1;
            double bs = -INFINITY;
            int64_t bi = -1;
            for (int t = 0; t < T; t++) {
                if (head[t] >= k) {
                    continue;
                }
                const double s = tw[t].lsc[m * k + head[t]];
                const int64_t i = tw[t].lidx[m * k + head[t]];
                if (i >= 0 && (best < 0 || ranks_before(s, i, bs, bi))) {
                    best = t;
                    bs = s;
                    bi = i;
                }
            }
            idx[m * k + r] = bi;
            sim[m * k + r] = bi >= 0 ? (float)bs : -INFINITY;
            if (best >= 0) {
                head[best]++;
            }
        }
    }
    return CRIBO_OK;
}
