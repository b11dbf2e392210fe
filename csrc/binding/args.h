/* args.h -- the argument checker of the binding: the spec types every entry point of
 * csrc/binding/_C.c fills in, and the one checker that reads them (csrc/binding/args.c).
 *
 * Only the binding includes this header (it includes Python.h and NumPy); the kernels
 * and tests/ops/sanitize/ never see it.  Include it FIRST, before any system header
 * (Python.h must come first).  It also fixes, for both files, how the NumPy C API is
 * reached: one API table, cribo_ARRAY_API, filled by import_array() in _C.c's module
 * init; args.c defines NO_IMPORT_ARRAY before including this header and so uses the
 * same table.  The API level (NPY_TARGET_VERSION, NumPy 1.25) comes from setup.py.
 *
 * ------------------------------------------------------------------ how a call is checked
 * An entry point describes its public Python function by an entry_spec: the function's
 * name (used in every message) and one arg_spec per argument, in the order of its
 * keywords.  cribo_args_check_call() then:
 *   1. binds the positional and keyword arguments to the specs ("takes at most",
 *      "unexpected keyword argument", "given by position and by keyword");
 *   2. rejects None unless allowed, and a missing required argument;
 *   3. checks the scalars, in keyword order; an omitted optional scalar takes `def`;
 *      an S_INT with a letter in `shape` binds that letter to its value (n_clusters -> K);
 *   4. checks the arrays (and seeds), in keyword order: dtype, native byte order, ndim,
 *      C-contiguous and aligned, every dimension <= INT_MAX, then the letters;
 *   5. checks that each letter of the entry's `nonempty` list that got bound is >= 1;
 *   6. checks the FINITE and NONNEG arrays, in keyword order (the finiteness scan runs
 *      with the GIL released).
 * The first rule broken raises (TypeError for a wrong kind or dtype, ValueError for
 * the rest) and the checker returns -1; rules that are not about one argument's kind,
 * range or shape (K <= 2N, ids given together, ...) are the entry point's own, next to
 * its table in _C.c, and run after the checker.
 *
 * How letters bind.  A shape spec is a comma-separated list of axes, each a letter or a
 * fixed size in digits: "B,2,N,d".  Letters are case-sensitive (A-Z and a-z, 52 in
 * all), shared by every argument of ONE call: the first argument to reach a letter
 * (an S_INT with that letter in step 3, else the first array in keyword order that
 * has it) binds it to its size, and every later axis with that letter must have that
 * size.  An omitted optional array binds nothing.  Each letter's size is then
 * DIM(c, letter) for the entry point (-1 if nothing bound it).
 *
 * Messages read "fn: arg must be ..., got ...", with the public function name
 * (entry_spec.fn) and argument name (arg_spec.name), e.g.
 *   "pool: labels must be a native-endian int64 array, got dtype('float32')"
 *   "pool: labels must have shape (2, 2, 5) to match tokens, got (2, 2, 4)"
 *   "cluster: sinkhorn_lambda must be a finite number in (0, 1000000], got 0.0"
 *   "cribo_losses: weights[1] must be a finite number in [0, 1000000], got -1.0"
 *   "cluster: the batch size B must be at least 1, got 0"
 * In a shape mismatch the expected shape shows the letters bound by other arguments as
 * their sizes and names those arguments; letters still free stay letters:
 *   "pool: weights must have shape (2, 2, 4, K) to match tokens, got (2, 2, 5, 2)"
 *   "cribo_losses: teacher_objects must have shape (2, 1, 3) to match student_global and
 *    student_objects, got (2, 1, 4)" */
#ifndef CRIBO_ARGS_H
#define CRIBO_ARGS_H

#define PY_SSIZE_T_CLEAN
#define NPY_NO_DEPRECATED_API NPY_1_21_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL cribo_ARRAY_API
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <numpy/arrayobject.h>

/* arg_spec.type: what an argument is. */
enum {
    A_F32 = 1, /* arrays: a float32 / int64 / bool numpy array of `shape` */
    A_I64,
    A_BOOL,
    S_INT,      /* an integer (not a bool) in [lo, hi]; may bind the letter `shape` */
    S_FLOAT,    /* a number (not a bool) in lo..hi, ends per LO_OPEN / HI_OPEN */
    S_FLAG,     /* anything, None included; its truth value */
    S_FLOATS,   /* a sequence of `count` numbers, each like S_FLOAT */
    S_INTS,     /* a sequence of `count` integers, each like S_INT */
    S_SEED,     /* an integer in [lo, hi], or an int64 array of shape (`shape`,) with entries
                 * >= 0; `shape` is ONE letter, bound by an array or integer before it */
    S_CALLABLE, /* any callable */
};

/* arg_spec.flags, or-ed. */
#define OPT 1     /* may be omitted (a scalar then takes `def`); an array may also be None */
#define FINITE 2  /* float32 array: every entry finite */
#define NONNEG 4  /* float32 array: every entry >= 0 */
#define LO_OPEN 8 /* S_FLOAT(S): the range excludes lo (else includes it) */
#define HI_OPEN 16 /* S_FLOAT(S): the range excludes hi */
#define NONE_OK 32 /* scalar: None means omitted (else None is a TypeError) */

/* One argument of a public function. */
typedef struct {
    const char *name;  /* the public keyword; every message names it */
    int type;          /* A_* or S_* above */
    const char *shape; /* arrays: the shape spec, e.g. "B,2,N,d"; S_INT: the letter it binds,
                        * or NULL; S_SEED: the letter giving a seed array's length */
    int flags;         /* OPT | FINITE | NONNEG | LO_OPEN | HI_OPEN | NONE_OK */
    double lo, hi;     /* scalar range (each element of a sequence); integers: lo and hi
                        * are whole numbers, hi >= 9.2e18 meaning LLONG_MAX */
    double def;        /* the value of an omitted optional scalar (every element of a
                        * sequence; an omitted seed is this integer) */
    int count;         /* S_FLOATS / S_INTS: the length (at most 4) */
    const char *what;  /* S_FLOATS / S_INTS: what the entries are, e.g. "(B, M, Z1, Z2)";
                        * S_INT: a note appended to the None message, e.g.
                        * " (required with integer labels)"; else NULL */
} arg_spec;

/* A letter that must be at least 1, and how messages call it. */
typedef struct {
    char letter;
    const char *doc; /* "the batch size B" */
} letter_doc;

/* One public function. */
typedef struct {
    const char *fn;             /* the public Python name, e.g. "ObjectQueue.push" */
    const arg_spec *args;       /* in keyword (= positional) order */
    int n_args;                 /* at most MAX_ARGS */
    const letter_doc *nonempty; /* letters that must be >= 1, checked in this order, ended by
                                 * {0, NULL}; NULL for none */
} entry_spec;

/* The exceptions of a broken rule, cribo._C.ArgumentError (a ValueError) and
 * cribo._C.ArgumentTypeError (a TypeError), created in PyInit__C: they tell the
 * user's bad input from a call of the binding that does not fit its signature
 * (missing, unknown or duplicate arguments), which raises a plain TypeError and is
 * a bug of the caller (cribo's own Python code). */
extern PyObject *cribo_args_ValueError;
extern PyObject *cribo_args_TypeError;

#define MAX_ARGS 16
#define N_LETTERS 52

/* A checked call: borrowed objects and converted values, by argument index k (the
 * index of its arg_spec).  Valid only after cribo_args_check_call() returned 0. */
typedef struct {
    const entry_spec *e;
    PyObject *obj[MAX_ARGS];       /* NULL where omitted or None */
    PyArrayObject *arr[MAX_ARGS];  /* arrays and seed arrays; NULL where omitted */
    long long i[MAX_ARGS];         /* S_INT, S_FLAG (0/1), S_SEED (a scalar seed) */
    double f[MAX_ARGS];            /* S_FLOAT */
    double fs[MAX_ARGS][4];        /* S_FLOATS */
    long long is[MAX_ARGS][4];     /* S_INTS */
    npy_intp dim[N_LETTERS];       /* size of each letter, -1 while unbound */
    int bound_by[N_LETTERS];       /* the argument that bound it */
} call_t;

/* The slot of a shape letter in call_t.dim (A-Z, then a-z); -1 for anything else. */
static inline int args_letter_index(char c)
{
    if (c >= 'A' && c <= 'Z') {
        return c - 'A';
    }
    if (c >= 'a' && c <= 'z') {
        return 26 + c - 'a';
    }
    return -1;
}

/* Accessors of a checked call. */
#define DIM(c, letter) ((c)->dim[args_letter_index(letter)])
#define F32P(c, k) ((float *)PyArray_DATA((c)->arr[k]))
#define OPT_F32P(c, k) ((c)->arr[k] != NULL ? (const float *)PyArray_DATA((c)->arr[k]) : NULL)
#define I64P(c, k) ((const int64_t *)PyArray_DATA((c)->arr[k]))

/* For writing tables. */
#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))
#define INTMAX ((double)INT_MAX)

/* THE checker: parses (args, kw) -- a tuple or NULL, a dict or NULL -- against e and
 * applies every rule of its table (the steps above).  0 and a filled *c, or -1 with an
 * exception set. */
int cribo_args_check_call(call_t *c, const entry_spec *e, PyObject *args, PyObject *kw);

/* The array rules of argument k (step 4) applied to o, binding or matching its letters;
 * for an array produced after the call was checked (cluster's drawn init).  On success
 * c->arr[k] = o (borrowed). */
int cribo_args_check_array(call_t *c, int k, PyObject *o);

/* Every entry of int64 argument k (given) lies in [lo, hi):
 * "fn: arg must lie in [lo, hi), got x". */
int cribo_args_check_index_range(const call_t *c, int k, int64_t lo, int64_t hi);

/* Every entry of int64 argument k is >= lo, or k was omitted:
 * "fn: arg must be <what>, got x". */
int cribo_args_check_at_least(const call_t *c, int k, int64_t lo, const char *what);

#endif
