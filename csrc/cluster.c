/* cluster.c -- joint-space clustering, docs/method.md §2 (one file for the section, as
 * every section of csrc/ has one, which makes it longer than the others).
 *
 * Per image (images run in parallel, each on one thread with single-threaded BLAS):
 *   Zn = rows of [z1; z2] L2-normalised                 (J, D)
 *   G  = Zn Zn^T                                        (J, J)   one ssyrk
 *   repeat n_iters times:
 *     Sim^T = mu Zn^T                                   (K, J)   from G (below)
 *     D^T   = positional cost of the current members    (K, J)   O(J^2), no (J, J, K) tensor
 *     S^T   = -lambda * minmax(-Sim + alpha * D)         (K, J)
 *     Sinkhorn on S, leaving potentials f (J), g (K) with log T = S + f + g
 *     labels = argmax_k log T (ties to the lowest k); marginals; centroids
 * With mu_k the normalised sum of cluster k's member rows,
 *   Sim_kj = <mu_k, Zn_j> = sum_{m in k} G_mj / sqrt(sum_{m, m' in k} G_mm'),
 * so after one ssyrk (half the flops of the J x J product) each iteration needs only
 * O(J^2) additions (in double) and no centroid; the first iteration's seeds give
 * Sim_kj = G_{init_k, j}.
 * Everything per (token, cluster) is stored cluster-major, (K, J): reductions over
 * tokens are contiguous rows, and per-token operations across clusters (the row
 * scaling, the argmax) are elementwise over rows, so every hot loop vectorises.
 *
 * Sinkhorn is the plain iteration (T = exp(S) / sum, rows to r, columns to c) in
 * one of two exact forms: for lambda <= 80 the exp domain (kernel exp(S - rowmax),
 * which cannot underflow in float there, and scaling vectors in double: two
 * matrix-vector products per round, no exponentials); above, the log domain
 * (every scaling kept as a logarithm, log-sum-exp with double sums), which stays
 * finite however large lambda is.  Both give the plain formula's T wherever
 * exp(S) does not underflow. */
#include <math.h>
#include <string.h>

#include "blas.h"
#include "cribo.h"
#include "vmath.h"
#include "workspace.h"

/* Largest lambda (cost range 1) for which the exp-domain kernel exp(S - rowmax),
 * with entries >= exp(-lambda), cannot underflow in float. */
#define EXP_DOMAIN_MAX_LAMBDA 80.0

/* ---------------------------------------------------------------- workspace */

typedef struct {
    float *zn;       /* (J, D) normalised tokens */
    float *gram;     /* (J, J) Zn Zn^T */
    float *s;        /* (K, J) Sim^T, then S^T = -lambda * M^T */
    float *dist;     /* (K, J) positional cost; then the exp-domain kernel */
    double *acc;     /* (K, J) sum_{m in k} G_mj */
    double *nrm;     /* (K) |sum_{m in k} Zn_m|^2 */
    double *f;       /* (J) row potentials (log T = S + f + g) */
    double *g;       /* (K) column potentials */
    double *u;       /* (J) exp-domain row scalings / row sums */
    double *v;       /* (K) exp-domain column scalings */
    double *c;       /* (K) column marginals */
    double *best;    /* (J) argmax: best value so far */
    float *fj;       /* (J) row maxima / f as float */
    float *tmp;      /* (J) */
    float *px;       /* (J) x positions */
    float *py;       /* (J) y positions */
    float *colbest;  /* (J) smallest squared distance to one cluster */
    int64_t *lab;    /* (J) current labels, -1 = no cluster */
    int64_t *order;  /* (J) tokens sorted by label */
    int64_t *start;  /* (K + 1) start of each cluster in order */
    int64_t *cnt;    /* (K) members */
} cluster_ws;

/* Lays the workspace out from `base` (or only counts if base is NULL). */
static size_t carve(cluster_ws *w, char *base, int64_t N, int64_t D, int64_t K)
{
    const int64_t J = 2 * N;
    size_t off = 0;
    CRIBO_TAKE(zn, float, J * D);
    CRIBO_TAKE(gram, float, J * J);
    CRIBO_TAKE(s, float, K * J);
    CRIBO_TAKE(dist, float, K * J);
    CRIBO_TAKE(acc, double, K * J);
    CRIBO_TAKE(nrm, double, K);
    CRIBO_TAKE(f, double, J);
    CRIBO_TAKE(g, double, K);
    CRIBO_TAKE(u, double, J);
    CRIBO_TAKE(v, double, K);
    CRIBO_TAKE(c, double, K);
    CRIBO_TAKE(best, double, J);
    CRIBO_TAKE(fj, float, J);
    CRIBO_TAKE(tmp, float, J);
    CRIBO_TAKE(px, float, J);
    CRIBO_TAKE(py, float, J);
    CRIBO_TAKE(colbest, float, J);
    CRIBO_TAKE(lab, int64_t, J);
    CRIBO_TAKE(order, int64_t, J);
    CRIBO_TAKE(start, int64_t, K + 1);
    CRIBO_TAKE(cnt, int64_t, K);
    return off;
}

size_t cribo_cluster_workspace_size(int64_t N, int64_t D, int64_t K)
{
    cluster_ws w = {0};
    return carve(&w, NULL, N, D, K);
}

/* ---------------------------------------------------------------- helpers */

/* y[j] += x[j], a float row widened (exactly) to double, elementwise. */
CRIBO_INLINE void add_widened(double *y, const float *x, int64_t n)
{
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        vd_store(y + j, vd_load(y + j) + vd_widen(x + j));
    }
    for (; j < n; j++) {
        y[j] += (double)x[j];
    }
}

/* y[j] += a * x[j], all double. */
CRIBO_INLINE void axpy_dd(double *y, double a, const double *x, int64_t n)
{
    const cribo_vd av = (cribo_vd){0} + a;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        vd_store(y + j, vd_load(y + j) + av * vd_load(x + j));
    }
    for (; j < n; j++) {
        y[j] += a * x[j];
    }
}

/* sum_j x[j] * y[j], all double, in 4 lanes. */
CRIBO_INLINE double dot_dd(const double *x, const double *y, int64_t n)
{
    cribo_vd acc = {0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        acc += vd_load(x + j) * vd_load(y + j);
    }
    double r = acc[0] + acc[1] + acc[2] + acc[3];
    for (; j < n; j++) {
        r += x[j] * y[j];
    }
    return r;
}

/* ---------------------------------------------------------------- steps */

/* zn (J, D) = rows of z L2-normalised (a zero row stays zero).  The squares and
 * the scaling are done in double: a float square overflows above |z| = 2^64 and
 * underflows below 2^-75, which would turn large or tiny tokens into zero rows;
 * in double every finite float row is normalised (cribo_dot_f64), so the result
 * is invariant under scaling the tokens by a power of two, and within float
 * rounding of it for any other scale. */
CRIBO_SIMD
static void normalize_tokens(float *zn, const float *z, int64_t J, int64_t D)
{
    for (int64_t j = 0; j < J; j++) {
        const float *zj = z + j * D;
        const double ss = cribo_dot_f64(zj, zj, D);
        const double inv = ss > 0.0 ? 1.0 / sqrt(ss) : 0.0;
        for (int64_t e = 0; e < D; e++) {
            zn[j * D + e] = (float)((double)zj[e] * inv);
        }
    }
}

/* dist (K, J): the positional cost (docs/method.md §2) for the current members lab (J).
 * For cluster k, colbest[n] = min over members m of |P[n] - P[m]|^2, members at
 * distance exactly 0 ignored; the loop over n is elementwise. */
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
    const cribo_vf zero = vf_set1(0.0f);
    const cribo_vf inf = vf_set1(INFINITY);
    for (int64_t k = 0; k < K; k++) {
        for (int64_t n = 0; n < J; n++) {
            best[n] = INFINITY;
        }
        for (int64_t m = w->start[k]; m < w->start[k + 1]; m++) {
            const float xm = px[w->order[m]];
            const float ym = py[w->order[m]];
            const cribo_vf vxm = vf_set1(xm);
            const cribo_vf vym = vf_set1(ym);
            int64_t n = 0;
            for (; n + CRIBO_VL <= J; n += CRIBO_VL) {
                const cribo_vf dx = vf_load(px + n) - vxm;
                const cribo_vf dy = vf_load(py + n) - vym;
                cribo_vf d2 = dx * dx + dy * dy;
                d2 = vf_select(d2 > zero, d2, inf);
                vf_store(best + n, vf_min(vf_load(best + n), d2));
            }
            for (; n < J; n++) {
                const float dx = px[n] - xm;
                const float dy = py[n] - ym;
                float d2 = dx * dx + dy * dy;
                d2 = d2 > 0.0f ? d2 : INFINITY;
                best[n] = d2 < best[n] ? d2 : best[n];
            }
        }
        float *row = w->dist + k * J;
        for (int64_t n = 0; n < J; n++) {
            row[n] = best[n] < INFINITY ? sqrtf(best[n]) : 0.0f;
        }
    }
    /* Zeros (no member at non-zero distance) become the mean of the whole matrix,
     * taken before the replacement; then everything is divided by the maximum. */
    const int64_t JK = J * K;
    const float meanf = (float)(cribo_row_sum(w->dist, JK) / (double)JK);
    float mx = cribo_row_max(w->dist, JK);
    mx = meanf > mx ? meanf : mx;
    const float inv = mx > 0.0f ? 1.0f / mx : 1.0f;
    for (int64_t i = 0; i < JK; i++) {
        const float d = w->dist[i] == 0.0f ? meanf : w->dist[i];
        w->dist[i] = mx > 0.0f ? d * inv : d;
    }
}

/* s (K, J) <- -lambda * minmax(-s + alpha * dist); a constant cost becomes 0. */
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
    float lo;
    float hi;
    cribo_row_range(s, JK, &lo, &hi);
    const double range = (double)hi - (double)lo;
    if (range > 0.0) {
        const float scale = (float)(-lambda / range);
        for (int64_t i = 0; i < JK; i++) {
            s[i] = (s[i] - lo) * scale;
        }
    } else {
        memset(s, 0, (size_t)JK * sizeof(float));
    }
}

/* fj (J) = max over k of s (K, J): per-token maxima, elementwise over rows. */
CRIBO_INLINE void token_max(float *fj, const float *s, int64_t J, int64_t K)
{
    memcpy(fj, s, (size_t)J * sizeof(float));
    for (int64_t k = 1; k < K; k++) {
        const float *row = s + k * J;
        int64_t j = 0;
        for (; j + CRIBO_VL <= J; j += CRIBO_VL) {
            vf_store(fj + j, vf_max(vf_load(fj + j), vf_load(row + j)));
        }
        for (; j < J; j++) {
            fj[j] = row[j] > fj[j] ? row[j] : fj[j];
        }
    }
}

/* The plain Sinkhorn in the exp domain, for lambda <= EXP_DOMAIN_MAX_LAMBDA:
 * kernel E = exp(s - tokenmax) (a per-token factor, cancelled exactly by the first
 * row scaling), then T = diag(u) E diag(v) with
 *   u_j = r / (E v)_j,  v_k = c_k / (E^T u)_k
 * in double.  Leaves f, g with log T = s + f + g. */
CRIBO_SIMD
static void sinkhorn_exp(cluster_ws *w, int64_t J, int64_t K, int64_t iters)
{
    float *E = w->dist;
    double *Ed = w->acc; /* E widened once, for the double matrix-vector products */
    const double r = 1.0 / (double)J;
    token_max(w->fj, w->s, J, K);
    for (int64_t k = 0; k < K; k++) {
        const float *row = w->s + k * J;
        float *e = E + k * J;
        int64_t j = 0;
        for (; j + CRIBO_VL <= J; j += CRIBO_VL) {
            vf_store(e + j, vf_exp(vf_load(row + j) - vf_load(w->fj + j)));
        }
        for (; j < J; j++) {
            e[j] = cribo_expf(row[j] - w->fj[j]);
        }
        for (j = 0; j < J; j++) {
            Ed[k * J + j] = (double)e[j];
        }
        w->v[k] = 1.0;
    }
    if (iters == 0) {
        /* T = exp(s) / sum(exp(s)): tokens keep their exp(tokenmax) factor. */
        const float m = cribo_row_max(w->fj, J);
        for (int64_t j = 0; j < J; j++) {
            w->u[j] = 0.0;
        }
        for (int64_t k = 0; k < K; k++) {
            add_widened(w->u, E + k * J, J);
        }
        double tot = 0.0;
        for (int64_t j = 0; j < J; j++) {
            const double scale = exp((double)w->fj[j] - (double)m);
            tot += scale * w->u[j];
            w->u[j] = scale;
        }
        for (int64_t j = 0; j < J; j++) {
            w->u[j] /= tot;
        }
    }
    for (int64_t it = 0; it < iters; it++) {
        /* u_j = r / sum_k E_kj v_k */
        for (int64_t j = 0; j < J; j++) {
            w->u[j] = 0.0;
        }
        for (int64_t k = 0; k < K; k++) {
            axpy_dd(w->u, w->v[k], Ed + k * J, J);
        }
        for (int64_t j = 0; j < J; j++) {
            w->u[j] = r / w->u[j];
        }
        /* v_k = c_k / sum_j E_kj u_j */
        for (int64_t k = 0; k < K; k++) {
            w->v[k] = w->c[k] / dot_dd(Ed + k * J, w->u, J);
        }
    }
    for (int64_t j = 0; j < J; j++) {
        w->f[j] = log(w->u[j]) - (double)w->fj[j];
    }
    for (int64_t k = 0; k < K; k++) {
        w->g[k] = log(w->v[k]);
    }
}

/* Log-domain Sinkhorn on s (K, J): rows to r = 1/J, columns to c.  Every sum of
 * exponentials is shifted by its maximum and accumulated in double.
 * Leaves f (J), g (K) with log T = s + f + g. */
CRIBO_SIMD
static void sinkhorn_log(cluster_ws *w, int64_t J, int64_t K, int64_t iters)
{
    const float *s = w->s;
    const double log_r = -log((double)J);
    for (int64_t k = 0; k < K; k++) {
        w->g[k] = 0.0;
    }
    if (iters == 0) {
        const float m = cribo_row_max(s, J * K);
        double tot = 0.0;
        for (int64_t k = 0; k < K; k++) {
            memcpy(w->tmp, s + k * J, (size_t)J * sizeof(float));
            tot += cribo_row_exp_sum(w->tmp, m, J);
        }
        for (int64_t j = 0; j < J; j++) {
            w->f[j] = -((double)m + log(tot));
        }
        return;
    }
    for (int64_t it = 0; it < iters; it++) {
        /* Rows: f_j = log r - lse_k(s_kj + g_k), swept over the K rows. */
        for (int64_t j = 0; j < J; j++) {
            w->fj[j] = -INFINITY;
            w->u[j] = 0.0;
        }
        for (int64_t k = 0; k < K; k++) {
            const float *row = s + k * J;
            const float gk = (float)w->g[k];
            for (int64_t j = 0; j < J; j++) {
                const float x = row[j] + gk;
                w->fj[j] = x > w->fj[j] ? x : w->fj[j];
            }
        }
        for (int64_t k = 0; k < K; k++) {
            const float *row = s + k * J;
            const float gk = (float)w->g[k];
            for (int64_t j = 0; j < J; j++) {
                w->tmp[j] = cribo_expf(row[j] + gk - w->fj[j]);
            }
            add_widened(w->u, w->tmp, J);
        }
        for (int64_t j = 0; j < J; j++) {
            w->f[j] = log_r - ((double)w->fj[j] + log(w->u[j]));
            w->fj[j] = (float)w->f[j];
        }
        /* Columns: g_k = log c_k - lse_j(s_kj + f_j), one contiguous row each. */
        for (int64_t k = 0; k < K; k++) {
            const float *row = s + k * J;
            for (int64_t j = 0; j < J; j++) {
                w->tmp[j] = row[j] + w->fj[j];
            }
            const float m = cribo_row_max(w->tmp, J);
            w->g[k] = log(w->c[k]) - ((double)m + log(cribo_row_exp_sum(w->tmp, m, J)));
        }
    }
}

/* lab (J) = argmax_k (s_kj + g_k) in double, ties to the lowest k (f_j is constant
 * along a token); cnt (K) the members.  Elementwise over the K rows. */
CRIBO_SIMD
static void assign(cluster_ws *w, int64_t J, int64_t K)
{
    for (int64_t j = 0; j < J; j++) {
        w->best[j] = (double)w->s[j] + w->g[0];
        w->lab[j] = 0;
    }
    for (int64_t k = 1; k < K; k++) {
        const float *row = w->s + k * J;
        const double gk = w->g[k];
        for (int64_t j = 0; j < J; j++) {
            const double x = (double)row[j] + gk;
            const int better = x > w->best[j];
            w->best[j] = better ? x : w->best[j];
            w->lab[j] = better ? k : w->lab[j];
        }
    }
    memset(w->cnt, 0, (size_t)K * sizeof(int64_t));
    for (int64_t j = 0; j < J; j++) {
        w->cnt[w->lab[j]]++;
    }
}

/* gram (J, J) = zn zn^T: the upper triangle from ssyrk, mirrored. */
static void gram_matrix(cluster_ws *w, int64_t J, int64_t D)
{
    /* (J,J) = (J,D) @ (J,D)^T, upper triangle */
    cribo_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)J, (int)D, 1.0f, w->zn, (int)D,
                0.0f, w->gram, (int)J);
    for (int64_t i = 1; i < J; i++) {
        for (int64_t j = 0; j < i; j++) {
            w->gram[i * J + j] = w->gram[j * J + i];
        }
    }
}

/* s (K, J) = Sim^T for the current members: for k, sum_{m in k} G_m. / |sum Zn_m|,
 * with |sum_{m in k} Zn_m|^2 = sum_{j in k} sum_{m in k} G_mj (an empty cluster, or
 * members summing to zero, gives 0). */
CRIBO_SIMD
static void similarity(cluster_ws *w, int64_t J, int64_t K)
{
    memset(w->acc, 0, (size_t)(K * J) * sizeof(double));
    memset(w->nrm, 0, (size_t)K * sizeof(double));
    for (int64_t m = 0; m < J; m++) {
        add_widened(w->acc + w->lab[m] * J, w->gram + m * J, J);
    }
    for (int64_t j = 0; j < J; j++) {
        w->nrm[w->lab[j]] += w->acc[w->lab[j] * J + j];
    }
    for (int64_t k = 0; k < K; k++) {
        const double inv = w->nrm[k] > 0.0 ? 1.0 / sqrt(w->nrm[k]) : 0.0;
        const double *a = w->acc + k * J;
        float *row = w->s + k * J;
        for (int64_t j = 0; j < J; j++) {
            row[j] = (float)(a[j] * inv);
        }
    }
}

/* ---------------------------------------------------------------- one image */

static void cluster_image(int64_t *labels, int64_t *counts, float *plan,
                          const float *z, const float *pos, const int64_t *init,
                          int64_t N, int64_t D, int64_t K,
                          const cribo_cluster_params *p, cluster_ws *w)
{
    const int64_t J = 2 * N;
    const int use_dist = p->pos_weight != 0.0;

    normalize_tokens(w->zn, z, J, D);
    for (int64_t j = 0; j < J; j++) {
        w->px[j] = pos[2 * j];
        w->py[j] = pos[2 * j + 1];
        w->lab[j] = -1;
    }
    gram_matrix(w, J, D);
    for (int64_t k = 0; k < K; k++) {
        /* First centroids: the seed tokens, so Sim_kj = G_{init_k, j}. */
        memcpy(w->s + k * J, w->gram + init[k] * J, (size_t)J * sizeof(float));
        w->lab[init[k]] = k;
        w->c[k] = 1.0 / (double)K;
    }

    for (int64_t it = 0; it < p->n_iters; it++) {
        if (it > 0) {
            similarity(w, J, K);
        }
        if (use_dist) {
            positional_cost(w, J, K);
        }
        cost_to_logits(w, J * K, p->pos_weight, p->sinkhorn_lambda, use_dist);
        if (p->sinkhorn_lambda <= EXP_DOMAIN_MAX_LAMBDA) {
            sinkhorn_exp(w, J, K, p->sinkhorn_iters);
        } else {
            sinkhorn_log(w, J, K, p->sinkhorn_iters);
        }
        assign(w, J, K);
        if (p->update_marginals) {
            const double tot = (double)J + 0.01 * (double)K;
            for (int64_t k = 0; k < K; k++) {
                w->c[k] = ((double)w->cnt[k] + 0.01) / tot;
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
                plan[j * K + k] = (float)exp((double)w->s[k * J + j] + w->f[j] + w->g[k]);
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
    cluster_ws w = {0};
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
