/* cribo.h -- the C core of cribo: CrIBo's operators over raw buffers.
 *
 * One file per operator family, one per section of docs/method.md:
 *   cluster.c    §2  joint-space clustering (positional cost, log-domain Sinkhorn)
 *   pool.c       §3  object pooling, forward and backward, hard and soft
 *   queue.c      §4  blocked top-k cosine search (the queue look-up, dense evaluation)
 *   loss.c       §5  fused softmax cross-entropy + gradient, centre update
 *   parallel.c       static row/image splits over pthreads
 *
 * Conventions (docs/contributing.md): arguments are outputs, inputs, shapes, hyper-parameters,
 * workspace, thread count.  Shapes are int64_t with these letters:
 *   B images, N tokens per view, J = 2N joint tokens, D features, K clusters,
 *   M queries, Q bank rows, R rows of logits, L logits per row.
 * Offsets are computed in int64_t; the binding has checked every dimension <= INT_MAX,
 * so casting a dimension to int at a cblas_* call is safe.
 * Kernels never allocate (workspace is passed in, sized by the *_workspace_size
 * functions, in bytes), never print, never abort.  Work is split statically over
 * independent images or rows, so results do not depend on the number of threads.
 * Ties (argmax, top-k) always go to the lowest index.  A result that goes through
 * BLAS (ssyrk in the clustering, sgemm in soft pooling) is reproducible for one
 * BLAS kernel; the top-k search only uses sgemm to choose what to score exactly,
 * so its result is the same under every kernel (docs/guarantees.md).
 */
#ifndef CRIBO_H
#define CRIBO_H

#include <stddef.h>
#include <stdint.h>

#define CRIBO_OK 0
#define CRIBO_ENONFINITE 1    /* an input held NaN or +-inf */
#define CRIBO_ENONFINITE_S 2  /* ... the student logits (cribo_softmax_cross_entropy) */
#define CRIBO_ENONFINITE_TA 3 /* ... teacher a (scaled by its temperature) */
#define CRIBO_ENONFINITE_TB 4 /* ... teacher b */

/* ------------------------------------------------------------------ parallel.c */

#define CRIBO_MAX_THREADS 256

/* Calls fn(ctx, begin, end, tid) on the static split of [0, n) into
 * T = cribo_thread_count(n, n_threads) contiguous chunks (chunk t = [n*t/T, n*(t+1)/T)),
 * chunk 0 on the calling thread.  A chunk whose thread cannot be started runs on
 * the calling thread, with its own tid. */
typedef void (*cribo_task_fn)(void *ctx, int64_t begin, int64_t end, int tid);
void cribo_parallel_for(int64_t n, int n_threads, cribo_task_fn fn, void *ctx);

/* The number of chunks (tids 0 .. T-1) cribo_parallel_for(n, n_threads, ...) runs:
 * n_threads clamped to [1, CRIBO_MAX_THREADS], then to n (0 where n <= 0). */
int cribo_thread_count(int64_t n, int n_threads);

/* The first non-zero of status[0 .. T-1] (per-thread error codes, in tid order),
 * or CRIBO_OK. */
int cribo_first_error(const int *status, int T);

/* 1 if every one of the n floats is finite, else 0. */
int cribo_all_finite(const float *x, int64_t n);

/* ------------------------------------------------------------------- cluster.c */

typedef struct {
    double pos_weight;       /* alpha_pos >= 0; 0 skips the positional cost */
    double sinkhorn_lambda;  /* lambda > 0 */
    int64_t sinkhorn_iters;  /* >= 0 */
    int64_t n_iters;         /* >= 1 */
    int update_marginals;    /* c_k = count_k + 0.01, normalised, after each assignment */
} cribo_cluster_params;

/* Bytes of workspace one thread needs for cribo_cluster (multiply by n_threads). */
size_t cribo_cluster_workspace_size(int64_t N, int64_t D, int64_t K);

/* Joint-space clustering of docs/method.md §2, image by image (parallel over images).
 *   labels (B, J)     out: cluster of each joint token, j = view * N + n
 *   counts (B, 2, K)  out: members of each cluster in each view
 *   plan   (B, J, K)  out, may be NULL: transport plan T of the last iteration
 *   tokens (B, J, D)  in: teacher tokens (the (B, 2, N, D) array)
 *   pos    (B, J, 2)  in: (x, y) of each token in the original image frame
 *   init   (B, K)     in: distinct joint indices in [0, J) seeding the clusters
 *   work   n_threads * cribo_cluster_workspace_size(N, D, K) bytes, 64-byte aligned */
void cribo_cluster(int64_t *labels, int64_t *counts, float *plan,
                   const float *tokens, const float *pos, const int64_t *init,
                   int64_t B, int64_t N, int64_t D, int64_t K,
                   const cribo_cluster_params *params, void *work, int n_threads);

/* ---------------------------------------------------------------------- pool.c */

/* Hard pooling, docs/method.md §3: per-view mean of member tokens (zeros for an empty cluster),
 * summed in double.  Parallel over the 2B (image, view) pairs.
 *   out    (B, 2, K, D)  overwritten
 *   tokens (B, 2, N, D)
 *   labels (B, 2, N)     cluster in [0, K), or -1 for a token in no cluster
 *   work   n_threads * cribo_pool_workspace_size(D, K) bytes */
size_t cribo_pool_workspace_size(int64_t D, int64_t K);
void cribo_pool(float *out, const float *tokens, const int64_t *labels,
                int64_t B, int64_t N, int64_t D, int64_t K,
                void *work, int n_threads);

/* Backward of cribo_pool w.r.t. tokens.
 *   dtokens (B, 2, N, D)  overwritten: dout[b, i, labels[b, i, n]] / count, 0 for -1
 *   dout    (B, 2, K, D)
 *   work    as for cribo_pool */
void cribo_pool_backward(float *dtokens, const float *dout, const int64_t *labels,
                         int64_t B, int64_t N, int64_t D, int64_t K,
                         void *work, int n_threads);

/* Soft pooling: out[b, i] = Qhat[b, i]^T @ tokens[b, i], Qhat = weights with each
 * column L1-normalised within its view (in double, before the sgemm, so weights of
 * any finite magnitude work; a zero column stays zero).
 *   out     (B, 2, K, D)  overwritten
 *   tokens  (B, 2, N, D)
 *   weights (B, 2, N, K)  non-negative
 *   work    n_threads * cribo_pool_soft_workspace_size(N, K) bytes (Qhat of one view
 *           and its column sums) */
size_t cribo_pool_soft_workspace_size(int64_t N, int64_t K);
void cribo_pool_soft(float *out, const float *tokens, const float *weights,
                     int64_t B, int64_t N, int64_t D, int64_t K,
                     void *work, int n_threads);

/* Backward of cribo_pool_soft w.r.t. tokens: dtokens = Qhat @ dout.
 *   dtokens (B, 2, N, D) overwritten;  dout (B, 2, K, D) */
void cribo_pool_soft_backward(float *dtokens, const float *dout, const float *weights,
                              int64_t B, int64_t N, int64_t D, int64_t K,
                              void *work, int n_threads);

/* ----------------------------------------------------------------- queue.c */

/* The bank is searched in blocks of CRIBO_TOPK_BROWS rows, the queries in chunks of
 * CRIBO_TOPK_QROWS; each is copied L2-normalised first and one sgemm per tile gives
 * approximate similarities, which only decide what to re-score exactly (below).
 * Per thread the scratch is QROWS x BROWS similarities plus the two normalised
 * copies (about 7 MB at D = 384), their QROWS + BROWS norms in double, and the
 * thread's (M, k) top-k lists (a double score and an int64 index each: 16 M k
 * bytes), whatever the bank size.  Threads split the bank blocks statically; their
 * lists are merged in a fixed order at the end. */
#define CRIBO_TOPK_QROWS 1024
#define CRIBO_TOPK_BROWS 1024
size_t cribo_topk_workspace_size(int64_t M, int64_t D, int64_t k, int n_threads);

/* E(D): a bound on |float sgemm similarity of the normalised copies - exact score|
 * for rows of length D, valid for any BLAS kernel (summation order, blocking, FMA);
 * +inf where no bound holds (D > 2^23).  Derivation in queue.c. */
double cribo_topk_error_bound(int64_t D);

/* k most cosine-similar bank rows of each query, ranked exactly:
 *   score(x, y) = dot(x, y) / (|x| |y|)  (0 where either row is zero),
 * each dot product and squared norm summed in double in one fixed order from the
 * caller's float rows (vmath.h cribo_dot_f64), so the score of two rows depends on
 * their values alone -- not on their position in the bank, the tile, the thread,
 * the query chunk or the BLAS kernel.  Results are sorted by (score desc, index
 * asc) and sim is the score rounded to float; every bank row whose score could
 * reach the k-th is re-scored (the sgemm scan skips a row only when its similarity
 * plus cribo_topk_error_bound(D) is below the k-th score), so ties, near-ties and
 * banks of identical rows are ranked exactly, whatever the thread count.  Where
 * ids are given, bank row q is never returned for query m if bank_ids[q] ==
 * query_ids[m]; missing results are index -1 and similarity -inf.
 *   idx       (M, k)  out
 *   sim       (M, k)  out
 *   queries   (M, D)
 *   bank      (Q, D)
 *   query_ids (M) and bank_ids (Q), or both NULL
 *   work      cribo_topk_workspace_size(M, D, k, n_threads) bytes, 64-byte aligned
 * Returns CRIBO_ENONFINITE if a query or bank row is not finite. */
int cribo_topk_cosine(int64_t *idx, float *sim, const float *queries, const float *bank,
                      const int64_t *query_ids, const int64_t *bank_ids,
                      int64_t M, int64_t Q, int64_t D, int64_t k,
                      void *work, int n_threads);

/* ---------------------------------------------------------------------- loss.c */

/* Fused softmax cross-entropy with up to two teachers per student row, docs/method.md §5.
 * For each row r, with p_s = softmax(s / student_temp), p_a = softmax((ta - ca) / temp_a):
 *   loss_a[r] = H(p_a, p_s) = -sum_l p_a[l] log p_s[l]      (same for b)
 *   grad[r]   = (wa[r] * (p_s - p_a) + wb[r] * (p_s - p_b)) / student_temp
 * The logits are read once from memory and the gradient written once.
 *   loss_a, loss_b (R)     out (loss_b may be NULL; it is 0 where wb[r] == 0 skips b)
 *   grad      (R, L)       out, may be NULL (forward only)
 *   s         (R, L)       student logits
 *   ta, tb    (R, L)       teacher logits (tb may be NULL: no second teacher)
 *   ca, cb    (L)          centres, may be NULL (zero)
 *   wa, wb    (R)          per-row gradient weights, may be NULL (1 for a, 0 for b);
 *                          a row with wb[r] == 0 does not read tb[r]
 *   work      n_threads * cribo_softmax_cross_entropy_workspace_size(L) bytes
 * Returns CRIBO_ENONFINITE_S / _TA / _TB naming the first input (in the lowest
 * failing row of the first failing thread) whose scaled logits are not finite. */
size_t cribo_softmax_cross_entropy_workspace_size(int64_t L);
int cribo_softmax_cross_entropy(float *loss_a, float *loss_b, float *grad,
                                const float *s, const float *ta, const float *tb,
                                const float *ca, const float *cb,
                                const float *wa, const float *wb,
                                int64_t R, int64_t L,
                                double student_temp, double temp_a, double temp_b,
                                void *work, int n_threads);

/* Column means of x (R, L) accumulated in double, parallel over columns:
 *   out (L) = momentum * center + (1 - momentum) * mean_r x[r]
 * (center may be NULL: treated as zero).  R >= 1. */
void cribo_update_center(float *out, const float *center, const float *x,
                         int64_t R, int64_t L, double momentum, int n_threads);

#endif /* CRIBO_H */
