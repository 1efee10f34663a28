/*
 * Matrix product with 8-bit weights for CPU: y = x dequant(W)^T (+ b), x [M, K] float32,
 * W [N, K] as int8 codes q with one float32 scale per output row and group of G inputs
 * (pdserve/model/quant.py: dequant(W)[n, k] = q[n, k] * s[n, k / G]).
 *
 * Weight-only quantisation: x stays float32 and every product is accumulated in float32.
 * The codes are widened to float in registers (never written back as floats), so a decode
 * step reads 1 byte per weight plus 4 bytes per G weights instead of 4 (float32).
 *
 * Layout: packed once at load time into panels of PANEL output columns, like gemm.c:
 * codes[p][k][j] = q[p * PANEL + j][k] and scales[p][g][j] = s[p * PANEL + j][g], zero past
 * N. A panel is one contiguous stream of K * PANEL bytes, read front to back.
 *
 * Work: a tile is MR rows x one panel. Per group, MR x 2 partial sums collect
 * x[m, k] * q[k, j] over the group's k (one widening of the codes serves all MR rows), and
 * are then folded into MR x 2 accumulators times the group's scales: one multiply per group
 * rather than per weight. AVX-512: vectors of 16 floats, PANEL 32, MR up to 6 (24 of 32
 * zmm registers); AVX2: 8 floats, PANEL 16, MR up to 3 (12 of 16 ymm). The library is built
 * with -march=native, so the host's instruction set picks the variant. Threads split the
 * panels (N), never K: each output element is computed whole by one thread.
 *
 * Many rows (from `blocked_min_rows`: big decode batches, prefill): widening the codes again
 * for every tile of MR rows would cost a third of the tile's work, so instead a block of KB
 * k's of the panel is dequantised once (q * s, in float32) into a scratch buffer that stays
 * in L1/L2, and every row tile then runs plain float32 FMAs over it, adding into y block
 * after block.
 */
#include <stdint.h>
#include <string.h>

#include "parallel.h"

#ifdef __AVX512F__
#define VL 16
#define MR_MAX 6
#else
#define VL 8
#define MR_MAX 3
#endif
#define PANEL (2 * VL)

typedef float vf __attribute__((vector_size(4 * VL)));
typedef float vf_u __attribute__((vector_size(4 * VL), aligned(4), may_alias));
#define INLINE static inline __attribute__((always_inline))

INLINE vf loadf(const float *p) { return *(const vf_u *)p; }
INLINE void storef(float *p, vf x) { *(vf_u *)p = x; }
#if defined(__AVX512F__)
#include <immintrin.h>
INLINE vf widen(const int8_t *p) {
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
#include <immintrin.h>
INLINE vf widen(const int8_t *p) {
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else /* GCC's generic int8 -> float vector conversion goes lane by lane; so does this */
INLINE vf widen(const int8_t *p) {
    vf w;
    for (int i = 0; i < VL; ++i) w[i] = (float)p[i];
    return w;
}
#endif
INLINE vf splat(float x) { return (vf){0} + x; }

#define KB 256 /* k's per dequantised block: KB x PANEL floats, 32 KiB with AVX-512 */

typedef struct {
    const float *x, *scales, *bias;
    const int8_t *codes;
    float *y;
    int64_t m, n, k, group, ldx, ldy, panels_per_chunk, blocked_min_rows;
} GemmQ8;

/* One row of a panel's output (cols of PANEL valid) to and from two vectors. */
INLINE void load_row(const float *src, int64_t cols, vf *a, vf *b) {
    if (cols == PANEL) {
        *a = loadf(src), *b = loadf(src + VL);
        return;
    }
    float tmp[PANEL] = {0};
    memcpy(tmp, src, sizeof(float) * (size_t)cols);
    *a = loadf(tmp), *b = loadf(tmp + VL);
}

INLINE void store_row(float *dst, int64_t cols, vf a, vf b) {
    if (cols == PANEL) {
        storef(dst, a), storef(dst + VL, b);
        return;
    }
    float tmp[PANEL];
    storef(tmp, a), storef(tmp + VL, b);
    memcpy(dst, tmp, sizeof(float) * (size_t)cols);
}

/* Rows [m0, m0 + MR) x panel p. MR is a compile-time constant at every call site. */
INLINE void tile(const GemmQ8 *g, int64_t m0, int64_t p, const int MR) {
    const float *x = g->x + m0 * g->ldx;
    const int64_t groups = (g->k + g->group - 1) / g->group;
    const int8_t *w = g->codes + p * g->k * PANEL;
    const float *s = g->scales + p * groups * PANEL;
    vf acc[MR_MAX][2];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = splat(0.0f);
    for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t k0 = gi * g->group;
        const int64_t k1 = k0 + g->group < g->k ? k0 + g->group : g->k;
        vf part[MR_MAX][2];
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) part[r][0] = part[r][1] = splat(0.0f);
        for (int64_t k = k0; k < k1; ++k) {
            const vf w0 = widen(w + k * PANEL), w1 = widen(w + k * PANEL + VL);
#pragma GCC unroll 6
            for (int r = 0; r < MR; ++r) {
                const vf xr = splat(x[r * g->ldx + k]);
                part[r][0] += xr * w0;
                part[r][1] += xr * w1;
            }
        }
        const vf s0 = loadf(s + gi * PANEL), s1 = loadf(s + gi * PANEL + VL);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
            acc[r][0] += part[r][0] * s0;
            acc[r][1] += part[r][1] * s1;
        }
    }
    const int64_t n0 = p * PANEL, cols = g->n - n0 < PANEL ? g->n - n0 : PANEL;
    if (g->bias) {
        vf b0, b1;
        load_row(g->bias + n0, cols, &b0, &b1);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) acc[r][0] += b0, acc[r][1] += b1;
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) store_row(g->y + (m0 + r) * g->ldy + n0, cols, acc[r][0], acc[r][1]);
}

/* scratch[i][j] = dequant(W)[p * PANEL + j][k0 + i] for i < kn: codes times their scales. */
static void dequantize_block(const GemmQ8 *g, int64_t p, int64_t k0, int64_t kn, float *scratch) {
    const int64_t groups = (g->k + g->group - 1) / g->group;
    const int8_t *w = g->codes + p * g->k * PANEL;
    const float *s = g->scales + p * groups * PANEL;
    for (int64_t i = 0; i < kn; ++i) {
        const int64_t k = k0 + i;
        const float *sk = s + (k / g->group) * PANEL;
        storef(scratch + i * PANEL, widen(w + k * PANEL) * loadf(sk));
        storef(scratch + i * PANEL + VL, widen(w + k * PANEL + VL) * loadf(sk + VL));
    }
}

/* Rows [m0, m0 + MR) of panel p, y += x[:, k0 : k0 + kn] @ scratch; the first block starts
   from the bias (or 0) instead of y. */
INLINE void tile_block(const GemmQ8 *g, int64_t m0, int64_t p, int64_t k0, int64_t kn,
                       const float *scratch, const int MR) {
    const float *x = g->x + m0 * g->ldx + k0;
    const int64_t n0 = p * PANEL, cols = g->n - n0 < PANEL ? g->n - n0 : PANEL;
    vf acc[MR_MAX][2];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
        if (k0 > 0) load_row(g->y + (m0 + r) * g->ldy + n0, cols, &acc[r][0], &acc[r][1]);
        else if (g->bias) load_row(g->bias + n0, cols, &acc[r][0], &acc[r][1]);
        else acc[r][0] = acc[r][1] = splat(0.0f);
    }
    for (int64_t i = 0; i < kn; ++i) {
        const vf w0 = loadf(scratch + i * PANEL), w1 = loadf(scratch + i * PANEL + VL);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
            const vf xr = splat(x[r * g->ldx + i]);
            acc[r][0] += xr * w0;
            acc[r][1] += xr * w1;
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) store_row(g->y + (m0 + r) * g->ldy + n0, cols, acc[r][0], acc[r][1]);
}

/* Every row of panel p, one dequantised block of k's at a time. */
static void panel_rows_blocked(const GemmQ8 *g, int64_t p) {
    float scratch[KB * PANEL] __attribute__((aligned(64)));
    for (int64_t k0 = 0; k0 < g->k; k0 += KB) {
        const int64_t kn = g->k - k0 < KB ? g->k - k0 : KB;
        dequantize_block(g, p, k0, kn, scratch);
        int64_t m = 0;
        for (; m + MR_MAX <= g->m; m += MR_MAX) tile_block(g, m, p, k0, kn, scratch, MR_MAX);
        switch (g->m - m) {
        case 1: tile_block(g, m, p, k0, kn, scratch, 1); break;
        case 2: tile_block(g, m, p, k0, kn, scratch, 2); break;
#if MR_MAX > 3
        case 3: tile_block(g, m, p, k0, kn, scratch, 3); break;
        case 4: tile_block(g, m, p, k0, kn, scratch, 4); break;
        case 5: tile_block(g, m, p, k0, kn, scratch, 5); break;
#endif
        default: break;
        }
    }
}

/* Every row of panel p: full tiles, then one smaller tile for the rest. */
static void panel_rows(const GemmQ8 *g, int64_t p) {
    int64_t m = 0;
    for (; m + MR_MAX <= g->m; m += MR_MAX) tile(g, m, p, MR_MAX);
    switch (g->m - m) {
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

static void gemm_q8_chunk(void *ctx, int64_t chunk) {
    const GemmQ8 *g = ctx;
    const int64_t panels = (g->n + PANEL - 1) / PANEL;
    const int64_t p0 = chunk * g->panels_per_chunk;
    const int64_t p1 = p0 + g->panels_per_chunk < panels ? p0 + g->panels_per_chunk : panels;
    for (int64_t p = p0; p < p1; ++p) {
        if (g->m >= g->blocked_min_rows) panel_rows_blocked(g, p);
        else panel_rows(g, p);
    }
}

int64_t gemm_q8_panel_width(void) { return PANEL; }

/* codes [ceil(N / PANEL), K, PANEL] and scales [ceil(N / PANEL), groups, PANEL] from
   q [N, K] (row stride ldq) and s [N, groups] (contiguous). */
void gemm_q8_pack(const int8_t *q, const float *s, int64_t n, int64_t k, int64_t ldq,
                  int64_t groups, int8_t *codes, float *scales) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t j = 0; j < PANEL; ++j) {
            const int64_t row = p * PANEL + j;
            int8_t *dst = codes + p * k * PANEL + j;
            for (int64_t i = 0; i < k; ++i) dst[i * PANEL] = row < n ? q[row * ldq + i] : 0;
            float *sd = scales + p * groups * PANEL + j;
            for (int64_t gi = 0; gi < groups; ++gi)
                sd[gi * PANEL] = row < n ? s[row * groups + gi] : 0.0f;
        }
}

/* out [K, N] (row-major: W transposed) = dequant(W), for a library product on many rows. */
void gemm_q8_dequantize(const int8_t *codes, const float *scales, int64_t n, int64_t k,
                        int64_t group, float *out) {
    const int64_t panels = (n + PANEL - 1) / PANEL, groups = (k + group - 1) / group;
    for (int64_t p = 0; p < panels; ++p) {
        const int64_t n0 = p * PANEL, cols = n - n0 < PANEL ? n - n0 : PANEL;
        for (int64_t i = 0; i < k; ++i) {
            const float *s = scales + p * groups * PANEL + (i / group) * PANEL;
            const vf w0 = widen(codes + (p * k + i) * PANEL) * loadf(s);
            const vf w1 = widen(codes + (p * k + i) * PANEL + VL) * loadf(s + VL);
            store_row(out + i * n + n0, cols, w0, w1);
        }
    }
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ dequant(W)^T (+ bias [N] or
   NULL), with groups of `group` inputs, on up to `threads` threads; from
   `blocked_min_rows` rows on through dequantised blocks. */
void gemm_q8_f32(const float *x, const int8_t *codes, const float *scales, const float *bias,
                 float *y, int64_t m, int64_t n, int64_t k, int64_t group, int64_t ldx,
                 int64_t ldy, int64_t threads, int64_t blocked_min_rows) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    /* A few chunks per thread, so a thread that gets its core late leaves less undone. */
    int64_t chunks = threads > 1 ? 4 * threads : 1;
    if (chunks > panels) chunks = panels;
    GemmQ8 g = {x,   scales, bias, codes, y, m, n, k, group, ldx, ldy, (panels + chunks - 1) / chunks,
                blocked_min_rows};
    parallel_run(gemm_q8_chunk, &g, (panels + g.panels_per_chunk - 1) / g.panels_per_chunk,
                 threads);
}
