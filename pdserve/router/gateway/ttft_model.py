"""`TtftModel`: time to first token from the work ahead of a request and the decode load.

    TTFT ~ base + per_token x work + per_sequence x decoding

`work` is the prompt tokens queued ahead of the request plus its own; `decoding` the
sequences already past their first token (still generating) when it arrived. Both
matter on one engine: a step computes every running sequence's next token next to the
prefill chunks, so a request's wait grows with the prompts ahead of it and, per step,
with the batch being decoded. A model in `work` alone learns a `base` that belongs to
the decode batch of its training load and is wrong as soon as that batch changes (for
example when admission itself keeps it small).

Fitted by exponentially weighted least squares (each new sample weighs 1, older ones
decay by `decay` per sample). Until `MIN_SAMPLES` samples exist the prior rate is used;
when the two inputs move together (collinear) or a coefficient comes out negative, the
fit falls back to `work` alone, and when even that cannot be separated, to the mean
time per token. Pure arithmetic on a few sums: O(1) per sample and per prediction.
"""

from __future__ import annotations

MIN_SAMPLES = 4.0  # (decayed) samples before the fit replaces the prior rate
DECAY = 0.98  # per sample: the fit follows the last ~50 requests
MIN_VAR_WORK = 1.0  # tokens^2: works must differ to separate base from rate
MIN_VAR_DECODING = 0.25  # sequences^2
MAX_CORRELATION = 0.95  # |corr(work, decoding)| above this: collinear


class TtftModel:
    def __init__(self, prior_tokens_per_s: float, decay: float = DECAY) -> None:
        self.prior_tokens_per_s = prior_tokens_per_s
        self.decay = decay
        self.n = 0.0
        # decayed sums of w, d, t and their products
        self.w = self.d = self.t = self.ww = self.dd = self.wd = self.wt = self.dt = 0.0

    def observe(self, work_tokens: float, ttft_s: float, decoding: float = 0.0) -> None:
        k, w, d, t = self.decay, work_tokens, decoding, ttft_s
        self.n = self.n * k + 1
        self.w, self.d, self.t = self.w * k + w, self.d * k + d, self.t * k + t
        self.ww, self.dd, self.wd = self.ww * k + w * w, self.dd * k + d * d, self.wd * k + w * d
        self.wt, self.dt = self.wt * k + w * t, self.dt * k + d * t

    @property
    def is_fitted(self) -> bool:
        """Enough samples to predict from measurements rather than the prior."""
        return self.n >= MIN_SAMPLES

    def coefficients(self) -> tuple[float, float, float]:
        """(base seconds, seconds per token of work, seconds per decoding sequence)."""
        if not self.is_fitted:
            return 0.0, 1.0 / self.prior_tokens_per_s, 0.0
        n = self.n
        mw, md, mt = self.w / n, self.d / n, self.t / n
        var_w, var_d = self.ww / n - mw * mw, self.dd / n - md * md
        cov_wd, cov_wt, cov_dt = self.wd / n - mw * md, self.wt / n - mw * mt, self.dt / n - md * mt
        separable = var_w > MIN_VAR_WORK and var_d > MIN_VAR_DECODING
        if separable and cov_wd * cov_wd < MAX_CORRELATION**2 * var_w * var_d:
            det = var_w * var_d - cov_wd * cov_wd
            per_token = (cov_wt * var_d - cov_dt * cov_wd) / det
            per_seq = (cov_dt * var_w - cov_wt * cov_wd) / det
            if per_token > 0 and per_seq >= 0:
                return max(0.0, mt - per_token * mw - per_seq * md), per_token, per_seq
        if var_w > MIN_VAR_WORK and cov_wt > 0:
            per_token = cov_wt / var_w
            return max(0.0, mt - per_token * mw), per_token, 0.0
        # All works alike (or TTFT not growing with work): the mean time per token.
        return 0.0, self.t / max(self.w, 1.0), 0.0

    def predict(self, work_tokens: float, decoding: float = 0.0) -> float:
        base, per_token, per_seq = self.coefficients()
        return base + work_tokens * per_token + decoding * per_seq

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.coefficients()[1]
