/* _C.c -- the only file of cribo that knows Python and NumPy.
 *
 * Every function: parse (keywords named as in cribo/ops/__init__.py), validate every array
 * (dtype, byte order, ndim, contiguity, shapes against each other, dimensions <=
 * INT_MAX, index ranges, finiteness), allocate outputs and workspace, release the
 * GIL around the kernel, map its status to an exception.  Arrays must be native,
 * aligned, C-contiguous float32 / int64: nothing is cast or copied here (the
 * conversions users may rely on happen visibly in cribo/ops/__init__.py).
 * Messages read "fn: arg must be ..., got ...". */
#define PY_SSIZE_T_CLEAN
#define NPY_NO_DEPRECATED_API NPY_1_21_API_VERSION
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <numpy/arrayobject.h>

#include "cribo.h"

#ifndef CRIBO_SYSTEM_CBLAS
void scipy_openblas_set_num_threads(int num_threads);
#define blas_set_num_threads scipy_openblas_set_num_threads
#else
#define blas_set_num_threads(n) ((void)(n))
#endif

/* Threads used by every kernel; BLAS itself always runs on one thread inside them. */
static int n_threads = 1;

/* ------------------------------------------------------------------ checks */

static int check_array(PyArrayObject *a, const char *fn, const char *name, int type,
                       const char *type_name, int ndim, const char *shape_doc)
{
    if (PyArray_TYPE(a) != type || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a native-endian %s array, got %R",
                     fn, name, type_name, (PyObject *)PyArray_DESCR(a));
        return -1;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have shape %s, got %d dimensions",
                     fn, name, shape_doc, PyArray_NDIM(a));
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: %s must be C-contiguous and aligned (use numpy.require(x, "
                     "requirements='CA'))",
                     fn, name);
        return -1;
    }
    for (int i = 0; i < ndim; i++) {
        if (PyArray_DIM(a, i) > INT_MAX) {
            PyErr_Format(PyExc_ValueError,
                         "%s: %s dimension %d is %zd, larger than the supported %d",
                         fn, name, i, (Py_ssize_t)PyArray_DIM(a, i), INT_MAX);
            return -1;
        }
    }
    return 0;
}

#define CHECK_F32(a, fn, name, nd, doc) check_array(a, fn, name, NPY_FLOAT32, "float32", nd, doc)
#define CHECK_I64(a, fn, name, nd, doc) check_array(a, fn, name, NPY_INT64, "int64", nd, doc)

/* Optional argument: NULL for None, else the array (checked to be an ndarray). */
static int optional_array(PyObject *o, PyArrayObject **out, const char *fn, const char *name)
{
    if (o == NULL || o == Py_None) {
        *out = NULL;
        return 0;
    }
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a numpy array or None, got %R",
                     fn, name, (PyObject *)Py_TYPE(o));
        return -1;
    }
    *out = (PyArrayObject *)o;
    return 0;
}

static int check_positive_dim(npy_intp v, const char *fn, const char *what)
{
    if (v < 1) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be at least 1, got %zd", fn, what,
                     (Py_ssize_t)v);
        return -1;
    }
    return 0;
}

static int check_finite(PyArrayObject *a, const char *fn, const char *name)
{
    int ok;
    const float *x = (const float *)PyArray_DATA(a);
    const int64_t n = (int64_t)PyArray_SIZE(a);
    Py_BEGIN_ALLOW_THREADS
    ok = cribo_all_finite(x, n);
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be finite, got NaN or infinity", fn, name);
        return -1;
    }
    return 0;
}

/* 0 if every entry of the int64 array lies in [lo, hi). */
static int check_range(PyArrayObject *a, int64_t lo, int64_t hi, const char *fn,
                       const char *name)
{
    const int64_t *x = (const int64_t *)PyArray_DATA(a);
    const npy_intp n = PyArray_SIZE(a);
    for (npy_intp i = 0; i < n; i++) {
        if (x[i] < lo || x[i] >= hi) {
            PyErr_Format(PyExc_ValueError, "%s: %s must lie in [%lld, %lld), got %lld",
                         fn, name, (long long)lo, (long long)hi, (long long)x[i]);
            return -1;
        }
    }
    return 0;
}

/* Raises ValueError "fn: name must be <expected>, got <value>" for a bad scalar. */
static int bad_scalar(const char *fn, const char *name, const char *expected, double value)
{
    char buf[64];
    snprintf(buf, sizeof buf, "%.17g", value);
    PyErr_Format(PyExc_ValueError, "%s: %s must be %s, got %s", fn, name, expected, buf);
    return -1;
}

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

static PyObject *nonfinite_error(const char *fn, const char *what)
{
    PyErr_Format(PyExc_ValueError, "%s: %s must be finite, got NaN or infinity", fn, what);
    return NULL;
}

/* ------------------------------------------------------------------ threads */

static PyObject *py_set_num_threads(PyObject *self, PyObject *args)
{
    (void)self;
    long long n;
    if (!PyArg_ParseTuple(args, "L:set_num_threads", &n)) {
        return NULL;
    }
    if (n < 1 || n > 256) {
        PyErr_Format(PyExc_ValueError, "set_num_threads: n must be in [1, 256], got %lld", n);
        return NULL;
    }
    n_threads = (int)n;
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromLong(n_threads);
}

/* ------------------------------------------------------------------ cluster */

static PyObject *py_cluster(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"tokens", "positions", "init", "pos_weight", "sinkhorn_lambda",
                             "sinkhorn_iters", "n_iters", "update_marginals", "return_plan",
                             NULL};
    const char *fn = "cluster";
    PyArrayObject *tok, *pos, *init;
    double pos_weight, lambda;
    long long sinkhorn_iters, n_iters;
    int update_marginals, return_plan;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!O!ddLLpp:cluster", kwlist,
                                     &PyArray_Type, &tok, &PyArray_Type, &pos,
                                     &PyArray_Type, &init, &pos_weight, &lambda,
                                     &sinkhorn_iters, &n_iters, &update_marginals,
                                     &return_plan)) {
        return NULL;
    }
    if (CHECK_F32(tok, fn, "tokens", 4, "(B, 2, N, d)") < 0 ||
        CHECK_F32(pos, fn, "positions", 4, "(B, 2, N, 2)") < 0 ||
        CHECK_I64(init, fn, "init", 2, "(B, K)") < 0) {
        return NULL;
    }
    const npy_intp B = PyArray_DIM(tok, 0), N = PyArray_DIM(tok, 2), D = PyArray_DIM(tok, 3);
    const npy_intp K = PyArray_DIM(init, 1);
    if (PyArray_DIM(tok, 1) != 2) {
        PyErr_Format(PyExc_ValueError, "%s: tokens must have shape (B, 2, N, d) with 2 views, "
                     "got %zd views", fn, (Py_ssize_t)PyArray_DIM(tok, 1));
        return NULL;
    }
    if (check_positive_dim(B, fn, "the batch size B") < 0 ||
        check_positive_dim(N, fn, "the number of tokens per view N") < 0 ||
        check_positive_dim(D, fn, "the token width d") < 0 ||
        check_positive_dim(K, fn, "n_clusters") < 0) {
        return NULL;
    }
    if (PyArray_DIM(pos, 0) != B || PyArray_DIM(pos, 1) != 2 || PyArray_DIM(pos, 2) != N ||
        PyArray_DIM(pos, 3) != 2) {
        PyErr_Format(PyExc_ValueError, "%s: positions must have shape (%zd, 2, %zd, 2) to match "
                     "tokens, got (%zd, %zd, %zd, %zd)", fn, (Py_ssize_t)B, (Py_ssize_t)N,
                     (Py_ssize_t)PyArray_DIM(pos, 0), (Py_ssize_t)PyArray_DIM(pos, 1),
                     (Py_ssize_t)PyArray_DIM(pos, 2), (Py_ssize_t)PyArray_DIM(pos, 3));
        return NULL;
    }
    if (PyArray_DIM(init, 0) != B) {
        PyErr_Format(PyExc_ValueError, "%s: init must have shape (%zd, K), got (%zd, %zd)", fn,
                     (Py_ssize_t)B, (Py_ssize_t)PyArray_DIM(init, 0), (Py_ssize_t)K);
        return NULL;
    }
    if (K > 2 * N) {
        PyErr_Format(PyExc_ValueError, "%s: n_clusters must be at most 2N = %zd (the joint "
                     "tokens of one image), got %zd", fn, (Py_ssize_t)(2 * N), (Py_ssize_t)K);
        return NULL;
    }
    if (2 * N > INT_MAX || (npy_intp)(2 * N) * K > (npy_intp)INT_MAX * 64) {
        PyErr_Format(PyExc_ValueError, "%s: 2N x n_clusters = %zd x %zd is too large", fn,
                     (Py_ssize_t)(2 * N), (Py_ssize_t)K);
        return NULL;
    }
    if (!(pos_weight >= 0.0 && pos_weight <= 1e6)) {
        bad_scalar(fn, "pos_weight", "a finite number in [0, 1e6]", pos_weight);
        return NULL;
    }
    if (!(lambda > 0.0 && lambda <= 1e6)) {
        bad_scalar(fn, "sinkhorn_lambda", "a finite number in (0, 1e6]", lambda);
        return NULL;
    }
    if (sinkhorn_iters < 0 || sinkhorn_iters > 100000) {
        PyErr_Format(PyExc_ValueError, "%s: sinkhorn_iters must be in [0, 100000], got %lld",
                     fn, sinkhorn_iters);
        return NULL;
    }
    if (n_iters < 1 || n_iters > 100000) {
        PyErr_Format(PyExc_ValueError, "%s: n_iters must be in [1, 100000], got %lld", fn,
                     n_iters);
        return NULL;
    }
    if (check_range(init, 0, 2 * N, fn, "init") < 0) {
        return NULL;
    }
    /* init rows must be distinct indices. */
    {
        char *seen = (char *)calloc((size_t)(2 * N), 1);
        if (seen == NULL) {
            return PyErr_NoMemory();
        }
        const int64_t *ix = (const int64_t *)PyArray_DATA(init);
        for (npy_intp b = 0; b < B; b++) {
            for (npy_intp k = 0; k < K; k++) {
                if (seen[ix[b * K + k]]) {
                    PyErr_Format(PyExc_ValueError, "%s: init must hold distinct token indices "
                                 "per image, got %lld twice in image %zd", fn,
                                 (long long)ix[b * K + k], (Py_ssize_t)b);
                    free(seen);
                    return NULL;
                }
                seen[ix[b * K + k]] = 1;
            }
            for (npy_intp k = 0; k < K; k++) {
                seen[ix[b * K + k]] = 0;
            }
        }
        free(seen);
    }
    if (check_finite(tok, fn, "tokens") < 0 || check_finite(pos, fn, "positions") < 0) {
        return NULL;
    }

    PyArrayObject *labels = NULL, *counts = NULL, *plan = NULL;
    void *work = NULL;
    npy_intp ldims[3] = {B, 2, N};
    npy_intp cdims[3] = {B, 2, K};
    npy_intp pdims[3] = {B, 2 * N, K};
    labels = (PyArrayObject *)PyArray_SimpleNew(3, ldims, NPY_INT64);
    counts = (PyArrayObject *)PyArray_SimpleNew(3, cdims, NPY_INT64);
    if (labels == NULL || counts == NULL) {
        goto fail;
    }
    if (return_plan) {
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
    cribo_cluster_params params = {pos_weight, lambda, sinkhorn_iters, n_iters,
                                   update_marginals};
    Py_BEGIN_ALLOW_THREADS
    cribo_cluster((int64_t *)PyArray_DATA(labels), (int64_t *)PyArray_DATA(counts),
                  plan != NULL ? (float *)PyArray_DATA(plan) : NULL,
                  (const float *)PyArray_DATA(tok), (const float *)PyArray_DATA(pos),
                  (const int64_t *)PyArray_DATA(init), B, N, D, K, &params, work, T);
    Py_END_ALLOW_THREADS
    free(work);
    if (plan == NULL) {
        return Py_BuildValue("NNO", labels, counts, Py_None);
    }
    return Py_BuildValue("NNN", labels, counts, plan);

fail:
    free(work);
    Py_XDECREF(labels);
    Py_XDECREF(counts);
    Py_XDECREF(plan);
    return NULL;
}

/* ------------------------------------------------------------------ pool */

/* Shared checks of pool / pool_backward: x is tokens (B,2,N,D) in the forward pass and
 * grad_objects (B,2,K,D) in the backward pass; labels (B,2,N) int64 in [-1, K). */
static int check_pool_hard(const char *fn, PyArrayObject *x, const char *xname, int forward,
                           PyArrayObject *labels, long long K)
{
    if (CHECK_F32(x, fn, xname, 4, forward ? "(B, 2, N, d)" : "(B, 2, K, d)") < 0 ||
        CHECK_I64(labels, fn, "labels", 3, "(B, 2, N)") < 0) {
        return -1;
    }
    if (K < 1 || K > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: n_clusters must be in [1, %d], got %lld", fn,
                     INT_MAX, K);
        return -1;
    }
    const npy_intp B = PyArray_DIM(labels, 0), N = PyArray_DIM(labels, 2);
    if (PyArray_DIM(x, 0) != B || PyArray_DIM(x, 1) != 2 || PyArray_DIM(labels, 1) != 2 ||
        PyArray_DIM(x, 2) != (forward ? N : (npy_intp)K)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have shape (%zd, 2, %lld, d) to match "
                     "labels (%zd, %zd, %zd) and n_clusters=%lld, got (%zd, %zd, %zd, %zd)",
                     fn, xname, (Py_ssize_t)B, forward ? (long long)N : K, (Py_ssize_t)B,
                     (Py_ssize_t)PyArray_DIM(labels, 1), (Py_ssize_t)N, K,
                     (Py_ssize_t)PyArray_DIM(x, 0), (Py_ssize_t)PyArray_DIM(x, 1),
                     (Py_ssize_t)PyArray_DIM(x, 2), (Py_ssize_t)PyArray_DIM(x, 3));
        return -1;
    }
    if (check_positive_dim(B, fn, "the batch size B") < 0 ||
        check_positive_dim(N, fn, "the number of tokens per view N") < 0 ||
        check_positive_dim(PyArray_DIM(x, 3), fn, "the token width d") < 0) {
        return -1;
    }
    if (check_range(labels, -1, K, fn, "labels") < 0) {
        return -1;
    }
    return check_finite(x, fn, xname);
}

static PyObject *pool_hard(PyObject *args, PyObject *kw, int forward)
{
    static char *kwf[] = {"tokens", "labels", "n_clusters", NULL};
    static char *kwb[] = {"grad_objects", "labels", "n_clusters", NULL};
    const char *fn = forward ? "pool" : "pool_backward";
    PyArrayObject *x, *labels;
    long long K;
    if (!PyArg_ParseTupleAndKeywords(args, kw, forward ? "O!O!L:pool" : "O!O!L:pool_backward",
                                     forward ? kwf : kwb, &PyArray_Type, &x, &PyArray_Type,
                                     &labels, &K)) {
        return NULL;
    }
    if (check_pool_hard(fn, x, forward ? "tokens" : "grad_objects", forward, labels, K) < 0) {
        return NULL;
    }
    const npy_intp B = PyArray_DIM(labels, 0), N = PyArray_DIM(labels, 2);
    const npy_intp D = PyArray_DIM(x, 3);
    npy_intp dims[4] = {B, 2, forward ? (npy_intp)K : N, D};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(4, dims, NPY_FLOAT32);
    if (out == NULL) {
        return NULL;
    }
    const int T = n_threads;
    void *work = alloc_work(cribo_pool_workspace_size(D, K) * (size_t)T);
    if (work == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (forward) {
        cribo_pool_forward((float *)PyArray_DATA(out), (const float *)PyArray_DATA(x),
                           (const int64_t *)PyArray_DATA(labels), B, N, D, K, work, T);
    } else {
        cribo_pool_backward((float *)PyArray_DATA(out), (const float *)PyArray_DATA(x),
                            (const int64_t *)PyArray_DATA(labels), B, N, D, K, work, T);
    }
    Py_END_ALLOW_THREADS
    free(work);
    return (PyObject *)out;
}

static PyObject *py_pool(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return pool_hard(args, kw, 1);
}

static PyObject *py_pool_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return pool_hard(args, kw, 0);
}

static PyObject *pool_soft(PyObject *args, PyObject *kw, int forward)
{
    static char *kwf[] = {"tokens", "weights", NULL};
    static char *kwb[] = {"grad_objects", "weights", NULL};
    const char *fn = forward ? "pool" : "pool_backward";
    const char *xname = forward ? "tokens" : "grad_objects";
    PyArrayObject *x, *w;
    if (!PyArg_ParseTupleAndKeywords(args, kw, forward ? "O!O!:pool" : "O!O!:pool_backward",
                                     forward ? kwf : kwb, &PyArray_Type, &x, &PyArray_Type,
                                     &w)) {
        return NULL;
    }
    if (CHECK_F32(x, fn, xname, 4, forward ? "(B, 2, N, d)" : "(B, 2, K, d)") < 0 ||
        CHECK_F32(w, fn, "weights", 4, "(B, 2, N, K)") < 0) {
        return NULL;
    }
    const npy_intp B = PyArray_DIM(w, 0), N = PyArray_DIM(w, 2), K = PyArray_DIM(w, 3);
    const npy_intp D = PyArray_DIM(x, 3);
    if (PyArray_DIM(w, 1) != 2 || PyArray_DIM(x, 0) != B || PyArray_DIM(x, 1) != 2 ||
        PyArray_DIM(x, 2) != (forward ? N : K)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have shape (%zd, 2, %zd, d) to match "
                     "weights (%zd, %zd, %zd, %zd), got (%zd, %zd, %zd, %zd)", fn, xname,
                     (Py_ssize_t)B, (Py_ssize_t)(forward ? N : K), (Py_ssize_t)B,
                     (Py_ssize_t)PyArray_DIM(w, 1), (Py_ssize_t)N, (Py_ssize_t)K,
                     (Py_ssize_t)PyArray_DIM(x, 0), (Py_ssize_t)PyArray_DIM(x, 1),
                     (Py_ssize_t)PyArray_DIM(x, 2), (Py_ssize_t)D);
        return NULL;
    }
    if (check_positive_dim(B, fn, "the batch size B") < 0 ||
        check_positive_dim(N, fn, "the number of tokens per view N") < 0 ||
        check_positive_dim(K, fn, "the number of clusters K") < 0 ||
        check_positive_dim(D, fn, "the token width d") < 0) {
        return NULL;
    }
    if (check_finite(x, fn, xname) < 0 || check_finite(w, fn, "weights") < 0) {
        return NULL;
    }
    {
        const float *wp = (const float *)PyArray_DATA(w);
        const npy_intp n = PyArray_SIZE(w);
        for (npy_intp i = 0; i < n; i++) {
            if (wp[i] < 0.0f) {
                PyErr_Format(PyExc_ValueError, "%s: weights must be non-negative", fn);
                return NULL;
            }
        }
    }
    npy_intp dims[4] = {B, 2, forward ? K : N, D};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(4, dims, NPY_FLOAT32);
    if (out == NULL) {
        return NULL;
    }
    const int T = n_threads;
    void *work = alloc_work(cribo_pool_soft_workspace_size(N, K) * (size_t)T);
    if (work == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (forward) {
        cribo_pool_soft_forward((float *)PyArray_DATA(out), (const float *)PyArray_DATA(x),
                                (const float *)PyArray_DATA(w), B, N, D, K, work, T);
    } else {
        cribo_pool_soft_backward((float *)PyArray_DATA(out), (const float *)PyArray_DATA(x),
                                 (const float *)PyArray_DATA(w), B, N, D, K, work, T);
    }
    Py_END_ALLOW_THREADS
    free(work);
    return (PyObject *)out;
}

static PyObject *py_pool_soft(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return pool_soft(args, kw, 1);
}

static PyObject *py_pool_soft_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return pool_soft(args, kw, 0);
}

/* ------------------------------------------------------------------ top-k */

static PyObject *py_topk_cosine(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"queries", "bank", "k", "query_ids", "bank_ids", NULL};
    const char *fn = "topk_cosine";
    PyArrayObject *q, *bank, *qids = NULL, *bids = NULL;
    PyObject *oq = Py_None, *ob = Py_None;
    long long k;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!L|OO:topk_cosine", kwlist, &PyArray_Type,
                                     &q, &PyArray_Type, &bank, &k, &oq, &ob)) {
        return NULL;
    }
    if (CHECK_F32(q, fn, "queries", 2, "(M, d)") < 0 ||
        CHECK_F32(bank, fn, "bank", 2, "(Q, d)") < 0 ||
        optional_array(oq, &qids, fn, "query_ids") < 0 ||
        optional_array(ob, &bids, fn, "bank_ids") < 0) {
        return NULL;
    }
    const npy_intp M = PyArray_DIM(q, 0), D = PyArray_DIM(q, 1), Q = PyArray_DIM(bank, 0);
    if (PyArray_DIM(bank, 1) != D) {
        PyErr_Format(PyExc_ValueError, "%s: bank must have shape (Q, %zd) to match queries, "
                     "got (%zd, %zd)", fn, (Py_ssize_t)D, (Py_ssize_t)Q,
                     (Py_ssize_t)PyArray_DIM(bank, 1));
        return NULL;
    }
    if (check_positive_dim(D, fn, "the feature width d") < 0) {
        return NULL;
    }
    if (Q < 1) {
        PyErr_Format(PyExc_ValueError, "%s: bank must hold at least one row, got an empty bank",
                     fn);
        return NULL;
    }
    if (k < 1 || k > Q) {
        PyErr_Format(PyExc_ValueError, "%s: k must be in [1, %zd] (the bank size), got %lld",
                     fn, (Py_ssize_t)Q, k);
        return NULL;
    }
    if ((qids == NULL) != (bids == NULL)) {
        PyErr_Format(PyExc_ValueError, "%s: query_ids and bank_ids must be given together", fn);
        return NULL;
    }
    if (qids != NULL) {
        if (CHECK_I64(qids, fn, "query_ids", 1, "(M,)") < 0 ||
            CHECK_I64(bids, fn, "bank_ids", 1, "(Q,)") < 0) {
            return NULL;
        }
        if (PyArray_DIM(qids, 0) != M || PyArray_DIM(bids, 0) != Q) {
            PyErr_Format(PyExc_ValueError, "%s: query_ids must have shape (%zd,) and bank_ids "
                         "(%zd,), got (%zd,) and (%zd,)", fn, (Py_ssize_t)M, (Py_ssize_t)Q,
                         (Py_ssize_t)PyArray_DIM(qids, 0), (Py_ssize_t)PyArray_DIM(bids, 0));
            return NULL;
        }
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
        Py_BEGIN_ALLOW_THREADS
        status = cribo_topk_cosine((int64_t *)PyArray_DATA(idx), (float *)PyArray_DATA(sim),
                                   (const float *)PyArray_DATA(q),
                                   (const float *)PyArray_DATA(bank),
                                   qids != NULL ? (const int64_t *)PyArray_DATA(qids) : NULL,
                                   bids != NULL ? (const int64_t *)PyArray_DATA(bids) : NULL,
                                   M, Q, D, k, work, T);
        Py_END_ALLOW_THREADS
        free(work);
        work = NULL;
        if (status != CRIBO_OK) {
            nonfinite_error(fn, "queries and bank");
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

/* ------------------------------------------------------------------ losses */

/* An optional (R, L) / (L) / (R) float32 argument, checked against R and L. */
static int check_opt(PyArrayObject *a, const char *fn, const char *name, int ndim,
                     npy_intp d0, npy_intp d1, const char *doc)
{
    if (a == NULL) {
        return 0;
    }
    if (CHECK_F32(a, fn, name, ndim, doc) < 0) {
        return -1;
    }
    if (PyArray_DIM(a, 0) != d0 || (ndim == 2 && PyArray_DIM(a, 1) != d1)) {
        if (ndim == 2) {
            PyErr_Format(PyExc_ValueError, "%s: %s must have shape (%zd, %zd), got (%zd, %zd)",
                         fn, name, (Py_ssize_t)d0, (Py_ssize_t)d1,
                         (Py_ssize_t)PyArray_DIM(a, 0), (Py_ssize_t)PyArray_DIM(a, 1));
        } else {
            PyErr_Format(PyExc_ValueError, "%s: %s must have shape (%zd,), got (%zd,)", fn,
                         name, (Py_ssize_t)d0, (Py_ssize_t)PyArray_DIM(a, 0));
        }
        return -1;
    }
    return 0;
}

static PyObject *py_xent(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"student_logits", "teacher_logits", "teacher_logits_b", "center",
                             "center_b", "weight", "weight_b", "student_temp", "teacher_temp",
                             "teacher_temp_b", "with_grad", "grad_out", NULL};
    const char *fn = "softmax_cross_entropy";
    PyArrayObject *s, *ta, *tb = NULL, *ca = NULL, *cb = NULL, *wa = NULL, *wb = NULL;
    PyObject *otb = Py_None, *oca = Py_None, *ocb = Py_None, *owa = Py_None, *owb = Py_None;
    PyObject *ogo = Py_None;
    PyArrayObject *gout = NULL;
    double ts = 0.1, tta = 0.07, ttb = 0.07;
    int with_grad = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!|OOOOOdddpO:softmax_cross_entropy", kwlist,
                                     &PyArray_Type, &s, &PyArray_Type, &ta, &otb, &oca, &ocb,
                                     &owa, &owb, &ts, &tta, &ttb, &with_grad, &ogo)) {
        return NULL;
    }
    if (optional_array(ogo, &gout, fn, "grad_out") < 0) {
        return NULL;
    }
    if (CHECK_F32(s, fn, "student_logits", 2, "(R, L)") < 0 ||
        optional_array(otb, &tb, fn, "teacher_logits_b") < 0 ||
        optional_array(oca, &ca, fn, "center") < 0 ||
        optional_array(ocb, &cb, fn, "center_b") < 0 ||
        optional_array(owa, &wa, fn, "weight") < 0 ||
        optional_array(owb, &wb, fn, "weight_b") < 0) {
        return NULL;
    }
    const npy_intp R = PyArray_DIM(s, 0), L = PyArray_DIM(s, 1);
    if (check_opt(ta, fn, "teacher_logits", 2, R, L, "(R, L)") < 0 ||
        check_opt(tb, fn, "teacher_logits_b", 2, R, L, "(R, L)") < 0 ||
        check_opt(ca, fn, "center", 1, L, 0, "(L,)") < 0 ||
        check_opt(cb, fn, "center_b", 1, L, 0, "(L,)") < 0 ||
        check_opt(wa, fn, "weight", 1, R, 0, "(R,)") < 0 ||
        check_opt(wb, fn, "weight_b", 1, R, 0, "(R,)") < 0 ||
        check_opt(gout, fn, "grad_out", 2, R, L, "(R, L)") < 0) {
        return NULL;
    }
    if (gout != NULL && !PyArray_ISWRITEABLE(gout)) {
        PyErr_Format(PyExc_ValueError, "%s: grad_out must be writeable", fn);
        return NULL;
    }
    if (check_positive_dim(L, fn, "the number of logits L") < 0) {
        return NULL;
    }
    if (tb != NULL && wb == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: weight_b is required with teacher_logits_b", fn);
        return NULL;
    }
    if (!(ts > 0.0 && ts < 1e6)) {
        bad_scalar(fn, "student_temp", "a finite number > 0", ts);
        return NULL;
    }
    if (!(tta > 0.0 && tta < 1e6)) {
        bad_scalar(fn, "teacher_temp", "a finite number > 0", tta);
        return NULL;
    }
    if (!(ttb > 0.0 && ttb < 1e6)) {
        bad_scalar(fn, "teacher_temp_b", "a finite number > 0", ttb);
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        PyArrayObject *wt = i == 0 ? wa : wb;
        if (wt != NULL) {
            const float *wp = (const float *)PyArray_DATA(wt);
            for (npy_intp r = 0; r < R; r++) {
                if (wp[r] < 0.0f) {
                    PyErr_Format(PyExc_ValueError, "%s: %s must be non-negative", fn,
                                 i == 0 ? "weight" : "weight_b");
                    return NULL;
                }
            }
        }
    }
    if ((wa != NULL && check_finite(wa, fn, "weight") < 0) ||
        (wb != NULL && check_finite(wb, fn, "weight_b") < 0) ||
        (ca != NULL && check_finite(ca, fn, "center") < 0) ||
        (cb != NULL && check_finite(cb, fn, "center_b") < 0)) {
        return NULL;
    }
    npy_intp rd[1] = {R};
    npy_intp gd[2] = {R, L};
    PyArrayObject *la = (PyArrayObject *)PyArray_SimpleNew(1, rd, NPY_FLOAT32);
    PyArrayObject *lb = NULL, *grad = NULL;
    void *work = NULL;
    if (la == NULL) {
        goto fail;
    }
    if (tb != NULL) {
        lb = (PyArrayObject *)PyArray_SimpleNew(1, rd, NPY_FLOAT32);
        if (lb == NULL) {
            goto fail;
        }
    }
    if (with_grad && gout != NULL) {
        /* Written in place: the caller's array (e.g. one view of a larger gradient). */
        Py_INCREF(gout);
        grad = gout;
    } else if (with_grad) {
        grad = (PyArrayObject *)PyArray_SimpleNew(2, gd, NPY_FLOAT32);
        if (grad == NULL) {
            goto fail;
        }
    }
    if (R > 0) {
        const int T = n_threads;
        work = alloc_work(cribo_xent_workspace_size(L) * (size_t)(T < R ? T : R));
        if (work == NULL) {
            goto fail;
        }
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = cribo_xent_forward_backward(
            (float *)PyArray_DATA(la), lb != NULL ? (float *)PyArray_DATA(lb) : NULL,
            grad != NULL ? (float *)PyArray_DATA(grad) : NULL, (const float *)PyArray_DATA(s),
            (const float *)PyArray_DATA(ta), tb != NULL ? (const float *)PyArray_DATA(tb) : NULL,
            ca != NULL ? (const float *)PyArray_DATA(ca) : NULL,
            cb != NULL ? (const float *)PyArray_DATA(cb) : NULL,
            wa != NULL ? (const float *)PyArray_DATA(wa) : NULL,
            wb != NULL ? (const float *)PyArray_DATA(wb) : NULL, R, L, ts, tta, ttb, work, T);
        Py_END_ALLOW_THREADS
        free(work);
        work = NULL;
        if (status != CRIBO_OK) {
            /* The kernel checks the logits as it scales them, so a finite logit whose
             * quotient by the temperature leaves float32's range is reported too. */
            PyErr_Format(PyExc_ValueError,
                         "%s: %s must be finite, got NaN or infinity (in the input, or from a "
                         "finite value beyond float32's range once scaled)", fn,
                         status == CRIBO_ENONFINITE_S    ? "student_logits (divided by student_temp)"
                         : status == CRIBO_ENONFINITE_TA ? "teacher_logits (after centring and scaling)"
                                                         : "teacher_logits_b (after centring and scaling)");
            goto fail;
        }
    }
    return Py_BuildValue("NNN", la, lb != NULL ? (PyObject *)lb : (Py_INCREF(Py_None), Py_None),
                         grad != NULL ? (PyObject *)grad : (Py_INCREF(Py_None), Py_None));

fail:
    free(work);
    Py_XDECREF(la);
    Py_XDECREF(lb);
    Py_XDECREF(grad);
    return NULL;
}

static PyObject *py_center_update(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"center", "teacher_logits", "momentum", NULL};
    const char *fn = "update_center";
    PyArrayObject *c, *x;
    double m;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!d:update_center", kwlist, &PyArray_Type, &c,
                                     &PyArray_Type, &x, &m)) {
        return NULL;
    }
    if (CHECK_F32(x, fn, "teacher_logits", 2, "(R, L)") < 0) {
        return NULL;
    }
    const npy_intp R = PyArray_DIM(x, 0), L = PyArray_DIM(x, 1);
    if (check_opt(c, fn, "center", 1, L, 0, "(L,)") < 0) {
        return NULL;
    }
    if (!(m >= 0.0 && m <= 1.0)) {
        bad_scalar(fn, "momentum", "in [0, 1]", m);
        return NULL;
    }
    if (check_finite(c, fn, "center") < 0) {
        return NULL;
    }
    npy_intp d[1] = {L};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, d, NPY_FLOAT32);
    if (out == NULL) {
        return NULL;
    }
    if (R == 0) {
        /* No rows this step: the centre is unchanged. */
        memcpy(PyArray_DATA(out), PyArray_DATA(c), (size_t)L * sizeof(float));
        return (PyObject *)out;
    }
    if (check_finite(x, fn, "teacher_logits") < 0) {
        Py_DECREF(out);
        return NULL;
    }
    const int T = n_threads;
    Py_BEGIN_ALLOW_THREADS
    cribo_center_update((float *)PyArray_DATA(out), (const float *)PyArray_DATA(c),
                        (const float *)PyArray_DATA(x), R, L, m, T);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"set_num_threads", (PyCFunction)py_set_num_threads, METH_VARARGS,
     "set_num_threads(n)"},
    {"get_num_threads", (PyCFunction)py_get_num_threads, METH_NOARGS, "get_num_threads()"},
    {"cluster", (PyCFunction)(void (*)(void))py_cluster, METH_VARARGS | METH_KEYWORDS,
     "cluster(tokens, positions, init, pos_weight, sinkhorn_lambda, sinkhorn_iters, n_iters, "
     "update_marginals, return_plan) -> (labels, counts, plan)"},
    {"pool", (PyCFunction)(void (*)(void))py_pool, METH_VARARGS | METH_KEYWORDS,
     "pool(tokens, labels, n_clusters) -> objects"},
    {"pool_backward", (PyCFunction)(void (*)(void))py_pool_backward,
     METH_VARARGS | METH_KEYWORDS, "pool_backward(grad_objects, labels, n_clusters) -> dtokens"},
    {"pool_soft", (PyCFunction)(void (*)(void))py_pool_soft, METH_VARARGS | METH_KEYWORDS,
     "pool_soft(tokens, weights) -> objects"},
    {"pool_soft_backward", (PyCFunction)(void (*)(void))py_pool_soft_backward,
     METH_VARARGS | METH_KEYWORDS, "pool_soft_backward(grad_objects, weights) -> dtokens"},
    {"topk_cosine", (PyCFunction)(void (*)(void))py_topk_cosine, METH_VARARGS | METH_KEYWORDS,
     "topk_cosine(queries, bank, k, query_ids=None, bank_ids=None) -> (indices, similarities)"},
    {"softmax_cross_entropy", (PyCFunction)(void (*)(void))py_xent,
     METH_VARARGS | METH_KEYWORDS,
     "softmax_cross_entropy(student_logits, teacher_logits, teacher_logits_b=None, center=None, "
     "center_b=None, weight=None, weight_b=None, student_temp=0.1, teacher_temp=0.07, "
     "teacher_temp_b=0.07, with_grad=True, grad_out=None) -> (losses, losses_b, grad)"},
    {"update_center", (PyCFunction)(void (*)(void))py_center_update,
     METH_VARARGS | METH_KEYWORDS, "update_center(center, teacher_logits, momentum) -> center"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cribo._C",
    .m_doc = "C kernels of cribo; use cribo.ops (validated, documented) instead.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    /* Parallelism is ours (static splits over images and rows); BLAS is called
     * from inside those threads and must not start threads of its own. */
    blas_set_num_threads(1);
    return PyModule_Create(&module);
}
