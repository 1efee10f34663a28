/*
 * The sampler's floating-point maths, one row at a time in one fixed order, for the
 * batch-invariant mode (CPU, float32 logits):
 *
 *   sample_rows_f32       a token per row by inverting the CDF of exp(x - max) at u * total
 *   log_softmax_rows_f32  x - max - log(sum exp(x - max))
 *
 * Why: the default sampler does this with torch ops over the whole [rows, vocab] batch, and
 * torch splits element-wise ops and reductions over threads at offsets set by the batch's
 * size (each thread's share ends in a scalar tail whose exp may differ from the vector one
 * in the last bit; a reduction over one row may be split over threads when there are few
 * rows). Here every element of every row goes through the same vector code (a row's tail is
 * padded to a whole vector), sums run in one order per row, and rows are split over threads
 * whole. So a row's token and logprobs depend on its own logits and uniform only.
 *
 * Meaning is the default sampler's (engine/sampler.py): weights w = exp(x - max) (here in
 * double, within ~4e-15 of exact), zeroed below min_p (relative to the top weight, 1), the
 * cumulative sum in double, and the first token whose cumulative weight exceeds u times the
 * total; when rounding lands on the total, the last token of positive weight.
 *
 * Work split: rows [begin, end), rows `row_stride` floats apart, columns contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* The 8 logits at x[i..], the ones past vocab as -inf (weight 0). */
INLINE v8sf load_padded(const float *x, int64_t i, int64_t vocab) {
    if (i + 8 <= vocab) return load8(x + i);
    v8sf v = splat8(-INFINITY);
    for (int64_t j = 0; i + j < vocab; ++j) v[j] = x[i + j];
    return v;
}

static float row_max(const float *x, int64_t vocab) {
    v8sf m = splat8(-INFINITY);
    for (int64_t i = 0; i < vocab; i += 8) m = max8(m, load_padded(x, i, vocab));
    float best = m[0];
    for (int j = 1; j < 8; ++j) best = m[j] > best ? m[j] : best;
    return best;
}

/* cdf[i] = w[0] + ... + w[i], in order; returns the total. */
static double cumulative_weights(const float *x, int64_t vocab, float max, double min_p,
                                 double *cdf) {
    double running = 0.0;
    for (int64_t i = 0; i < vocab; i += 8) {
        const v8df w = exp_diff8(load_padded(x, i, vocab), max);
        for (int j = 0; j < 8 && i + j < vocab; ++j) {
            running += w[j] < min_p ? 0.0 : w[j];
            cdf[i + j] = running;
        }
    }
    return running;
}

static int64_t first_index_of(const float *x, int64_t vocab, float value) {
    for (int64_t i = 0; i < vocab; ++i)
        if (x[i] == value) return i;
    return 0;
}

/* The token of one row; cdf: scratch of vocab doubles. */
static int64_t sample_row(const float *x, int64_t vocab, double min_p, double u, double *cdf) {
    const float max = row_max(x, vocab);
    if (!isfinite(max)) return first_index_of(x, vocab, max); /* all -inf, or +inf: no maths */
    const double total = cumulative_weights(x, vocab, max, min_p, cdf);
    const double target = u * total;
    int64_t lo = 0, hi = vocab; /* first i with cdf[i] > target (cdf is non-decreasing) */
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (cdf[mid] > target) hi = mid;
        else lo = mid + 1;
    }
    if (lo < vocab) return lo;
    for (int64_t i = vocab - 1; i > 0; --i) /* rounding: the last token of positive weight */
        if (cdf[i] > cdf[i - 1]) return i;
    return 0;
}

/* logits: [rows, vocab] after temperature and masks; min_p, u: [rows]; out: [rows] ids.
   Returns 0, or -1 when the scratch buffer cannot be allocated. */
int sample_rows_f32(const float *logits, const double *min_p, const double *u, int64_t *out,
                    int64_t vocab, int64_t row_stride, int64_t begin, int64_t end) {
    double *cdf = malloc(sizeof(double) * (size_t)vocab);
    if (cdf == NULL) return -1;
    for (int64_t r = begin; r < end; ++r)
        out[r] = sample_row(logits + r * row_stride, vocab, min_p[r], u[r], cdf);
    free(cdf);
    return 0;
}

/* out: [rows, vocab] contiguous. */
void log_softmax_rows_f32(const float *logits, float *out, int64_t vocab, int64_t row_stride,
                          int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
        const float *x = logits + r * row_stride;
        float *o = out + r * vocab;
        const float max = row_max(x, vocab);
        double sum = 0.0;
        if (isfinite(max))
            for (int64_t i = 0; i < vocab; i += 8) {
                const v8df w = exp_diff8(load_padded(x, i, vocab), max);
                for (int j = 0; j < 8; ++j) sum += w[j];
            }
        const double shift = (double)max + log(sum); /* +-inf / NaN rows: as torch would */
        for (int64_t i = 0; i < vocab; ++i) o[i] = (float)((double)x[i] - shift);
    }
}
