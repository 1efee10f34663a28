/*
 * Shared by the kernels: 8 x float vectors through GCC/Clang vector extensions (one AVX2
 * register; split by the compiler on SSE and NEON, merged on AVX-512), unaligned loads and
 * stores, 16-bit storage (bfloat16, float16) widened to and rounded from float32, and e^x
 * for the x <= 0 that softmax and sigmoid need.
 */
#ifndef PDSERVE_SIMD_H
#define PDSERVE_SIMD_H

#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v8sf __attribute__((vector_size(32)));
typedef int32_t v8si __attribute__((vector_size(32)));
/* Tensors are only 4-byte aligned for us: loads and stores go through this type. */
typedef float v8sf_u __attribute__((vector_size(32), aligned(4), may_alias));

#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector((a), (b), __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle((a), (b), (v8si){__VA_ARGS__})
#endif
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define INLINE static inline __attribute__((always_inline))

INLINE v8sf load8(const float *p) { return *(const v8sf_u *)p; }
INLINE void store8(float *p, v8sf x) { *(v8sf_u *)p = x; }
INLINE v8sf splat8(float x) { return (v8sf){x, x, x, x, x, x, x, x}; }
INLINE v8sf select8(v8si mask, v8sf a, v8sf b) {
    return (v8sf)(((v8si)a & mask) | ((v8si)b & ~mask));
}
INLINE v8sf max8(v8sf a, v8sf b) { return select8(a > b, a, b); }

/* ---- 16-bit storage: element types of a KV pool (codes shared with the Python side) ---- */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
typedef uint16_t v8hu __attribute__((vector_size(16)));
typedef uint16_t v8hu_u __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t v8su __attribute__((vector_size(32)));

/* bfloat16 -> float32 is exact: the 16 bits are the float's top half. (GCC 12 turns the
   generic widening into 7 instructions on x86 where `vpmovzxwd` from memory is one: the
   attention kernel over a bf16 pool ran at half the float32 kernel's speed in cache.) */
INLINE v8sf load8_bf16(const uint16_t *p) {
#if defined(__AVX2__)
    return (v8sf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    return (v8sf)(__builtin_convertvector(*(const v8hu_u *)p, v8su) << 16);
#endif
}

/* float32 -> bfloat16, round to nearest even, as torch's `.to(torch.bfloat16)` (NaN: a
   quiet NaN, 0x7fc0; torch's bits for NaN vary with its code path). */
INLINE v8hu round8_bf16(v8sf x) {
    const v8su u = (v8su)x;
    const v8su rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const v8su is_nan = (v8su)((u & 0x7fffffffu) > 0x7f800000u);
    return __builtin_convertvector((rounded & ~is_nan) | (0x7fc0u & is_nan), v8hu);
}

INLINE v8sf load8_f16(const uint16_t *p) {
#if defined(__F16C__)
    return (v8sf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    v8sf v;
    for (int i = 0; i < 8; ++i) {
        _Float16 h;
        memcpy(&h, p + i, 2);
        v[i] = (float)h;
    }
    return v;
#endif
}

/* float32 -> float16, round to nearest even (overflow to inf), as torch's conversion. */
INLINE v8hu round8_f16(v8sf x) {
#if defined(__F16C__)
    return (v8hu)_mm256_cvtps_ph((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    v8hu o;
    for (int i = 0; i < 8; ++i) {
        const _Float16 h = (_Float16)x[i];
        memcpy(&o[i], &h, 2);
    }
    return o;
#endif
}

/* 8 floats from element d of a row of type T (a compile-time constant at every call site). */
INLINE v8sf load8_as(const void *row, int64_t d, const int T) {
    if (T == DT_BF16) return load8_bf16((const uint16_t *)row + d);
    if (T == DT_F16) return load8_f16((const uint16_t *)row + d);
    return load8((const float *)row + d);
}

INLINE float load1_as(const void *row, int64_t d, const int T) {
    if (T == DT_F32) return ((const float *)row)[d];
    uint16_t h[8] = {((const uint16_t *)row)[d]};
    return T == DT_BF16 ? load8_bf16(h)[0] : load8_f16(h)[0];
}

/* e^x for x <= 0 (softmax and sigmoid arguments), within a few float ulps of expf; lanes below -87 and
   -inf give 0. x = n ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial
   (truncation error < 1e-8 relative), 2^n added to the exponent bits. */
INLINE v8sf exp8(v8sf x) {
    const v8sf lowest = splat8(-87.0f);
    const v8si keep = x >= lowest;
    x = max8(x, lowest);
    /* round to nearest by truncation toward zero, valid because t <= 0 */
    const v8si n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8si);
    const v8sf nf = __builtin_convertvector(n, v8sf);
    /* ln2 in two parts: the high part has 16 significant bits, so nf * hi is exact */
    const v8sf r = x - nf * 0.693145751953125f - nf * 1.42860682030941723e-6f;
    v8sf p = splat8(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return (v8sf)(((v8si)p + (n << 23)) & keep);
}

/* 8 doubles: one AVX-512 register, two AVX2 ones (the compiler splits it) */
typedef double v8df __attribute__((vector_size(64)));
typedef double v8df_u __attribute__((vector_size(64), aligned(8), may_alias));

/* e^(x - max) in double for logits x <= max, within ~4e-15 (relative) of the exact value;
   0 below e^-87 and for -inf. x - max = n ln2 + r, n picked in float (it only needs to be
   near the nearest integer of (x - max) / ln2: |r| <= 0.35), r in double (where x - max
   of two floats is exact), e^r by its degree-12 Taylor polynomial (truncation < 3e-16),
   times 2^n built as a float (exact for n >= -126). Measured: <= 3.1e-15 from exp for
   x - max in [-87, 0]. */
INLINE v8df exp_diff8(v8sf x, float max) {
    x = max8(x, splat8(max - 100.0f)); /* -inf, NaN, far tails: finite, weight 0 below */
    /* round to nearest by truncation toward zero, valid because the argument is <= 0 */
    const v8si n = __builtin_convertvector((x - max) * 1.44269504088896341f - 0.5f, v8si);
    const v8sf scale = (v8sf)(((n + 127) << 23) & (n >= -126));
    const v8df r = (__builtin_convertvector(x, v8df) - (double)max) -
                   __builtin_convertvector(n, v8df) * 0.69314718055994530942;
    const double inv_factorial[] = {
        1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
        1.0 / 5040.0,     1.0 / 720.0,     1.0 / 120.0,    1.0 / 24.0,
        1.0 / 6.0,        0.5,             1.0,            1.0,
    };
    v8df p = r * (1.0 / 479001600.0) + inv_factorial[0];
#pragma GCC unroll 11
    for (int k = 1; k < 12; ++k) p = p * r + inv_factorial[k];
    return p * __builtin_convertvector(scale, v8df);
}

#endif /* PDSERVE_SIMD_H */
