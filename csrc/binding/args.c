/* args.c -- the argument checker of the binding (interface, rules and messages:
 * csrc/binding/args.h).  Generic: it knows spec tables, not operators; each operator's table
 * and its rules that are not about one argument live in csrc/binding/_C.c.  About 500
 * lines because every kind of argument a table can name is checked here and nowhere else. */
#define NO_IMPORT_ARRAY /* the API table is filled by import_array() in _C.c */
#include "args.h"

PyObject *cribo_args_ValueError = NULL;
PyObject *cribo_args_TypeError = NULL;

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cribo.h" /* cribo_all_finite */

/* The axes of a shape spec: tokens[i] is a letter or a fixed size. */
static int parse_shape(const char *spec, char *letters, npy_intp *fixed)
{
    int n = 0;
    const char *p = spec;
    while (*p) {
        if (*p >= '0' && *p <= '9') {
            letters[n] = 0;
            fixed[n] = (npy_intp)strtol(p, (char **)&p, 10);
        } else {
            letters[n] = *p++;
            fixed[n] = -1;
        }
        n++;
        if (*p == ',') {
            p++;
        }
    }
    return n;
}

/* "(B, 2, N, d)" into buf; letters bound by an argument other than `self` are numbers. */
static void shape_text(char *buf, size_t size, const char *spec, const call_t *c, int self)
{
    char letters[8];
    npy_intp fixed[8];
    const int n = parse_shape(spec, letters, fixed);
    size_t used = 0;
    used += (size_t)snprintf(buf + used, size - used, "(");
    for (int a = 0; a < n && used < size; a++) {
        const int li = letters[a] ? args_letter_index(letters[a]) : -1;
        const char *sep = a + 1 < n ? ", " : (n == 1 ? "," : "");
        if (li < 0) {
            used += (size_t)snprintf(buf + used, size - used, "%zd%s", (Py_ssize_t)fixed[a], sep);
        } else if (c != NULL && c->dim[li] >= 0 && c->bound_by[li] != self) {
            used += (size_t)snprintf(buf + used, size - used, "%zd%s", (Py_ssize_t)c->dim[li], sep);
        } else {
            used += (size_t)snprintf(buf + used, size - used, "%c%s", letters[a], sep);
        }
    }
    if (used < size) {
        snprintf(buf + used, size - used, ")");
    }
}

/* "(2, 3, 5)" of an array. */
static void dims_text(char *buf, size_t size, PyArrayObject *a)
{
    size_t used = (size_t)snprintf(buf, size, "(");
    const int n = PyArray_NDIM(a);
    for (int i = 0; i < n && used < size; i++) {
        used += (size_t)snprintf(buf + used, size - used, "%zd%s", (Py_ssize_t)PyArray_DIM(a, i),
                                 i + 1 < n ? ", " : (n == 1 ? "," : ""));
    }
    if (used < size) {
        snprintf(buf + used, size - used, ")");
    }
}

/* "[0, 1000000]", "(0, 100000]" */
static void range_text(char *buf, size_t size, const arg_spec *s)
{
    snprintf(buf, size, "%c%.17g, %.17g%c", (s->flags & LO_OPEN) ? '(' : '[', s->lo, s->hi,
             (s->flags & HI_OPEN) ? ')' : ']');
}

static const char *type_name(int type)
{
    return type == A_F32 ? "float32" : type == A_I64 ? "int64" : "bool";
}

/* The array rules of argument k: type, ndim, layout, INT_MAX, letters. */
int cribo_args_check_array(call_t *c, int k, PyObject *o)
{
    const entry_spec *e = c->e;
    const arg_spec *s = &e->args[k];
    char want[96], got[96];
    if (!PyArray_Check(o)) {
        PyErr_Format(cribo_args_TypeError, "%s: %s must be a numpy array%s, got %R", e->fn, s->name,
                     (s->flags & OPT) ? " or None" : "", (PyObject *)Py_TYPE(o));
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    const int npy = s->type == A_F32 ? NPY_FLOAT32 : s->type == A_I64 ? NPY_INT64 : NPY_BOOL;
    if (PyArray_TYPE(a) != npy || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(cribo_args_TypeError, "%s: %s must be a native-endian %s array, got %R", e->fn,
                     s->name, type_name(s->type), (PyObject *)PyArray_DESCR(a));
        return -1;
    }
    char letters[8];
    npy_intp fixed[8];
    const int nd = parse_shape(s->shape, letters, fixed);
    if (PyArray_NDIM(a) != nd) {
        shape_text(want, sizeof want, s->shape, NULL, k);
        dims_text(got, sizeof got, a);
        PyErr_Format(cribo_args_ValueError, "%s: %s must have shape %s, got %s", e->fn, s->name, want,
                     got);
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(cribo_args_ValueError,
                     "%s: %s must be C-contiguous and aligned (use numpy.require(x, "
                     "requirements='CA'))",
                     e->fn, s->name);
        return -1;
    }
    for (int i = 0; i < nd; i++) {
        if (PyArray_DIM(a, i) > INT_MAX) {
            PyErr_Format(cribo_args_ValueError,
                         "%s: %s dimension %d is %zd, larger than the supported %d", e->fn,
                         s->name, i, (Py_ssize_t)PyArray_DIM(a, i), INT_MAX);
            return -1;
        }
    }
    for (int i = 0; i < nd; i++) {
        const int li = letters[i] ? args_letter_index(letters[i]) : -1;
        const npy_intp d = PyArray_DIM(a, i);
        if (li < 0 ? d == fixed[i] : (c->dim[li] < 0 || c->dim[li] == d)) {
            if (li >= 0 && c->dim[li] < 0) {
                c->dim[li] = d;
                c->bound_by[li] = k;
            }
            continue;
        }
        /* Mismatch: say which earlier arguments fixed the letters of this shape. */
        char match[160] = "";
        size_t used = 0;
        int seen[MAX_ARGS] = {0}, n_seen = 0;
        for (int j = 0; j < nd; j++) {
            const int lj = letters[j] ? args_letter_index(letters[j]) : -1;
            if (lj >= 0 && c->dim[lj] >= 0 && c->bound_by[lj] != k && !seen[c->bound_by[lj]]) {
                seen[c->bound_by[lj]] = 1;
                n_seen++;
            }
        }
        for (int j = 0, m = 0; j < e->n_args; j++) {
            if (seen[j]) {
                m++;
                used += (size_t)snprintf(match + used, sizeof match - used, "%s%s",
                                         m == 1 ? " to match " : (m == n_seen ? " and " : ", "),
                                         e->args[j].name);
            }
        }
        shape_text(want, sizeof want, s->shape, c, k);
        dims_text(got, sizeof got, a);
        PyErr_Format(cribo_args_ValueError, "%s: %s must have shape %s%s, got %s", e->fn, s->name,
                     want, match, got);
        return -1;
    }
    c->arr[k] = a;
    return 0;
}

static int is_bool_object(PyObject *o)
{
    return PyBool_Check(o) || PyArray_IsScalar(o, Bool);
}

/* One integer of argument k (name shown as `label`) into *out, checked against its range. */
static int check_int(const call_t *c, int k, const char *label, PyObject *o, long long *out)
{
    const arg_spec *s = &c->e->args[k];
    if (is_bool_object(o) || !PyIndex_Check(o)) {
        PyErr_Format(cribo_args_TypeError, "%s: %s must be an integer, got %R", c->e->fn, label, o);
        return -1;
    }
    PyObject *v = PyNumber_Index(o);
    if (v == NULL) {
        return -1;
    }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) {
        Py_DECREF(v);
        return -1;
    }
    const long long lo = (long long)s->lo, hi = s->hi >= 9.2e18 ? LLONG_MAX : (long long)s->hi;
    if (overflow || x < lo || x > hi) {
        PyErr_Format(cribo_args_ValueError, "%s: %s must be in [%lld, %lld], got %S", c->e->fn, label,
                     lo, hi, v);
        Py_DECREF(v);
        return -1;
    }
    Py_DECREF(v);
    *out = x;
    return 0;
}

/* One number of argument k into *out, finite and within its range. */
static int check_float(const call_t *c, int k, const char *label, PyObject *o, double *out)
{
    const arg_spec *s = &c->e->args[k];
    char range[80];
    if (is_bool_object(o) ||
        !(PyFloat_Check(o) || PyLong_Check(o) || PyArray_IsScalar(o, Floating) ||
          PyArray_IsScalar(o, Integer))) {
        PyErr_Format(cribo_args_TypeError, "%s: %s must be a number, got %R", c->e->fn, label, o);
        return -1;
    }
    const double x = PyFloat_AsDouble(o);
    if (x == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return -1;
        }
        /* An integer beyond double's range is out of every range (not shown: it may be
         * too long to print). */
        PyErr_Clear();
        range_text(range, sizeof range, s);
        PyErr_Format(cribo_args_ValueError, "%s: %s must be a finite number in %s, got an "
                     "integer beyond the float range", c->e->fn, label, range);
        return -1;
    }
    const int lo_ok = (s->flags & LO_OPEN) ? x > s->lo : x >= s->lo;
    const int hi_ok = (s->flags & HI_OPEN) ? x < s->hi : x <= s->hi;
    if (!(lo_ok && hi_ok)) {
        range_text(range, sizeof range, s);
        PyObject *f = PyFloat_FromDouble(x);
        if (f != NULL) {
            PyErr_Format(cribo_args_ValueError, "%s: %s must be a finite number in %s, got %R",
                         c->e->fn, label, range, f);
            Py_DECREF(f);
        }
        return -1;
    }
    *out = x;
    return 0;
}

/* A fixed-length sequence of numbers or integers. */
static int check_sequence(call_t *c, int k, PyObject *o)
{
    const arg_spec *s = &c->e->args[k];
    PyObject *seq = NULL;
    if (!PyUnicode_Check(o) && !PyBytes_Check(o)) {
        seq = PySequence_Fast(o, "");
    }
    if (seq == NULL || PySequence_Fast_GET_SIZE(seq) != s->count) {
        PyErr_Clear();
        PyErr_Format(cribo_args_ValueError, "%s: %s must be %d %s %s, got %R", c->e->fn, s->name,
                     s->count, s->type == S_INTS ? "integers" : "numbers", s->what, o);
        Py_XDECREF(seq);
        return -1;
    }
    for (int j = 0; j < s->count; j++) {
        char label[64];
        snprintf(label, sizeof label, "%s[%d]", s->name, j);
        PyObject *item = PySequence_Fast_GET_ITEM(seq, j);
        if ((s->type == S_INTS ? check_int(c, k, label, item, &c->is[k][j])
                               : check_float(c, k, label, item, &c->fs[k][j])) < 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

static int is_array_type(int type)
{
    return type == A_F32 || type == A_I64 || type == A_BOOL;
}

/* A seed: an integer in the spec's range, or an int64 array of its shape with entries >= 0. */
static int check_seed(call_t *c, int k, PyObject *o)
{
    const entry_spec *e = c->e;
    const arg_spec *s = &e->args[k];
    if (!PyArray_Check(o) || PyArray_NDIM((PyArrayObject *)o) == 0) {
        return check_int(c, k, s->name, o, &c->i[k]);
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_TYPE(a) != NPY_INT64 || !PyArray_ISNOTSWAPPED(a) || !PyArray_IS_C_CONTIGUOUS(a) ||
        !PyArray_ISALIGNED(a)) {
        PyErr_Format(cribo_args_TypeError, "%s: %s must be an integer or a native-endian, "
                     "C-contiguous int64 array, got %R", e->fn, s->name, o);
        return -1;
    }
    const int li = args_letter_index(s->shape[0]);
    if (PyArray_NDIM(a) != 1 || PyArray_DIM(a, 0) != c->dim[li]) {
        char got[96];
        dims_text(got, sizeof got, a);
        PyErr_Format(cribo_args_ValueError, "%s: %s must be an integer or have shape (%zd,), got "
                     "shape %s", e->fn, s->name, (Py_ssize_t)c->dim[li], got);
        return -1;
    }
    const int64_t *x = (const int64_t *)PyArray_DATA(a);
    for (npy_intp j = 0; j < PyArray_DIM(a, 0); j++) {
        if (x[j] < 0) {
            PyErr_Format(cribo_args_ValueError, "%s: %s values must be non-negative, got %lld",
                         e->fn, s->name, (long long)x[j]);
            return -1;
        }
    }
    c->arr[k] = a;
    return 0;
}

static int check_finite_array(const call_t *c, int k)
{
    PyArrayObject *a = c->arr[k];
    int ok;
    const float *x = (const float *)PyArray_DATA(a);
    const int64_t n = (int64_t)PyArray_SIZE(a);
    Py_BEGIN_ALLOW_THREADS
    ok = cribo_all_finite(x, n);
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_Format(cribo_args_ValueError, "%s: %s must be finite, got NaN or infinity", c->e->fn,
                     c->e->args[k].name);
        return -1;
    }
    return 0;
}

/* THE checker: parses (args, kw) against the entry's table and applies every rule of it.
 * Scalars first (an integer may bind a letter, e.g. n_clusters -> K), then arrays in
 * keyword order, then non-empty letters, finiteness and signs. */
int cribo_args_check_call(call_t *c, const entry_spec *e, PyObject *args, PyObject *kw)
{
    memset(c, 0, sizeof *c);
    c->e = e;
    for (int l = 0; l < N_LETTERS; l++) {
        c->dim[l] = -1;
    }
    const Py_ssize_t n_pos = args != NULL ? PyTuple_GET_SIZE(args) : 0;
    if (n_pos > e->n_args) {
        PyErr_Format(PyExc_TypeError, "%s: takes at most %d arguments, got %zd", e->fn,
                     e->n_args, n_pos);
        return -1;
    }
    for (Py_ssize_t k = 0; k < n_pos; k++) {
        c->obj[k] = PyTuple_GET_ITEM(args, k);
    }
    if (kw != NULL) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kw, &pos, &key, &value)) {
            int k = 0;
            while (k < e->n_args && PyUnicode_CompareWithASCIIString(key, e->args[k].name) != 0) {
                k++;
            }
            if (k == e->n_args) {
                PyErr_Format(PyExc_TypeError, "%s: unexpected keyword argument %R", e->fn, key);
                return -1;
            }
            if (k < n_pos) {
                PyErr_Format(PyExc_TypeError, "%s: argument %R given by position and by "
                             "keyword", e->fn, key);
                return -1;
            }
            c->obj[k] = value;
        }
    }
    for (int k = 0; k < e->n_args; k++) {
        const arg_spec *s = &e->args[k];
        if (c->obj[k] == Py_None && s->type != S_FLAG) { /* a flag takes None's truth */
            if (is_array_type(s->type) ? !(s->flags & OPT) : !(s->flags & NONE_OK)) {
                PyErr_Format(cribo_args_TypeError, "%s: %s must be %s%s, got None", e->fn, s->name,
                             is_array_type(s->type) ? "a numpy array"
                             : s->type == S_INT || s->type == S_SEED ? "an integer"
                             : s->type == S_CALLABLE ? "callable"
                             : s->type == S_FLOATS || s->type == S_INTS ? "a sequence"
                                                                       : "a number",
                             s->type == S_INT && s->what != NULL ? s->what : "");
                return -1;
            }
            c->obj[k] = NULL;
        } else if (c->obj[k] == NULL && !(s->flags & OPT)) {
            PyErr_Format(PyExc_TypeError, "%s: missing required argument '%s'", e->fn, s->name);
            return -1;
        }
    }
    /* scalars */
    for (int k = 0; k < e->n_args; k++) {
        const arg_spec *s = &e->args[k];
        PyObject *o = c->obj[k];
        if (is_array_type(s->type) || s->type == S_SEED) {
            continue;
        }
        if (o == NULL) { /* omitted optional: its default */
            c->i[k] = (long long)s->def;
            c->f[k] = s->def;
            for (int j = 0; j < 4; j++) {
                c->fs[k][j] = s->def;
                c->is[k][j] = (long long)s->def;
            }
            continue;
        }
        int r = 0;
        switch (s->type) {
        case S_INT:
            r = check_int(c, k, s->name, o, &c->i[k]);
            if (r == 0 && s->shape != NULL) {
                const int li = args_letter_index(s->shape[0]);
                c->dim[li] = (npy_intp)c->i[k];
                c->bound_by[li] = k;
            }
            break;
        case S_FLOAT:
            r = check_float(c, k, s->name, o, &c->f[k]);
            break;
        case S_FLAG:
            c->i[k] = PyObject_IsTrue(o);
            r = c->i[k] < 0 ? -1 : 0;
            break;
        case S_FLOATS:
        case S_INTS:
            r = check_sequence(c, k, o);
            break;
        case S_CALLABLE:
            if (!PyCallable_Check(o)) {
                PyErr_Format(cribo_args_TypeError, "%s: %s must be callable, got %R", e->fn, s->name,
                             (PyObject *)Py_TYPE(o));
                r = -1;
            }
            break;
        }
        if (r < 0) {
            return -1;
        }
    }
    /* arrays (and seeds, whose shape follows the arrays') */
    for (int k = 0; k < e->n_args; k++) {
        const arg_spec *s = &e->args[k];
        if (c->obj[k] == NULL) {
            if (s->type == S_SEED) {
                c->i[k] = (long long)s->def;
            }
            continue;
        }
        if ((is_array_type(s->type) && cribo_args_check_array(c, k, c->obj[k]) < 0) ||
            (s->type == S_SEED && check_seed(c, k, c->obj[k]) < 0)) {
            return -1;
        }
    }
    for (const letter_doc *d = e->nonempty; d != NULL && d->letter; d++) {
        const int li = args_letter_index(d->letter);
        if (c->dim[li] >= 0 && c->dim[li] < 1) {
            PyErr_Format(cribo_args_ValueError, "%s: %s must be at least 1, got %zd", e->fn, d->doc,
                         (Py_ssize_t)c->dim[li]);
            return -1;
        }
    }
    for (int k = 0; k < e->n_args; k++) {
        const arg_spec *s = &e->args[k];
        if (c->arr[k] == NULL || s->type != A_F32) {
            continue;
        }
        if ((s->flags & FINITE) && check_finite_array(c, k) < 0) {
            return -1;
        }
        if (s->flags & NONNEG) {
            const float *x = (const float *)PyArray_DATA(c->arr[k]);
            const npy_intp n = PyArray_SIZE(c->arr[k]);
            for (npy_intp j = 0; j < n; j++) {
                if (x[j] < 0.0f) {
                    char v[32];
                    snprintf(v, sizeof v, "%.9g", (double)x[j]);
                    PyErr_Format(cribo_args_ValueError, "%s: %s must be non-negative, got %s at "
                                 "flat index %zd", e->fn, s->name, v, (Py_ssize_t)j);
                    return -1;
                }
            }
        }
    }
    return 0;
}

/* 0 if every entry of the int64 array lies in [lo, hi). */
int cribo_args_check_index_range(const call_t *c, int k, int64_t lo, int64_t hi)
{
    const int64_t *x = I64P(c, k);
    const npy_intp n = PyArray_SIZE(c->arr[k]);
    for (npy_intp i = 0; i < n; i++) {
        if (x[i] < lo || x[i] >= hi) {
            PyErr_Format(cribo_args_ValueError, "%s: %s must lie in [%lld, %lld), got %lld", c->e->fn,
                         c->e->args[k].name, (long long)lo, (long long)hi, (long long)x[i]);
            return -1;
        }
    }
    return 0;
}

/* Every entry of int64 argument k is >= lo. */
int cribo_args_check_at_least(const call_t *c, int k, int64_t lo, const char *what)
{
    if (c->arr[k] == NULL) {
        return 0;
    }
    const int64_t *x = I64P(c, k);
    for (npy_intp i = 0; i < PyArray_SIZE(c->arr[k]); i++) {
        if (x[i] < lo) {
            PyErr_Format(cribo_args_ValueError, "%s: %s must be %s, got %lld", c->e->fn,
                         c->e->args[k].name, what, (long long)x[i]);
            return -1;
        }
    }
    return 0;
}
