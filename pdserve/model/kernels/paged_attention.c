/*
 * Decode attention straight from the paged KV pool, for CPU and float32.
 *
 * Why: with PyTorch ops a decode step must first gather every sequence's blocks into a
 * contiguous copy and then run attention over the copy, reading the KV cache three times.
 * At batch 32 that gather and the strided attention dominate the step. This kernel walks
 * each sequence's block table and reads every key and value once.
 *
 * Layout (see pdserve/model/attention.py):
 *   q            [S, H, D]              contiguous
 *   k/v cache    [N, B, Hkv, D]         contiguous (one layer)
 *   block_tables [S, M] int64           padded rows; only the first ceil(len/B) are read
 *   context_lens [S] int64
 *   out          [S, H, D]
 * Work items are (sequence, kv head) pairs; the caller passes a range of them so that it
 * can split a batch across threads (ctypes releases the GIL during the call).
 * Per item: scores for the `group` query heads sharing the kv head, an exact softmax in
 * float32 (max, exp, sum) and the weighted sum of values. No approximations.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
    return acc;
}

int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int64_t *block_tables, const int64_t *context_lens,
                               float *out, int64_t num_seqs, int64_t max_blocks,
                               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t block_size, float scale, int64_t item_begin,
                               int64_t item_end) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    int64_t max_len = 0;
    for (int64_t s = 0; s < num_seqs; ++s)
        if (context_lens[s] > max_len) max_len = context_lens[s];
    float *scores = malloc(sizeof(float) * (size_t)(group * (max_len > 0 ? max_len : 1)));
    if (!scores) return 1;

    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t s = item / num_kv_heads, kv_head = item % num_kv_heads;
        const int64_t len = context_lens[s];
        const int64_t *table = block_tables + s * max_blocks;
        const float *q_head = q + (s * num_heads + kv_head * group) * head_dim;
        float *out_head = out + (s * num_heads + kv_head * group) * head_dim;

        /* pass 1: scores[g][t] = q_g . k_t * scale */
        for (int64_t t = 0; t < len; ++t) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            const float *k = k_cache + slot * token_stride + kv_head * head_dim;
            for (int64_t g = 0; g < group; ++g)
                scores[g * len + t] = dot(q_head + g * head_dim, k, head_dim) * scale;
        }
        /* pass 2: softmax per query head */
        for (int64_t g = 0; g < group; ++g) {
            float *row = scores + g * len;
            float m = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < len; ++t) m = row[t] > m ? row[t] : m;
            for (int64_t t = 0; t < len; ++t) {
                row[t] = expf(row[t] - m);
                sum += row[t];
            }
            const float inv = 1.0f / sum;
            for (int64_t t = 0; t < len; ++t) row[t] *= inv;
        }
        /* pass 3: out_g = sum_t p[g][t] * v_t */
        memset(out_head, 0, sizeof(float) * (size_t)(group * head_dim));
        for (int64_t t = 0; t < len; ++t) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            const float *v = v_cache + slot * token_stride + kv_head * head_dim;
            for (int64_t g = 0; g < group; ++g) {
                const float p = scores[g * len + t];
                float *o = out_head + g * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) o[d] += p * v[d];
            }
        }
    }
    free(scores);
    return 0;
}
