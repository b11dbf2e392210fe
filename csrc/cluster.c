/* cluster.c -- joint-space clustering, SPEC §2.
 *
 * Per image (images run in parallel, each on one thread with single-threaded BLAS):
 *   Zn = rows of [z1; z2] L2-normalised                 (J, D)
 *   repeat n_iters times:
 *     Sim = Zn mu^T                                     (J, K)   one sgemm
 *     D   = positional cost of the current members      (J, K)   O(J^2), no (J, J, K) tensor
 *     S   = -lambda * minmax(-Sim + alpha * D)          (J, K)
 *     Sinkhorn on S, leaving potentials f (J), g (K) with log T = S + f + g
 *     labels = argmax_k log T (ties to the lowest k); marginals; centroids
 * Sinkhorn is the plain iteration (T = exp(S) / sum, rows to r, columns to c) in
 * one of two exact forms: for lambda <= 80 the exp domain (kernel exp(S - rowmax),
 * which cannot underflow in float there, and scaling vectors in double: two
 * matrix-vector products per round, no exponentials); above, the log domain
 * (every scaling kept as a logarithm, log-sum-exp in double), which stays finite
 * however large lambda is.  Both give the plain formula's T wherever exp(S) does
 * not underflow. */
#include <math.h>
#include <string.h>

#include "blas.h"
#include "cribo.h"
#include "vmath.h"

/* ---------------------------------------------------------------- workspace */

typedef struct {
    float *zn;       /* (J, D) normalised tokens */
    float *mu;       /* (K, D) centroids */
    float *s;        /* (J, K) Sim, then S = -lambda * M */
    float *dist;     /* (J, K) positional cost; the kernel exp(s - rowmax) in the
                        exp-domain Sinkhorn */
    double *acc;     /* (K, D) centroid sums */
    double *f;       /* (J) row potentials */
    double *g;       /* (K) column potentials */
    double *logc;    /* (K) log column marginals */
    double *colsum;  /* (K) */
    double *u;       /* (J) exp-domain row scalings */
    double *v;       /* (K) exp-domain column scalings */
    double *c;       /* (K) column marginals */
    float *ff;       /* (J) f as float */
    float *gf;       /* (K) g as float */
    float *colmax;   /* (K) */
    float *tmp;      /* (max(J, K)) */
    float *px;       /* (J) x positions */
    float *py;       /* (J) y positions */
    float *colbest;  /* (J) smallest squared distance to one cluster */
    int64_t *lab;    /* (J) current labels, -1 = no cluster */
    int64_t *order;  /* (J) tokens sorted by label */
    int64_t *start;  /* (K + 1) start of each cluster in order */
    int64_t *cnt;    /* (K) members */
} cluster_ws;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Lays the workspace out from `base` (or only counts if base is NULL). */
static size_t carve(cluster_ws *w, char *base, int64_t N, int64_t D, int64_t K)
{
    const int64_t J = 2 * N;
    const int64_t T = J > K ? J : K;
    size_t off = 0;
#define TAKE(field, type, count)                                  \
    do {                                                          \
        if (base != NULL) {                                       \
            w->field = (type *)(base + off);                      \
        }                                                         \
        off += align64((size_t)(count) * sizeof(type));           \
    } while (0)
    TAKE(zn, float, J * D);
    TAKE(mu, float, K * D);
    TAKE(s, float, J * K);
    TAKE(dist, float, J * K);
    TAKE(acc, double, K * D);
    TAKE(f, double, J);
    TAKE(g, double, K);
    TAKE(logc, double, K);
    TAKE(colsum, double, K);
    TAKE(u, double, J);
    TAKE(v, double, K);
    TAKE(c, double, K);
    TAKE(ff, float, J);
    TAKE(gf, float, K);
    TAKE(colmax, float, K);
    TAKE(tmp, float, T);
    TAKE(px, float, J);
    TAKE(py, float, J);
    TAKE(colbest, float, J);
    TAKE(lab, int64_t, J);
    TAKE(order, int64_t, J);
    TAKE(start, int64_t, K + 1);
    TAKE(cnt, int64_t, K);
#undef TAKE
    return off;
}

size_t cribo_cluster_workspace_size(int64_t N, int64_t D, int64_t K)
{
    cluster_ws w;
    return carve(&w, NULL, N, D, K);
}

/* ---------------------------------------------------------------- helpers */

/* log sum_i exp(x[i] + shift[i]) for one row; tmp (n) is scratch. */
static double row_lse(const float *x, const float *shift, int64_t n, float *tmp)
{
    for (int64_t i = 0; i < n; i++) {
        tmp[i] = x[i] + shift[i];
    }
    const float m = cribo_lane_max(tmp, n);
    for (int64_t i = 0; i < n; i++) {
        tmp[i] = cribo_expf(tmp[i] - m);
    }
    return (double)m + log(cribo_lane_sum(tmp, n));
}

/* ---------------------------------------------------------------- steps */

/* dist (J, K): SPEC's positional cost for the current members lab (J).
 * For cluster k, colbest[n] = min over members m of |P[n] - P[m]|^2 with members at
 * distance exactly 0 ignored; the loop over n is elementwise, so it vectorises. */
CRIBO_SIMD
static void positional_cost(cluster_ws *w, int64_t J, int64_t K)
{
    /* Counting sort of the members by cluster. */
    memset(w->start, 0, (size_t)(K + 1) * sizeof(int64_t));
    for (int64_t j = 0; j < J; j++) {
        if (w->lab[j] >= 0) {
            w->start[w->lab[j] + 1]++;
        }
    }
    for (int64_t k = 0; k < K; k++) {
        w->start[k + 1] += w->start[k];
        w->cnt[k] = w->start[k];
    }
    for (int64_t j = 0; j < J; j++) {
        if (w->lab[j] >= 0) {
            w->order[w->cnt[w->lab[j]]++] = j;
        }
    }
    const float *px = w->px;
    const float *py = w->py;
    float *best = w->colbest;
    for (int64_t k = 0; k < K; k++) {
        for (int64_t n = 0; n < J; n++) {
            best[n] = INFINITY;
        }
        for (int64_t m = w->start[k]; m < w->start[k + 1]; m++) {
            const float xm = px[w->order[m]];
            const float ym = py[w->order[m]];
            for (int64_t n = 0; n < J; n++) {
                const float dx = px[n] - xm;
                const float dy = py[n] - ym;
                float d2 = dx * dx + dy * dy;
                d2 = d2 > 0.0f ? d2 : INFINITY;
                best[n] = d2 < best[n] ? d2 : best[n];
            }
        }
        for (int64_t n = 0; n < J; n++) {
            w->dist[n * K + k] = best[n] < INFINITY ? sqrtf(best[n]) : 0.0f;
        }
    }
    /* Zeros (no member at non-zero distance) become the mean of the whole matrix,
     * taken before the replacement; then everything is divided by the maximum. */
    const int64_t JK = J * K;
    const double mean = cribo_lane_sum(w->dist, JK) / (double)JK;
    float mx = cribo_lane_max(w->dist, JK);
    const float meanf = (float)mean;
    for (int64_t i = 0; i < JK; i++) {
        w->dist[i] = w->dist[i] == 0.0f ? meanf : w->dist[i];
    }
    mx = meanf > mx ? meanf : mx;
    if (mx > 0.0f) {
        const float inv = 1.0f / mx;
        for (int64_t i = 0; i < JK; i++) {
            w->dist[i] *= inv;
        }
    }
}

/* s (J, K) <- -lambda * minmax(-s + alpha * dist); a constant cost becomes 0. */
CRIBO_SIMD
static void cost_to_logits(cluster_ws *w, int64_t JK, double alpha, double lambda, int use_dist)
{
    float *s = w->s;
    const float a = (float)alpha;
    if (use_dist) {
        for (int64_t i = 0; i < JK; i++) {
            s[i] = -s[i] + a * w->dist[i];
        }
    } else {
        for (int64_t i = 0; i < JK; i++) {
            s[i] = -s[i];
        }
    }
    const float hi = cribo_lane_max(s, JK);
    const float lo = cribo_lane_min(s, JK);
    const double range = (double)hi - (double)lo;
    if (range > 0.0) {
        const float scale = (float)(-lambda / range);
        for (int64_t i = 0; i < JK; i++) {
            s[i] = (s[i] - lo) * scale;
        }
    } else {
        for (int64_t i = 0; i < JK; i++) {
            s[i] = 0.0f;
        }
    }
}

/* Log-domain Sinkhorn on logits s (J, K): rows to r = 1/J, columns to c = exp(logc).
 * Leaves f (J) and g (K) with log T = s + f + g. */
CRIBO_SIMD
static void sinkhorn(cluster_ws *w, int64_t J, int64_t K, int64_t iters)
{
    const float *s = w->s;
    const double log_r = -log((double)J);
    for (int64_t k = 0; k < K; k++) {
        w->g[k] = 0.0;
        w->gf[k] = 0.0f;
    }
    if (iters == 0) {
        /* T = exp(s) / sum(exp(s)): one global potential. */
        float m = cribo_lane_max(s, J * K);
        double tot = 0.0;
        for (int64_t j = 0; j < J; j++) {
            const float *row = s + j * K;
            for (int64_t k = 0; k < K; k++) {
                w->tmp[k] = cribo_expf(row[k] - m);
            }
            tot += cribo_lane_sum(w->tmp, K);
        }
        const double lse = (double)m + log(tot);
        for (int64_t j = 0; j < J; j++) {
            w->f[j] = -lse;
        }
        return;
    }
    for (int64_t it = 0; it < iters; it++) {
        /* Rows: f_j = log r - lse_k(s_jk + g_k). */
        for (int64_t j = 0; j < J; j++) {
            w->f[j] = log_r - row_lse(s + j * K, w->gf, K, w->tmp);
            w->ff[j] = (float)w->f[j];
        }
        /* Columns: g_k = log c_k - lse_j(s_jk + f_j), swept row by row so the
         * inner loop over k is elementwise. */
        for (int64_t k = 0; k < K; k++) {
            w->colmax[k] = -INFINITY;
            w->colsum[k] = 0.0;
        }
        for (int64_t j = 0; j < J; j++) {
            const float *row = s + j * K;
            const float fj = w->ff[j];
            for (int64_t k = 0; k < K; k++) {
                const float v = row[k] + fj;
                w->colmax[k] = v > w->colmax[k] ? v : w->colmax[k];
            }
        }
        for (int64_t j = 0; j < J; j++) {
            const float *row = s + j * K;
            const float fj = w->ff[j];
            for (int64_t k = 0; k < K; k++) {
                w->tmp[k] = cribo_expf(row[k] + fj - w->colmax[k]);
            }
            for (int64_t k = 0; k < K; k++) {
                w->colsum[k] += (double)w->tmp[k];
            }
        }
        for (int64_t k = 0; k < K; k++) {
            w->g[k] = w->logc[k] - ((double)w->colmax[k] + log(w->colsum[k]));
            w->gf[k] = (float)w->g[k];
        }
    }
}

/* Largest lambda (cost range 1) for which the exp-domain kernel exp(s - rowmax),
 * with entries >= exp(-lambda), cannot underflow in float. */
#define EXP_DOMAIN_MAX_LAMBDA 80.0

/* The plain Sinkhorn in the exp domain, for lambda <= EXP_DOMAIN_MAX_LAMBDA:
 * kernel E = exp(s - rowmax) (a per-row factor, cancelled exactly by the first row
 * scaling), then T = diag(u) E diag(v) with
 *   u_j = r / (E v)_j,  v_k = c_k / (E^T u)_k
 * in double.  Leaves E in dist, u, v; and f, g (log T = s + f + g) for the plan. */
CRIBO_SIMD
static void sinkhorn_exp(cluster_ws *w, int64_t J, int64_t K, int64_t iters)
{
    float *E = w->dist;
    const double r = 1.0 / (double)J;
    for (int64_t j = 0; j < J; j++) {
        const float *row = w->s + j * K;
        const float m = cribo_lane_max(row, K);
        float *e = E + j * K;
        for (int64_t k = 0; k < K; k++) {
            e[k] = cribo_expf(row[k] - m);
        }
        w->ff[j] = m; /* rowmax, for f below */
    }
    for (int64_t k = 0; k < K; k++) {
        w->v[k] = 1.0;
    }
    if (iters == 0) {
        /* T = exp(s) / sum(exp(s)): rows keep their exp(rowmax) factor. */
        const float m = cribo_lane_max(w->ff, J);
        double tot = 0.0;
        for (int64_t j = 0; j < J; j++) {
            w->u[j] = exp((double)w->ff[j] - (double)m);
            tot += w->u[j] * cribo_lane_sum(E + j * K, K);
        }
        for (int64_t j = 0; j < J; j++) {
            w->u[j] /= tot;
        }
    }
    for (int64_t it = 0; it < iters; it++) {
        for (int64_t j = 0; j < J; j++) {
            const float *e = E + j * K;
            double acc[CRIBO_LANES] = {0};
            int64_t k = 0;
            for (; k + CRIBO_LANES <= K; k += CRIBO_LANES) {
                for (int l = 0; l < CRIBO_LANES; l++) {
                    acc[l] += (double)e[k + l] * w->v[k + l];
                }
            }
            double sum = 0.0;
            for (; k < K; k++) {
                sum += (double)e[k] * w->v[k];
            }
            for (int l = 0; l < CRIBO_LANES; l++) {
                sum += acc[l];
            }
            w->u[j] = r / sum;
        }
        for (int64_t k = 0; k < K; k++) {
            w->colsum[k] = 0.0;
        }
        for (int64_t j = 0; j < J; j++) {
            const float *e = E + j * K;
            const double uj = w->u[j];
            for (int64_t k = 0; k < K; k++) {
                w->colsum[k] += (double)e[k] * uj;
            }
        }
        for (int64_t k = 0; k < K; k++) {
            w->v[k] = w->c[k] / w->colsum[k];
        }
    }
    /* log T = s - rowmax + log u + log v. */
    for (int64_t j = 0; j < J; j++) {
        w->f[j] = log(w->u[j]) - (double)w->ff[j];
    }
    for (int64_t k = 0; k < K; k++) {
        w->g[k] = log(w->v[k]);
    }
}

/* ---------------------------------------------------------------- one image */

static void cluster_image(int64_t *labels, int64_t *counts, float *plan,
                          const float *z, const float *pos, const int64_t *init,
                          int64_t N, int64_t D, int64_t K,
                          const cribo_cluster_params *p, cluster_ws *w)
{
    const int64_t J = 2 * N;
    const int64_t JK = J * K;
    const int use_dist = p->pos_weight != 0.0;

    /* Zn: rows normalised in double (a zero row stays zero). */
    for (int64_t j = 0; j < J; j++) {
        const float *zj = z + j * D;
        double ss = 0.0;
        for (int64_t e = 0; e < D; e++) {
            ss += (double)zj[e] * (double)zj[e];
        }
        const float inv = ss > 0.0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
        for (int64_t e = 0; e < D; e++) {
            w->zn[j * D + e] = zj[e] * inv;
        }
        w->px[j] = pos[2 * j];
        w->py[j] = pos[2 * j + 1];
        w->lab[j] = -1;
    }
    for (int64_t k = 0; k < K; k++) {
        memcpy(w->mu + k * D, w->zn + init[k] * D, (size_t)D * sizeof(float));
        w->lab[init[k]] = k;
        w->logc[k] = -log((double)K);
        w->c[k] = 1.0 / (double)K;
    }

    for (int64_t it = 0; it < p->n_iters; it++) {
        /* (J,K) = (J,D) @ (K,D)^T */
        cribo_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)J, (int)K, (int)D,
                    1.0f, w->zn, (int)D, w->mu, (int)D, 0.0f, w->s, (int)K);
        if (use_dist) {
            positional_cost(w, J, K);
        }
        cost_to_logits(w, JK, p->pos_weight, p->sinkhorn_lambda, use_dist);
        if (p->sinkhorn_lambda <= EXP_DOMAIN_MAX_LAMBDA) {
            sinkhorn_exp(w, J, K, p->sinkhorn_iters);
        } else {
            sinkhorn(w, J, K, p->sinkhorn_iters);
        }

        /* Hard assignment: argmax_k (s_jk + g_k) (f_j is constant along the row). */
        memset(w->cnt, 0, (size_t)K * sizeof(int64_t));
        for (int64_t j = 0; j < J; j++) {
            const float *row = w->s + j * K;
            int64_t arg = 0;
            double best = (double)row[0] + w->g[0];
            for (int64_t k = 1; k < K; k++) {
                const double v = (double)row[k] + w->g[k];
                if (v > best) {
                    best = v;
                    arg = k;
                }
            }
            w->lab[j] = arg;
            w->cnt[arg]++;
        }
        if (p->update_marginals) {
            const double tot = (double)J + 0.01 * (double)K;
            for (int64_t k = 0; k < K; k++) {
                w->c[k] = ((double)w->cnt[k] + 0.01) / tot;
                w->logc[k] = log(w->c[k]);
            }
        }
        /* Centroids: normalised sums of member rows (an empty cluster gets 0). */
        memset(w->acc, 0, (size_t)(K * D) * sizeof(double));
        for (int64_t j = 0; j < J; j++) {
            double *a = w->acc + w->lab[j] * D;
            const float *zj = w->zn + j * D;
            for (int64_t e = 0; e < D; e++) {
                a[e] += (double)zj[e];
            }
        }
        for (int64_t k = 0; k < K; k++) {
            const double *a = w->acc + k * D;
            double ss = 0.0;
            for (int64_t e = 0; e < D; e++) {
                ss += a[e] * a[e];
            }
            const double inv = ss > 0.0 ? 1.0 / sqrt(ss) : 0.0;
            for (int64_t e = 0; e < D; e++) {
                w->mu[k * D + e] = (float)(a[e] * inv);
            }
        }
    }

    memset(counts, 0, (size_t)(2 * K) * sizeof(int64_t));
    for (int64_t j = 0; j < J; j++) {
        labels[j] = w->lab[j];
        counts[(j >= N ? K : 0) + w->lab[j]]++;
    }
    if (plan != NULL) {
        for (int64_t j = 0; j < J; j++) {
            for (int64_t k = 0; k < K; k++) {
                plan[j * K + k] = (float)exp((double)w->s[j * K + k] + w->f[j] + w->g[k]);
            }
        }
    }
}

/* ---------------------------------------------------------------- batch */

typedef struct {
    int64_t *labels;
    int64_t *counts;
    float *plan;
    const float *tokens;
    const float *pos;
    const int64_t *init;
    int64_t N, D, K;
    const cribo_cluster_params *params;
    char *work;
    size_t ws;
} cluster_job;

static void cluster_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    cluster_job *job = (cluster_job *)ctx;
    const int64_t N = job->N, D = job->D, K = job->K, J = 2 * N;
    cluster_ws w;
    carve(&w, job->work + (size_t)tid * job->ws, N, D, K);
    for (int64_t b = begin; b < end; b++) {
        cluster_image(job->labels + b * J, job->counts + b * 2 * K,
                      job->plan != NULL ? job->plan + b * J * K : NULL,
                      job->tokens + b * J * D, job->pos + b * J * 2, job->init + b * K,
                      N, D, K, job->params, &w);
    }
}

void cribo_cluster(int64_t *labels, int64_t *counts, float *plan,
                   const float *tokens, const float *pos, const int64_t *init,
                   int64_t B, int64_t N, int64_t D, int64_t K,
                   const cribo_cluster_params *params, void *work, int n_threads)
{
    cluster_job job = {labels, counts, plan, tokens, pos, init, N, D, K, params,
                       (char *)work, cribo_cluster_workspace_size(N, D, K)};
    cribo_parallel_for(B, n_threads, cluster_task, &job);
}
