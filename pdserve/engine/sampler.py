"""The sampler: logits of the rows that yield a token this step → token ids (+ logprobs).

Per request: greedy (temperature 0) or random with temperature, top-k, top-p and min-p;
`min_tokens` masks end-of-sequence and stop ids until enough tokens exist.

Top-k and top-p are thresholds, not sorts: a sort of [32, 32000] float32 rows took ~37 ms,
more than a batch-32 decode step. Top-k keeps the logits >= the row's k-th largest
(`torch.topk`); top-p keeps a token iff the probability mass of the strictly larger
logits is < top_p, found by a radix select in C (`kernels/sampling.c`), with a sort-based
PyTorch fallback of the same meaning. Both keep every token tied with the last kept one.

Reproducibility. A seeded request draws its randomness from a generator seeded with
(seed, index of the token being sampled) — not from a stream shared with other requests —
so its output depends only on its own prompt, parameters and seed: not on what else is in
the batch, not on preemption, and not on which worker samples which token (the prefill
worker samples the first token in disaggregated serving, the decode worker the rest).
Sampling inverts the distribution's CDF: one uniform u per row, and the first token whose
cumulative weight exceeds u times the total (weights exp(logit - max), summed in float64 so
that a token's interval keeps its width however far down the vocabulary it sits). One draw
per row, vectorised over the batch: the exponential race it replaced (argmax p_i / E_i)
drew a vocabulary of exponential noise per row: 21-26 ms at batch 32, most of a decode step.

All maths in float32, except the float64 sums said so above and top-p's mass.

Batch-invariant mode (`batch_invariant=True`): the exp, the cumulative sum and the
log-softmax run row by row in C (`kernels/categorical.c`), one fixed order per row, so a
row's token and logprobs do not depend on the other rows; everything else here (masks,
division by the temperature, argmax, top-k values) is exact element by element already.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.model.kernels import sampling as sampling_kernels
from pdserve.outputs import Logprob
from pdserve.sampling_params import SamplingParams, token_seed


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    num_output_tokens: int  # tokens generated so far; the sampled one gets this index
    blocked_token_ids: tuple[int, ...] = ()  # masked out (min_tokens not reached yet)


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprobs: dict[int, Logprob] | None = None
    error: str | None = None  # this row could not be sampled; `token_id` means nothing


class Sampler:
    def __init__(self, seed: int = 0, batch_invariant: bool = False) -> None:
        # Stream for unseeded requests: reproducible per engine, not per request.
        self._generator = torch.Generator().manual_seed(seed)
        self.batch_invariant = batch_invariant

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        # logits: [S, V] float32, one row per entry of `rows`
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = (
                sampling_kernels.log_softmax_rows(logits)
                if self._per_row(logits)
                else torch.log_softmax(logits, dim=-1)
            )
        _block_tokens(logits, rows)
        token_ids = argmax_rows(logits)  # greedy for every row; random rows overwrite
        random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if random_rows:
            self._sample_random(logits, token_ids, rows, random_rows)
        return self._results(token_ids.tolist(), rows, raw_logprobs)

    def _sample_random(self, logits, token_ids, rows, random_rows: list[int]) -> None:
        index = torch.tensor(random_rows, device=logits.device)
        sub = logits[index]
        params = [rows[i].params for i in random_rows]
        temperature = torch.tensor([p.temperature for p in params], device=sub.device)
        temperature = temperature.unsqueeze(1)
        sub = _apply_top_k_top_p(sub / temperature, params)
        if self._per_row(sub):
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float64)
            u = self._uniforms([rows[i] for i in random_rows])
            token_ids[index] = sampling_kernels.sample_rows(sub, min_p, u)
            return
        # Weights relative to the row's most likely token (1.0), so min-p compares directly.
        weights = torch.exp(sub - sub.amax(dim=-1, keepdim=True))
        min_p = torch.tensor([p.min_p for p in params], device=sub.device).unsqueeze(1)
        if bool((min_p > 0).any()):
            weights = weights.masked_fill(weights < min_p, 0.0)
        cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)
        u = self._uniforms([rows[i] for i in random_rows]).to(cdf.device)
        picks = torch.searchsorted(cdf, u.unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)
        # A pick below the vocabulary size always has positive weight (its cumulative sum
        # rises past the target there). u < 1 keeps u * total below the total, but rounding
        # can land on it: then the pick is the last token of positive weight.
        for j in (picks >= weights.shape[-1]).nonzero().flatten().tolist():
            picks[j] = int((weights[j] > 0).nonzero()[-1])
        token_ids[index] = picks

    def _per_row(self, logits: torch.Tensor) -> bool:
        return self.batch_invariant and sampling_kernels.can_mask(logits)

    def _uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        """One U[0, 1) float64 per row: seeded rows from their own (seed, token index)
        generator, the others in order from the engine's stream."""
        u = torch.empty(len(rows), dtype=torch.float64)
        unseeded = [j for j, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, generator=self._generator)
        for j, r in enumerate(rows):
            if r.params.seed is not None:
                u[j] = torch.rand(1, dtype=torch.float64, generator=self._row_generator(r))
        return u

    def _row_generator(self, row: SamplingRow) -> torch.Generator:
        if row.params.seed is None:
            return self._generator
        return torch.Generator().manual_seed(token_seed(row.params.seed, row.num_output_tokens))

    @staticmethod
    def _results(token_ids: list[int], rows, raw_logprobs) -> list[SampleResult]:
        results = [SampleResult(t) for t in token_ids]
        if raw_logprobs is None:
            return results
        for i, row in enumerate(rows):
            if row.params.logprobs is not None:
                results[i].logprobs = _token_logprobs(
                    raw_logprobs[i], token_ids[i], row.params.logprobs
                )
        return results


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` (first index of the maximum; a NaN counts as the maximum). On CPU
    through numpy, whose vectorised argmax is ~13x torch's on `[32, 32000]` float32 rows
    (60 vs 870 us: 3 % of a batch-32 decode step)."""
    if x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32:
        return torch.from_numpy(x.contiguous().numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


def _block_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        if row.blocked_token_ids:
            logits[i, list(row.blocked_token_ids)] = float("-inf")


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask to -inf, in place, the logits outside each row's top-k set and then outside its
    top-p set (computed on what top-k left); returns `logits`. logits: [S, V]."""
    if any(p.top_k > 0 for p in params):
        _mask_top_k_(logits, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64)
        if sampling_kernels.can_mask(logits):
            sampling_kernels.top_p_mask_(logits, top_p)
        else:
            _mask_top_p_sorted_(logits, top_p)
    return logits


def _mask_top_k_(logits: torch.Tensor, top_k: list[int]) -> None:
    """Keep the logits >= the row's k-th largest (k = 0: all). A threshold, as vLLM's: every
    logit tied with the k-th largest is kept, so a row may keep more than k; k >= vocab
    keeps everything. One `topk` over the batch, for the largest k that masks anything."""
    vocab = logits.shape[-1]
    k = torch.tensor([n if 0 < n < vocab else 0 for n in top_k], device=logits.device)  # 0: off
    if not bool((k > 0).any()):
        return
    values = torch.topk(logits, int(k.max()), dim=-1).values  # [S, kmax], descending
    threshold = values.gather(-1, (k - 1).clamp(min=0).unsqueeze(1))  # [S, 1]: k-th largest
    threshold = threshold.masked_fill((k == 0).unsqueeze(1), float("-inf"))
    logits.masked_fill_(logits < threshold, float("-inf"))


def _mask_top_p_sorted_(logits: torch.Tensor, top_p: torch.Tensor) -> None:
    """Top-p by a sort, for where the C kernel does not apply (GPU, other dtypes, no
    compiler): the kernel's rule and float64 mass, so the same kept sets."""
    sorted_logits = logits.sort(dim=-1, descending=True).values  # [S, V]
    probs = torch.softmax(sorted_logits.double(), dim=-1)
    # Mass before each sorted position; at a tie group's first position, the mass of the
    # strictly larger logits.
    mass_before = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
    top_p = top_p.to(device=logits.device, dtype=torch.float64).unsqueeze(1)  # [S, 1]
    num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)  # a prefix
    cut = sorted_logits.gather(-1, num_kept - 1)  # [S, 1]: the last kept value
    cut = cut.masked_fill(top_p >= 1.0, float("-inf"))  # top_p = 1: keep all, tails too
    logits.masked_fill_(logits < cut, float("-inf"))


def _token_logprobs(row: torch.Tensor, token_id: int, num_top: int) -> dict[int, Logprob]:
    sampled = row[token_id].item()
    rank = int((row > sampled).sum().item()) + 1
    result = {token_id: Logprob(sampled, rank)}
    if num_top:
        values, indices = row.topk(num_top)
        for r, (value, index) in enumerate(zip(values.tolist(), indices.tolist(), strict=True)):
            result.setdefault(index, Logprob(value, r + 1))
    return result
