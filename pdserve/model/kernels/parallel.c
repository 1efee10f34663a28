/*
 * A small persistent thread pool for the batch-invariant kernels (gemm.c).
 *
 * Why not Python threads, as the other kernels use: handing a call to a Python
 * ThreadPoolExecutor and waiting for it costs ~55 us here, and a decode step makes 33 matrix
 * products (8 layers x 4 + lm_head): ~2 ms a step. Here a call wakes the workers through one
 * atomic counter they spin on for a short while (then sleep on a condition variable, so an
 * idle engine burns no CPU) and costs a few microseconds.
 *
 * Contract: `parallel_run(fn, ctx, parts)` calls fn(ctx, part, parts) once for every part in
 * [0, parts) — part 0 on the calling thread — and returns when all have returned. Callers
 * are serialised by a mutex. Which thread runs which part never changes a result: the
 * kernels split their work so that every output element is computed whole by one part.
 * After fork() the child starts with no workers (they do not survive a fork) and makes new
 * ones on first use.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "parallel.h"

#define MAX_WORKERS 63
/* Spins (~10-40 ns each) a worker makes before it sleeps: ~50-200 us, longer than the gap
   between two products of a step, shorter than the gap between two steps of an idle engine. */
#define SPINS 5000

typedef struct {
    pthread_mutex_t call_lock; /* one caller at a time */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    atomic_uint generation; /* bumped once per call */
    atomic_int pending;     /* workers still to finish the current call */
    int num_workers;
    part_fn fn;
    void *ctx;
    int64_t parts;
} Pool;

static Pool pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
                    PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static unsigned wait_for_call(unsigned seen) {
    for (int i = 0; i < SPINS; ++i) {
        const unsigned g = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (g != seen) return g;
        cpu_relax();
    }
    pthread_mutex_lock(&pool.sleep_lock);
    unsigned g;
    while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen)
        pthread_cond_wait(&pool.wake, &pool.sleep_lock);
    pthread_mutex_unlock(&pool.sleep_lock);
    return g;
}

static void *worker_main(void *arg) {
    /* arg: the part this worker runs, and the generation when it was made (it may start
       running only after the call that made it has been announced) */
    const int64_t index = (int64_t)((uintptr_t)arg & 0xff);
    unsigned seen = (unsigned)((uintptr_t)arg >> 8);
    for (;;) {
        seen = wait_for_call(seen);
        if (index < pool.parts) pool.fn(pool.ctx, index, pool.parts);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return 0;
}

static void forget_workers_after_fork(void) {
    pthread_mutex_init(&pool.call_lock, 0);
    pthread_mutex_init(&pool.sleep_lock, 0);
    pthread_cond_init(&pool.wake, 0);
    pool.num_workers = 0;
}

/* Start workers up to `wanted` (call_lock held). Returns how many exist. */
static int grow(int wanted) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(0, 0, forget_workers_after_fork);
        registered = 1;
    }
    while (pool.num_workers < wanted && pool.num_workers < MAX_WORKERS) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const uintptr_t gen = atomic_load_explicit(&pool.generation, memory_order_relaxed);
        const uintptr_t arg = (gen << 8) | (uintptr_t)(pool.num_workers + 1);
        const int failed = pthread_create(&thread, &attr, worker_main, (void *)arg);
        pthread_attr_destroy(&attr);
        if (failed) break;
        ++pool.num_workers;
    }
    return pool.num_workers;
}

void parallel_run(part_fn fn, void *ctx, int64_t parts) {
    if (parts <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool.call_lock);
    const int64_t workers = grow((int)(parts - 1));
    if (parts > workers + 1) parts = workers + 1;
    if (parts <= 1) {
        pthread_mutex_unlock(&pool.call_lock);
        fn(ctx, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.parts = parts;
    atomic_store_explicit(&pool.pending, (int)workers, memory_order_relaxed);
    pthread_mutex_lock(&pool.sleep_lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.sleep_lock);
    fn(ctx, 0, parts);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) cpu_relax();
    pthread_mutex_unlock(&pool.call_lock);
}
