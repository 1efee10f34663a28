/* The C kernels' thread pool (parallel.c). */
#ifndef PDSERVE_PARALLEL_H
#define PDSERVE_PARALLEL_H

#include <stdint.h>

typedef void (*chunk_fn)(void *ctx, int64_t chunk);

/* fn(ctx, chunk) for every chunk in [0, num_chunks), on the calling thread and up to
   threads - 1 pool threads; returns when all are done. */
/* Hidden: each library that compiles parallel.c in has a pool of its own, never another's. */
__attribute__((visibility("hidden"))) void parallel_run(chunk_fn fn, void *ctx,
                                                        int64_t num_chunks, int64_t threads);

#endif /* PDSERVE_PARALLEL_H */
