/*
 * A small persistent thread pool for the C kernels: the batch-invariant product (gemm.c) and
 * decode attention (paged_attention.c); each library has its own.
 *
 * Why not Python threads, as the other kernels use: handing a call to a Python
 * ThreadPoolExecutor and waiting for it costs ~55 us here, and a decode step makes 33 matrix
 * products (8 layers x 4 + lm_head): ~2 ms a step. Here a call wakes the workers through one
 * atomic counter they spin on for a short while (then sleep on a condition variable, so an
 * idle engine burns no CPU) and costs a few microseconds.
 *
 * Contract: `parallel_run(fn, ctx, num_chunks, threads)` calls fn(ctx, chunk) once for every
 * chunk in [0, num_chunks), on the calling thread and up to threads - 1 workers, and returns
 * when all have returned. Callers are serialised by a mutex. Which thread runs which chunk
 * never changes a result: the kernels split their work so that every output element is
 * computed whole inside one chunk.
 *
 * Chunks are claimed, not assigned: each thread takes the next unclaimed chunk from one
 * atomic counter until none is left. On a machine with more runnable threads than cores a
 * worker may not get a core for milliseconds; the caller then does its chunks too and waits
 * only for chunks already started, never for a worker that has not woken up. The counter
 * carries the call's number in its high 32 bits, so a worker that wakes late cannot claim a
 * chunk of a call that is over (its claim fails the number check).
 *
 * After fork() the child starts with no workers (they do not survive a fork) and makes new
 * ones on first use.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#include "parallel.h"

#define MAX_WORKERS 63
/* Spins (~10-40 ns each) a worker makes before it sleeps: ~50-200 us, longer than the gap
   between two products of a step, shorter than the gap between two steps of an idle engine. */
#define SPINS 5000
#define INDEX_MASK 0xffffffffull

typedef struct {
    pthread_mutex_t call_lock; /* one caller at a time */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    atomic_uint wake_generation;    /* bumped once per call: workers wake up */
    _Atomic uint64_t next;          /* call number << 32 | next chunk to claim */
    _Atomic uint64_t limit;         /* call number << 32 | number of chunks */
    atomic_long done;               /* chunks of the current call finished */
    uint64_t calls;                 /* call number (under call_lock) */
    int num_workers;
    chunk_fn fn;
    void *ctx;
} Pool;

static Pool pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
                    PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run chunks of the current call until none is left. */
static void run_chunks(void) {
    for (;;) {
        const uint64_t claim = atomic_fetch_add_explicit(&pool.next, 1, memory_order_acq_rel);
        const uint64_t limit = atomic_load_explicit(&pool.limit, memory_order_acquire);
        if (claim >> 32 != limit >> 32 || (claim & INDEX_MASK) >= (limit & INDEX_MASK)) return;
        /* fn and ctx stay valid: the call cannot end before this claimed chunk is done */
        pool.fn(pool.ctx, (int64_t)(claim & INDEX_MASK));
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static unsigned wait_for_call(unsigned seen) {
    for (int i = 0; i < SPINS; ++i) {
        const unsigned g = atomic_load_explicit(&pool.wake_generation, memory_order_acquire);
        if (g != seen) return g;
        cpu_relax();
    }
    pthread_mutex_lock(&pool.sleep_lock);
    unsigned g;
    while ((g = atomic_load_explicit(&pool.wake_generation, memory_order_acquire)) == seen)
        pthread_cond_wait(&pool.wake, &pool.sleep_lock);
    pthread_mutex_unlock(&pool.sleep_lock);
    return g;
}

static void *worker_main(void *arg) {
    /* arg: the wake generation when this worker was made (it may start running only after
       the call that made it has been announced, and must still take part in it) */
    unsigned seen = (unsigned)(uintptr_t)arg - 1;
    for (;;) {
        seen = wait_for_call(seen);
        run_chunks();
    }
    return 0;
}

static void forget_workers_after_fork(void) {
    pthread_mutex_init(&pool.call_lock, 0);
    pthread_mutex_init(&pool.sleep_lock, 0);
    pthread_cond_init(&pool.wake, 0);
    pool.num_workers = 0;
}

/* Start workers up to `wanted` (call_lock held). */
static void grow(int wanted) {
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
        /* the generation this call is about to announce: the new worker joins it */
        const uintptr_t next_wake =
            atomic_load_explicit(&pool.wake_generation, memory_order_relaxed) + 1u;
        const int failed = pthread_create(&thread, &attr, worker_main, (void *)next_wake);
        pthread_attr_destroy(&attr);
        if (failed) break;
        ++pool.num_workers;
    }
}

void parallel_run(chunk_fn fn, void *ctx, int64_t num_chunks, int64_t threads) {
    if (threads <= 1 || num_chunks <= 1) {
        for (int64_t c = 0; c < num_chunks; ++c) fn(ctx, c);
        return;
    }
    pthread_mutex_lock(&pool.call_lock);
    grow((int)(threads - 1));
    pool.fn = fn;
    pool.ctx = ctx;
    const uint64_t call = ++pool.calls & INDEX_MASK;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    /* limit before next: a claim of this call's chunk (read from next, acquire) then always
       sees this call's limit, fn and ctx; the other order could lose chunk 0 to a late
       worker that read the new next but the old limit. */
    atomic_store_explicit(&pool.limit, call << 32 | (uint64_t)num_chunks, memory_order_release);
    atomic_store_explicit(&pool.next, call << 32, memory_order_release);
    pthread_mutex_lock(&pool.sleep_lock);
    atomic_fetch_add_explicit(&pool.wake_generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.sleep_lock);
    run_chunks();
    /* Only chunks a worker has started are left: wait, giving the core away if it is slow. */
    for (int spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < num_chunks;
         ++spins)
        if (spins < SPINS) cpu_relax();
        else sched_yield();
    pthread_mutex_unlock(&pool.call_lock);
}
