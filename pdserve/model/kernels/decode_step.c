/*
 * A decode step's whole model in one call, for CPU: the embedding lookup, every layer of a
 * Llama-family model over a few single-token rows (decodes), the final norm, the LM head.
 *
 * Why: at batch 1 the products read the weights at close to the memory bandwidth, and the
 * rest of a step was the Python and torch work around them: ~12 kernel calls a layer through
 * ctypes (each a few dozen us of argument checks, tensor allocations and views), ~1-2 ms a
 * step against a ~5 ms floor. Here the layer loop runs in C and calls the same kernels with
 * the same arguments the Python path passes them:
 *
 *   h = rms_norm(x)                                   rms_norm_f32
 *   qkv = h Wqkv^T (+ b)                              gemv
 *   rotate q and k of each row at its position        rope_neox_f32 (row by row)
 *   keys and values into their pool slots             write_kv_f32
 *   a = attention(q, pool)                            paged_decode_attention_mt_f32
 *   o = a Wo^T (+ b)                                  gemv
 *   x += o; h = rms_norm(x)                           rms_norm_f32 with the residual
 *   gu = h Wgate_up^T (+ b); s = silu(gate) * up      gemv, silu_mul_f32
 *   x += s Wdown^T (+ b)                              gemv, then one add per element
 * and after the last layer the final rms_norm and the LM head's gemv (the logits).
 *
 * so the result is the Python path's bit for bit (same kernels, same thread counts, same
 * order of operations; the residual add is one IEEE add per element either way). The
 * products and attention use the C pool's threads (parallel.c); the element-wise parts of
 * a few rows are too small to split (the Python side splits from 2^17 floats a thread).
 *
 * Scope (checked on the Python side, `decode_step.py`): float32 activations, no q/k norm,
 * every row a decode. A 16-bit model passes 16-bit packed weights and a 16-bit pool; its
 * activations are float32 here as in llama.py.
 */
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* The kernels this file calls, from the other files of the same library. */
int gemv(const void *x, const void *packed, const float *bias, void *y, int64_t m, int64_t n,
         int64_t k, int64_t ldx, int64_t ldy, int wtype, int xtype, int64_t threads);
void silu_mul_f32(const float *gate_up, float *out, int64_t inter, int64_t in_stride,
                  int64_t begin, int64_t end);
void rms_norm_f32(float *x, const float *residual, const float *weight, float *out, int64_t dim,
                  int64_t x_stride, float eps, int64_t begin, int64_t end);
void rope_neox_f32(float *x, const float *cos_table, const float *sin_table, int64_t heads,
                   int64_t head_dim, int64_t row_stride, int64_t begin, int64_t end);
int write_kv_f32(const float *k, const float *v, int64_t k_stride, int64_t v_stride,
                 void *k_cache, void *v_cache, const int64_t *slots, int64_t num_slots,
                 int64_t row_elems, int cache_type, int64_t begin, int64_t end);
int paged_decode_attention_mt_f32(const float *q, const void *k_cache, const void *v_cache,
                                  const int64_t *block_tables, const int64_t *context_lens,
                                  float *out, int64_t num_seqs, int64_t max_blocks,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  int64_t block_size, float scale, int64_t q_stride,
                                  int kv_type, int64_t threads, int64_t min_tokens_per_thread);

/* One decoder layer: weights packed by gemv_pack (all of the model's weight type), float32
   biases (NULL when absent) and norm weights, and this layer's KV pool. Mirrored by
   `decode_step.Layer` on the Python side: keep the two in the same order. */
typedef struct {
    const void *qkv, *o, *gate_up, *down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias;
    const float *input_norm, *post_norm;
    void *k_cache, *v_cache; /* [num_slots, kv_heads * head_dim] of kv_type */
} Layer;

/* The model's shapes and what every layer shares. Mirrored by `decode_step.Model`. */
typedef struct {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, inter;
    int64_t block_size, num_slots, max_positions;
    int64_t threads;            /* products; attention takes min(threads, rows * kv_heads) */
    int64_t attn_min_tokens;    /* the attention kernel's min_tokens_per_thread */
    int64_t wtype, kv_type;     /* gemv.c and simd.h type codes */
    int64_t vocab, embed_type;  /* rows and simd.h type code of the embedding table */
    float eps, scale;
    const float *cos, *sin;     /* [max_positions, head_dim / 2] float32 */
    const float *final_norm;
    const void *embed;          /* [vocab, hidden] */
    const void *lm_head;        /* packed by gemv_pack, [vocab_out, hidden] */
    int64_t vocab_out;
} Model;

enum {
    OK = 0,
    NO_MEMORY = -1,
    BAD_SLOT = -2,
    BAD_POSITION = -3,
    ATTENTION_FAILED = -4,
    BAD_TOKEN = -5,
};

typedef struct {
    float *x, *h, *qkv, *attn, *o, *gate_up, *act, *down;
} Scratch;

#define PARTS 8
static float *scratch_alloc(const Model *m, int64_t rows, Scratch *s) {
    const int64_t qkv_width = (m->heads + 2 * m->kv_heads) * m->head_dim;
    const int64_t q_width = m->heads * m->head_dim;
    const int64_t sizes[PARTS] = {m->hidden,   m->hidden, qkv_width, q_width,
                                  m->hidden,   2 * m->inter, m->inter, m->hidden};
    int64_t total = 0;
    for (int i = 0; i < PARTS; ++i) total += rows * sizes[i];
    float *base = malloc(sizeof(float) * (size_t)total);
    if (!base) return NULL;
    float **parts[PARTS] = {&s->x,  &s->h,       &s->qkv, &s->attn,
                            &s->o,  &s->gate_up, &s->act, &s->down};
    float *at = base;
    for (int i = 0; i < PARTS; ++i) {
        *parts[i] = at;
        at += rows * sizes[i];
    }
    return base;
}

/* x[r] = the embedding row of ids[r], widened to float32 (exact, as torch's `.to`). */
INLINE void embed_as(const Model *m, const int64_t *ids, float *x, int64_t rows, const int T) {
    const int64_t row_bytes = m->hidden * (T == DT_F32 ? 4 : 2);
    for (int64_t r = 0; r < rows; ++r) {
        const char *e = (const char *)m->embed + ids[r] * row_bytes;
        float *xr = x + r * m->hidden;
        int64_t i = 0;
        for (; i + 8 <= m->hidden; i += 8) store8(xr + i, load8_as(e, i, T));
        for (; i < m->hidden; ++i) xr[i] = load1_as(e, i, T);
    }
}

static void embed(const Model *m, const int64_t *ids, float *x, int64_t rows) {
    if (m->embed_type == DT_BF16) embed_as(m, ids, x, rows, DT_BF16);
    else if (m->embed_type == DT_F16) embed_as(m, ids, x, rows, DT_F16);
    else embed_as(m, ids, x, rows, DT_F32);
}

/* Threads of the attention kernel for `rows` sequences, as kernels.paged_decode_attention
   picks them. */
static int64_t attention_threads(const Model *m, int64_t rows) {
    const int64_t items = rows * m->kv_heads;
    const int64_t t = m->threads < items ? m->threads : items;
    return t > 1 ? t : 1;
}

static int attention_half(const Model *m, const Layer *l, const Scratch *s, int64_t rows,
                          const int64_t *positions, const int64_t *slots,
                          const int64_t *block_tables, int64_t max_blocks,
                          const int64_t *context_lens) {
    const int64_t d = m->head_dim, half = d / 2, q_width = m->heads * d;
    const int64_t qkv_width = q_width + 2 * m->kv_heads * d;
    if (gemv(s->h, l->qkv, l->qkv_bias, s->qkv, rows, qkv_width, m->hidden, m->hidden,
             qkv_width, (int)m->wtype, DT_F32, m->threads))
        return NO_MEMORY;
    for (int64_t r = 0; r < rows; ++r) /* q and k heads of row r, at its own position */
        rope_neox_f32(s->qkv + r * qkv_width, m->cos + positions[r] * half,
                      m->sin + positions[r] * half, m->heads + m->kv_heads, d, qkv_width, 0, 1);
    const float *k = s->qkv + q_width, *v = k + m->kv_heads * d;
    if (write_kv_f32(k, v, qkv_width, qkv_width, l->k_cache, l->v_cache, slots, m->num_slots,
                     m->kv_heads * d, (int)m->kv_type, 0, rows))
        return BAD_SLOT;
    const int64_t min_tokens = m->attn_min_tokens;
    if (paged_decode_attention_mt_f32(s->qkv, l->k_cache, l->v_cache, block_tables, context_lens,
                                      s->attn, rows, max_blocks, m->heads, m->kv_heads, d,
                                      m->block_size, m->scale, qkv_width, (int)m->kv_type,
                                      attention_threads(m, rows), min_tokens))
        return ATTENTION_FAILED;
    return gemv(s->attn, l->o, l->o_bias, s->o, rows, m->hidden, q_width, q_width, m->hidden,
                (int)m->wtype, DT_F32, m->threads)
               ? NO_MEMORY
               : OK;
}

static int mlp_half(const Model *m, const Layer *l, const Scratch *s, float *x, int64_t rows) {
    const int64_t hidden = m->hidden, inter = m->inter;
    rms_norm_f32(x, s->o, l->post_norm, s->h, hidden, hidden, m->eps, 0, rows); /* x += o */
    if (gemv(s->h, l->gate_up, l->gate_up_bias, s->gate_up, rows, 2 * inter, hidden, hidden,
             2 * inter, (int)m->wtype, DT_F32, m->threads))
        return NO_MEMORY;
    silu_mul_f32(s->gate_up, s->act, inter, 2 * inter, 0, rows);
    if (gemv(s->act, l->down, l->down_bias, s->down, rows, hidden, inter, inter, hidden,
             (int)m->wtype, DT_F32, m->threads))
        return NO_MEMORY;
    for (int64_t i = 0; i < rows * hidden; ++i) x[i] += s->down[i];
    return OK;
}

/* ids [rows]: embed each token, run every layer over the rows (the residual stream in
   float32), write the final norm of each row to out [rows, hidden] float32 and its logits
   (LM head product, no bias) to logits [rows, vocab_out] float32. positions,
   slots, context_lens [rows]; block_tables [rows, max_blocks]. Returns OK, or a negative
   code: BAD_TOKEN (an id outside the table) and BAD_POSITION (outside the RoPE tables) with
   nothing done; BAD_SLOT (a slot outside the pool: the layers before written), NO_MEMORY,
   ATTENTION_FAILED. */
int decode_step_f32(const Model *m, const Layer *layers, const int64_t *ids, float *out,
                    float *logits, int64_t rows, const int64_t *positions, const int64_t *slots,
                    const int64_t *block_tables, int64_t max_blocks,
                    const int64_t *context_lens) {
    for (int64_t r = 0; r < rows; ++r) {
        if (ids[r] < 0 || ids[r] >= m->vocab) return BAD_TOKEN;
        if (positions[r] < 0 || positions[r] >= m->max_positions) return BAD_POSITION;
    }
    Scratch s;
    float *base = scratch_alloc(m, rows, &s);
    if (!base) return NO_MEMORY;
    float *x = s.x;
    embed(m, ids, x, rows);
    int status = OK;
    for (int64_t i = 0; i < m->num_layers && status == OK; ++i) {
        const Layer *l = layers + i;
        rms_norm_f32(x, NULL, l->input_norm, s.h, m->hidden, m->hidden, m->eps, 0, rows);
        status = attention_half(m, l, &s, rows, positions, slots, block_tables, max_blocks,
                                context_lens);
        if (status == OK) status = mlp_half(m, l, &s, x, rows);
    }
    if (status == OK) {
        rms_norm_f32(x, NULL, m->final_norm, out, m->hidden, m->hidden, m->eps, 0, rows);
        if (gemv(out, m->lm_head, NULL, logits, rows, m->vocab_out, m->hidden, m->hidden,
                 m->vocab_out, (int)m->wtype, DT_F32, m->threads))
            status = NO_MEMORY;
    }
    free(base);
    return status;
}
