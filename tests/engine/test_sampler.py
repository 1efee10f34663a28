"""Sampler: greedy equivalences of the filters, seeded reproducibility independent of the
batch, blocked tokens, logprobs, the sampled distribution itself, and the top-k / top-p
masks against their definitions (the C top-p kernel and its PyTorch fallback alike)."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.sampler import Sampler, SamplingRow, _apply_top_k_top_p, token_seed
from pdserve.model import kernels
from pdserve.model.kernels import sampling as sampling_kernels
from pdserve.sampling_params import SamplingParams
from tests.helpers import torch_threads

VOCAB = 1000


def random_logits(num_rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=generator) * scale


def sample(logits: torch.Tensor, rows: list[SamplingRow], sampler_seed: int = 0):
    # The sampler masks blocked tokens in place: give it a copy.
    return Sampler(sampler_seed)(logits.clone(), rows)


def tokens(logits: torch.Tensor, rows: list[SamplingRow], sampler_seed: int = 0) -> list[int]:
    return [r.token_id for r in sample(logits, rows, sampler_seed)]


def row(num_output_tokens: int = 0, blocked: tuple[int, ...] = (), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), num_output_tokens, blocked)


def seeded_sequence(logits_row: torch.Tensor, seed: int, length: int = 20, **params) -> list[int]:
    """Tokens 0..length-1 of a seeded request sampling from the same logits each step."""
    return [tokens(logits_row[None], [row(i, seed=seed, **params)])[0] for i in range(length)]


# ---- greedy and its equivalents ---------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(4)
    assert tokens(logits, [row(temperature=0)] * 4) == logits.argmax(-1).tolist()


def test_temperature_below_epsilon_is_greedy_and_ignores_the_seed():
    logits = random_logits(4, seed=8, scale=0.1)  # flat: any randomness would show
    rows = [row(i, seed=i, temperature=1e-6) for i in range(4)]
    assert tokens(logits, rows) == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1.0, "top_k": 1},
        {"temperature": 1.5, "top_p": 1e-6},
        {"temperature": 2.0, "min_p": 1.0},
        {"temperature": 1.0, "top_k": 1, "top_p": 0.5, "min_p": 0.5},
    ],
    ids=["top_k=1", "top_p~0", "min_p=1", "all"],
)
def test_filters_that_keep_one_token_equal_greedy(params):
    logits = random_logits(8, seed=1, scale=1.0)  # flat enough that plain sampling wanders
    greedy = logits.argmax(-1).tolist()
    for seed in range(5):
        rows = [row(i, seed=seed, **params) for i in range(8)]
        assert tokens(logits, rows) == greedy
    unfiltered = [row(i, seed=0, temperature=params["temperature"]) for i in range(8)]
    assert tokens(logits, unfiltered) != greedy  # the filter, not the logits, did it


# ---- seeds -----------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(1, seed=2, scale=0.5)[0]
    first = seeded_sequence(logits, seed=42)
    assert seeded_sequence(logits, seed=42) == first
    assert seeded_sequence(logits, seed=43) != first
    assert len(set(first)) > 10  # really random over a flat distribution


def test_seeded_row_ignores_the_rest_of_the_batch_and_the_engine_seed():
    logits = random_logits(6, seed=3, scale=0.5)
    target = row(5, seed=7, temperature=0.8, top_p=0.9)
    alone = tokens(logits[2:3], [target])[0]
    others = [
        row(0),  # unseeded random: draws from the engine stream
        row(1, temperature=0),
        row(2, seed=7, temperature=1.3),
        row(0, seed=8, top_k=50),
        row(3),
    ]
    for position in range(len(others) + 1):
        batch_rows = [*others[:position], target, *others[position:]]
        batch_logits = torch.cat([logits[:position], logits[2:3], logits[position:5]])
        for engine_seed in (0, 1):
            assert tokens(batch_logits, batch_rows, engine_seed)[position] == alone


def test_seeded_token_depends_on_its_index():
    logits = random_logits(1, seed=4, scale=0.5)
    picks = {tokens(logits, [row(i, seed=1)])[0] for i in range(10)}
    assert len(picks) > 5
    assert token_seed(1, 0) != token_seed(1, 1) != token_seed(2, 0)
    assert token_seed(1, 5) == token_seed(1, 5)
    assert 0 <= token_seed(2**62, 10**6) < 2**63


def test_unseeded_rows_follow_the_engine_seed():
    logits = random_logits(8, seed=5, scale=0.5)
    rows = [row(0)] * 8
    assert tokens(logits, rows, sampler_seed=3) == tokens(logits, rows, sampler_seed=3)
    assert tokens(logits, rows, sampler_seed=3) != tokens(logits, rows, sampler_seed=4)


# ---- blocked tokens ----------------------------------------------------------------------


def test_blocked_tokens_are_never_sampled():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, [3, 4, 5]] = 10.0  # nearly all the mass
    blocked = (3, 4)
    greedy = tokens(logits, [row(blocked=blocked, temperature=0)])
    assert greedy == [5]
    picks = tokens(logits.expand(300, VOCAB), [row(0, blocked, seed=s) for s in range(300)])
    assert not set(picks) & set(blocked)
    assert picks.count(5) >= 295  # p(5) is 99.97% once 3 and 4 are gone


# ---- logprobs ----------------------------------------------------------------------------


def test_logprobs_of_the_sampled_token_and_top_alternatives():
    logits = random_logits(2, seed=6)
    expected = torch.log_softmax(logits, dim=-1)
    results = sample(logits, [row(logprobs=3, temperature=0), row(seed=1, logprobs=5)])
    for i, (result, num_top) in enumerate(zip(results, (3, 5), strict=True)):
        entries = result.logprobs
        sampled = entries[result.token_id]
        assert sampled.logprob == pytest.approx(expected[i, result.token_id].item(), abs=1e-6)
        assert sampled.rank == int((expected[i] > expected[i, result.token_id]).sum()) + 1
        top_values, top_ids = expected[i].topk(num_top)
        for rank, (token_id, value) in enumerate(
            zip(top_ids.tolist(), top_values.tolist(), strict=True), start=1
        ):
            assert entries[token_id].rank == rank
            assert entries[token_id].logprob == pytest.approx(value, abs=1e-6)
        assert len(entries) == num_top + (result.token_id not in top_ids.tolist())
    assert results[0].logprobs[results[0].token_id].rank == 1  # greedy picks rank 1


def test_logprobs_report_raw_ranks_when_the_top_tokens_are_blocked():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    (result,) = sample(logits, [row(blocked=(0, 1), temperature=0, logprobs=1)])
    assert result.token_id == 2
    expected = torch.log_softmax(logits[0], dim=-1)
    assert set(result.logprobs) == {2, 0}
    assert result.logprobs[2].rank == 3
    assert result.logprobs[2].logprob == pytest.approx(expected[2].item(), abs=1e-6)
    assert result.logprobs[0].rank == 1


def test_logprobs_zero_returns_only_the_sampled_token_and_none_when_unset():
    logits = random_logits(2, seed=7)
    results = sample(logits, [row(temperature=0, logprobs=0), row(temperature=0)])
    assert list(results[0].logprobs) == [results[0].token_id]
    assert results[1].logprobs is None


# ---- the distribution --------------------------------------------------------------------

NUM_DRAWS = 2000
PROBS = [0.5, 0.3, 0.2]


def frequencies(logits_row: list[float], **params) -> list[float]:
    logits = torch.tensor([logits_row]).expand(NUM_DRAWS, len(logits_row))
    rows = [row(0, seed=seed, **params) for seed in range(NUM_DRAWS)]
    picks = tokens(logits, rows)
    return [picks.count(i) / NUM_DRAWS for i in range(len(logits_row))]


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


# Standard error of a frequency near 0.5 over 2000 draws is ~0.011; 0.04 is ~3.5 sigma.
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"temperature": 1.0}, PROBS),
        ({"temperature": 0.5}, softmax([2 * math.log(p) for p in PROBS])),
        ({"temperature": 1.0, "top_k": 2}, [0.625, 0.375, 0.0]),
        ({"temperature": 1.0, "top_p": 0.6}, [0.625, 0.375, 0.0]),
        ({"temperature": 1.0, "top_p": 0.4}, [1.0, 0.0, 0.0]),
        ({"temperature": 1.0, "min_p": 0.5}, [0.625, 0.375, 0.0]),
    ],
    ids=["t=1", "t=0.5", "top_k=2", "top_p=0.6", "top_p=0.4", "min_p=0.5"],
)
def test_sampled_frequencies_match_the_filtered_softmax(params, expected):
    observed = frequencies([math.log(p) for p in PROBS], **params)
    assert observed == pytest.approx(expected, abs=0.04)
    for got, want in zip(observed, expected, strict=True):
        if want == 0.0:
            assert got == 0.0


def test_argmax_rows_matches_torch_on_ties_nan_and_inf():
    from pdserve.engine.sampler import argmax_rows

    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    x[1, 7] = x[1, 30] = 100.0  # a tie: the first index wins
    x[2, 11] = float("nan")  # NaN counts as the maximum
    x[3] = float("-inf")  # a fully blocked row: index 0
    x[4, 49] = float("inf")
    got = argmax_rows(x)
    assert got.tolist() == x.argmax(dim=-1).tolist()
    assert got.tolist()[1:4] == [7, 11, 0]
    assert argmax_rows(x[:, ::2]).tolist() == x[:, ::2].argmax(dim=-1).tolist()  # strided


def test_a_token_at_the_end_of_a_large_vocabulary_keeps_its_probability():
    # 32000 tokens: the cumulative sum runs through ~32000 terms before the last token's
    # interval; a float32 sum would blur it, the float64 one must not.
    vocab = 32000
    logits = torch.zeros(NUM_DRAWS, vocab)
    logits[:, -1] = math.log(0.3 / 0.7 * (vocab - 1))  # p(last) = 0.3, the rest share 0.7
    picks = tokens(logits, [row(0, seed=seed) for seed in range(NUM_DRAWS)])
    assert picks.count(vocab - 1) / NUM_DRAWS == pytest.approx(0.3, abs=0.04)
    assert len(set(picks)) > 1000  # the flat part is really sampled, all over it


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize(("u", "expected"), [(0.0, 3), (1.0, 5)])
def test_uniform_at_either_end_picks_a_token_of_positive_weight(
    monkeypatch, u, expected, batch_invariant
):
    if batch_invariant and not kernels.is_available():
        pytest.skip("no C compiler here")
    # Tokens 0-2 and 6-9 are masked by top-k: u = 0 must give the first kept token and a
    # draw that rounds up to the total the last kept one, never a masked neighbour.
    logits = torch.full((1, 10), -50.0)
    logits[0, 3:6] = torch.tensor([5.0, 5.2, 5.1])
    monkeypatch.setattr(
        Sampler, "_uniforms", lambda self, rows: torch.full((1,), u, dtype=torch.float64)
    )
    picked = Sampler(0, batch_invariant)(logits, [row(0, seed=1, top_k=3)])
    assert [r.token_id for r in picked] == [expected]


def test_seeded_and_unseeded_rows_in_one_batch_draw_independently():
    logits = random_logits(4, seed=9, scale=0.2)
    rows = [row(0), row(3, seed=5), row(0), row(3, seed=5)]
    picks = tokens(logits, rows, sampler_seed=2)
    # The two seeded rows have the same seed and token index: the same uniform. Their
    # logits differ, so compare each with the row sampled alone.
    assert picks[1] == tokens(logits[1:2], [rows[1]])[0]
    assert picks[3] == tokens(logits[3:4], [rows[3]])[0]
    assert tokens(logits, rows, sampler_seed=2) == picks


# ---- top-k and top-p masks ---------------------------------------------------------------

TOP_PS = (1e-6, 0.3, 0.9, 0.999, 1.0)


def reference_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """The definition, in float64 with an explicit sort and cumsum: sorted descending, a
    token is kept while the mass before it is < top_p, and so is every token tied with the
    last kept one."""
    out = logits.clone()
    for r, p in enumerate(top_p):
        if p >= 1.0:
            continue
        x = logits[r].double()
        probs = torch.softmax(x, dim=0)
        values, order = x.sort(descending=True, stable=True)
        mass_before = torch.cat([torch.zeros(1, dtype=torch.float64), probs[order].cumsum(0)])
        num_kept = int((mass_before[:-1] < p).sum())
        out[r, x < values[num_kept - 1]] = float("-inf")
    return out


def mask_cases(vocab: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Rows of one kind of distribution, each top_p of TOP_PS on 3 rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = 3 * len(TOP_PS)
    scale = {"flat": 0.1, "medium": 2.0, "peaked": 10.0, "masked": 2.0, "ties": 1.0}[kind]
    logits = torch.randn(rows, vocab, generator=generator) * scale
    if kind == "masked":  # -inf as top-k or blocked tokens leave them
        logits[torch.rand(rows, vocab, generator=generator) < 0.6] = float("-inf")
        logits[:, 0] = 1.0  # every row keeps a finite logit
    if kind == "ties":
        logits = torch.round(logits * 2) / 2
    return logits, [p for p in TOP_PS for _ in range(3)]


def top_p_kernel(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    out = logits.clone()
    sampling_kernels.top_p_mask_(out, torch.tensor(top_p, dtype=torch.float64))
    return out


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [row.isfinite().nonzero().flatten().tolist() for row in logits]


needs_kernels = pytest.mark.skipif(not kernels.is_available(), reason="no C compiler here")


@needs_kernels
@pytest.mark.parametrize("vocab", [7, 1000, 1003, 32000])
@pytest.mark.parametrize("kind", ["flat", "medium", "peaked", "masked", "ties"])
def test_top_p_kernel_equals_a_float64_sort_and_cumsum(vocab, kind):
    logits, top_p = mask_cases(vocab, kind)
    got = top_p_kernel(logits, top_p)
    assert kept(got) == kept(reference_top_p(logits, top_p))
    assert torch.equal(got[got.isfinite()], logits[got.isfinite()])  # kept ones untouched


@needs_kernels
def test_top_p_kernel_on_strided_rows_split_across_threads(monkeypatch):
    logits, top_p = mask_cases(1000, "medium", seed=1)
    wide = torch.full((logits.shape[0], 1024), 7.0)
    wide[:, :1000] = logits
    monkeypatch.setattr(kernels, "MIN_FLOATS_PER_THREAD", 1)
    with torch_threads(2):
        sampling_kernels.top_p_mask_(wide[:, :1000], torch.tensor(top_p))
    assert kept(wide[:, :1000]) == kept(reference_top_p(logits, top_p))
    assert bool((wide[:, 1000:] == 7.0).all())  # nothing written past a row's end


@pytest.mark.parametrize("vocab", [7, 1003, 32000])
@pytest.mark.parametrize("kind", ["flat", "peaked", "masked", "ties"])
def test_top_p_fallback_keeps_the_same_tokens_as_the_kernel(monkeypatch, vocab, kind):
    logits, top_p = mask_cases(vocab, kind, seed=2)
    params = [SamplingParams(top_p=p) for p in top_p]
    expected = reference_top_p(logits, top_p)
    if kernels.is_available():
        assert kept(_apply_top_k_top_p(logits.clone(), params)) == kept(expected)
    monkeypatch.setattr(sampling_kernels, "is_available", lambda: False)
    assert kept(_apply_top_k_top_p(logits.clone(), params)) == kept(expected)


def test_top_p_keeps_every_token_tied_with_the_last_kept_one(monkeypatch):
    # p = 0.447 for 2.0, 0.164 for each 1.0: the mass before the second 1.0 is 0.61.
    logits = torch.tensor([[1.0, 2.0, 0.0, 1.0, 1.0]])
    for use_kernel in (True, False):
        monkeypatch.setattr(sampling_kernels, "is_available", lambda use=use_kernel: use)
        if use_kernel and not kernels.is_available():
            continue
        masked = _apply_top_k_top_p(logits.clone(), [SamplingParams(top_p=0.5)])
        assert kept(masked) == [[0, 1, 3, 4]]


def test_top_k_keeps_ties_with_the_kth_value_and_everything_when_k_exceeds_the_vocab():
    logits = torch.tensor(
        [
            [3.0, 5.0, 3.0, 1.0, 3.0, 0.0],  # k = 2: the 2nd largest is 3.0, tied thrice
            [3.0, 5.0, 3.0, 1.0, 3.0, 0.0],  # k = 10 > vocab: all kept
            [3.0, 5.0, 3.0, 1.0, 3.0, 0.0],  # k = 0: off
            [0.5, float("-inf"), 2.0, float("-inf"), float("-inf"), float("-inf")],  # k = 3
        ]
    )
    params = [SamplingParams(top_k=k) for k in (2, 10, 0, 3)]
    masked = _apply_top_k_top_p(logits.clone(), params)
    assert kept(masked) == [[0, 1, 2, 4], list(range(6)), list(range(6)), [0, 2]]
    assert torch.equal(masked[0, [0, 1, 2, 4]], logits[0, [0, 1, 2, 4]])


@pytest.mark.parametrize("use_kernel", [True, False])
def test_top_p_applies_to_what_top_k_left(monkeypatch, use_kernel):
    if use_kernel and not kernels.is_available():
        pytest.skip("no C compiler here")
    monkeypatch.setattr(sampling_kernels, "is_available", lambda: use_kernel)
    logits, _ = mask_cases(1000, "medium", seed=3)
    params = [SamplingParams(top_k=k, top_p=0.8) for k in (5, 50, 0) for _ in range(5)]
    top_k_only = _apply_top_k_top_p(logits.clone(), [SamplingParams(top_k=p.top_k) for p in params])
    expected = reference_top_p(top_k_only, [0.8] * len(params))
    assert kept(_apply_top_k_top_p(logits.clone(), params)) == kept(expected)


# ---- batch-invariant mode: the maths row by row in C (kernels/categorical.c) --------------

needs_kernels = pytest.mark.skipif(not kernels.is_available(), reason="no C compiler here")
MIXED_PARAMS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 50},
    {"temperature": 1.3, "top_p": 0.9},
    {"temperature": 1.0, "min_p": 0.05},
    {"temperature": 0.0},
]


@needs_kernels
def test_per_row_sampler_picks_what_the_default_one_picks():
    logits = random_logits(40, seed=4, scale=2.0)
    rows = [row(i % 3, seed=100 + i, logprobs=2, **MIXED_PARAMS[i % 5]) for i in range(40)]
    default = sample(logits, rows)
    per_row = Sampler(0, batch_invariant=True)(logits.clone(), rows)
    assert [r.token_id for r in per_row] == [r.token_id for r in default]
    for a, b in zip(per_row, default, strict=True):
        assert a.logprobs.keys() == b.logprobs.keys()
        for token, lp in a.logprobs.items():
            assert lp.rank == b.logprobs[token].rank
            assert lp.logprob == pytest.approx(b.logprobs[token].logprob, abs=1e-5)


@needs_kernels
@pytest.mark.parametrize("num_threads", [1, 2])
def test_per_row_maths_of_a_row_do_not_depend_on_the_batch(num_threads, monkeypatch):
    # An odd vocabulary (a tail shorter than a vector) and threads forced on small inputs.
    monkeypatch.setattr(kernels, "MIN_FLOATS_PER_THREAD", 1)
    logits = torch.randn(33, 1001, generator=torch.Generator().manual_seed(5)) * 4
    min_p = torch.tensor([0.0, 0.02, 0.3] * 11, dtype=torch.float64)
    u = torch.rand(33, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch_threads(num_threads):
        batch_ids = sampling_kernels.sample_rows(logits, min_p, u)
        batch_lp = sampling_kernels.log_softmax_rows(logits)
        for i in range(33):
            for lo, hi in ((i, i + 1), (max(0, i - 5), min(33, i + 9))):
                ids = sampling_kernels.sample_rows(logits[lo:hi], min_p[lo:hi], u[lo:hi])
                assert ids[i - lo] == batch_ids[i]
                assert torch.equal(sampling_kernels.log_softmax_rows(logits[lo:hi])[i - lo],
                                   batch_lp[i])  # fmt: skip
    torch.testing.assert_close(batch_lp, torch.log_softmax(logits, -1), rtol=0, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize(
    ("params", "expected"),
    [({"temperature": 1.0}, PROBS), ({"temperature": 1.0, "min_p": 0.5}, [0.625, 0.375, 0.0])],
    ids=["t=1", "min_p=0.5"],
)
def test_per_row_sampled_frequencies_match_the_filtered_softmax(params, expected):
    logits = torch.tensor([[math.log(p) for p in PROBS]]).expand(NUM_DRAWS, 3)
    rows = [row(0, seed=seed, **params) for seed in range(NUM_DRAWS)]
    picks = [r.token_id for r in Sampler(0, batch_invariant=True)(logits.clone(), rows)]
    observed = [picks.count(i) / NUM_DRAWS for i in range(3)]
    assert observed == pytest.approx(expected, abs=0.04)
    assert all(got == 0.0 for got, want in zip(observed, expected, strict=True) if want == 0.0)
