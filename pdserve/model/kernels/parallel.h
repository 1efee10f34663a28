/* The batch-invariant kernels' thread pool (parallel.c). */
#ifndef PDSERVE_PARALLEL_H
#define PDSERVE_PARALLEL_H

#include <stdint.h>

typedef void (*part_fn)(void *ctx, int64_t part, int64_t parts);

/* fn(ctx, part, parts) for every part in [0, parts), in parallel; returns when all are done.
   May run fewer parts than asked (if threads cannot be created): fn gets the real count. */
void parallel_run(part_fn fn, void *ctx, int64_t parts);

#endif /* PDSERVE_PARALLEL_H */
