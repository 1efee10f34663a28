/*
 * The element-wise parts of a decoder layer, fused, for CPU and float32:
 *   silu_mul_f32   out = silu(gate) * up, from the fused gate/up projection's output
 *   rms_norm_f32   out = w * (x * rsqrt(mean(x^2) + eps)), optionally after x += residual
 *   rope_neox_f32  rotate-halves RoPE applied in place to every head of every row
 *   write_kv_f32   a step's keys and values copied into their KV pool slots (torch's
 *                  index_copy_ took ~13 ms a layer for 512 rows with 2 threads on a busy
 *                  machine, 0.3 ms with 1: its threads wait for cores; a copy needs none),
 *                  rounded to nearest even on the way when the pool is bfloat16 or float16
 *
 * Why: in PyTorch each is 2-7 ops, each a pass over memory with a fresh output tensor, and
 * above ~32k elements each op wakes torch's OpenMP threads: at a batch-32 decode step
 * silu(gate) * up took ~117 us for 45k elements, and the element-wise ops of a
 * 2048-token prefill step ~60 ms. Here each is one pass, one call.
 *
 * Maths follows the PyTorch modules in llama.py operation by operation (the norm
 * multiplies x by the inverse root, then by the weight; RoPE computes x1*cos - x2*sin and
 * x2*cos + x1*sin), except that sums may be reordered and a*b+c fused (see CFLAGS in
 * __init__.py): results agree to a few float32 ulps.
 *
 * Work split: rows [begin, end) per call; the Python side hands contiguous row ranges to
 * threads for large inputs. Rows may be strided (views into a wider buffer).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

/* silu(x) = x * sigmoid(x), sigmoid from e^-|x| (never overflows):
   x >= 0: 1 / (1 + e^-x);  x < 0: e^x / (1 + e^x). */
INLINE v8sf silu8(v8sf x) {
    const v8si negative = x < 0.0f;
    const v8sf absx = select8(negative, -x, x);
    const v8sf e = exp8(-absx);
    const v8sf sigmoid = select8(negative, e, splat8(1.0f)) / (1.0f + e);
    return x * sigmoid;
}

INLINE float silu1(float x) {
    const float e = expf(-fabsf(x));
    return x * ((x < 0.0f ? e : 1.0f) / (1.0f + e));
}

/* gate_up: [rows, 2 * inter] (row stride in_stride); out: [rows, inter] contiguous. */
void silu_mul_f32(const float *gate_up, float *out, int64_t inter, int64_t in_stride,
                  int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
        const float *g = gate_up + r * in_stride;
        const float *u = g + inter;
        float *o = out + r * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) store8(o + i, silu8(load8(g + i)) * load8(u + i));
        for (; i < inter; ++i) o[i] = silu1(g[i]) * u[i];
    }
}

/* x: [rows, dim] (row stride x_stride). With `residual` (same shape, contiguous), x += residual
   first, written back into x (the residual stream for the next layer part). out contiguous. */
void rms_norm_f32(float *x, const float *residual, const float *weight, float *out, int64_t dim,
                  int64_t x_stride, float eps, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
        float *xr = x + r * x_stride;
        float *o = out + r * dim;
        v8sf acc = splat8(0.0f);
        float tail = 0.0f;
        int64_t i = 0;
        if (residual) {
            const float *res = residual + r * dim;
            for (; i + 8 <= dim; i += 8) {
                const v8sf v = load8(xr + i) + load8(res + i);
                store8(xr + i, v);
                acc += v * v;
            }
            for (; i < dim; ++i) {
                xr[i] += res[i];
                tail += xr[i] * xr[i];
            }
        } else {
            for (; i + 8 <= dim; i += 8) {
                const v8sf v = load8(xr + i);
                acc += v * v;
            }
            for (; i < dim; ++i) tail += xr[i] * xr[i];
        }
        float sum = tail;
        for (int j = 0; j < 8; ++j) sum += acc[j];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        const v8sf inv8 = splat8(inv);
        i = 0;
        for (; i + 8 <= dim; i += 8) store8(o + i, load8(weight + i) * (load8(xr + i) * inv8));
        for (; i < dim; ++i) o[i] = weight[i] * (xr[i] * inv);
    }
}

/* x: [rows, heads, head_dim], rows `row_stride` apart, heads head_dim apart, rotated in place.
   cos, sin: [rows, head_dim / 2] contiguous. */
void rope_neox_f32(float *x, const float *cos_table, const float *sin_table, int64_t heads,
                   int64_t head_dim, int64_t row_stride, int64_t begin, int64_t end) {
    const int64_t half = head_dim / 2;
    for (int64_t r = begin; r < end; ++r) {
        const float *c = cos_table + r * half;
        const float *s = sin_table + r * half;
        for (int64_t h = 0; h < heads; ++h) {
            float *x1 = x + r * row_stride + h * head_dim;
            float *x2 = x1 + half;
            int64_t i = 0;
            for (; i + 8 <= half; i += 8) {
                const v8sf a = load8(x1 + i), b = load8(x2 + i);
                const v8sf cv = load8(c + i), sv = load8(s + i);
                store8(x1 + i, a * cv - b * sv);
                store8(x2 + i, b * cv + a * sv);
            }
            for (; i < half; ++i) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/* One row of n floats into a pool row of type T, rounded to nearest even for 16-bit. */
static void store_row(void *dst, const float *src, int64_t n, int T) {
    if (T == DT_F32) {
        memcpy(dst, src, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *d = dst;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const v8hu h = T == DT_BF16 ? round8_bf16(load8(src + i)) : round8_f16(load8(src + i));
        memcpy(d + i, &h, sizeof(h));
    }
    if (i < n) {
        float tail[8] = {0};
        memcpy(tail, src + i, sizeof(float) * (size_t)(n - i));
        const v8hu h = T == DT_BF16 ? round8_bf16(load8(tail)) : round8_f16(load8(tail));
        memcpy(d + i, &h, 2 * (size_t)(n - i));
    }
}

/* Keys and values of rows [begin, end) into their pool slots: k, v [rows, row_elems] float32
   (rows k_stride / v_stride floats apart, e.g. views into the fused q/k/v output); the caches
   [num_slots, row_elems] contiguous (one layer of the pool), of `cache_type` (DT_*). Returns
   -1, having written nothing, when a slot is outside [0, num_slots); else 0. (Checked here,
   not in Python: two torch reductions and their reads cost ~20 us a layer in a batch-1
   decode step.) */
int write_kv_f32(const float *k, const float *v, int64_t k_stride, int64_t v_stride,
                 void *k_cache, void *v_cache, const int64_t *slots, int64_t num_slots,
                 int64_t row_elems, int cache_type, int64_t begin, int64_t end) {
    const int64_t row_bytes = row_elems * (cache_type == DT_F32 ? 4 : 2);
    for (int64_t r = begin; r < end; ++r)
        if (slots[r] < 0 || slots[r] >= num_slots) return -1;
    for (int64_t r = begin; r < end; ++r) {
        store_row((char *)k_cache + slots[r] * row_bytes, k + r * k_stride, row_elems, cache_type);
        store_row((char *)v_cache + slots[r] * row_bytes, v + r * v_stride, row_elems, cache_type);
    }
    return 0;
}
