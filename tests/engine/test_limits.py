"""`check_request` refuses non-finite floats and integers past 64 bits, so an offline
`LLM` user (and any worker) is protected like the HTTP edge is."""

from __future__ import annotations

import math

import pytest

from pdserve.engine.limits import check_request
from pdserve.errors import InvalidRequestError
from pdserve.sampling_params import SamplingParams

LIMITS = {"max_model_len": 64, "vocab_size": 100}


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 1e400}, "temperature"),  # what JSON's 1e400 parses to
        ({"temperature": 1e39}, "temperature"),  # inf once the sampler makes it float32
        ({"top_k": 2**64}, "top_k"),
        ({"seed": 2**80}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop_token_ids": (2**64,)}, "stop_token_ids"),
    ],
)
def test_out_of_range_values_name_their_parameter(changes, param):
    params = SamplingParams(max_tokens=4, **changes)
    with pytest.raises(InvalidRequestError) as info:
        check_request([1, 2, 3], params, **LIMITS)
    assert info.value.param == param


def test_int64_edges_are_accepted():
    params = SamplingParams(max_tokens=4, seed=2**63 - 1, top_k=2**63 - 1, temperature=1e6)
    assert check_request([1, 2, 3], params, **LIMITS) == 4
    assert check_request([1], SamplingParams(max_tokens=2, seed=-(2**63)), **LIMITS) == 2


def test_offline_llm_refuses_infinite_temperature(builtin_model_dir):
    from pdserve import LLM

    llm = LLM(builtin_model_dir, max_model_len=64, num_kv_blocks=16, num_threads=1)
    with pytest.raises(InvalidRequestError) as info:
        llm.generate("Hello", SamplingParams(temperature=math.inf, min_tokens=2), use_tqdm=False)
    assert info.value.param == "temperature"
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate("Hello", greedy, use_tqdm=False)[0].outputs[0].token_ids) == 4
