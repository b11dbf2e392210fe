/* workspace.h -- carving a kernel's caller-provided workspace into buffers.
 *
 * Each kernel lays its per-thread workspace out in one function that is run twice:
 * with base == NULL to count the bytes (the *_workspace_size functions), and with
 * the thread's slice to set the pointers.  Every buffer starts on a 64-byte line. */
#ifndef CRIBO_WORKSPACE_H
#define CRIBO_WORKSPACE_H

#include <stddef.h>

static inline size_t cribo_align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Inside a carve function with `char *base`, `size_t off` and a struct pointer `w`:
 * points w->field at the next `count` elements of `type` (if base is not NULL). */
#define CRIBO_TAKE(field, type, count)                            \
    do {                                                          \
        if (base != NULL) {                                       \
            w->field = (type *)(base + off);                      \
        }                                                         \
        off += cribo_align64((size_t)(count) * sizeof(type));     \
    } while (0)

#endif /* CRIBO_WORKSPACE_H */
