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
 * The caller passes a range of sequences so that it can split a batch across threads
 * (ctypes releases the GIL during the call). Per sequence: scores of every query head
 * against its kv head (walking each block front to back: one token's keys for all heads are
 * contiguous), an exact softmax in float32 (max, exp, sum), then the weighted sum of values.
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
                               int64_t block_size, float scale, int64_t seq_begin,
                               int64_t seq_end) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    int64_t max_len = 1;
    for (int64_t s = seq_begin; s < seq_end; ++s)
        if (context_lens[s] > max_len) max_len = context_lens[s];
    float *scores = malloc(sizeof(float) * (size_t)(num_heads * max_len));
    if (!scores) return 1;

    for (int64_t s = seq_begin; s < seq_end; ++s) {
        const int64_t len = context_lens[s];
        const int64_t *table = block_tables + s * max_blocks;
        const float *q_seq = q + s * num_heads * head_dim;
        float *out_seq = out + s * num_heads * head_dim;

        /* pass 1: scores[h][t] = q_h . k_t[kv(h)] * scale; one token's keys for all heads
           are contiguous, so the cache is read front to back within each block */
        for (int64_t t = 0; t < len; ++t) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            const float *k_row = k_cache + slot * token_stride;
            for (int64_t h = 0; h < num_heads; ++h)
                scores[h * len + t] =
                    dot(q_seq + h * head_dim, k_row + (h / group) * head_dim, head_dim) * scale;
        }
        /* pass 2: exact softmax per head */
        for (int64_t h = 0; h < num_heads; ++h) {
            float *row = scores + h * len;
            float m = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < len; ++t) m = row[t] > m ? row[t] : m;
            for (int64_t t = 0; t < len; ++t) {
                row[t] = expf(row[t] - m);
                sum += row[t];
            }
            const float inv = 1.0f / sum;
            for (int64_t t = 0; t < len; ++t) row[t] *= inv;
        }
        /* pass 3: out_h = sum_t p[h][t] * v_t[kv(h)] */
        memset(out_seq, 0, sizeof(float) * (size_t)(num_heads * head_dim));
        for (int64_t t = 0; t < len; ++t) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            const float *v_row = v_cache + slot * token_stride;
            for (int64_t h = 0; h < num_heads; ++h) {
                const float p = scores[h * len + t];
                const float *restrict v = v_row + (h / group) * head_dim;
                float *restrict o = out_seq + h * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) o[d] += p * v[d];
            }
        }
    }
    free(scores);
    return 0;
}
