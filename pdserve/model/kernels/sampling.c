/*
 * Top-p (nucleus) masking of logits, for CPU and float32, without a sort.
 *
 *   top_p_mask_f32   in each row, every logit outside the nucleus set to -inf, in place
 *
 * Meaning: a token is kept iff the probability mass of the tokens whose logit is strictly
 * larger is < top_p. That is the sort-and-cumsum rule (sort descending, keep a token while
 * the mass before it is < top_p) with ties to the last kept token kept too; the most
 * likely token is always kept. Logits already -inf have weight 0 and stay -inf. Rows with
 * top_p >= 1, and rows whose maximum is not finite (all -inf, or +inf), are left alone.
 * NaN logits weigh 0 and become -inf.
 *
 * Why: PyTorch's sort of [32, 32000] float32 rows took ~37 ms, more than a whole batch-32
 * decode step, and OpenAI-style clients send top_p = 0.9 / 0.95 routinely.
 *
 * How, per row: weights w = exp(x - max), their total Z, target = top_p * Z; then a
 * select by mass, walking histograms of w from the highest bucket down until the running
 * mass reaches the target. The first pass buckets the logits on a grid below the max
 * (1/64 nat, finer for rows that span less than 32 nats); the tokens of the bucket where
 * the target is reached are gathered, and the next passes bucket their float bits, mapped
 * to unsigned keys that order like the floats, 11 bits at a time until a bucket is a
 * single key: the cut value v*. Last, x < v* -> -inf. Every bucket is an interval of
 * logits, so the kept set is exactly "x >= v*", ties included.
 *
 * Precision: the cut must be the one a float64 sort-and-cumsum gives, so the weights are
 * doubles within ~4e-15 of exp(x - max) and every sum is a double: the kept set equals
 * the float64 reference's unless the mass before a token lies within summation-order
 * rounding (~1e-13 of the total) of top_p. Float weights from exp8 (~3e-7 off) would make
 * the exp 3x cheaper, but moved the cut of ~1 in 10^4 flat 32k rows. Weights below e^-87
 * count as 0 (all of them together are < vocab * 2e-38 of the total).
 *
 * Cost at [32, 32000] on one core: ~70 us a row, half of it the double exp, a quarter
 * the first histogram (scalar read-add-writes); later passes see only one bucket's tokens.
 *
 * Work split: rows [begin, end) per call, rows `row_stride` floats apart; the Python side
 * hands row ranges to threads. Scratch (12 bytes a logit) is allocated per call: returns
 * 0, or -1 when that allocation fails (nothing is masked then).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define RADIX_BITS 11
#define NUM_BUCKETS (1 << RADIX_BITS)

typedef uint32_t v8su __attribute__((vector_size(32)));
typedef uint32_t v8su_u __attribute__((vector_size(32), aligned(4), may_alias));
/* Unsigned keys that order like the floats: negative floats reversed below the positive;
   -0 and +0 one key, as they are one value. */
INLINE uint32_t key_of(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    const uint32_t key = bits ^ ((uint32_t)((int32_t)bits >> 31) | 0x80000000u);
    return key + (key == 0x7FFFFFFFu);
}

/* Whether any lane of a comparison's result is true (an OR of lanes by shuffles: lane by
   lane extraction made the gather 4x slower). */
INLINE int any8(v8si mask) {
    mask |= SHUFFLE(mask, mask, 4, 5, 6, 7, 0, 1, 2, 3);
    mask |= SHUFFLE(mask, mask, 2, 3, 0, 1, 6, 7, 4, 5);
    mask |= SHUFFLE(mask, mask, 1, 0, 3, 2, 5, 4, 7, 6);
    return mask[0] != 0;
}

INLINE float float_of(uint32_t key) {
    const uint32_t bits = key & 0x80000000u ? key & 0x7FFFFFFFu : ~key;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* The row's largest logit and its smallest finite one (+inf if none). */
static void row_range(const float *x, int64_t vocab, float *lowest, float *highest) {
    const v8sf minus_inf = splat8(-INFINITY), plus_inf = splat8(INFINITY);
    v8sf lo = plus_inf, hi = minus_inf;
    int64_t i = 0;
    for (; i + 8 <= vocab; i += 8) {
        const v8sf v = load8(x + i);
        hi = max8(v, hi);
        lo = select8((v < lo) & (v > minus_inf), v, lo);
    }
    float l = INFINITY, h = -INFINITY;
    for (int j = 0; j < 8; ++j) {
        l = lo[j] < l ? lo[j] : l;
        h = hi[j] > h ? hi[j] : h;
    }
    for (; i < vocab; ++i) {
        l = x[i] < l && x[i] > -INFINITY ? x[i] : l;
        h = x[i] > h ? x[i] : h;
    }
    *lowest = l;
    *highest = h;
}

/* The first pass's grid: buckets of 1/per_nat nat below the max, the highest logits in
   the highest bucket, the last bucket (0) taking everything further down. */
struct grid {
    float max, per_nat;
};

/* 64 buckets a nat (32 nats down; below, weights < e^-32 of the max's), finer when the
   finite logits span less, so that a flat row still spreads over the buckets: the fewer
   tokens share the cut's bucket, the cheaper gathering them (its branches miss): for
   randn rows ~10-50 tokens, where a bucket of the keys' top bits (a quarter octave) held
   ~800-1000. */
INLINE struct grid grid_for(float lowest, float highest) {
    const float span = highest - lowest;
    float per_nat = 64.0f;
    if (span > 0.0f && span < (NUM_BUCKETS - 1) / per_nat) per_nat = (NUM_BUCKETS - 1) / span;
    return (struct grid){highest, per_nat < 1e30f ? per_nat : 1e30f};
}

/* NUM_BUCKETS - 1 - floor((max - x) * per_nat), floored at 0: monotone in x (float
   subtraction and scaling are), -inf and NaN in bucket 0. */
INLINE v8si grid8(v8sf x, struct grid g) {
    const v8sf last = splat8((float)(NUM_BUCKETS - 1));
    v8sf steps = (g.max - x) * g.per_nat;
    steps = select8(steps < last, steps, last);
    return (NUM_BUCKETS - 1) - __builtin_convertvector(steps, v8si);
}

/* w[i] = exp(x[i] - max) and bucket[i] = its grid bucket; returns sum(w). */
static double weigh(const float *x, int64_t vocab, struct grid g, double *w, uint32_t *bucket) {
    const v8sf minus_inf = splat8(-INFINITY);
    v8df total = {0};
    int64_t i = 0;
    for (; i + 8 <= vocab; i += 8) {
        const v8sf v = load8(x + i);
        if (!any8(v > minus_inf)) { /* masked (by top-k, say): no exp */
            *(v8df_u *)(w + i) = (v8df){0};
            *(v8su_u *)(bucket + i) = (v8su){0};
            continue;
        }
        const v8df e = exp_diff8(v, g.max);
        *(v8df_u *)(w + i) = e;
        *(v8su_u *)(bucket + i) = (v8su)grid8(v, g);
        total += e;
    }
    if (i < vocab) { /* the tail, padded with -inf (weight 0) */
        v8sf v = minus_inf;
        for (int64_t j = 0; i + j < vocab; ++j) v[j] = x[i + j];
        const v8df e = exp_diff8(v, g.max);
        const v8si b = grid8(v, g);
        for (int64_t j = 0; i + j < vocab; ++j) {
            w[i + j] = e[j];
            bucket[i + j] = b[j];
        }
        total += e;
    }
    double sum = 0.0;
    for (int j = 0; j < 8; ++j) sum += total[j];
    return sum;
}

/* hist[b] = the mass of the tokens in grid bucket b; hist has 4 * NUM_BUCKETS doubles.
   Four interleaved partial histograms: tokens piling into one bucket (the far tail)
   would each wait for the previous one's store (~4x slower). */
static void grid_histogram(const uint32_t *bucket, const double *w, int64_t vocab,
                           double *hist) {
    memset(hist, 0, 4 * NUM_BUCKETS * sizeof *hist);
    int64_t i = 0;
    for (; i + 4 <= vocab; i += 4)
        for (int c = 0; c < 4; ++c) hist[c * NUM_BUCKETS + bucket[i + c]] += w[i + c];
    for (; i < vocab; ++i) hist[bucket[i]] += w[i];
    for (int64_t b = 0; b < NUM_BUCKETS; ++b)
        hist[b] += hist[NUM_BUCKETS + b] + hist[2 * NUM_BUCKETS + b] + hist[3 * NUM_BUCKETS + b];
}

/* The bucket, scanned from the top, where the running mass (starting at *above, the mass
   above all buckets) first reaches target; *above becomes the mass above that bucket. -1
   when the target is never reached (summation rounding, with top_p within ~1e-13 of 1). */
static int64_t find_bucket(const double *hist, int64_t num_buckets, double target,
                           double *above) {
    double mass = *above;
    int64_t b = num_buckets;
    for (; b >= 8; b -= 8) { /* groups of 8 first: one dependent add per group */
        double group = 0.0;
        for (int j = 1; j <= 8; ++j) group += hist[b - j];
        if (mass + group >= target) break;
        mass += group;
    }
    for (--b; b >= 0; --b) {
        if (mass + hist[b] >= target) {
            *above = mass;
            return b;
        }
        mass += hist[b];
    }
    return -1;
}

/* Move the tokens of first-pass bucket b to the front: keys (read as buckets, written as
   full keys) and w, in place (a token is written at or before where it was read). Returns
   how many; their smallest and largest key in *kmin, *kmax. */
static int64_t gather_bucket(const float *x, int64_t vocab, uint32_t b, uint32_t *keys,
                             double *w, uint32_t *kmin, uint32_t *kmax) {
    uint32_t lo = UINT32_MAX, hi = 0;
    int64_t n = 0;
    for (int64_t i = 0; i < vocab; i += 8) {
        const int64_t lanes = vocab - i < 8 ? vocab - i : 8;
        if (lanes == 8 && !any8(*(const v8su_u *)(keys + i) == b))
            continue; /* most blocks have no hit */
        for (int64_t j = 0; j < lanes; ++j) {
            if (keys[i + j] != b) continue;
            const uint32_t k = key_of(x[i + j]);
            keys[n] = k;
            w[n++] = w[i + j];
            lo = k < lo ? k : lo;
            hi = k > hi ? k : hi;
        }
    }
    *kmin = lo;
    *kmax = hi;
    return n;
}

/* The key of the cut, v*: the largest key at which the mass of its tokens and all larger
   keys reaches target. keys holds the first pass's buckets, w the weights, both for the
   whole row; later passes work on the gathered tokens at the front of both. */
static uint32_t select_cut(const float *x, int64_t vocab, double target, uint32_t *keys,
                           double *w, double *hist) {
    grid_histogram(keys, w, vocab, hist);
    double above = 0.0;
    int64_t b = find_bucket(hist, NUM_BUCKETS, target, &above);
    if (b < 0) return key_of(-INFINITY); /* keep everything */
    uint32_t kmin, kmax;
    int64_t num = gather_bucket(x, vocab, (uint32_t)b, keys, w, &kmin, &kmax); /* >= 1 */
    for (;;) {
        int shift = 0;
        while ((kmax - kmin) >> shift >= NUM_BUCKETS) ++shift;
        const int64_t num_buckets = (int64_t)((kmax - kmin) >> shift) + 1;
        memset(hist, 0, (size_t)num_buckets * sizeof *hist);
        for (int64_t i = 0; i < num; ++i) hist[(keys[i] - kmin) >> shift] += w[i];
        b = find_bucket(hist, num_buckets, target, &above);
        if (b < 0) return kmin; /* rounding: the bucket's own sum fell short; keep it all */
        const uint32_t lo = kmin + ((uint32_t)b << shift);
        if (shift == 0) return lo;
        int64_t m = 0;
        kmin = UINT32_MAX, kmax = 0;
        for (int64_t i = 0; i < num; ++i) {
            if ((keys[i] - lo) >> shift != 0) continue;
            kmin = keys[i] < kmin ? keys[i] : kmin;
            kmax = keys[i] > kmax ? keys[i] : kmax;
            keys[m] = keys[i];
            w[m++] = w[i];
        }
        num = m;
    }
}

static void mask_below(float *x, int64_t vocab, float cut) {
    const v8sf minus_inf = splat8(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= vocab; i += 8) {
        const v8sf v = load8(x + i);
        store8(x + i, select8(v >= cut, v, minus_inf));
    }
    for (; i < vocab; ++i) x[i] = x[i] >= cut ? x[i] : -INFINITY;
}

/* logits: [rows, vocab], rows row_stride floats apart, columns contiguous; masked in place.
   top_p: [rows] double. */
int top_p_mask_f32(float *logits, const double *top_p, int64_t vocab, int64_t row_stride,
                   int64_t begin, int64_t end) {
    double *scratch = malloc(((size_t)vocab + 4 * NUM_BUCKETS) * sizeof(double) +
                             (size_t)vocab * sizeof(uint32_t));
    if (scratch == NULL) return -1;
    double *w = scratch, *hist = scratch + vocab;
    uint32_t *keys = (uint32_t *)(hist + 4 * NUM_BUCKETS);
    for (int64_t r = begin; r < end; ++r) {
        if (!(top_p[r] < 1.0)) continue;
        float *x = logits + r * row_stride;
        float lowest, highest;
        row_range(x, vocab, &lowest, &highest);
        if (!isfinite(highest)) continue;
        /* top_p > 0 is validated upstream; at 0 empty buckets would match */
        const double p = top_p[r] > 0.0 ? top_p[r] : 1e-300;
        const double target = p * weigh(x, vocab, grid_for(lowest, highest), w, keys);
        mask_below(x, vocab, float_of(select_cut(x, vocab, target, keys, w, hist)));
    }
    free(scratch);
    return 0;
}
