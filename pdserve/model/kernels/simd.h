/*
 * Shared by the kernels: 8 x float vectors through GCC/Clang vector extensions (one AVX2
 * register; split by the compiler on SSE and NEON, merged on AVX-512), unaligned loads and
 * stores, and e^x for the x <= 0 that softmax and sigmoid need.
 */
#ifndef PDSERVE_SIMD_H
#define PDSERVE_SIMD_H

#include <stdint.h>

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
