/* parallel.c -- static splits of independent work over POSIX threads.
 *
 * Each call starts its own threads and joins them before returning: no pool, no
 * global state, nothing left running between calls.  Chunk t of [0, n) is always
 * [n*t/T, n*(t+1)/T), and every task writes only its own outputs, so a result
 * never depends on T or on scheduling. */
#include <pthread.h>

#include "cribo.h"

typedef struct {
    cribo_task_fn fn;
    void *ctx;
    int64_t begin;
    int64_t end;
    int tid;
} task_t;

static void *run_task(void *arg)
{
    task_t *t = (task_t *)arg;
    t->fn(t->ctx, t->begin, t->end, t->tid);
    return NULL;
}

int cribo_thread_count(int64_t n, int n_threads)
{
    if (n <= 0) {
        return 0;
    }
    int T = n_threads < 1 ? 1 : n_threads;
    if (T > CRIBO_MAX_THREADS) {
        T = CRIBO_MAX_THREADS;
    }
    if ((int64_t)T > n) {
        T = (int)n;
    }
    return T;
}

int cribo_first_error(const int *status, int T)
{
    for (int t = 0; t < T; t++) {
        if (status[t] != CRIBO_OK) {
            return status[t];
        }
    }
    return CRIBO_OK;
}

void cribo_parallel_for(int64_t n, int n_threads, cribo_task_fn fn, void *ctx)
{
    const int T = cribo_thread_count(n, n_threads);
    if (T == 0) {
        return;
    }
    if (T == 1) {
        fn(ctx, 0, n, 0);
        return;
    }
    task_t tasks[CRIBO_MAX_THREADS];
    pthread_t threads[CRIBO_MAX_THREADS];
    int started[CRIBO_MAX_THREADS];
    for (int t = 0; t < T; t++) {
        tasks[t].fn = fn;
        tasks[t].ctx = ctx;
        tasks[t].begin = n * t / T;
        tasks[t].end = n * (t + 1) / T;
        tasks[t].tid = t;
        started[t] = 0;
    }
    for (int t = 1; t < T; t++) {
        started[t] = pthread_create(&threads[t], NULL, run_task, &tasks[t]) == 0;
    }
    run_task(&tasks[0]);
    for (int t = 1; t < T; t++) {
        if (started[t]) {
            pthread_join(threads[t], NULL);
        } else {
            /* Could not start a thread: do its chunk here, with its own tid
             * (its own workspace slice), so the result is unchanged. */
            run_task(&tasks[t]);
        }
    }
}

int cribo_all_finite(const float *x, int64_t n)
{
    /* x - x is 0 for finite x and NaN for NaN or +-inf; lanes keep it vectorisable. */
    int bad[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int l = 0; l < 16; l++) {
            bad[l] |= !(x[i + l] - x[i + l] == 0.0f);
        }
    }
    int any = 0;
    for (; i < n; i++) {
        any |= !(x[i] - x[i] == 0.0f);
    }
    for (int l = 0; l < 16; l++) {
        any |= bad[l];
    }
    return !any;
}
