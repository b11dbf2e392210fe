/* _C.c -- the module cribo._C: one entry point per public operator of cribo/ops, each
 * with the table of its argument rules, and the module definition.  Together with
 * csrc/binding/args.c (the argument checker, interface in csrc/binding/args.h) it is the only code of
 * cribo that knows Python and NumPy, and the one owner of every argument rule of the
 * operators.
 *
 * Why one file of nearly 1000 lines: every entry point lives here so that each operator's rules
 * sit in one table next to its kernel call, and the module's method table lists them
 * all; what is generic (parsing a call against a table, the messages) is in args.c.
 *
 * Each entry point has the name and the keyword names of its public Python function
 * (the modules of cribo/ops, which only convert array-likes and dispatch) and a table of
 * argument specs (arg_spec: dtype and symbolic shape such as "B,2,N,d" for arrays, kind
 * and range for scalars; see args.h) read by ONE checker, cribo_args_check_call(), which
 * parses the call and writes every message ("fn: arg must be ..., got ..." with the public
 * function and argument names).  Rules that are not shapes (K <= 2N, distinct seeds,
 * labels in range, ids given together, ...) are written next to the table of their entry
 * point.  Then: allocate outputs and workspace, release the GIL around the kernel, map
 * its status to an exception. */
#include "args.h" /* first: Python.h, NumPy (its API table is filled in PyInit__C) */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cribo.h"

#ifndef CRIBO_SYSTEM_CBLAS
void scipy_openblas_set_num_threads(int num_threads);
#define blas_set_num_threads scipy_openblas_set_num_threads
#else
#define blas_set_num_threads(n) ((void)(n))
#endif

/* Threads used by every kernel; BLAS itself always runs on one thread inside them. */
static int n_threads = 1;

/* A 64-byte aligned workspace (never of size 0); MemoryError if it cannot be had. */
static void *alloc_work(size_t bytes)
{
    void *p = NULL;
    if (bytes == 0) {
        bytes = 64;
    }
    if (posix_memalign(&p, 64, bytes) != 0) {
        PyErr_NoMemory();
        return NULL;
    }
    return p;
}

/* temperatures, everywhere */
#define TEMP(name, def) {name, S_FLOAT, NULL, OPT | LO_OPEN, 0.0, 1e5, def, 0, NULL}

/* Runs the fused cross-entropy kernel; a non-finite scaled input is reported under the
 * caller's public argument names (s_name, ta_name, tb_name). */
static int run_softmax_cross_entropy(const char *fn, const char *s_name, const char *ta_name,
                                     const char *tb_name, float *la, float *lb, float *grad,
                                     const float *s, const float *ta, const float *tb,
                                     const float *ca, const float *cb, const float *wa,
                                     const float *wb, npy_intp R, npy_intp L, double ts,
                                     double tta, double ttb)
{
    if (R == 0) {
        return 0;
    }
    const int T = n_threads;
    void *work = alloc_work(cribo_softmax_cross_entropy_workspace_size(L) *
                            (size_t)(T < R ? T : R));
    if (work == NULL) {
        return -1;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = cribo_softmax_cross_entropy(la, lb, grad, s, ta, tb, ca, cb, wa, wb, R, L, ts, tta,
                                         ttb, work, T);
    Py_END_ALLOW_THREADS
    free(work);
    if (status == CRIBO_OK) {
        return 0;
    }
    /* The kernel checks the logits as it scales them, so a finite logit whose quotient by
     * the temperature leaves float32's range is reported too. */
    PyErr_Format(cribo_args_ValueError,
                 "%s: %s %s must be finite, got NaN or infinity (in the input, or from a finite "
                 "value beyond float32's range once scaled)", fn,
                 status == CRIBO_ENONFINITE_S ? s_name : status == CRIBO_ENONFINITE_TA ? ta_name
                                                                                     : tb_name,
                 status == CRIBO_ENONFINITE_S ? "(divided by student_temp)"
                                              : "(after centring and scaling)");
    return -1;
}

/* ------------------------------------------------------------------ threads */

static const arg_spec set_num_threads_args[] = {
    {"n", S_INT, NULL, 0, 1, CRIBO_MAX_THREADS, 0, 0, NULL},
};
static const entry_spec set_num_threads_spec = {"set_num_threads", set_num_threads_args, 1, NULL};

static PyObject *py_set_num_threads(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    call_t c;
    if (cribo_args_check_call(&c, &set_num_threads_spec, args, kw) < 0) {
        return NULL;
    }
    n_threads = (int)c.i[0];
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromLong(n_threads);
}

/* ------------------------------------------------------------------ cluster, draw_init */

#define SEED_MAX 9223372036854775807.0 /* 2^63 - 1 (rounds to 2^63; see check_int, args.c) */

/* The joint tokens of one image bound the clusters: K <= 2N. */
static int check_clusters_fit(const call_t *c, const char *k_name)
{
    const npy_intp N = DIM(c, 'N'), K = DIM(c, 'K');
    if (K > 2 * N) {
        PyErr_Format(cribo_args_ValueError, "%s: %s must be at most 2N = %zd (the joint tokens of "
                     "one image), got %zd", c->e->fn, k_name, (Py_ssize_t)(2 * N), (Py_ssize_t)K);
        return -1;
    }
    return 0;
}

enum { DI_IMAGES, DI_TOKENS, DI_CLUSTERS, DI_SEED, DI_DRAW };
static const arg_spec draw_init_args[] = {
    {"n_images", S_INT, "B", 0, 0, INTMAX, 0, 0, NULL},
    {"n_tokens", S_INT, "N", 0, 1, INTMAX, 0, 0, NULL},
    {"n_clusters", S_INT, "K", 0, 1, INTMAX, 0, 0, NULL},
    {"seed", S_SEED, "B", OPT, 0, SEED_MAX, 0, 0, NULL},
    {"draw", S_CALLABLE, NULL, 0, 0, 0, 0, 0, NULL},
};
static const entry_spec draw_init_spec = {"draw_init", draw_init_args, N_OF(draw_init_args),
                                          NULL};

/* draw(n_images, n_tokens, n_clusters, seed) once its arguments pass; the draw itself is
 * NumPy's Generator, in cribo/ops/clustering.py. */
static PyObject *call_draw(PyObject *draw, npy_intp B, npy_intp N, npy_intp K, PyObject *seed)
{
    PyObject *zero = NULL;
    if (seed == NULL) {
        seed = zero = PyLong_FromLong(0);
        if (zero == NULL) {
            return NULL;
        }
    }
    PyObject *r = PyObject_CallFunction(draw, "nnnO", (Py_ssize_t)B, (Py_ssize_t)N,
                                        (Py_ssize_t)K, seed);
    Py_XDECREF(zero);
    return r;
}

static PyObject *py_draw_init(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    call_t c;
    if (cribo_args_check_call(&c, &draw_init_spec, args, kw) < 0 ||
        check_clusters_fit(&c, "n_clusters") < 0) {
        return NULL;
    }
    return call_draw(c.obj[DI_DRAW], DIM(&c, 'B'), DIM(&c, 'N'), DIM(&c, 'K'), c.obj[DI_SEED]);
}

enum { CL_TOKENS, CL_POSITIONS, CL_K, CL_POSW, CL_LAMBDA, CL_SITERS, CL_ITERS, CL_UPDATE,
       CL_SEED, CL_INIT, CL_PLAN, CL_DRAW };
static const arg_spec cluster_args[] = {
    {"tokens", A_F32, "B,2,N,d", FINITE, 0, 0, 0, 0, NULL},
    {"positions", A_F32, "B,2,N,2", FINITE, 0, 0, 0, 0, NULL},
    {"n_clusters", S_INT, "K", 0, 1, INTMAX, 0, 0, NULL},
    {"pos_weight", S_FLOAT, NULL, OPT, 0.0, 1e6, 2.0, 0, NULL},
    {"sinkhorn_lambda", S_FLOAT, NULL, OPT | LO_OPEN, 0.0, 1e6, 20.0, 0, NULL},
    {"sinkhorn_iters", S_INT, NULL, OPT, 0, 100000, 5, 0, NULL},
    {"n_iters", S_INT, NULL, OPT, 1, 100000, 5, 0, NULL},
    {"update_marginals", S_FLAG, NULL, OPT, 0, 0, 1, 0, NULL},
    {"seed", S_SEED, "B", OPT, 0, SEED_MAX, 0, 0, NULL},
    {"init", A_I64, "B,K", OPT, 0, 0, 0, 0, NULL},
    {"return_plan", S_FLAG, NULL, OPT, 0, 0, 0, 0, NULL},
    {"draw", S_CALLABLE, NULL, OPT | NONE_OK, 0, 0, 0, 0, NULL},
};
static const letter_doc cluster_nonempty[] = {
    {'B', "the batch size B"}, {'N', "the number of tokens per view N"},
    {'d', "the token width d"}, {0, NULL}};
static const entry_spec cluster_spec = {"cluster", cluster_args, N_OF(cluster_args),
                                        cluster_nonempty};

/* init: distinct joint indices in [0, 2N) per image. */
static int check_init(const call_t *c)
{
    const npy_intp B = DIM(c, 'B'), N = DIM(c, 'N'), K = DIM(c, 'K');
    if (cribo_args_check_index_range(c, CL_INIT, 0, 2 * N) < 0) {
        return -1;
    }
    char *seen = (char *)calloc((size_t)(2 * N), 1);
    if (seen == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    const int64_t *ix = I64P(c, CL_INIT);
    for (npy_intp b = 0; b < B; b++) {
        for (npy_intp k = 0; k < K; k++) {
            if (seen[ix[b * K + k]]) {
                PyErr_Format(cribo_args_ValueError, "%s: init must hold distinct token indices per "
                             "image, got %lld twice in image %zd", c->e->fn,
                             (long long)ix[b * K + k], (Py_ssize_t)b);
                free(seen);
                return -1;
            }
            seen[ix[b * K + k]] = 1;
        }
        for (npy_intp k = 0; k < K; k++) {
            seen[ix[b * K + k]] = 0;
        }
    }
    free(seen);
    return 0;
}

static PyObject *py_cluster(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    call_t c;
    if (cribo_args_check_call(&c, &cluster_spec, args, kw) < 0 ||
        check_clusters_fit(&c, "n_clusters") < 0) {
        return NULL;
    }
    const npy_intp B = DIM(&c, 'B'), N = DIM(&c, 'N'), D = DIM(&c, 'd'), K = DIM(&c, 'K');
    if (2 * N > INT_MAX || (npy_intp)(2 * N) * K > (npy_intp)INT_MAX * 64) {
        PyErr_Format(cribo_args_ValueError, "cluster: 2N x n_clusters = %zd x %zd is too large",
                     (Py_ssize_t)(2 * N), (Py_ssize_t)K);
        return NULL;
    }
    PyObject *init; /* owned */
    if (c.arr[CL_INIT] != NULL) {
        init = (PyObject *)c.arr[CL_INIT];
        Py_INCREF(init);
    } else {
        if (c.obj[CL_DRAW] == NULL) {
            PyErr_SetString(PyExc_ValueError, "cluster: init is required when draw is None");
            return NULL;
        }
        init = call_draw(c.obj[CL_DRAW], B, N, K, c.obj[CL_SEED]);
        if (init == NULL || cribo_args_check_array(&c, CL_INIT, init) < 0) {
            Py_XDECREF(init);
            return NULL;
        }
    }
    PyArrayObject *labels = NULL, *counts = NULL, *plan = NULL;
    void *work = NULL;
    if (check_init(&c) < 0) {
        goto fail;
    }
    npy_intp ldims[3] = {B, 2, N};
    npy_intp cdims[3] = {B, 2, K};
    npy_intp pdims[3] = {B, 2 * N, K};
    labels = (PyArrayObject *)PyArray_SimpleNew(3, ldims, NPY_INT64);
    counts = (PyArrayObject *)PyArray_SimpleNew(3, cdims, NPY_INT64);
    if (labels == NULL || counts == NULL) {
        goto fail;
    }
    if (c.i[CL_PLAN]) {
        plan = (PyArrayObject *)PyArray_SimpleNew(3, pdims, NPY_FLOAT32);
        if (plan == NULL) {
            goto fail;
        }
    }
    const int T = n_threads;
    const size_t ws = cribo_cluster_workspace_size(N, D, K);
    work = alloc_work(ws * (size_t)(T < B ? T : B));
    if (work == NULL) {
        goto fail;
    }
    cribo_cluster_params params = {c.f[CL_POSW], c.f[CL_LAMBDA], c.i[CL_SITERS], c.i[CL_ITERS],
                                   (int)c.i[CL_UPDATE]};
    Py_BEGIN_ALLOW_THREADS
    cribo_cluster((int64_t *)PyArray_DATA(labels), (int64_t *)PyArray_DATA(counts),
                  plan != NULL ? (float *)PyArray_DATA(plan) : NULL, F32P(&c, CL_TOKENS),
                  F32P(&c, CL_POSITIONS), I64P(&c, CL_INIT), B, N, D, K, &params, work, T);
    Py_END_ALLOW_THREADS
    free(work);
    if (plan == NULL) {
        Py_INCREF(Py_None);
        plan = (PyArrayObject *)Py_None;
    }
    return Py_BuildValue("NNNN", labels, counts, plan, init);

fail:
    free(work);
    Py_XDECREF(labels);
    Py_XDECREF(counts);
    Py_XDECREF(plan);
    Py_DECREF(init);
    return NULL;
}

/* ------------------------------------------------------------------ pool */

#define N_CLUSTERS_ARG(flags, note) {"n_clusters", S_INT, "K", flags, 1, INTMAX, 0, 0, note}
static const arg_spec pool_args[] = {
    {"tokens", A_F32, "B,2,N,d", FINITE, 0, 0, 0, 0, NULL},
    {"labels", A_I64, "B,2,N", 0, 0, 0, 0, 0, NULL},
    N_CLUSTERS_ARG(0, " (required with integer labels)"),
};
static const arg_spec pool_backward_args[] = {
    {"grad_objects", A_F32, "B,2,K,d", FINITE, 0, 0, 0, 0, NULL},
    {"labels", A_I64, "B,2,N", 0, 0, 0, 0, 0, NULL},
    N_CLUSTERS_ARG(0, " (required with integer labels)"),
};
static const arg_spec pool_soft_args[] = {
    {"tokens", A_F32, "B,2,N,d", FINITE, 0, 0, 0, 0, NULL},
    {"weights", A_F32, "B,2,N,K", FINITE | NONNEG, 0, 0, 0, 0, NULL},
    N_CLUSTERS_ARG(OPT | NONE_OK, NULL),
};
static const arg_spec pool_soft_backward_args[] = {
    {"grad_objects", A_F32, "B,2,K,d", FINITE, 0, 0, 0, 0, NULL},
    {"weights", A_F32, "B,2,N,K", FINITE | NONNEG, 0, 0, 0, 0, NULL},
    N_CLUSTERS_ARG(OPT | NONE_OK, NULL),
};
static const letter_doc pool_nonempty[] = {
    {'B', "the batch size B"}, {'N', "the number of tokens per view N"},
    {'K', "the number of clusters K"}, {'d', "the token width d"}, {0, NULL}};
/* The public functions are pool and pool_backward, with labels or with weights. */
static const entry_spec pool_spec = {"pool", pool_args, N_OF(pool_args), pool_nonempty};
static const entry_spec pool_backward_spec = {"pool_backward", pool_backward_args,
                                              N_OF(pool_backward_args), pool_nonempty};
static const entry_spec pool_soft_spec = {"pool", pool_soft_args, N_OF(pool_soft_args),
                                          pool_nonempty};
static const entry_spec pool_soft_backward_spec = {"pool_backward", pool_soft_backward_args,
                                                   N_OF(pool_soft_backward_args), pool_nonempty};

/* kind: 0 pool, 1 pool_backward, 2 pool_soft, 3 pool_soft_backward */
static PyObject *pool_entry(PyObject *args, PyObject *kw, int kind)
{
    static const entry_spec *const specs[4] = {&pool_spec, &pool_backward_spec, &pool_soft_spec,
                                               &pool_soft_backward_spec};
    call_t c;
    if (cribo_args_check_call(&c, specs[kind], args, kw) < 0) {
        return NULL;
    }
    const int forward = kind == 0 || kind == 2, soft = kind >= 2;
    const npy_intp B = DIM(&c, 'B'), N = DIM(&c, 'N'), D = DIM(&c, 'd'), K = DIM(&c, 'K');
    if (!soft && cribo_args_check_index_range(&c, 1, -1, K) < 0) {
        return NULL;
    }
    npy_intp dims[4] = {B, 2, forward ? K : N, D};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(4, dims, NPY_FLOAT32);
    if (out == NULL) {
        return NULL;
    }
    const int T = n_threads;
    void *work = alloc_work((soft ? cribo_pool_soft_workspace_size(N, K)
                                  : cribo_pool_workspace_size(D, K)) * (size_t)T);
    if (work == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    float *o = (float *)PyArray_DATA(out);
    const float *x = F32P(&c, 0);
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case 0:
        cribo_pool(o, x, I64P(&c, 1), B, N, D, K, work, T);
        break;
    case 1:
        cribo_pool_backward(o, x, I64P(&c, 1), B, N, D, K, work, T);
        break;
    case 2:
        cribo_pool_soft(o, x, F32P(&c, 1), B, N, D, K, work, T);
        break;
    default:
        cribo_pool_soft_backward(o, x, F32P(&c, 1), B, N, D, K, work, T);
        break;
    }
    Py_END_ALLOW_THREADS
    free(work);
    return (PyObject *)out;
}

static PyObject *py_pool(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return pool_entry(args, kw, 0);
}

static PyObject *py_pool_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return pool_entry(args, kw, 1);
}

static PyObject *py_pool_soft(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return pool_entry(args, kw, 2);
}

static PyObject *py_pool_soft_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return pool_entry(args, kw, 3);
}

/* ------------------------------------------------------------------ top-k */

enum { TK_QUERIES, TK_BANK, TK_K, TK_QIDS, TK_BIDS };
static const arg_spec topk_cosine_args[] = {
    {"queries", A_F32, "M,d", 0, 0, 0, 0, 0, NULL},
    {"bank", A_F32, "Q,d", 0, 0, 0, 0, 0, NULL},
    {"k", S_INT, NULL, OPT, 1, INTMAX, 1, 0, NULL},
    {"query_ids", A_I64, "M", OPT, 0, 0, 0, 0, NULL},
    {"bank_ids", A_I64, "Q", OPT, 0, 0, 0, 0, NULL},
};
static const letter_doc topk_cosine_nonempty[] = {
    {'d', "the feature width d"}, {'Q', "the bank size Q"}, {0, NULL}};
static const entry_spec topk_cosine_spec = {"topk_cosine", topk_cosine_args,
                                            N_OF(topk_cosine_args), topk_cosine_nonempty};

static PyObject *py_topk_cosine(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    call_t c;
    if (cribo_args_check_call(&c, &topk_cosine_spec, args, kw) < 0) {
        return NULL;
    }
    const npy_intp M = DIM(&c, 'M'), D = DIM(&c, 'd'), Q = DIM(&c, 'Q');
    const long long k = c.i[TK_K];
    if (k > Q) {
        PyErr_Format(cribo_args_ValueError, "topk_cosine: k must be in [1, %zd] (the bank size), "
                     "got %lld", (Py_ssize_t)Q, k);
        return NULL;
    }
    if ((c.arr[TK_QIDS] == NULL) != (c.arr[TK_BIDS] == NULL)) {
        PyErr_SetString(cribo_args_ValueError, "topk_cosine: query_ids and bank_ids must be given "
                        "together");
        return NULL;
    }
    npy_intp dims[2] = {M, (npy_intp)k};
    PyArrayObject *idx = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_INT64);
    PyArrayObject *sim = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    void *work = NULL;
    if (idx == NULL || sim == NULL) {
        goto fail;
    }
    if (M > 0) {
        const int T = n_threads;
        work = alloc_work(cribo_topk_workspace_size(M, D, k, T));
        if (work == NULL) {
            goto fail;
        }
        int status;
        const int64_t *qids = c.arr[TK_QIDS] != NULL ? I64P(&c, TK_QIDS) : NULL;
        const int64_t *bids = c.arr[TK_BIDS] != NULL ? I64P(&c, TK_BIDS) : NULL;
        Py_BEGIN_ALLOW_THREADS
        status = cribo_topk_cosine((int64_t *)PyArray_DATA(idx), (float *)PyArray_DATA(sim),
                                   F32P(&c, TK_QUERIES), F32P(&c, TK_BANK), qids, bids, M, Q, D,
                                   k, work, T);
        Py_END_ALLOW_THREADS
        free(work);
        work = NULL;
        if (status != CRIBO_OK) {
            PyErr_SetString(cribo_args_ValueError, "topk_cosine: queries and bank must be finite, got "
                            "NaN or infinity");
            goto fail;
        }
    }
    return Py_BuildValue("NN", idx, sim);

fail:
    free(work);
    Py_XDECREF(idx);
    Py_XDECREF(sim);
    return NULL;
}

/* ------------------------------------------------------------------ softmax_cross_entropy */

enum { SX_S, SX_T, SX_C, SX_TS, SX_TT };
static const arg_spec softmax_cross_entropy_args[] = {
    {"student_logits", A_F32, "R,L", 0, 0, 0, 0, 0, NULL},
    {"teacher_logits", A_F32, "R,L", 0, 0, 0, 0, 0, NULL},
    {"center", A_F32, "L", OPT | FINITE, 0, 0, 0, 0, NULL},
    TEMP("student_temp", 0.1),
    TEMP("teacher_temp", 0.07),
};
static const letter_doc logits_nonempty[] = {{'L', "the number of logits L"}, {0, NULL}};
static const entry_spec softmax_cross_entropy_spec = {
    "softmax_cross_entropy", softmax_cross_entropy_args, N_OF(softmax_cross_entropy_args),
    logits_nonempty};

static PyObject *py_softmax_cross_entropy(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    call_t c;
    if (cribo_args_check_call(&c, &softmax_cross_entropy_spec, args, kw) < 0) {
        return NULL;
    }
    const npy_intp R = DIM(&c, 'R'), L = DIM(&c, 'L');
    npy_intp rd[1] = {R};
    npy_intp gd[2] = {R, L};
    PyArrayObject *loss = (PyArrayObject *)PyArray_SimpleNew(1, rd, NPY_FLOAT32);
    PyArrayObject *grad = (PyArrayObject *)PyArray_SimpleNew(2, gd, NPY_FLOAT32);
    if (loss == NULL || grad == NULL ||
        run_softmax_cross_entropy("softmax_cross_entropy", "student_logits", "teacher_logits",
                                  "teacher_logits", (float *)PyArray_DATA(loss), NULL,
                                  (float *)PyArray_DATA(grad), F32P(&c, SX_S), F32P(&c, SX_T),
                                  NULL, OPT_F32P(&c, SX_C), NULL, NULL, NULL, R, L, c.f[SX_TS],
                                  c.f[SX_TT], c.f[SX_TT]) < 0) {
        Py_XDECREF(loss);
        Py_XDECREF(grad);
        return NULL;
    }
    return Py_BuildValue("NN", loss, grad);
}

/* ------------------------------------------------------------------ update_center */

enum { UC_C, UC_T, UC_M };
static const arg_spec update_center_args[] = {
    {"center", A_F32, "L", FINITE, 0, 0, 0, 0, NULL},
    {"teacher_logits", A_F32, "R,L", FINITE, 0, 0, 0, 0, NULL},
    {"momentum", S_FLOAT, NULL, OPT, 0.0, 1.0, 0.9, 0, NULL},
};
static const entry_spec update_center_spec = {"update_center", update_center_args,
                                              N_OF(update_center_args), NULL};

/* out = momentum * center + (1 - momentum) * mean of the R rows (center itself if R = 0). */
static void update_center_into(float *out, const float *center, const float *x, npy_intp R,
                               npy_intp L, double momentum)
{
    if (R == 0) {
        memcpy(out, center, (size_t)L * sizeof(float));
        return;
    }
    const int T = n_threads;
    Py_BEGIN_ALLOW_THREADS
    cribo_update_center(out, center, x, R, L, momentum, T);
    Py_END_ALLOW_THREADS
}

static PyObject *py_update_center(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    call_t c;
    if (cribo_args_check_call(&c, &update_center_spec, args, kw) < 0) {
        return NULL;
    }
    const npy_intp R = DIM(&c, 'R'), L = DIM(&c, 'L');
    npy_intp d[1] = {L};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, d, NPY_FLOAT32);
    if (out == NULL) {
        return NULL;
    }
    update_center_into((float *)PyArray_DATA(out), F32P(&c, UC_C), F32P(&c, UC_T), R, L,
                       c.f[UC_M]);
    return (PyObject *)out;
}

/* ------------------------------------------------------------------ cribo_losses */

enum { LS_SG, LS_TG, LS_SO, LS_TO, LS_TN, LS_M1, LS_M2, LS_CG, LS_CO, LS_TS, LS_TT, LS_TTO,
       LS_W, LS_MOM, LS_DEN };
static const arg_spec cribo_losses_args[] = {
    {"student_global", A_F32, "2,B,L", 0, 0, 0, 0, 0, NULL},
    {"teacher_global", A_F32, "2,B,L", 0, 0, 0, 0, 0, NULL},
    {"student_objects", A_F32, "2,M,L", 0, 0, 0, 0, 0, NULL},
    {"teacher_objects", A_F32, "2,M,L", 0, 0, 0, 0, 0, NULL},
    {"teacher_neighbours", A_F32, "2,M,L", OPT, 0, 0, 0, 0, NULL},
    {"mask1", A_BOOL, "M", OPT, 0, 0, 0, 0, NULL},
    {"mask2", A_BOOL, "M", OPT, 0, 0, 0, 0, NULL},
    {"center_global", A_F32, "L", FINITE, 0, 0, 0, 0, NULL},
    {"center_objects", A_F32, "L", FINITE, 0, 0, 0, 0, NULL},
    TEMP("student_temp", 0.1),
    TEMP("teacher_temp", 0.07),
    {"teacher_temp_objects", S_FLOAT, NULL, OPT | NONE_OK | LO_OPEN, 0.0, 1e5, 0, 0, NULL},
    {"weights", S_FLOATS, NULL, OPT, 0.0, 1e6, 1.0, 3, "(w_global, w_objects, w_neighbours)"},
    {"center_momentum", S_FLOAT, NULL, OPT, 0.0, 1.0, 0.9, 0, NULL},
    {"denominators", S_INTS, NULL, OPT | NONE_OK, 0, 4611686018427387904.0, 0, 4, "(B, M, Z1, Z2)"},
};
static const letter_doc cribo_losses_nonempty[] = {
    {'B', "the batch size B"}, {'L', "the number of logits L"}, {0, NULL}};
static const entry_spec cribo_losses_spec = {"cribo_losses", cribo_losses_args,
                                             N_OF(cribo_losses_args), cribo_losses_nonempty};

static double sum_f64(const float *x, npy_intp n)
{
    double s = 0.0;
    for (npy_intp i = 0; i < n; i++) {
        s += (double)x[i];
    }
    return s;
}

static PyObject *py_cribo_losses(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    const char *fn = "cribo_losses";
    call_t c;
    if (cribo_args_check_call(&c, &cribo_losses_spec, args, kw) < 0) {
        return NULL;
    }
    const npy_intp B = DIM(&c, 'B'), M = DIM(&c, 'M'), L = DIM(&c, 'L');
    const npy_bool *masks[2] = {
        c.arr[LS_M1] != NULL ? (const npy_bool *)PyArray_DATA(c.arr[LS_M1]) : NULL,
        c.arr[LS_M2] != NULL ? (const npy_bool *)PyArray_DATA(c.arr[LS_M2]) : NULL};
    npy_intp Z[2] = {M, M};
    for (int v = 0; v < 2; v++) {
        if (masks[v] != NULL) {
            Z[v] = 0;
            for (npy_intp j = 0; j < M; j++) {
                Z[v] += masks[v][j] != 0;
            }
        }
    }
    long long B_den = B, M_den = M, Zd[2] = {Z[0], Z[1]};
    if (c.obj[LS_DEN] != NULL) {
        const long long *d = c.is[LS_DEN];
        if (d[0] < B || d[1] < M || d[2] < Z[0] || d[3] < Z[1]) {
            PyErr_Format(cribo_args_ValueError, "%s: denominators (%lld, %lld, %lld, %lld) must be at "
                         "least this call's counts (B=%zd, M=%zd, Z1=%zd, Z2=%zd)", fn, d[0], d[1],
                         d[2], d[3], (Py_ssize_t)B, (Py_ssize_t)M, (Py_ssize_t)Z[0],
                         (Py_ssize_t)Z[1]);
            return NULL;
        }
        B_den = d[0];
        M_den = d[1];
        Zd[0] = d[2];
        Zd[1] = d[3];
    }
    const double ts = c.f[LS_TS], tt = c.f[LS_TT];
    const double tto = c.obj[LS_TTO] != NULL ? c.f[LS_TTO] : tt;
    const double w_g = c.fs[LS_W][0], w_o = c.fs[LS_W][1], w_nn = c.fs[LS_W][2];
    const float *sg = F32P(&c, LS_SG), *tg = F32P(&c, LS_TG), *so = F32P(&c, LS_SO);
    const float *to = F32P(&c, LS_TO), *tn = OPT_F32P(&c, LS_TN);
    const float *cg = F32P(&c, LS_CG), *co = F32P(&c, LS_CO);

    npy_intp gdims[3] = {2, B, L}, odims[3] = {2, M, L}, cdims[1] = {L};
    PyArrayObject *grad_g = (PyArrayObject *)PyArray_SimpleNew(3, gdims, NPY_FLOAT32);
    PyArrayObject *grad_o = (PyArrayObject *)PyArray_SimpleNew(3, odims, NPY_FLOAT32);
    PyArrayObject *new_cg = (PyArrayObject *)PyArray_SimpleNew(1, cdims, NPY_FLOAT32);
    PyArrayObject *new_co = (PyArrayObject *)PyArray_SimpleNew(1, cdims, NPY_FLOAT32);
    const npy_intp rows = B > M ? B : M;
    float *la = (float *)malloc((size_t)(rows + 1) * sizeof(float));
    float *lb = (float *)malloc((size_t)(rows + 1) * sizeof(float));
    float *wa = (float *)malloc((size_t)(rows + 1) * sizeof(float));
    float *wb = (float *)malloc((size_t)(rows + 1) * sizeof(float));
    float *gathered = NULL;
    if (grad_g == NULL || grad_o == NULL || new_cg == NULL || new_co == NULL) {
        goto fail;
    }
    if (la == NULL || lb == NULL || wa == NULL || wb == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    /* Global: student view 2 learns from teacher view 1 and vice versa. */
    float *gg = (float *)PyArray_DATA(grad_g), *go = (float *)PyArray_DATA(grad_o);
    double l_g = 0.0, l_o = 0.0, l_nn = 0.0;
    for (npy_intp r = 0; r < B; r++) {
        wa[r] = (float)(w_g / (double)B_den);
    }
    for (int v = 0; v < 2; v++) {
        if (run_softmax_cross_entropy(fn, "student_global", "teacher_global", "teacher_global",
                                      la, NULL, gg + (1 - v) * B * L, sg + (1 - v) * B * L,
                                      tg + v * B * L, NULL, cg, NULL, wa, NULL, B, L, ts, tt,
                                      tt) < 0) {
            goto fail;
        }
        l_g += sum_f64(la, B) / (double)B_den;
    }
    /* Objects: student view 2 row j learns from teacher view 1 row j (L_o) and from the
     * neighbour of view 1 (L_nn, where mask1[j]); symmetrically for view 1. */
    if (M > 0) {
        for (npy_intp r = 0; r < M; r++) {
            wa[r] = (float)(w_o / (double)M_den);
        }
        for (int v = 0; v < 2; v++) {
            const npy_bool *mask = masks[v];
            const int use_nn = tn != NULL && Z[v] > 0;
            const float *s_rows = so + (1 - v) * M * L, *n_rows = use_nn ? tn + v * M * L : NULL;
            if (use_nn) {
                for (npy_intp r = 0; r < M; r++) {
                    wb[r] = (mask == NULL || mask[r]) ? (float)(w_nn / (double)Zd[v]) : 0.0f;
                }
            }
            if (run_softmax_cross_entropy(fn, "student_objects", "teacher_objects",
                                          "teacher_neighbours", la, use_nn ? lb : NULL,
                                          go + (1 - v) * M * L, s_rows, to + v * M * L, n_rows,
                                          co, use_nn ? co : NULL, wa, use_nn ? wb : NULL, M, L,
                                          ts, tto, tto) < 0) {
                goto fail;
            }
            l_o += sum_f64(la, M) / (double)M_den;
            if (!use_nn) {
                continue;
            }
            if (w_nn != 0.0) {
                double s = 0.0;
                for (npy_intp r = 0; r < M; r++) {
                    s += (mask == NULL || mask[r]) ? (double)lb[r] : 0.0;
                }
                l_nn += s / (double)Zd[v];
                continue;
            }
            /* Weight 0 skips the neighbour part of every row; the term is still reported,
             * from the masked rows alone (the others are never read). */
            gathered = (float *)malloc((size_t)(2 * Z[v] * L) * sizeof(float));
            if (gathered == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            npy_intp z = 0;
            for (npy_intp r = 0; r < M; r++) {
                if (mask == NULL || mask[r]) {
                    memcpy(gathered + z * L, s_rows + r * L, (size_t)L * sizeof(float));
                    memcpy(gathered + (Z[v] + z) * L, n_rows + r * L, (size_t)L * sizeof(float));
                    z++;
                }
            }
            if (run_softmax_cross_entropy(fn, "student_objects", "teacher_neighbours",
                                          "teacher_neighbours", lb, NULL, NULL, gathered,
                                          gathered + Z[v] * L, NULL, co, NULL, NULL, NULL, Z[v],
                                          L, ts, tto, tto) < 0) {
                goto fail;
            }
            free(gathered);
            gathered = NULL;
            l_nn += sum_f64(lb, Z[v]) / (double)Zd[v];
        }
    }
    update_center_into((float *)PyArray_DATA(new_cg), cg, tg, 2 * B, L, c.f[LS_MOM]);
    update_center_into((float *)PyArray_DATA(new_co), co, to, 2 * M, L, c.f[LS_MOM]);
    free(la);
    free(lb);
    free(wa);
    free(wb);
    const double total = w_g * l_g + w_o * l_o + w_nn * l_nn;
    return Py_BuildValue("ddddNNNNnn", total, l_g, l_o, l_nn, grad_g, grad_o, new_cg, new_co,
                         (Py_ssize_t)Z[0], (Py_ssize_t)Z[1]);

fail:
    free(la);
    free(lb);
    free(wa);
    free(wb);
    free(gathered);
    Py_XDECREF(grad_g);
    Py_XDECREF(grad_o);
    Py_XDECREF(new_cg);
    Py_XDECREF(new_co);
    return NULL;
}

/* ------------------------------------------------------------------ ObjectQueue */

/* The rules of cribo.ObjectQueue's arguments; the queue itself is NumPy (cribo/ops/queue.py).
 * `dim` (or `queue_dim`) is the queue's own width, passed by the method. */

static const arg_spec object_queue_args[] = {
    {"capacity", S_INT, NULL, 0, 1, INTMAX, 0, 0, NULL},
    {"dim", S_INT, NULL, 0, 1, INTMAX, 0, 0, NULL},
};
static const entry_spec object_queue_spec = {"ObjectQueue", object_queue_args,
                                             N_OF(object_queue_args), NULL};

static PyObject *py_object_queue(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    call_t c;
    if (cribo_args_check_call(&c, &object_queue_spec, args, kw) < 0) {
        return NULL;
    }
    return Py_BuildValue("LL", c.i[0], c.i[1]);
}

/* counts (argument k, whose entries were checked non-negative) sum to `total` objects.
 * The sum never wraps: int64 counts whose true sum only wrapped to `total` would make the
 * queue walk past its objects. */
static int check_counts_sum(const call_t *c, int k, npy_intp total)
{
    const int64_t *x = I64P(c, k);
    long long s = 0;
    for (npy_intp i = 0; i < PyArray_SIZE(c->arr[k]); i++) {
        if ((long long)x[i] > LLONG_MAX - s) {
            PyErr_Format(cribo_args_ValueError, "%s: %s must sum to the number of objects %zd, "
                         "got a sum beyond the int64 range", c->e->fn, c->e->args[k].name,
                         (Py_ssize_t)total);
            return -1;
        }
        s += (long long)x[i];
    }
    if (s != (long long)total) {
        PyErr_Format(cribo_args_ValueError, "%s: %s must sum to the number of objects %zd, got %lld",
                     c->e->fn, c->e->args[k].name, (Py_ssize_t)total, s);
        return -1;
    }
    return 0;
}

enum { QP_O1, QP_O2, QP_COUNTS, QP_IDS, QP_DIM };
static const arg_spec queue_push_args[] = {
    {"objects1", A_F32, "M,d", FINITE, 0, 0, 0, 0, NULL},
    {"objects2", A_F32, "M,d", FINITE, 0, 0, 0, 0, NULL},
    {"counts", A_I64, "B", 0, 0, 0, 0, 0, NULL},
    {"image_ids", A_I64, "B", OPT, 0, 0, 0, 0, NULL},
    {"dim", S_INT, "d", 0, 1, INTMAX, 0, 0, NULL},
};
static const entry_spec queue_push_spec = {"ObjectQueue.push", queue_push_args,
                                           N_OF(queue_push_args), NULL};

static PyObject *py_queue_push(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    call_t c;
    if (cribo_args_check_call(&c, &queue_push_spec, args, kw) < 0 ||
        cribo_args_check_at_least(&c, QP_COUNTS, 0, "non-negative") < 0 ||
        check_counts_sum(&c, QP_COUNTS, DIM(&c, 'M')) < 0 ||
        cribo_args_check_at_least(&c, QP_IDS, 0, "non-negative") < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

enum { QM_O1, QM_O2, QM_IDS, QM_B1, QM_B2, QM_OFFSET, QM_DIM };
static const arg_spec queue_match_args[] = {
    {"objects1", A_F32, "M,d", FINITE, 0, 0, 0, 0, NULL},
    {"objects2", A_F32, "M,d", FINITE, 0, 0, 0, 0, NULL},
    {"image_ids", A_I64, "M", OPT, 0, 0, 0, 0, NULL},
    {"batch[0]", A_F32, "P,d", OPT | FINITE, 0, 0, 0, 0, NULL},
    {"batch[1]", A_F32, "P,d", OPT | FINITE, 0, 0, 0, 0, NULL},
    {"offset", S_INT, NULL, OPT | NONE_OK, 0, 4611686018427387904.0, 0, 0, NULL},
    {"dim", S_INT, "d", 0, 1, INTMAX, 0, 0, NULL},
};
static const entry_spec queue_match_spec = {"ObjectQueue.match", queue_match_args,
                                            N_OF(queue_match_args), NULL};

static PyObject *py_queue_match(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    call_t c;
    if (cribo_args_check_call(&c, &queue_match_spec, args, kw) < 0 ||
        cribo_args_check_at_least(&c, QM_IDS, 0, "non-negative") < 0) {
        return NULL;
    }
    if ((c.arr[QM_B1] == NULL) != (c.arr[QM_B2] == NULL)) {
        PyErr_SetString(cribo_args_ValueError, "ObjectQueue.match: batch must be two arrays "
                        "(all_objects1, all_objects2)");
        return NULL;
    }
    const npy_intp M = DIM(&c, 'M'), P = DIM(&c, 'P');
    if (c.arr[QM_B1] != NULL && c.i[QM_OFFSET] + M > P) {
        PyErr_Format(cribo_args_ValueError, "ObjectQueue.match: batch must be two arrays holding the "
                     "queries at rows %lld..%lld (offset..offset + M), got %zd rows",
                     c.i[QM_OFFSET], c.i[QM_OFFSET] + (long long)M, (Py_ssize_t)P);
        return NULL;
    }
    Py_RETURN_NONE;
}

enum { QL_CAPACITY, QL_DIM, QL_O1, QL_O2, QL_OIDS, QL_COUNTS, QL_IIDS, QL_QDIM };
static const arg_spec queue_load_args[] = {
    {"capacity", S_INT, NULL, 0, 1, INTMAX, 0, 0, NULL},
    {"dim", S_INT, "d", 0, 1, INTMAX, 0, 0, NULL},
    {"objects1", A_F32, "M,d", FINITE, 0, 0, 0, 0, NULL},
    {"objects2", A_F32, "M,d", FINITE, 0, 0, 0, 0, NULL},
    {"object_ids", A_I64, "M", 0, 0, 0, 0, 0, NULL},
    {"image_counts", A_I64, "I", 0, 0, 0, 0, 0, NULL},
    {"image_ids", A_I64, "I", 0, 0, 0, 0, 0, NULL},
    {"queue_dim", S_INT, NULL, 0, 1, INTMAX, 0, 0, NULL},
};
static const entry_spec queue_load_spec = {"ObjectQueue.load_state_dict", queue_load_args,
                                           N_OF(queue_load_args), NULL};

static PyObject *py_queue_load_state_dict(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    const char *fn = "ObjectQueue.load_state_dict";
    call_t c;
    if (cribo_args_check_call(&c, &queue_load_spec, args, kw) < 0) {
        return NULL;
    }
    if (c.i[QL_DIM] != c.i[QL_QDIM]) {
        PyErr_Format(cribo_args_ValueError, "%s: state has dim %lld, this queue %lld", fn,
                     c.i[QL_DIM], c.i[QL_QDIM]);
        return NULL;
    }
    if (cribo_args_check_at_least(&c, QL_COUNTS, 0, "non-negative") < 0 ||
        check_counts_sum(&c, QL_COUNTS, DIM(&c, 'M')) < 0 ||
        cribo_args_check_at_least(&c, QL_IIDS, -1, "non-negative (or -1: unknown)") < 0) {
        return NULL;
    }
    /* object_ids must repeat each image id image_counts times. */
    const int64_t *oid = I64P(&c, QL_OIDS), *cnt = I64P(&c, QL_COUNTS), *iid = I64P(&c, QL_IIDS);
    npy_intp j = 0;
    for (npy_intp i = 0; i < DIM(&c, 'I'); i++) {
        for (int64_t n = 0; n < cnt[i]; n++, j++) {
            if (oid[j] != iid[i]) {
                PyErr_Format(cribo_args_ValueError, "%s: object_ids do not agree with image_ids and "
                             "image_counts (object %zd is %lld, its image %lld)", fn,
                             (Py_ssize_t)j, (long long)oid[j], (long long)iid[i]);
                return NULL;
            }
        }
    }
    if (DIM(&c, 'I') > c.i[QL_CAPACITY]) {
        PyErr_Format(cribo_args_ValueError, "%s: state holds %zd images for capacity %lld", fn,
                     (Py_ssize_t)DIM(&c, 'I'), c.i[QL_CAPACITY]);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ module */

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS
static PyMethodDef methods[] = {
    {"set_num_threads", KW(py_set_num_threads), "set_num_threads(n)"},
    {"get_num_threads", (PyCFunction)py_get_num_threads, METH_NOARGS, "get_num_threads()"},
    {"draw_init", KW(py_draw_init),
     "draw_init(n_images, n_tokens, n_clusters, seed=0, draw) -> draw(...)"},
    {"cluster", KW(py_cluster),
     "cluster(tokens, positions, n_clusters, pos_weight=2.0, sinkhorn_lambda=20.0, "
     "sinkhorn_iters=5, n_iters=5, update_marginals=True, seed=0, init=None, return_plan=False, "
     "draw=None) -> (labels, counts, plan, init)"},
    {"pool", KW(py_pool), "pool(tokens, labels, n_clusters) -> objects"},
    {"pool_backward", KW(py_pool_backward),
     "pool_backward(grad_objects, labels, n_clusters) -> grad_tokens"},
    {"pool_soft", KW(py_pool_soft), "pool_soft(tokens, weights, n_clusters=None) -> objects"},
    {"pool_soft_backward", KW(py_pool_soft_backward),
     "pool_soft_backward(grad_objects, weights, n_clusters=None) -> grad_tokens"},
    {"topk_cosine", KW(py_topk_cosine),
     "topk_cosine(queries, bank, k=1, query_ids=None, bank_ids=None) -> (indices, similarities)"},
    {"softmax_cross_entropy", KW(py_softmax_cross_entropy),
     "softmax_cross_entropy(student_logits, teacher_logits, center=None, student_temp=0.1, "
     "teacher_temp=0.07) -> (losses, grad)"},
    {"update_center", KW(py_update_center),
     "update_center(center, teacher_logits, momentum=0.9) -> center"},
    {"ObjectQueue", KW(py_object_queue), "ObjectQueue(capacity, dim) -> (capacity, dim)"},
    {"ObjectQueue_push", KW(py_queue_push),
     "ObjectQueue_push(objects1, objects2, counts, image_ids=None, dim) -> None (checks)"},
    {"ObjectQueue_match", KW(py_queue_match),
     "ObjectQueue_match(objects1, objects2, image_ids=None, batch[0]=None, batch[1]=None, "
     "offset=0, dim) -> None (checks)"},
    {"ObjectQueue_load_state_dict", KW(py_queue_load_state_dict),
     "ObjectQueue_load_state_dict(capacity, dim, objects1, objects2, object_ids, image_counts, "
     "image_ids, queue_dim) -> None (checks)"},
    {"cribo_losses", KW(py_cribo_losses),
     "cribo_losses(student_global, teacher_global, student_objects, teacher_objects, "
     "teacher_neighbours=None, mask1=None, mask2=None, center_global, center_objects, "
     "student_temp=0.1, teacher_temp=0.07, teacher_temp_objects=None, weights=(1, 1, 1), "
     "center_momentum=0.9, denominators=None) -> (total, global, objects, neighbours, "
     "grad_global, grad_objects, center_global, center_objects, n_pairs1, n_pairs2)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cribo._C",
    .m_doc = "C kernels of cribo and the rules of their arguments; use cribo.ops (documented).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    /* Parallelism is ours (static splits over images and rows); BLAS is called
     * from inside those threads and must not start threads of its own. */
    blas_set_num_threads(1);
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    cribo_args_ValueError = PyErr_NewExceptionWithDoc(
        "cribo._C.ArgumentError",
        "An argument of a cribo operator breaks its rule (shape, range, finiteness, ...); "
        "the message names the function, the argument and what was expected.",
        PyExc_ValueError, NULL);
    cribo_args_TypeError = PyErr_NewExceptionWithDoc(
        "cribo._C.ArgumentTypeError",
        "An argument of a cribo operator has the wrong type (dtype, a number, an array); "
        "the message names the function, the argument and what was expected.",
        PyExc_TypeError, NULL);
    if (cribo_args_ValueError == NULL || cribo_args_TypeError == NULL) {
        Py_CLEAR(cribo_args_ValueError);
        Py_CLEAR(cribo_args_TypeError);
        Py_DECREF(m);
        return NULL;
    }
    /* the bound of set_num_threads, for cribo/ops/threads.py's default */
    if (PyModule_AddIntConstant(m, "MAX_THREADS", CRIBO_MAX_THREADS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* PyModule_AddObject steals a reference on success (Python 3.9 lacks AddObjectRef);
     * the globals keep their own. */
    Py_INCREF(cribo_args_ValueError);
    if (PyModule_AddObject(m, "ArgumentError", cribo_args_ValueError) < 0) {
        Py_DECREF(cribo_args_ValueError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(cribo_args_TypeError);
    if (PyModule_AddObject(m, "ArgumentTypeError", cribo_args_TypeError) < 0) {
        Py_DECREF(cribo_args_TypeError);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
