/*
 * Decode attention straight from the paged KV pool, for CPU: float32 queries and outputs,
 * and a pool of float32, bfloat16 or float16 (`kv_type`, simd.h's DT_* codes).
 *
 * Why: with PyTorch ops a decode step must first gather every sequence's blocks into a
 * contiguous copy and then run attention over the copy, reading the KV cache three times.
 * At batch 32 that gather and the strided attention dominate the step. This kernel walks
 * each sequence's block table and reads every key and value once, in one sweep.
 *
 * Layout (see pdserve/model/attention.py):
 *   q            [S, H, D]              heads contiguous, rows q_stride floats apart
 *   k/v cache    [N, B, Hkv, D]         contiguous (one layer)
 *   block_tables [S, M] int64           padded rows; only the first ceil(len/B) are read
 *   context_lens [S] int64
 *   out          [S, H, D]
 *
 * Work: one item per (sequence, kv head), cost ~ context length. A call does part `part`
 * of `num_parts`; items are split by cost, so a lone long sequence still spreads its kv
 * heads over the threads. `paged_decode_attention_mt_f32` runs 4 parts per thread on the
 * C pool (parallel.c: threads claim parts, a late one holds nobody up). An item is
 * computed whole by one part with the same code wherever it falls, so a row's output does
 * not depend on the other rows or on the split: the batch-invariant mode relies on it.
 *
 * Maths: exact softmax attention in float32, computed online (running max and sum per
 * query head, accumulators rescaled when the max grows), so keys and values are read in
 * the same pass and no score buffer of the context's length exists. Keys are taken
 * TOKENS (8) at a time: the 8 dot products of a query head run in 8 vector accumulators
 * whose lanes are summed together by one transpose-add (instead of 8 horizontal sums), which
 * leaves the 8 scores in one vector for a vector exp. The softmax weights then scale the
 * 8 value rows into the output accumulators, two query heads (the GQA group shares the
 * value rows) by 32 floats of head_dim at a time, which fits in 16 vector registers.
 *
 * Memory: blocks are scattered over the pool, so the hardware prefetcher loses the stream at
 * every block (and 4 KB page); without help the kernel stalled at ~7 GB/s, a third of the
 * machine's read bandwidth. The keys and values of the token group PREFETCH_GROUPS ahead are
 * prefetched into L2 (not L1: with prefetcht0 the incoming rows, which sit at the same page
 * offsets as the current ones, evicted them and the kernel got slower), one line at a time
 * between the value FMAs rather than in bursts.
 *
 * 16-bit pools: each key and value is widened to float32 as it is loaded (exact), then the
 * same code runs as for a float32 pool: the result equals the float32 kernel's on the
 * widened pool, bit for bit (the same operations in the same order), and reads half the
 * bytes. The element type is a compile-time constant of each instance of `attend`.
 *
 * Portability: GCC/Clang vector extensions (8 x float), no intrinsics; on AVX2 a vector is
 * one register, elsewhere (SSE, NEON) the compiler splits it. head_dim need not be a multiple
 * of 8 (scalar tails), block_size is arbitrary (token groups may straddle blocks).
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

#define TOKENS 8 /* keys scored together: one vector of scores */
#define ITEM_COST 16 /* fixed cost of a work item, in tokens, for the thread split */
#ifndef PREFETCH_GROUPS
#define PREFETCH_GROUPS 2 /* distance of the prefetch, in token groups; 1 and 4 did no better */
#endif

#include "simd.h"

INLINE float hmax8(v8sf x) {
    x = max8(x, SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3));
    x = max8(x, SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5));
    x = max8(x, SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6));
    return x[0];
}

INLINE float hsum8(v8sf x) {
    x += SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
    x += SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
    x += SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
    return x[0];
}

/* Lane j of the result = sum of the lanes of a[j]: three rounds of pairwise shuffle-adds,
   each halving the number of vectors while doubling how many partial sums each holds. */
INLINE v8sf transpose_sum8(const v8sf a[TOKENS]) {
    v8sf r1[4], r2[2];
    for (int i = 0; i < 4; ++i) /* [x0+x2, y0+y2, x1+x3, y1+y3 | same for lanes 4..7] */
        r1[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13) +
                SHUFFLE(a[2 * i], a[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    for (int i = 0; i < 2; ++i) /* [w, x, y, z partial sums of lanes 0..3 | of lanes 4..7] */
        r2[i] = SHUFFLE(r1[2 * i], r1[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
                SHUFFLE(r1[2 * i], r1[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE(r2[0], r2[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           SHUFFLE(r2[0], r2[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* Key and value rows are addressed in bytes (`const char *`): their elements are of type T. */
#define ESIZE(T) ((T) == DT_F32 ? 4 : 2)

/* Scores of one query against TOKENS key rows: lane j = q . k[j]. */
INLINE v8sf dot8(const float *restrict q, const char *const k[TOKENS], int64_t head_dim,
                 const int T) {
    v8sf acc[TOKENS] = {0};
    int64_t d = 0;
    for (; d + 8 <= head_dim; d += 8) {
        const v8sf x = load8(q + d);
#pragma GCC unroll 8
        for (int j = 0; j < TOKENS; ++j) acc[j] += x * load8_as(k[j], d, T);
    }
    v8sf s = transpose_sum8(acc);
    for (; d < head_dim; ++d)
        for (int j = 0; j < TOKENS; ++j) s[j] += q[d] * load1_as(k[j], d, T);
    return s;
}

/* acc[h][d .. d + 8*VECS) += sum_j p[h][j] * v[j][d ..] for HEADS query heads (compile-time
   HEADS and VECS: the tile stays in registers). acc rows are head_dim apart. Also prefetches
   the same columns of the next token group's key and value rows (pf, or none if NULL), so
   that memory requests are spread between the arithmetic instead of issued in bursts. */
INLINE void pv_tile(float *restrict acc, const float *restrict p, const char *const v[TOKENS],
                    const char *const *pf, int64_t head_dim, int64_t d, const int HEADS,
                    const int VECS, const int T) {
    const int line_vecs = 64 / (8 * ESIZE(T)); /* vectors per 64-byte line */
    v8sf o[2][8];
#pragma GCC unroll 2
    for (int h = 0; h < HEADS; ++h)
#pragma GCC unroll 8
        for (int i = 0; i < VECS; ++i) o[h][i] = load8(acc + h * head_dim + d + 8 * i);
#pragma GCC unroll 8
    for (int j = 0; j < TOKENS; ++j) {
        v8sf x[8];
#pragma GCC unroll 8
        for (int i = 0; i < VECS; ++i) x[i] = load8_as(v[j], d + 8 * i, T);
        if (pf)
#pragma GCC unroll 4
            for (int i = 0; i < VECS; i += line_vecs) { /* one 64-byte line at a time */
                __builtin_prefetch(pf[j] + (d + 8 * i) * ESIZE(T), 0, 1);
                __builtin_prefetch(pf[TOKENS + j] + (d + 8 * i) * ESIZE(T), 0, 1);
            }
#pragma GCC unroll 2
        for (int h = 0; h < HEADS; ++h) {
            const v8sf w = splat8(p[h * TOKENS + j]);
#pragma GCC unroll 8
            for (int i = 0; i < VECS; ++i) o[h][i] += w * x[i];
        }
    }
#pragma GCC unroll 2
    for (int h = 0; h < HEADS; ++h)
#pragma GCC unroll 8
        for (int i = 0; i < VECS; ++i) store8(acc + h * head_dim + d + 8 * i, o[h][i]);
}

/* The whole head_dim for HEADS (1 or 2) query heads: wide tiles, then 8-wide, then scalar. */
INLINE void pv_heads(float *restrict acc, const float *restrict p, const char *const v[TOKENS],
                     const char *const *pf, int64_t head_dim, const int HEADS, const int T) {
    const int VECS = HEADS == 1 ? 8 : 4;
    int64_t d = 0;
    for (; d + 8 * VECS <= head_dim; d += 8 * VECS)
        pv_tile(acc, p, v, pf, head_dim, d, HEADS, VECS, T);
    for (; d + 8 <= head_dim; d += 8) pv_tile(acc, p, v, pf, head_dim, d, HEADS, 1, T);
    for (; d < head_dim; ++d)
        for (int h = 0; h < HEADS; ++h)
            for (int j = 0; j < TOKENS; ++j)
                acc[h * head_dim + d] += p[h * TOKENS + j] * load1_as(v[j], d, T);
}

typedef struct {
    const float *q;
    const char *k_cache, *v_cache; /* elements of kv_type */
    const int64_t *block_tables, *context_lens;
    float *out;
    int64_t max_blocks, num_heads, num_kv_heads, head_dim, block_size, group;
    float scale;
    int64_t q_stride;
    int kv_type;
} Problem;

/* Per-call scratch, sized for every query head of one sequence. */
typedef struct {
    float *q;    /* [H, D] query pre-multiplied by the scale */
    float *acc;  /* [H, D] unnormalised output */
    float *sum;  /* [H, TOKENS] running softmax denominators, one partial per lane */
    float *max;  /* [H] running max score */
    float *p;    /* [group, TOKENS] weights of the current token group */
} Scratch;

/* Element offsets (head 0) of the key/value rows of tokens t0 .. t0+n-1, walking the block
   table from (*block, *offset); rows past n repeat row 0 (their weight will be 0). */
static void token_rows(const int64_t *table, int64_t block_size, int64_t token_stride,
                       int64_t n, int64_t *block, int64_t *offset, int64_t rows[TOKENS]) {
    int64_t b = *block, o = *offset;
    for (int j = 0; j < n; ++j) {
        rows[j] = (table[b] * block_size + o) * token_stride;
        if (++o == block_size) o = 0, ++b;
    }
    for (int j = (int)n; j < TOKENS; ++j) rows[j] = rows[0];
    *block = b, *offset = o;
}

/* Online softmax for one query head and one token group: fold the group's scores into the
   running max (rescaling what was accumulated so far) and write the weights to p. */
static inline void softmax_step(v8sf scores, int64_t n, float *restrict max, float *restrict sum,
                                float *restrict acc, int64_t head_dim, float *restrict p) {
    for (int64_t j = n; j < TOKENS; ++j) scores[j] = -INFINITY;
    const float group_max = hmax8(scores);
    if (group_max > *max) {
        const float c = expf(*max - group_max); /* 0 on the first group: max is -inf */
        for (int64_t d = 0; d < head_dim; ++d) acc[d] *= c;
        store8(sum, load8(sum) * c);
        *max = group_max;
    }
    const v8sf w = exp8(scores - *max);
    store8(sum, load8(sum) + w);
    store8(p, w);
}

/* Query heads of kv heads [h_begin, h_end) of sequence s, keys and values of type T. */
INLINE void attend(const Problem *pb, const Scratch *sc, int64_t s, int64_t h_begin,
                   int64_t h_end, const int T) {
    const int64_t D = pb->head_dim, G = pb->group, len = pb->context_lens[s];
    const int64_t token_stride = pb->num_kv_heads * D;
    const int64_t num_q = (h_end - h_begin) * G;
    const float *q = pb->q + s * pb->q_stride + h_begin * G * D;
    const int64_t *table = pb->block_tables + s * pb->max_blocks;
    for (int64_t i = 0; i < num_q * D; ++i) sc->q[i] = q[i] * pb->scale;
    memset(sc->acc, 0, sizeof(float) * (size_t)(num_q * D));
    memset(sc->sum, 0, sizeof(float) * (size_t)(num_q * TOKENS));
    for (int64_t i = 0; i < num_q; ++i) sc->max[i] = -INFINITY;

    /* Rows of the current token group, and of the group PREFETCH_GROUPS ahead to prefetch. */
    int64_t block = 0, offset = 0, rows[TOKENS];
    int64_t pf_block = 0, pf_offset = 0, pf_t = 0, next[TOKENS]; /* pf_t: next's first token */
    for (int i = 0; i < PREFETCH_GROUPS && pf_t < len; ++i, pf_t += TOKENS)
        token_rows(table, pb->block_size, token_stride, MIN(TOKENS, len - pf_t), &pf_block,
                   &pf_offset, next);
    for (int64_t t0 = 0; t0 < len; t0 += TOKENS) {
        const int64_t n = MIN(TOKENS, len - t0);
        token_rows(table, pb->block_size, token_stride, n, &block, &offset, rows);
        const int has_next = pf_t < len;
        if (has_next) {
            token_rows(table, pb->block_size, token_stride, MIN(TOKENS, len - pf_t), &pf_block,
                       &pf_offset, next);
            pf_t += TOKENS;
        }
        /* kv heads inner: the group's rows of all heads are contiguous in the pool */
        for (int64_t h = h_begin; h < h_end; ++h) {
            const char *k[TOKENS], *v[TOKENS], *pf[2 * TOKENS]; /* pf: next keys, values */
            for (int j = 0; j < TOKENS; ++j) {
                k[j] = pb->k_cache + (rows[j] + h * D) * ESIZE(T);
                v[j] = pb->v_cache + (rows[j] + h * D) * ESIZE(T);
                pf[j] = pb->k_cache + (next[j] + h * D) * ESIZE(T);
                pf[TOKENS + j] = pb->v_cache + (next[j] + h * D) * ESIZE(T);
            }
            const int64_t q0 = (h - h_begin) * G;
            for (int64_t g = 0; g < G; ++g) {
                const int64_t i = q0 + g;
                softmax_step(dot8(sc->q + i * D, k, D, T), n, sc->max + i,
                             sc->sum + i * TOKENS, sc->acc + i * D, D, sc->p + g * TOKENS);
            }
            float *acc = sc->acc + q0 * D;
            int64_t g = 0;
            const char *const *prefetch = has_next ? pf : NULL; /* once per kv head */
            for (; g + 2 <= G; g += 2)
                pv_heads(acc + g * D, sc->p + g * TOKENS, v, g ? NULL : prefetch, D, 2, T);
            if (g < G)
                pv_heads(acc + g * D, sc->p + g * TOKENS, v, g ? NULL : prefetch, D, 1, T);
        }
    }
    float *out = pb->out + (s * pb->num_heads + h_begin * G) * D;
    for (int64_t i = 0; i < num_q; ++i) {
        const float total = hsum8(load8(sc->sum + i * TOKENS));
        const float inv = total > 0.0f ? 1.0f / total : 0.0f; /* context_len 0: zeros */
        for (int64_t d = 0; d < D; ++d) out[i * D + d] = sc->acc[i * D + d] * inv;
    }
}

static void attend_f32(const Problem *pb, const Scratch *sc, int64_t s, int64_t h0, int64_t h1) {
    attend(pb, sc, s, h0, h1, DT_F32);
}
static void attend_bf16(const Problem *pb, const Scratch *sc, int64_t s, int64_t h0, int64_t h1) {
    attend(pb, sc, s, h0, h1, DT_BF16);
}
static void attend_f16(const Problem *pb, const Scratch *sc, int64_t s, int64_t h0, int64_t h1) {
    attend(pb, sc, s, h0, h1, DT_F16);
}

/* Part `part` of `num_parts` of the call; k_cache and v_cache hold elements of kv_type. */
int paged_decode_attention_f32(const float *q, const void *k_cache, const void *v_cache,
                               const int64_t *block_tables, const int64_t *context_lens,
                               float *out, int64_t num_seqs, int64_t max_blocks,
                               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t block_size, float scale, int64_t q_stride, int kv_type,
                               int64_t part, int64_t num_parts) {
    const Problem pb = {q,          k_cache,    v_cache,     block_tables,
                        context_lens, out,      max_blocks,  num_heads,
                        num_kv_heads, head_dim, block_size,  num_heads / num_kv_heads,
                        scale,      q_stride,   kv_type};
    const size_t floats = (size_t)(num_heads * (2 * head_dim + 2 * TOKENS + 1));
    float *buf = malloc(sizeof(float) * floats);
    if (!buf) return 1;
    const Scratch sc = {buf, buf + num_heads * head_dim, buf + 2 * num_heads * head_dim,
                        buf + num_heads * (2 * head_dim + TOKENS),
                        buf + num_heads * (2 * head_dim + TOKENS) + num_heads};

    /* Item (s, h) belongs to the part its cost midpoint falls in: parts are contiguous,
       cover every item once and carry about equal cost. */
    int64_t total = 0;
    for (int64_t s = 0; s < num_seqs; ++s) total += num_kv_heads * (context_lens[s] + ITEM_COST);
    int64_t before = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t cost = context_lens[s] + ITEM_COST;
        int64_t h_begin = -1, h_end = -1;
        for (int64_t h = 0; h < num_kv_heads; ++h, before += cost) {
            if ((2 * before + cost) * num_parts / (2 * total) != part) continue;
            if (h_begin < 0) h_begin = h;
            h_end = h + 1;
        }
        if (h_begin < 0) continue;
        if (pb.kv_type == DT_BF16) attend_bf16(&pb, &sc, s, h_begin, h_end);
        else if (pb.kv_type == DT_F16) attend_f16(&pb, &sc, s, h_begin, h_end);
        else attend_f32(&pb, &sc, s, h_begin, h_end);
    }
    free(buf);
    return 0;
}

typedef struct {
    const float *q;
    const void *k_cache, *v_cache;
    const int64_t *block_tables, *context_lens;
    float *out;
    int64_t num_seqs, max_blocks, num_heads, num_kv_heads, head_dim, block_size;
    float scale;
    int64_t q_stride;
    int kv_type;
    int64_t num_parts;
    atomic_int failed;
} AttentionCall;

static void attention_part(void *ctx, int64_t part) {
    AttentionCall *a = ctx;
    if (paged_decode_attention_f32(a->q, a->k_cache, a->v_cache, a->block_tables,
                                   a->context_lens, a->out, a->num_seqs, a->max_blocks,
                                   a->num_heads, a->num_kv_heads, a->head_dim, a->block_size,
                                   a->scale, a->q_stride, a->kv_type, part, a->num_parts))
        atomic_store(&a->failed, 1);
}

/* The whole call on up to `threads` threads, fewer when the keys and values to read come to
   less than `min_tokens_per_thread` tokens (of one kv head) per thread; 0, or 1 if a
   scratch allocation failed. (The total is summed here: in Python it was a torch reduction
   and a read per layer of a decode step.) */
int paged_decode_attention_mt_f32(const float *q, const void *k_cache, const void *v_cache,
                                  const int64_t *block_tables, const int64_t *context_lens,
                                  float *out, int64_t num_seqs, int64_t max_blocks,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  int64_t block_size, float scale, int64_t q_stride,
                                  int kv_type, int64_t threads, int64_t min_tokens_per_thread) {
    int64_t tokens = 0;
    for (int64_t s = 0; s < num_seqs; ++s) tokens += context_lens[s] * num_kv_heads;
    if (min_tokens_per_thread > 0 && threads > tokens / min_tokens_per_thread)
        threads = tokens / min_tokens_per_thread > 1 ? tokens / min_tokens_per_thread : 1;
    AttentionCall a = {q,          k_cache,    v_cache,    block_tables, context_lens,
                       out,        num_seqs,   max_blocks, num_heads,    num_kv_heads,
                       head_dim,   block_size, scale,      q_stride,     kv_type,
                       threads > 1 ? 4 * threads : 1, 0};
    parallel_run(attention_part, &a, a.num_parts, threads);
    return atomic_load(&a.failed);
}
