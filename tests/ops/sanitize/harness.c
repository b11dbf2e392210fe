/* harness.c -- calls every kernel of csrc/ directly (no Python) on random data and
 * checks a few invariants, for running under AddressSanitizer + UBSan
 * (tests/ops/sanitize/build_and_run.sh; docs/contributing.md "Test conventions" 7).
 *
 * Every buffer -- inputs, outputs and workspace -- is allocated with exactly the
 * size the kernel contract gives (workspace from the *_workspace_size functions),
 * so any read or write past the end is reported by ASan.  Kernels that are split
 * over threads run with 1 and 3 threads and must give bitwise-equal results.
 * One file (longer than most) so that one compile links every kernel once.
 * Exits 0 on success; prints "FAIL: ..." and exits 1 on the first broken invariant
 * (a sanitizer report aborts the process with its own non-zero status). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cribo.h"

#ifndef CRIBO_SYSTEM_CBLAS
void scipy_openblas_set_num_threads(int num_threads);
#endif

static int n_checks = 0;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        n_checks++;                                                          \
        if (!(cond)) {                                                       \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);             \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

/* ------------------------------------------------------------------ helpers */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t next_u64(void)
{
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static float uniform(void) /* [0, 1) */
{
    return (float)((next_u64() >> 40) * (1.0 / 16777216.0));
}

static float gaussian(void)
{
    double u1 = ((next_u64() >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (next_u64() >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static int64_t below(int64_t n) { return (int64_t)(next_u64() % (uint64_t)n); }

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes == 0 ? 1 : bytes);
    CHECK(p != NULL, "malloc(%zu) failed", bytes);
    return p;
}

/* Workspace exactly as large as asked for (64-byte aligned, like the binding). */
static void *xwork(size_t bytes)
{
    void *p = NULL;
    CHECK(posix_memalign(&p, 64, bytes == 0 ? 64 : bytes) == 0, "posix_memalign(%zu)", bytes);
    return p;
}

static float *randn(int64_t n, float scale)
{
    float *x = xmalloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        x[i] = scale * gaussian();
    }
    return x;
}

static float *randu(int64_t n, float scale)
{
    float *x = xmalloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        x[i] = scale * uniform();
    }
    return x;
}

static int all_finite(const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(x[i])) {
            return 0;
        }
    }
    return 1;
}

/* ------------------------------------------------------------------ parallel_for */

typedef struct {
    int *visits; /* (n) */
    int n_threads;
    int bad_tid;
} cover_ctx;

static void cover_task(void *ctx, int64_t begin, int64_t end, int tid)
{
    cover_ctx *c = (cover_ctx *)ctx;
    if (tid < 0 || tid >= c->n_threads) {
        c->bad_tid = 1; /* only read after the join */
        return;
    }
    for (int64_t i = begin; i < end; i++) {
        c->visits[i]++; /* chunks are disjoint: no two threads touch one index */
    }
}

static void test_parallel_for(void)
{
    const int64_t sizes[] = {0, 1, 2, 3, 7, 100};
    const int threads[] = {1, 3, 0, 300};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        for (size_t t = 0; t < sizeof threads / sizeof threads[0]; t++) {
            const int64_t n = sizes[s];
            int *visits = xmalloc((size_t)(n > 0 ? n : 1) * sizeof(int));
            memset(visits, 0, (size_t)(n > 0 ? n : 1) * sizeof(int));
            int eff = threads[t] < 1 ? 1 : (threads[t] > 256 ? 256 : threads[t]);
            cover_ctx c = {visits, eff, 0};
            cribo_parallel_for(n, threads[t], cover_task, &c);
            CHECK(!c.bad_tid, "parallel_for(n=%lld, T=%d): tid out of range", (long long)n,
                  threads[t]);
            for (int64_t i = 0; i < n; i++) {
                CHECK(visits[i] == 1, "parallel_for(n=%lld, T=%d): index %lld visited %d times",
                      (long long)n, threads[t], (long long)i, visits[i]);
            }
            free(visits);
        }
    }
    /* cribo_all_finite on every length around the 16-lane boundary. */
    for (int64_t n = 0; n < 40; n++) {
        float *x = randn(n, 1.0f);
        CHECK(cribo_all_finite(x, n), "all_finite(n=%lld) on finite data", (long long)n);
        for (int64_t i = 0; i < n; i++) {
            const float keep = x[i];
            x[i] = (i % 3 == 0) ? NAN : ((i % 3 == 1) ? INFINITY : -INFINITY);
            CHECK(!cribo_all_finite(x, n), "all_finite missed a non-finite at %lld of %lld",
                  (long long)i, (long long)n);
            x[i] = keep;
        }
        free(x);
    }
}

/* ------------------------------------------------------------------ cluster */

static void run_cluster(int64_t B, int64_t N, int64_t D, int64_t K, double lambda,
                        int64_t sinkhorn_iters, double pos_weight, int update_marginals)
{
    const int64_t J = 2 * N;
    float *tokens = randn(B * J * D, 1.0f);
    float *pos = randu(B * J * 2, 16.0f);
    int64_t *init = xmalloc((size_t)(B * K) * sizeof(int64_t));
    /* K distinct indices per image (partial Fisher-Yates). */
    int64_t *perm = xmalloc((size_t)J * sizeof(int64_t));
    for (int64_t b = 0; b < B; b++) {
        for (int64_t j = 0; j < J; j++) {
            perm[j] = j;
        }
        for (int64_t k = 0; k < K; k++) {
            int64_t r = k + below(J - k);
            int64_t tmp = perm[k];
            perm[k] = perm[r];
            perm[r] = tmp;
            init[b * K + k] = perm[k];
        }
    }
    if (B > 1) {
        /* Two tokens at the very same position (distance exactly 0 is ignored). */
        pos[2 * 1] = pos[0];
        pos[2 * 1 + 1] = pos[1];
        /* An all-zero token (its normalised row stays zero). */
        memset(tokens + (B * J - 1) * D, 0, (size_t)D * sizeof(float));
    }
    cribo_cluster_params p = {pos_weight, lambda, sinkhorn_iters, 5, update_marginals};
    const size_t ws = cribo_cluster_workspace_size(N, D, K);

    int64_t *labels[2];
    int64_t *counts[2];
    float *plan[2];
    const int threads[2] = {1, 3};
    for (int t = 0; t < 2; t++) {
        const int T = threads[t];
        const int Tw = T < B ? T : (int)B; /* the binding allocates min(T, B) slices */
        labels[t] = xmalloc((size_t)(B * J) * sizeof(int64_t));
        counts[t] = xmalloc((size_t)(B * 2 * K) * sizeof(int64_t));
        plan[t] = xmalloc((size_t)(B * J * K) * sizeof(float));
        void *work = xwork(ws * (size_t)Tw);
        cribo_cluster(labels[t], counts[t], plan[t], tokens, pos, init, B, N, D, K, &p, work, T);
        free(work);
    }
    /* Without a plan (NULL is allowed). */
    {
        int64_t *lab = xmalloc((size_t)(B * J) * sizeof(int64_t));
        int64_t *cnt = xmalloc((size_t)(B * 2 * K) * sizeof(int64_t));
        void *work = xwork(ws);
        cribo_cluster(lab, cnt, NULL, tokens, pos, init, B, N, D, K, &p, work, 1);
        CHECK(memcmp(lab, labels[0], (size_t)(B * J) * sizeof(int64_t)) == 0,
              "cluster labels differ with plan=NULL");
        free(work);
        free(lab);
        free(cnt);
    }
    CHECK(memcmp(labels[0], labels[1], (size_t)(B * J) * sizeof(int64_t)) == 0,
          "cluster labels differ between 1 and 3 threads (lambda=%g)", lambda);
    CHECK(memcmp(counts[0], counts[1], (size_t)(B * 2 * K) * sizeof(int64_t)) == 0,
          "cluster counts differ between 1 and 3 threads");
    CHECK(memcmp(plan[0], plan[1], (size_t)(B * J * K) * sizeof(float)) == 0,
          "cluster plan differs between 1 and 3 threads");

    for (int64_t b = 0; b < B; b++) {
        int64_t per_view[2] = {0, 0};
        for (int64_t j = 0; j < J; j++) {
            const int64_t l = labels[0][b * J + j];
            CHECK(l >= 0 && l < K, "cluster label %lld out of [0, %lld)", (long long)l,
                  (long long)K);
        }
        for (int64_t i = 0; i < 2; i++) {
            for (int64_t k = 0; k < K; k++) {
                const int64_t c = counts[0][(b * 2 + i) * K + k];
                int64_t expect = 0;
                for (int64_t n = 0; n < N; n++) {
                    expect += labels[0][b * J + i * N + n] == k;
                }
                CHECK(c == expect, "counts[%lld,%lld,%lld] = %lld, labels say %lld",
                      (long long)b, (long long)i, (long long)k, (long long)c, (long long)expect);
                per_view[i] += c;
            }
        }
        CHECK(per_view[0] == N && per_view[1] == N, "counts do not sum to N per view");

        /* The plan: finite, non-negative, total mass 1.  Sinkhorn (docs/method.md §2) ends each
         * round with the column scaling, so with fixed marginals (c = 1/K) every
         * column sums to exactly 1/K, while the rows sum to r = 1/(2N) only in the
         * limit of many rounds (at lambda = 1e4 they are far from it after 2): the
         * rows are checked to hold at most the total mass, and on average 1/(2N). */
        const float *T = plan[0] + b * J * K;
        CHECK(all_finite(T, J * K), "cluster plan not finite (lambda=%g)", lambda);
        double total = 0.0;
        for (int64_t i = 0; i < J * K; i++) {
            CHECK(T[i] >= 0.0f, "cluster plan entry %g < 0", (double)T[i]);
            total += T[i];
        }
        const double tol = lambda <= 1000.0 ? 1e-4 : 1e-3;
        CHECK(fabs(total - 1.0) < tol, "cluster plan sums to %.9g, not 1 (lambda=%g)", total,
              lambda);
        if (!update_marginals && sinkhorn_iters > 0) {
            for (int64_t k = 0; k < K; k++) {
                double col = 0.0;
                for (int64_t j = 0; j < J; j++) {
                    col += T[j * K + k];
                }
                CHECK(fabs(col * (double)K - 1.0) < tol,
                      "plan column %lld sums to %.9g, not 1/K (lambda=%g)", (long long)k, col,
                      lambda);
            }
        }
        double rows = 0.0;
        for (int64_t j = 0; j < J; j++) {
            double row = 0.0;
            for (int64_t k = 0; k < K; k++) {
                row += T[j * K + k];
            }
            CHECK(row >= 0.0 && row <= 1.0 + tol, "plan row sum %.9g out of [0, 1]", row);
            rows += row;
        }
        CHECK(fabs(rows / (double)J - 1.0 / (double)J) < tol / (double)J,
              "plan mean row sum %.9g, not 1/(2N) = %.9g", rows / (double)J, 1.0 / (double)J);
    }
    for (int t = 0; t < 2; t++) {
        free(labels[t]);
        free(counts[t]);
        free(plan[t]);
    }
    free(perm);
    free(init);
    free(tokens);
    free(pos);
}

static void test_cluster(void)
{
    /* lambda <= 80: exp-domain Sinkhorn; > 80: log domain. */
    run_cluster(3, 7, 5, 4, 20.0, 5, 2.0, 1);
    run_cluster(3, 7, 5, 4, 20.0, 5, 2.0, 0);
    run_cluster(3, 7, 5, 4, 80.0, 3, 0.0, 0);
    run_cluster(3, 7, 5, 4, 500.0, 5, 2.0, 1);
    run_cluster(3, 7, 5, 4, 500.0, 5, 2.0, 0);
    run_cluster(2, 9, 3, 18, 1e4, 2, 1.0, 0); /* K = 2N */
    run_cluster(2, 5, 4, 3, 20.0, 0, 2.0, 0);  /* no Sinkhorn iterations */
    run_cluster(2, 5, 4, 3, 500.0, 0, 2.0, 1);
    run_cluster(1, 1, 1, 1, 20.0, 5, 2.0, 1);  /* smallest image */
    run_cluster(1, 1, 1, 2, 500.0, 5, 2.0, 1);
    run_cluster(5, 20, 33, 17, 20.0, 5, 2.0, 1); /* D, K not multiples of 16 */
}

/* ------------------------------------------------------------------ pooling */

static void test_pool(int64_t B, int64_t N, int64_t D, int64_t K)
{
    float *tokens = randn(B * 2 * N * D, 1.0f);
    float *dout = randn(B * 2 * K * D, 1.0f);
    int64_t *labels = xmalloc((size_t)(B * 2 * N) * sizeof(int64_t));
    for (int64_t i = 0; i < B * 2 * N; i++) {
        labels[i] = below(K + 1) - 1; /* -1 = in no cluster */
    }
    float *weights = randu(B * 2 * N * K, 1.0f);
    /* A zero column (stays zero) in the first view of the first image. */
    for (int64_t n = 0; n < N; n++) {
        weights[n * K + (K - 1)] = 0.0f;
    }
    const int threads[2] = {1, 3};
    float *out[2], *dtok[2], *sout[2], *sdtok[2];
    for (int t = 0; t < 2; t++) {
        const int T = threads[t];
        out[t] = xmalloc((size_t)(B * 2 * K * D) * sizeof(float));
        dtok[t] = xmalloc((size_t)(B * 2 * N * D) * sizeof(float));
        sout[t] = xmalloc((size_t)(B * 2 * K * D) * sizeof(float));
        sdtok[t] = xmalloc((size_t)(B * 2 * N * D) * sizeof(float));
        void *w = xwork(cribo_pool_workspace_size(D, K) * (size_t)T);
        cribo_pool(out[t], tokens, labels, B, N, D, K, w, T);
        cribo_pool_backward(dtok[t], dout, labels, B, N, D, K, w, T);
        free(w);
        void *ws = xwork(cribo_pool_soft_workspace_size(N, K) * (size_t)T);
        cribo_pool_soft(sout[t], tokens, weights, B, N, D, K, ws, T);
        cribo_pool_soft_backward(sdtok[t], dout, weights, B, N, D, K, ws, T);
        free(ws);
    }
    CHECK(memcmp(out[0], out[1], (size_t)(B * 2 * K * D) * sizeof(float)) == 0,
          "pool forward differs between 1 and 3 threads");
    CHECK(memcmp(dtok[0], dtok[1], (size_t)(B * 2 * N * D) * sizeof(float)) == 0,
          "pool backward differs between 1 and 3 threads");
    CHECK(memcmp(sout[0], sout[1], (size_t)(B * 2 * K * D) * sizeof(float)) == 0,
          "soft pool forward differs between 1 and 3 threads");
    CHECK(memcmp(sdtok[0], sdtok[1], (size_t)(B * 2 * N * D) * sizeof(float)) == 0,
          "soft pool backward differs between 1 and 3 threads");
    CHECK(all_finite(out[0], B * 2 * K * D) && all_finite(dtok[0], B * 2 * N * D) &&
              all_finite(sout[0], B * 2 * K * D) && all_finite(sdtok[0], B * 2 * N * D),
          "pool outputs not finite");

    /* Hard forward = per-view mean (double check in double); backward = dout / count. */
    for (int64_t v = 0; v < B * 2; v++) {
        for (int64_t k = 0; k < K; k++) {
            int64_t cnt = 0;
            for (int64_t n = 0; n < N; n++) {
                cnt += labels[v * N + n] == k;
            }
            for (int64_t e = 0; e < D; e++) {
                double s = 0.0;
                for (int64_t n = 0; n < N; n++) {
                    if (labels[v * N + n] == k) {
                        s += tokens[(v * N + n) * D + e];
                    }
                }
                const double ref = cnt > 0 ? s / (double)cnt : 0.0;
                const float got = out[0][(v * K + k) * D + e];
                CHECK(fabs(got - ref) <= 1e-5 * (1.0 + fabs(ref)),
                      "pool[%lld,%lld,%lld] = %g, expected %g", (long long)v, (long long)k,
                      (long long)e, (double)got, ref);
            }
        }
        for (int64_t n = 0; n < N; n++) {
            const int64_t k = labels[v * N + n];
            int64_t cnt = 0;
            for (int64_t m = 0; m < N; m++) {
                cnt += k >= 0 && labels[v * N + m] == k;
            }
            for (int64_t e = 0; e < D; e++) {
                const double ref = k < 0 ? 0.0 : dout[(v * K + k) * D + e] / (double)cnt;
                const float got = dtok[0][(v * N + n) * D + e];
                CHECK(fabs(got - ref) <= 1e-6 * (1.0 + fabs(ref)),
                      "pool_backward mismatch at %lld,%lld,%lld", (long long)v, (long long)n,
                      (long long)e);
            }
        }
        /* Soft: the zero column pools to zero. */
        if (v == 0) {
            for (int64_t e = 0; e < D; e++) {
                CHECK(sout[0][(K - 1) * D + e] == 0.0f, "zero weight column did not pool to 0");
            }
        }
    }
    for (int t = 0; t < 2; t++) {
        free(out[t]);
        free(dtok[t]);
        free(sout[t]);
        free(sdtok[t]);
    }
    free(tokens);
    free(dout);
    free(labels);
    free(weights);
}

/* ------------------------------------------------------------------ top-k */

static void run_topk(int64_t M, int64_t Q, int64_t D, int64_t k, int with_ids)
{
    float *queries = randn(M * D, 1.0f);
    float *bank = randn(Q * D, 1.0f);
    /* Exact duplicates (ties go to the lowest index), one across a block boundary,
     * and a zero vector (similarity 0 with everything). */
    if (Q > 3) {
        memcpy(bank + 2 * D, bank + 0 * D, (size_t)D * sizeof(float));
        memset(bank + 1 * D, 0, (size_t)D * sizeof(float));
    }
    if (Q > CRIBO_TOPK_BROWS + 5) {
        memcpy(bank + (CRIBO_TOPK_BROWS + 3) * D, bank + 5 * D, (size_t)D * sizeof(float));
    }
    if (M > 1) {
        memset(queries + D, 0, (size_t)D * sizeof(float));
    }
    int64_t *qids = NULL, *bids = NULL;
    if (with_ids) {
        qids = xmalloc((size_t)M * sizeof(int64_t));
        bids = xmalloc((size_t)Q * sizeof(int64_t));
        for (int64_t m = 0; m < M; m++) {
            qids[m] = below(4);
        }
        for (int64_t q = 0; q < Q; q++) {
            bids[q] = below(4);
        }
    }
    const int threads[2] = {1, 3};
    int64_t *idx[2];
    float *sim[2];
    for (int t = 0; t < 2; t++) {
        const int T = threads[t];
        idx[t] = xmalloc((size_t)(M * k) * sizeof(int64_t));
        sim[t] = xmalloc((size_t)(M * k) * sizeof(float));
        void *work = xwork(cribo_topk_workspace_size(M, D, k, T));
        int st = cribo_topk_cosine(idx[t], sim[t], queries, bank, qids, bids, M, Q, D, k, work, T);
        CHECK(st == CRIBO_OK, "topk returned %d on finite data", st);
        free(work);
    }
    CHECK(memcmp(idx[0], idx[1], (size_t)(M * k) * sizeof(int64_t)) == 0,
          "topk indices differ between 1 and 3 threads (Q=%lld)", (long long)Q);
    CHECK(memcmp(sim[0], sim[1], (size_t)(M * k) * sizeof(float)) == 0,
          "topk similarities differ between 1 and 3 threads");

    /* Brute force in double: the best admissible similarity, and the order. */
    double *qn = xmalloc((size_t)M * sizeof(double));
    double *bn = xmalloc((size_t)Q * sizeof(double));
    for (int64_t m = 0; m < M; m++) {
        double s = 0.0;
        for (int64_t e = 0; e < D; e++) {
            s += (double)queries[m * D + e] * queries[m * D + e];
        }
        qn[m] = sqrt(s);
    }
    for (int64_t q = 0; q < Q; q++) {
        double s = 0.0;
        for (int64_t e = 0; e < D; e++) {
            s += (double)bank[q * D + e] * bank[q * D + e];
        }
        bn[q] = sqrt(s);
    }
    for (int64_t m = 0; m < M; m++) {
        double best = -INFINITY;
        int64_t admissible = 0;
        for (int64_t q = 0; q < Q; q++) {
            if (with_ids && qids[m] == bids[q]) {
                continue;
            }
            admissible++;
            double d = 0.0;
            for (int64_t e = 0; e < D; e++) {
                d += (double)queries[m * D + e] * bank[q * D + e];
            }
            const double c = (qn[m] > 0 && bn[q] > 0) ? d / (qn[m] * bn[q]) : 0.0;
            best = c > best ? c : best;
        }
        const int64_t *im = idx[0] + m * k;
        const float *sm = sim[0] + m * k;
        if (admissible == 0) {
            CHECK(im[0] == -1 && isinf(sm[0]) && sm[0] < 0, "no candidate must give -1/-inf");
            continue;
        }
        CHECK(im[0] >= 0 && im[0] < Q, "topk index %lld out of range", (long long)im[0]);
        CHECK(fabs(sm[0] - best) < 1e-5, "topk best %g, brute force %g", (double)sm[0], best);
        for (int64_t r = 0; r < k; r++) {
            if (r >= admissible) {
                CHECK(im[r] == -1 && isinf(sm[r]) && sm[r] < 0,
                      "missing result must be -1 / -inf");
                continue;
            }
            CHECK(im[r] >= 0 && im[r] < Q, "topk index out of range");
            CHECK(!with_ids || bids[im[r]] != qids[m], "topk returned an excluded row");
            CHECK(sm[r] >= -1.0f - 1e-5f && sm[r] <= 1.0f + 1e-5f, "cosine %g out of [-1, 1]",
                  (double)sm[r]);
            for (int64_t r2 = 0; r2 < r; r2++) {
                CHECK(im[r2] != im[r], "topk returned index %lld twice", (long long)im[r]);
            }
            if (r > 0) {
                CHECK(sm[r - 1] > sm[r] || (sm[r - 1] == sm[r] && im[r - 1] < im[r]),
                      "topk results not sorted (similarity desc, index asc)");
            }
        }
    }
    /* A zero query has similarity 0 with everything: its first result is the lowest
     * admissible index. */
    if (M > 1 && !with_ids) {
        CHECK(idx[0][1 * k] == 0 && sim[0][1 * k] == 0.0f, "zero query: got %lld, %g",
              (long long)idx[0][1 * k], (double)sim[0][1 * k]);
    }
    /* A non-finite bank row is reported, not returned. */
    {
        bank[(Q - 1) * D] = NAN;
        int64_t *i2 = xmalloc((size_t)(M * k) * sizeof(int64_t));
        float *s2 = xmalloc((size_t)(M * k) * sizeof(float));
        void *work = xwork(cribo_topk_workspace_size(M, D, k, 3));
        int st = cribo_topk_cosine(i2, s2, queries, bank, qids, bids, M, Q, D, k, work, 3);
        CHECK(st == CRIBO_ENONFINITE, "topk on a NaN bank returned %d", st);
        free(work);
        free(i2);
        free(s2);
    }
    for (int t = 0; t < 2; t++) {
        free(idx[t]);
        free(sim[t]);
    }
    free(qn);
    free(bn);
    free(qids);
    free(bids);
    free(queries);
    free(bank);
}

/* Many exact ties: a bank of identical rows over 3 blocks.  Every row is re-scored
 * (the slow path); the results are the lowest admissible indices, in order, with
 * equal similarities, for 1 and 3 threads alike. */
static void run_topk_ties(int with_ids)
{
    const int64_t Q = 2 * CRIBO_TOPK_BROWS + 37, D = 5, M = 3, k = 40;
    float *row = randn(D, 1.0f);
    float *bank = xmalloc((size_t)(Q * D) * sizeof(float));
    float *queries = xmalloc((size_t)(M * D) * sizeof(float));
    for (int64_t q = 0; q < Q; q++) {
        memcpy(bank + q * D, row, (size_t)D * sizeof(float));
    }
    for (int64_t e = 0; e < D; e++) {
        queries[e] = row[e];
        queries[D + e] = -2.0f * row[e];
        queries[2 * D + e] = gaussian();
    }
    int64_t qids[3] = {0, 1, 2};
    int64_t *bids = xmalloc((size_t)Q * sizeof(int64_t));
    for (int64_t q = 0; q < Q; q++) {
        bids[q] = q % 3;
    }
    const int threads[2] = {1, 3};
    int64_t *idx[2];
    float *sim[2];
    for (int t = 0; t < 2; t++) {
        idx[t] = xmalloc((size_t)(M * k) * sizeof(int64_t));
        sim[t] = xmalloc((size_t)(M * k) * sizeof(float));
        void *work = xwork(cribo_topk_workspace_size(M, D, k, threads[t]));
        int st = cribo_topk_cosine(idx[t], sim[t], queries, bank, with_ids ? qids : NULL,
                                   with_ids ? bids : NULL, M, Q, D, k, work, threads[t]);
        CHECK(st == CRIBO_OK, "topk (ties) returned %d", st);
        free(work);
    }
    CHECK(memcmp(idx[0], idx[1], (size_t)(M * k) * sizeof(int64_t)) == 0 &&
          memcmp(sim[0], sim[1], (size_t)(M * k) * sizeof(float)) == 0,
          "topk on identical rows differs between 1 and 3 threads");
    for (int64_t m = 0; m < M; m++) {
        int64_t want = 0;
        for (int64_t r = 0; r < k; r++) {
            while (with_ids && bids[want] == qids[m]) {
                want++;
            }
            CHECK(idx[0][m * k + r] == want, "ties: query %lld rank %lld is %lld, want %lld",
                  (long long)m, (long long)r, (long long)idx[0][m * k + r], (long long)want);
            CHECK(sim[0][m * k + r] == sim[0][m * k], "ties: unequal similarities");
            want++;
        }
    }
    CHECK(fabsf(sim[0][0] - 1.0f) <= 2e-7f && fabsf(sim[0][k] + 1.0f) <= 2e-7f,
          "ties: cosines %g and %g, want 1 and -1", (double)sim[0][0], (double)sim[0][k]);
    for (int t = 0; t < 2; t++) {
        free(idx[t]);
        free(sim[t]);
    }
    free(bids);
    free(queries);
    free(bank);
    free(row);
}

/* The scan's error bound: about D * 2^-24, void (+inf) where D u > 1/2, and above
 * the error of a float dot product of unit vectors. */
static void test_topk_bound(void)
{
    const double E = cribo_topk_error_bound(384);
    CHECK(E > 2.2e-5 && E < 2.4e-5, "E(384) = %g", E);
    CHECK(cribo_topk_error_bound(1) > 0x1p-23, "E(1) = %g", cribo_topk_error_bound(1));
    CHECK(isinf(cribo_topk_error_bound((int64_t)1 << 24)), "E(2^24) must be +inf");
    const int64_t D = 384;
    float *x = randn(D, 1.0f);
    float *y = randn(D, 1.0f);
    double nx = 0.0, ny = 0.0;
    for (int64_t e = 0; e < D; e++) {
        nx += (double)x[e] * x[e];
        ny += (double)y[e] * y[e];
    }
    float s = 0.0f;
    double exact = 0.0;
    for (int64_t e = 0; e < D; e++) {
        x[e] = (float)(x[e] / sqrt(nx));
        y[e] = (float)(y[e] / sqrt(ny));
        s += x[e] * y[e];
        exact += (double)x[e] * y[e];
    }
    CHECK(fabs((double)s - exact) < E, "a float dot product is off by %g > E",
          fabs((double)s - exact));
    free(x);
    free(y);
}

static void test_topk(void)
{
    test_topk_bound();
    run_topk_ties(0);
    run_topk_ties(1);
    run_topk(7, 13, 5, 1, 0);
    run_topk(7, 13, 5, 3, 1);
    run_topk(7, 13, 5, 13, 0); /* k = Q */
    run_topk(5, 6, 3, 6, 1);   /* exclusion leaves fewer than k: -1 / -inf */
    run_topk(9, 2 * CRIBO_TOPK_BROWS + 37, 6, 1, 0); /* 3 blocks, last partial */
    run_topk(9, 2 * CRIBO_TOPK_BROWS + 37, 6, 4, 1);
    run_topk(CRIBO_TOPK_QROWS + 3, CRIBO_TOPK_BROWS + 9, 4, 2, 0); /* 2 query chunks */
    run_topk(1, 1, 1, 1, 0);
}

/* ------------------------------------------------------------------ losses */

static void run_softmax_cross_entropy(int64_t R, int64_t L, int two_teachers, int with_center, float scale,
                     double ts, double tt)
{
    float *s = randn(R * L, scale);
    float *ta = randn(R * L, scale);
    float *tb = two_teachers ? randn(R * L, scale) : NULL;
    float *ca = with_center ? randn(L, 1.0f) : NULL;
    float *cb = with_center && two_teachers ? randn(L, 1.0f) : NULL;
    float *wa = randu(R, 1.0f);
    float *wb = NULL;
    if (two_teachers) {
        wb = randu(R, 1.0f);
        wb[0] = 0.0f; /* a zero weight skips teacher b for that row (tb not read) */
        for (int64_t l = 0; l < L; l++) {
            tb[l] = NAN; /* row 0 of tb is never read because wb[0] == 0 */
        }
    }
    const int threads[2] = {1, 3};
    float *la[2], *lb[2], *g[2];
    for (int t = 0; t < 2; t++) {
        const int T = threads[t];
        const int Tw = T < R ? T : (int)R;
        la[t] = xmalloc((size_t)R * sizeof(float));
        lb[t] = two_teachers ? xmalloc((size_t)R * sizeof(float)) : NULL;
        g[t] = xmalloc((size_t)(R * L) * sizeof(float));
        void *work = xwork(cribo_softmax_cross_entropy_workspace_size(L) * (size_t)Tw);
        int st = cribo_softmax_cross_entropy(la[t], lb[t], g[t], s, ta, tb, ca, cb, wa, wb, R, L,
                                             ts, tt, tt, work, T);
        CHECK(st == CRIBO_OK, "softmax_cross_entropy returned %d", st);
        free(work);
    }
    CHECK(memcmp(la[0], la[1], (size_t)R * sizeof(float)) == 0, "softmax_cross_entropy loss differs by threads");
    CHECK(memcmp(g[0], g[1], (size_t)(R * L) * sizeof(float)) == 0, "softmax_cross_entropy grad differs by threads");
    CHECK(all_finite(la[0], R) && all_finite(g[0], R * L), "softmax_cross_entropy outputs not finite");
    if (two_teachers) {
        CHECK(memcmp(lb[0], lb[1], (size_t)R * sizeof(float)) == 0, "softmax_cross_entropy loss_b differs");
        CHECK(all_finite(lb[0], R), "softmax_cross_entropy loss_b not finite");
        CHECK(lb[0][0] == 0.0f, "loss_b must be 0 where wb == 0");
    }
    for (int64_t r = 0; r < R; r++) {
        /* H(p, q) >= 0 up to rounding relative to the logit scale. */
        const double slack = 1e-5 * (1.0 + scale / ts);
        CHECK(la[0][r] >= -slack, "softmax_cross_entropy loss %g < 0", (double)la[0][r]);
        double gs = 0.0;
        for (int64_t l = 0; l < L; l++) {
            gs += g[0][r * L + l];
        }
        const double wsum = wa[r] + (two_teachers ? wb[r] : 0.0);
        CHECK(fabs(gs) <= 1e-4 * (1.0 + wsum / ts), "softmax_cross_entropy grad row %lld sums to %g",
              (long long)r, gs);
    }
    /* Forward only (grad NULL, loss_b NULL) gives the same losses. */
    {
        float *l1 = xmalloc((size_t)R * sizeof(float));
        void *work = xwork(cribo_softmax_cross_entropy_workspace_size(L));
        int st = cribo_softmax_cross_entropy(l1, NULL, NULL, s, ta, tb, ca, cb, wa, wb, R, L,
                                             ts, tt, tt, work, 1);
        CHECK(st == CRIBO_OK, "softmax_cross_entropy (no grad) returned %d", st);
        CHECK(memcmp(l1, la[0], (size_t)R * sizeof(float)) == 0, "softmax_cross_entropy losses depend on grad");
        /* A non-finite student logit is reported. */
        s[R * L - 1] = INFINITY;
        st = cribo_softmax_cross_entropy(l1, NULL, NULL, s, ta, tb, ca, cb, wa, wb, R, L, ts, tt,
                                         tt, work, 1);
        CHECK(st != CRIBO_OK, "softmax_cross_entropy on an inf logit returned %d", st);
        free(work);
        free(l1);
    }
    for (int t = 0; t < 2; t++) {
        free(la[t]);
        free(lb[t]);
        free(g[t]);
    }
    free(s);
    free(ta);
    free(tb);
    free(ca);
    free(cb);
    free(wa);
    free(wb);
}

static void test_softmax_cross_entropy(void)
{
    run_softmax_cross_entropy(5, 37, 0, 0, 1.0f, 0.1, 0.04);
    run_softmax_cross_entropy(5, 37, 1, 1, 1.0f, 0.1, 0.07);
    run_softmax_cross_entropy(4, 16, 1, 0, 1.0f, 0.1, 0.04);
    run_softmax_cross_entropy(3, 1, 0, 1, 1.0f, 0.1, 0.04);      /* L = 1 */
    run_softmax_cross_entropy(6, 1000, 1, 1, 1e4f, 0.1, 0.01);   /* extreme logits stay finite */
    run_softmax_cross_entropy(1, 2049, 0, 1, 3.0f, 1.0, 1.0);
}

static void test_center(int64_t R, int64_t L, int with_center)
{
    float *x = randn(R * L, 2.0f);
    float *c = with_center ? randn(L, 1.0f) : NULL;
    float *out[2];
    const int threads[2] = {1, 3};
    for (int t = 0; t < 2; t++) {
        out[t] = xmalloc((size_t)L * sizeof(float));
        cribo_update_center(out[t], c, x, R, L, 0.9, threads[t]);
    }
    CHECK(memcmp(out[0], out[1], (size_t)L * sizeof(float)) == 0, "center differs by threads");
    for (int64_t l = 0; l < L; l++) {
        double mean = 0.0;
        for (int64_t r = 0; r < R; r++) {
            mean += x[r * L + l];
        }
        mean /= (double)R;
        const double ref = 0.9 * (c != NULL ? c[l] : 0.0) + 0.1 * mean;
        CHECK(fabs(out[0][l] - ref) <= 1e-6 * (1.0 + fabs(ref)), "center[%lld] = %g, expected %g",
              (long long)l, (double)out[0][l], ref);
    }
    free(out[0]);
    free(out[1]);
    free(x);
    free(c);
}

int main(void)
{
#ifndef CRIBO_SYSTEM_CBLAS
    scipy_openblas_set_num_threads(1); /* as the binding does: our threads, serial BLAS */
#endif
    test_parallel_for();
    test_cluster();
    test_pool(3, 11, 7, 4);
    test_pool(1, 1, 1, 1);
    test_pool(4, 33, 17, 9);
    test_topk();
    test_softmax_cross_entropy();
    test_center(5, 7, 1);
    test_center(3, 3000, 1); /* several 1024-column chunks */
    test_center(1, 1024, 0);
    printf("harness: all %d checks passed\n", n_checks);
    return 0;
}
