/*
 * Batch-invariant float32 matrix product for CPU: y = x W^T (+ b), x [M, K], W [N, K].
 *
 * The contract: every output element y[m, n] is the sum over k of x[m, k] * W[n, k] taken
 * in one fixed order — k = 0, 1, ..., K-1, one fused multiply-add at a time into one float
 * accumulator that starts at 0 — and then + b[n]. Nothing about that order depends on M,
 * on which other rows are in x, on the row's position, on the tile it falls in, or on the
 * number of threads. So a row's output is bitwise the same alone or in any batch. BLAS
 * libraries do not promise this: they choose kernels, K splits and summation trees by
 * shape (oneDNN and OpenBLAS both change the result of a row with M).
 *
 * This file is compiled without -fassociative-math (see kernels/__init__.py), so the
 * compiler may not reorder the sums; -ffp-contract=fast makes each `acc += x * w` one FMA.
 *
 * Layout: W is packed once, at load time, into panels of PANEL (32) output columns:
 * packed[p][k][j] = W[p * PANEL + j][k], zero-padded past N. A panel is one contiguous
 * stream of K * 128 bytes, read front to back.
 *
 * Work: a micro-tile is MR rows x one panel: MR * 2 vector accumulators of 16 floats, held
 * in registers for the whole K loop (AVX-512: MR = 6, 12 zmm; AVX2: MR = 3, 12 ymm pairs).
 * Per k it loads two vectors of the panel and MR broadcasts of x. Rows left over at the end
 * take a smaller MR — the same sequence of FMAs per element. Threads split the panels (the
 * N dimension) into chunks they claim (parallel.c), never K. A panel stays in L2 while every
 * row tile passes over it.
 */
#include <stdint.h>
#include <string.h>

#include "parallel.h"

#define PANEL 32
#ifdef __AVX512F__
#define MR_MAX 6
#else
#define MR_MAX 3 /* 16 ymm registers: 12 accumulators + panel + broadcast */
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16_u __attribute__((vector_size(64), aligned(4), may_alias));
#define INLINE static inline __attribute__((always_inline))

INLINE v16 load16(const float *p) { return *(const v16_u *)p; }
INLINE void store16(float *p, v16 x) { *(v16_u *)p = x; }
INLINE v16 splat16(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

typedef struct {
    const float *x, *packed, *bias;
    float *y;
    int64_t m, n, k, ldx, ldy, panels_per_chunk;
} Gemm;

/* Rows [m0, m0 + MR) x panel p. MR is a compile-time constant at every call site. */
INLINE void tile(const Gemm *g, int64_t m0, int64_t p, const int MR) {
    const float *x = g->x + m0 * g->ldx;
    const float *w = g->packed + p * g->k * PANEL;
    v16 acc[MR_MAX][2];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = splat16(0.0f);
    for (int64_t k = 0; k < g->k; ++k) {
        const v16 w0 = load16(w + k * PANEL), w1 = load16(w + k * PANEL + 16);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
            const v16 xr = splat16(x[r * g->ldx + k]);
            acc[r][0] += xr * w0;
            acc[r][1] += xr * w1;
        }
    }
    const int64_t n0 = p * PANEL, cols = g->n - n0 < PANEL ? g->n - n0 : PANEL;
    if (g->bias) {
        float b[PANEL] = {0};
        memcpy(b, g->bias + n0, sizeof(float) * (size_t)cols);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) acc[r][0] += load16(b), acc[r][1] += load16(b + 16);
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
        float *y = g->y + (m0 + r) * g->ldy + n0;
        if (cols == PANEL) {
            store16(y, acc[r][0]);
            store16(y + 16, acc[r][1]);
        } else {
            float tmp[PANEL];
            store16(tmp, acc[r][0]);
            store16(tmp + 16, acc[r][1]);
            memcpy(y, tmp, sizeof(float) * (size_t)cols);
        }
    }
}

/* Rows [m0, m1) of panel p: full tiles, then one smaller tile for the rest. */
static void panel_rows(const Gemm *g, int64_t p, int64_t m0, int64_t m1) {
    int64_t m = m0;
    for (; m + MR_MAX <= m1; m += MR_MAX) tile(g, m, p, MR_MAX);
    switch (m1 - m) {
    case 1: tile(g, m, p, 1); break;
    case 2: tile(g, m, p, 2); break;
#if MR_MAX > 3
    case 3: tile(g, m, p, 3); break;
    case 4: tile(g, m, p, 4); break;
    case 5: tile(g, m, p, 5); break;
#endif
    default: break;
    }
}

/* Chunk c: panels [c * panels_per_chunk, ...), every row. */
static void gemm_chunk(void *ctx, int64_t chunk) {
    const Gemm *g = ctx;
    const int64_t panels = (g->n + PANEL - 1) / PANEL;
    const int64_t p0 = chunk * g->panels_per_chunk;
    const int64_t p1 = p0 + g->panels_per_chunk < panels ? p0 + g->panels_per_chunk : panels;
    for (int64_t p = p0; p < p1; ++p) panel_rows(g, p, 0, g->m);
}

int64_t gemm_panel_width(void) { return PANEL; }

/* packed: [ceil(N / PANEL), K, PANEL] from W [N, K] (row stride ldw). */
void gemm_pack_f32(const float *w, int64_t n, int64_t k, int64_t ldw, float *packed) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t j = 0; j < PANEL; ++j) {
            const int64_t row = p * PANEL + j;
            float *dst = packed + p * k * PANEL + j;
            for (int64_t i = 0; i < k; ++i) dst[i * PANEL] = row < n ? w[row * ldw + i] : 0.0f;
        }
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ W^T (+ bias [N] or NULL), on up to
   `threads` threads. */
void gemm_f32(const float *x, const float *packed, const float *bias, float *y, int64_t m,
              int64_t n, int64_t k, int64_t ldx, int64_t ldy, int64_t threads) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    /* A few chunks per thread, so a thread that gets its core late leaves less undone;
       with enough rows, whole panels per chunk keep each panel's K x 32 weights in L2. */
    int64_t chunks = threads > 1 ? 4 * threads : 1;
    if (chunks > panels) chunks = panels;
    Gemm g = {x, packed, bias, y, m, n, k, ldx, ldy, (panels + chunks - 1) / chunks};
    parallel_run(gemm_chunk, &g, (panels + g.panels_per_chunk - 1) / g.panels_per_chunk, threads);
}
