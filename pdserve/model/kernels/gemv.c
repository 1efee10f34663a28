/*
 * Small-batch matrix products for decode: y = x W^T (+ b) for a few rows of x (1 to ~16),
 * where the work is reading W once from memory, not the arithmetic.
 *
 * Layout: W [N, K] is packed once, at load time, into panels of PANEL (16) output columns,
 * K rounded up to even (Kp, zero-padded; x is padded alike):
 *   float32, float16: packed[p][k][j]            = W[p * 16 + j][k]
 *   bfloat16:         packed[p][k / 2][j][k % 2] = W[p * 16 + j][k]  (k pairs, as the
 *                     AVX512-BF16 dot product `vdpbf16ps` wants them)
 * zero past N. A panel is one contiguous stream of Kp * 16 weights, and a thread's chunk of
 * panels is one contiguous stream too: the hardware prefetcher sees a single forward walk,
 * helped by a software prefetch PREFETCH_BYTES ahead.
 *
 * Work: a tile is up to MR_MAX rows of x times one panel, accumulated in registers over
 * all of K: every weight is loaded (and converted, for 16-bit weights) once per tile and
 * multiplied into every row of the tile. More rows than MR_MAX pass over the same panel
 * again, from L1/L2. With one or two rows, even and odd k go to separate accumulators so
 * that the FMA latency is hidden. Threads (parallel.c) claim chunks of whole panels: each
 * output element is computed in one place, so no reduction across threads.
 *
 * Types: weights float32, bfloat16 or float16; activations (x and y) float32, bfloat16 or
 * float16; bias float32. 16-bit weights are widened to float32 in registers (bf16: a
 * shift or a mask of the 32-bit pair; f16: `vcvtph2ps`) and all sums are float32. Where
 * the CPU has AVX512-BF16 and x is bfloat16 too, pairs go through `vdpbf16ps` instead: each
 * product of two bf16 is exact in float32, so this is the same maths up to summation order.
 * Outputs in 16-bit are rounded to nearest even once, from the float32 sum.
 *
 * Not batch-invariant: sums are reordered (-fassociative-math, two accumulators for small
 * M), so a row's result may depend on how many rows share the call. The batch-invariant
 * mode uses gemm.c instead.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "simd.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define PANEL 16
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 0
#endif
#ifdef __AVX512F__
#define MR_MAX 8 /* 32 zmm registers: 8 accumulators + 2 weights + broadcasts */
#else
#define MR_MAX 4 /* 16 ymm registers: 8 accumulators (2 each) + 4 weights + a broadcast */
#endif

enum { T_F32 = DT_F32, T_BF16 = DT_BF16, T_F16 = DT_F16 };

typedef float v16 __attribute__((vector_size(64)));
typedef float v16_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint16_t v16h_u __attribute__((vector_size(32), aligned(2), may_alias));

INLINE v16 load16(const float *p) { return *(const v16_u *)p; }
INLINE void store16(float *p, v16 v) { *(v16_u *)p = v; }
INLINE v16 splat16(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* ---- 16-bit conversions (16 at a time from simd.h's 8-wide ones, but for AVX-512) ------- */

typedef union { v16 v; v8sf h[2]; } Halves;
typedef union { v16h v; v8hu h[2]; } HalvesH;

INLINE v16 half16_to_float(const uint16_t *p) {
#if defined(__AVX512F__)
    return (v16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    Halves u = {.h = {load8_f16(p), load8_f16(p + 8)}};
    return u.v;
#endif
}

INLINE v16h float_to_half16(v16 v) {
#if defined(__AVX512F__)
    return (v16h)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const Halves u = {v};
    const HalvesH o = {.h = {round8_f16(u.h[0]), round8_f16(u.h[1])}};
    return o.v;
#endif
}

/* float32 -> bfloat16, round to nearest even (as torch; NaN stays NaN, inf inf). */
INLINE v16h float_to_bf16(v16 v) {
    const Halves u = {v};
    const HalvesH o = {.h = {round8_bf16(u.h[0]), round8_bf16(u.h[1])}};
    return o.v;
}

INLINE float scalar_to_float(const void *p, int64_t i, int type) {
    if (type == T_F32) return ((const float *)p)[i];
    return type == T_BF16 ? load1_as(p, i, DT_BF16) : load1_as(p, i, DT_F16);
}

/* ---- tiles ------------------------------------------------------------------------------- */

typedef struct {
    const void *packed;
    const float *x;     /* [m][kp] float32, zero-padded */
    const uint32_t *xb; /* [m][kp / 2] bf16 pairs (native bf16 path) or NULL */
    const float *bias;  /* [n] or NULL */
    void *y;            /* [m][ldy] of ytype */
    int64_t m, n, kp, ldy, panels_per_chunk;
    int wtype, ytype;
} Gemv;

INLINE void store_row(const Gemv *g, int64_t row, int64_t n0, v16 v) {
    const int64_t cols = MIN(PANEL, g->n - n0);
    if (g->bias) {
        float b[PANEL] = {0};
        memcpy(b, g->bias + n0, sizeof(float) * (size_t)cols);
        v += load16(b);
    }
    if (g->ytype == T_F32) {
        float *y = (float *)g->y + row * g->ldy + n0;
        if (cols == PANEL) store16(y, v);
        else {
            float tmp[PANEL];
            store16(tmp, v);
            memcpy(y, tmp, sizeof(float) * (size_t)cols);
        }
        return;
    }
    uint16_t *y = (uint16_t *)g->y + row * g->ldy + n0;
    const v16h h = g->ytype == T_BF16 ? float_to_bf16(v) : float_to_half16(v);
    if (cols == PANEL) *(v16h_u *)y = h;
    else memcpy(y, &h, 2 * (size_t)cols);
}

/* The inner loop works in vectors of the ISA's width (`vf`, VL floats): a panel of 16
   columns is VPP of them. GCC lowers a 64-byte vector type on AVX2 through the stack
   (measured: 4-6x slower at 8-32 rows), so the tile never uses v16 there. */
#ifdef __AVX512F__
#define VL 16
#else
#define VL 8
#endif
#define VPP (PANEL / VL)
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vf_u __attribute__((vector_size(VL * 4), aligned(4), may_alias));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint32_t vu_u __attribute__((vector_size(VL * 4), aligned(2), may_alias));

INLINE vf splat_vf(float x) { return (vf){0} + x; }

INLINE vf half_to_vf(const uint16_t *p) {
#if VL == 16
    return (vf)half16_to_float(p);
#else
    return (vf)load8_f16(p);
#endif
}

/* The weight vectors of k and k + 1 (pair `s`) of a panel, as float32, VPP of each. */
INLINE void load_pair(const void *panel, int64_t s, const int wtype, vf *w0, vf *w1) {
#pragma GCC unroll 2
    for (int v = 0; v < VPP; ++v) {
        if (wtype == T_F32) {
            const float *p = (const float *)panel + s * 2 * PANEL + v * VL;
            w0[v] = *(const vf_u *)p;
            w1[v] = *(const vf_u *)(p + PANEL);
        } else if (wtype == T_F16) {
            const uint16_t *p = (const uint16_t *)panel + s * 2 * PANEL + v * VL;
            w0[v] = half_to_vf(p);
            w1[v] = half_to_vf(p + PANEL);
        } else { /* bf16 pairs: VL columns x (k, k + 1) in VL 32-bit words */
            const vu u = *(const vu_u *)((const uint16_t *)panel + s * 2 * PANEL + v * 2 * VL);
            w0[v] = (vf)(u << 16);
            w1[v] = (vf)(u & 0xffff0000u);
        }
    }
}

/* Rows [m0, m0 + MR) x panel p. MR and wtype are compile-time constants at each call site. */
INLINE void tile(const Gemv *g, int64_t m0, int64_t p, const int MR, const int wtype,
                 const int prefetch) {
    const int esize = wtype == T_F32 ? 4 : 2;
    const char *panel = (const char *)g->packed + p * g->kp * PANEL * esize;
    const float *x = g->x + m0 * g->kp;
    const int64_t steps = g->kp / 2;
    const int split = MR <= 2; /* even and odd k in separate accumulators */
    vf acc[MR_MAX][2][VPP];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < VPP; ++v) acc[r][0][v] = acc[r][1][v] = splat_vf(0.0f);
    for (int64_t s = 0; s < steps; ++s) {
        if (prefetch) {
            const char *ahead = panel + s * 2 * PANEL * esize + PREFETCH_BYTES;
            __builtin_prefetch(ahead, 0, PREFETCH_LOCALITY);
            if (esize == 4) __builtin_prefetch(ahead + 64, 0, PREFETCH_LOCALITY);
        }
        vf w0[VPP], w1[VPP];
        load_pair(panel, s, wtype, w0, w1);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const vf x0 = splat_vf(x[r * g->kp + 2 * s]), x1 = splat_vf(x[r * g->kp + 2 * s + 1]);
#pragma GCC unroll 2
            for (int v = 0; v < VPP; ++v) {
                acc[r][0][v] += x0 * w0[v];
                acc[r][split][v] += x1 * w1[v];
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        float out[PANEL];
#pragma GCC unroll 2
        for (int v = 0; v < VPP; ++v)
            *(vf_u *)(out + v * VL) = split ? acc[r][0][v] + acc[r][1][v] : acc[r][0][v];
        store_row(g, m0 + r, p * PANEL, load16(out));
    }
}

#ifdef __AVX512BF16__
/* bf16 weights and bf16 x: one `vdpbf16ps` per k pair and row (32 products each). */
INLINE void tile_dpbf16(const Gemv *g, int64_t m0, int64_t p, const int MR, const int prefetch) {
    const char *panel = (const char *)g->packed + p * g->kp * PANEL * 2;
    const int64_t steps = g->kp / 2;
    const uint32_t *xb = g->xb + m0 * steps;
    const int split = MR <= 2;
    __m512 acc[MR_MAX][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t s = 0; s < steps; s += 2) {
        /* two k pairs per pass (the second may be past the end: then weight 0) */
        const int has_next = s + 1 < steps;
        const char *w = panel + s * 2 * PANEL * 2;
        if (prefetch) __builtin_prefetch(w + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
        const __m512bh w1 =
            (__m512bh)(has_next ? _mm512_loadu_si512(w + 64) : _mm512_setzero_si512());
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const uint32_t *xr = xb + r * steps + s;
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, (__m512bh)_mm512_set1_epi32((int)xr[0]));
            const __m512bh x1 = (__m512bh)_mm512_set1_epi32(has_next ? (int)xr[1] : 0);
            acc[r][split] = _mm512_dpbf16_ps(acc[r][split], w1, x1);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
        store_row(g, m0 + r, p * PANEL, (v16)(split ? _mm512_add_ps(acc[r][0], acc[r][1]) : acc[r][0]));
}
#define HAS_DPBF16 1
#else
#define HAS_DPBF16 0
#endif

/* Rows [m0, m0 + mr) of panel p, mr <= MR_MAX: expand to a compile-time tile. */
#define TILE_CASES(CALL)                                                                      \
    switch (mr) {                                                                            \
    case 1: CALL(1); break;                                                                  \
    case 2: CALL(2); break;                                                                  \
    case 3: CALL(3); break;                                                                  \
    case 4: CALL(4); break;                                                                  \
    MORE_CASES(CALL)                                                                         \
    default: break;                                                                          \
    }
#if MR_MAX > 4
#define MORE_CASES(CALL)                                                                     \
    case 5: CALL(5); break;                                                                  \
    case 6: CALL(6); break;                                                                  \
    case 7: CALL(7); break;                                                                  \
    case 8: CALL(8); break;
#else
#define MORE_CASES(CALL)
#endif

static void tile_f32(const Gemv *g, int64_t m0, int64_t p, int mr, int pf) {
#define CALL(MR) (pf ? tile(g, m0, p, MR, T_F32, 1) : tile(g, m0, p, MR, T_F32, 0))
    TILE_CASES(CALL)
#undef CALL
}

static void tile_bf16(const Gemv *g, int64_t m0, int64_t p, int mr, int pf) {
#if HAS_DPBF16
    if (g->xb) {
#define CALL(MR) (pf ? tile_dpbf16(g, m0, p, MR, 1) : tile_dpbf16(g, m0, p, MR, 0))
        TILE_CASES(CALL)
#undef CALL
        return;
    }
#endif
#define CALL(MR) (pf ? tile(g, m0, p, MR, T_BF16, 1) : tile(g, m0, p, MR, T_BF16, 0))
    TILE_CASES(CALL)
#undef CALL
}

static void tile_f16(const Gemv *g, int64_t m0, int64_t p, int mr, int pf) {
#define CALL(MR) (pf ? tile(g, m0, p, MR, T_F16, 1) : tile(g, m0, p, MR, T_F16, 0))
    TILE_CASES(CALL)
#undef CALL
}

/* Chunk c: panels [c * panels_per_chunk, ...), every row. Only the first pass over a panel
   prefetches: later row groups find it in cache. */
static void gemv_chunk(void *ctx, int64_t chunk) {
    const Gemv *g = ctx;
    const int64_t panels = (g->n + PANEL - 1) / PANEL;
    const int64_t p0 = chunk * g->panels_per_chunk;
    const int64_t p1 = MIN(p0 + g->panels_per_chunk, panels);
    void (*tile_fn)(const Gemv *, int64_t, int64_t, int, int) =
        g->wtype == T_F32 ? tile_f32 : g->wtype == T_BF16 ? tile_bf16 : tile_f16;
    for (int64_t p = p0; p < p1; ++p)
        for (int64_t m0 = 0; m0 < g->m; m0 += MR_MAX)
            tile_fn(g, m0, p, (int)MIN(MR_MAX, g->m - m0), m0 == 0);
}

/* Weight bytes per chunk of work; 0: four chunks per thread (gemv_set_chunk_bytes). */
static int64_t chunk_bytes = 0;

/* How a product is cut into chunks for the thread pool. Four per thread by default: with
   256 KiB chunks (claimed one at a time, so both threads stream to the end of a product)
   a quiet Zen 4 host measured the same batch-1 steps within 1-5 % and the AVX2 build's
   float32 batch-32 step 11 % slower (docs/benchmarks.md, issue 18, the quiet-host run),
   so the knob stays for the next host to measure. Which thread computes a panel never
   changes its bits. */
static int64_t panels_per_chunk(int64_t panels, int64_t kp, int wtype, int64_t threads) {
    if (threads <= 1) return panels;
    if (chunk_bytes <= 0) {
        const int64_t chunks = MIN(4 * threads, panels);
        return (panels + chunks - 1) / chunks;
    }
    const int64_t panel_bytes = kp * PANEL * (wtype == T_F32 ? 4 : 2);
    return chunk_bytes > panel_bytes ? chunk_bytes / panel_bytes : 1;
}

/* ---- entry points ------------------------------------------------------------------------ */

/* Sets the weight bytes per chunk of work (0: four chunks per thread); returns the old value.
   For benchmarks comparing splits in one process; results are the same bits either way. */
int64_t gemv_set_chunk_bytes(int64_t bytes) {
    const int64_t old = chunk_bytes;
    chunk_bytes = bytes;
    return old;
}

int64_t gemv_panel_width(void) { return PANEL; }

/* Floats per vector in the tile's inner loop: 16 in an AVX-512 build, 8 otherwise. */
int64_t gemv_vector_floats(void) { return VL; }

/* 1 when bf16 x bf16 products use `vdpbf16ps` (AVX512-BF16 in this build), else 0. */
int64_t gemv_has_dpbf16(void) { return HAS_DPBF16; }

/* packed (see the layout above; Kp = k rounded up to even) from W [n, k] (row stride ldw)
   of `wtype`; packed has the same element type. */
void gemv_pack(const void *w, int64_t n, int64_t k, int64_t ldw, int wtype, void *packed) {
    const int64_t kp = (k + 1) & ~(int64_t)1, panels = (n + PANEL - 1) / PANEL;
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t j = 0; j < PANEL; ++j) {
            const int64_t row = p * PANEL + j;
            for (int64_t i = 0; i < kp; ++i) {
                const int inside = row < n && i < k;
                /* bf16: pairs of k per column; f32, f16: one k row of 16 columns at a time */
                const int64_t at = wtype == T_BF16
                                       ? p * kp * PANEL + (i / 2) * 2 * PANEL + j * 2 + (i & 1)
                                       : p * kp * PANEL + i * PANEL + j;
                if (wtype == T_F32)
                    ((float *)packed)[at] = inside ? ((const float *)w)[row * ldw + i] : 0.0f;
                else
                    ((uint16_t *)packed)[at] = inside ? ((const uint16_t *)w)[row * ldw + i] : 0;
            }
        }
}

/* y [m, n] (row stride ldy, of xtype) = x [m, k] (row stride ldx, of xtype) @ W^T (+ bias
   [n] float32, or NULL), W packed by gemv_pack with `wtype`, on up to `threads` threads.
   Returns 0, or -1 when the scratch buffer cannot be allocated. */
int gemv(const void *x, const void *packed, const float *bias, void *y, int64_t m, int64_t n,
         int64_t k, int64_t ldx, int64_t ldy, int wtype, int xtype, int64_t threads) {
    const int64_t kp = (k + 1) & ~(int64_t)1, panels = (n + PANEL - 1) / PANEL;
    const int native = HAS_DPBF16 && wtype == T_BF16 && xtype == T_BF16;
    float *xf = native ? NULL : calloc((size_t)(m * kp), sizeof(float));
    uint32_t *xb = native ? calloc((size_t)(m * kp / 2), sizeof(uint32_t)) : NULL;
    if (!xf && !xb) return -1;
    for (int64_t r = 0; r < m; ++r) {
        if (native) memcpy(xb + r * kp / 2, (const uint16_t *)x + r * ldx, 2 * (size_t)k);
        else if (xtype == T_F32)
            memcpy(xf + r * kp, (const float *)x + r * ldx, sizeof(float) * (size_t)k);
        else
            for (int64_t i = 0; i < k; ++i) xf[r * kp + i] = scalar_to_float(x, r * ldx + i, xtype);
    }
    const int64_t per_chunk = panels_per_chunk(panels, kp, wtype, threads);
    Gemv g = {packed, xf, xb, bias, y, m, n, kp, ldy, per_chunk, wtype, xtype};
    parallel_run(gemv_chunk, &g, (panels + g.panels_per_chunk - 1) / g.panels_per_chunk, threads);
    free(xf);
    free(xb);
    return 0;
}
