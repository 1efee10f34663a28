"""8-bit weights (`quantization="int8"`, pdserve/model/quant.py).

- the format: every weight within half its group's scale of the original; rows and groups
  independent; odd input sizes; all-zero groups;
- the engine with int8 weights generates, greedily, exactly what transformers generates
  with the same quantised weights dequantised back to float32 (an independent torch
  implementation of the same quantised model). Exact because the tiny test models' top-2
  logit gaps (~2e-3 and more, see tests/helpers.py) dwarf the float32 summation-order
  differences between the two (~1e-5);
- configuration: flags, YAML, `LLM(...)`, and a ConfigError for a bad value.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from pdserve import LLM, SamplingParams
from pdserve.cli import build_parser
from pdserve.config import EngineConfig
from pdserve.errors import ConfigError
from pdserve.model import quant
from pdserve.serve import ServeConfig
from tests.helpers import hf_model_greedy, make_hf_model_dir, torch_threads

NUM_NEW_TOKENS = 12


def test_round_trip_within_half_a_scale_per_group():
    torch.manual_seed(0)
    w = torch.randn(37, 101) * torch.rand(37, 1) * 3  # rows of different magnitudes
    w[5] = 0.0  # an all-zero row: scale 0, codes 0
    w[6, 40:64] = 0.0  # a zero stretch inside a row (part of a group)
    w[7, 3] = 50.0  # an outlier spoils its own group's scale only
    q, scales, group = quant.quantize_int8(w)
    assert (q.dtype, q.shape, scales.shape, group) == (torch.int8, (37, 101), (37, 4), 32)
    assert int(q.abs().max()) <= 127
    back = quant.dequantize_int8(quant.Int8Weight(q, scales, group))
    bound = scales.repeat_interleave(32, dim=1)[:, :101] / 2
    assert torch.all((back - w).abs() <= bound * (1 + 1e-6) + 1e-12)
    assert torch.equal(back[5], torch.zeros(101)) and torch.equal(back[6, 40:64], w[6, 40:64])
    # each group's largest weight is exact up to float rounding (code +-127)
    assert torch.allclose(scales[7, 0], torch.tensor(50.0 / 127))
    assert torch.allclose(scales[7, 1:], w[7, 32:].abs().view(-1).max() / 127, rtol=1.0)
    assert (back[7, 32:] - w[7, 32:]).abs().max() < 0.01 * w.abs().max()


def test_group_size_is_the_whole_row_for_per_channel():
    w = torch.randn(8, 64)
    _, scales, _ = quant.quantize_int8(w, group_size=64)
    assert scales.shape == (8, 1)
    assert torch.allclose(scales[:, 0], w.abs().amax(1) / 127)


# ---- the kernel against a float64 reference -------------------------------------------------

ISAS = {"native": None, "avx2": ("-mno-avx512f",)}  # the AVX2 tiles run on AVX-512 hosts too
# (out, in): odd panels, tails of groups and of the kernel's 256-k blocks
SHAPES = [(64, 96), (100, 70), (33, 5), (17, 300), (48, 64), (40, 600)]
# every row count a tile split can produce, then prefill-sized ones
ROW_COUNTS = [*range(1, 41), 64, 131]


@pytest.fixture(scope="module", params=list(ISAS))
def kernel_lib(request):
    lib = (
        quant._kernel() if ISAS[request.param] is None else quant.build_variant(ISAS[request.param])
    )
    if lib is None:
        pytest.skip("the C kernels cannot be built here (no compiler)")
    return lib


def reference(x: torch.Tensor, weight: quant.Int8Weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 product on the dequantised weight, and a bound on float32 rounding:
    a sum of K products in float32 is off by at most ~K eps times the sum of |terms|."""
    w = quant.dequantize_int8(weight).double()
    exact = x.double() @ w.T + (0 if bias is None else bias.double())
    terms = x.double().abs() @ w.abs().T + (0 if bias is None else bias.double().abs())
    return exact, 2 * (x.shape[1] + 2) * 2**-24 * terms + 1e-30


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("group_size", [32, 0])  # 0: per channel (one group per row)
@pytest.mark.parametrize(
    "blocked_from,dequantized_from",
    [
        (quant.BLOCKED_MIN_ROWS, quant.DEQUANTIZED_MIN_ROWS),
        (1, 1 << 40),
        (1 << 40, 1 << 40),
        (1 << 40, 1),
    ],
    ids=["default", "blocked", "tiles", "dequantized"],
)
def test_kernel_matches_float64_for_every_row_count(
    kernel_lib, out_features, in_features, group_size, blocked_from, dequantized_from, monkeypatch
):
    # each path on every row count
    monkeypatch.setattr(quant, "BLOCKED_MIN_ROWS", blocked_from)
    monkeypatch.setattr(quant, "DEQUANTIZED_MIN_ROWS", dequantized_from)
    gen = torch.Generator().manual_seed(out_features * 1000 + in_features)
    w = torch.randn(out_features, in_features, generator=gen)
    weight = quant.quantize_int8(w, group_size or in_features)
    bias = torch.randn(out_features, generator=gen) if out_features % 2 == 0 else None
    packed = quant.PackedInt8(weight, kernel_lib)
    x_all = torch.randn(131, in_features + 3, generator=gen)[:, 2 : 2 + in_features]  # strided
    for rows in ROW_COUNTS:
        x = x_all[:rows]
        got = packed(x, bias)
        exact, bound = reference(x, weight, bias)
        assert got.shape == (rows, out_features)
        assert torch.all((got.double() - exact).abs() <= bound), f"{rows} rows"


def test_layer_on_either_path_and_dtype_gives_the_same_product():
    gen = torch.Generator().manual_seed(3)
    w, bias = torch.randn(80, 72, generator=gen), torch.randn(80, generator=gen)
    x = torch.randn(2, 3, 72, generator=gen)  # leading dims kept
    fallback = quant.Int8Linear.quantize(w, bias, lib=None)
    exact, bound = reference(x.view(6, 72), quant.quantize_int8(w), bias)
    assert fallback.packed is None
    assert torch.all((fallback(x).view(6, 80).double() - exact).abs() <= bound)
    if quant._kernel() is not None:
        layer = quant.Int8Linear.quantize(w, bias, quant._kernel())
        assert layer.weight is None and layer(x).shape == (2, 3, 80)
        assert torch.all((layer(x).view(6, 80).double() - exact).abs() <= bound)
        y16 = layer(x.bfloat16())  # bfloat16 activations: computed in float32, cast back
        assert y16.dtype == torch.bfloat16
        assert torch.allclose(y16.float(), layer(x.bfloat16().float()).bfloat16().float())


# ---- the engine against transformers with the same quantised weights ----------------------


def dequantized_hf_model(model_dir):
    """transformers' model with every projection and the LM head replaced by
    dequant(quant(W)) — the embedding stays float32, as pdserve keeps it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                dq = quant.dequantize_int8(quant.quantize_int8(module.weight))
                module.weight = torch.nn.Parameter(dq, requires_grad=False)  # unties lm_head
    return model.eval()


def prompts() -> list[list[int]]:
    lengths = (1, 5, 16, 17, 40, 90)
    return [[(13 * i + 7 * j) % 509 + 2 for j in range(n)] for i, n in enumerate(lengths)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize(
    "kind,kernel",
    [
        ("llama_gqa_llama3", True),
        ("qwen2_tied", True),
        ("llama_biases", True),
        ("llama_gqa_llama3", False),  # the torch fallback (no compiler, or another device)
    ],
)
def test_engine_matches_transformers_on_the_dequantized_weights(
    kind, kernel, tmp_path, monkeypatch
):
    if not kernel:
        monkeypatch.setattr(quant, "_kernel", lambda: None)
    model_dir = make_hf_model_dir(tmp_path, kind)
    expected = hf_model_greedy(dequantized_hf_model(model_dir), prompts(), NUM_NEW_TOKENS)
    llm = LLM(model_dir, skip_tokenizer_init=True, num_kv_blocks=128, quantization="int8")
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    model = llm.engine.core.runner.model
    linears = [m for m in model.modules() if isinstance(m, quant.Int8Linear)]
    assert len(linears) == 4 * model.config.num_layers  # qkv, o, gate_up, down
    on_kernel = kernel and quant._kernel() is not None
    assert all((m.packed is not None) == on_kernel for m in linears)
    assert model.embed_tokens.numel() > 0  # kept for lookups (tied or not)


@pytest.mark.gpu
def test_torch_fallback_on_cuda():
    w, x = torch.randn(64, 96, device="cuda"), torch.randn(5, 96, device="cuda")
    layer = quant.Int8Linear.quantize(w, None, lib=quant._kernel())  # ignored off CPU
    assert layer.packed is None and layer.weight.q.device.type == "cuda"
    exact, bound = reference(x.cpu(), quant.quantize_int8(w.cpu()), None)
    assert torch.all((layer(x).cpu().double() - exact).abs() <= bound * 4)


# ---- configuration -------------------------------------------------------------------------


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(quantization="int4")
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(quantization="int8", batch_invariant=True)
    with pytest.raises(ConfigError, match=r"engine_decode\.quantization"):
        ServeConfig.from_dict({"engine_decode": {"quantization": 8}})
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        build_parser().parse_args(["generate", "--quantization", "int4"])


def test_flags_and_yaml_reach_the_engine_config(tmp_path):
    def serve(*argv: str) -> ServeConfig:
        return ServeConfig.from_args(build_parser().parse_args(["serve", *argv]))

    assert serve().engine.quantization is None
    assert serve("--quantization", "int8").engine.quantization == "int8"
    path = tmp_path / "serve.yaml"
    path.write_text("engine_decode:\n  quantization: int8\n")
    config = serve("--config", str(path))
    assert config.engine_for("decode").quantization == "int8"
    assert config.engine_for("prefill").quantization is None
    with pytest.raises(ConfigError, match=r"engine_decode\.quantization"):
        path.write_text("engine_decode:\n  quantization: fp4\n")
        serve("--config", str(path))
    args = build_parser().parse_args(["worker", "--role", "decode", "--quantization", "int8"])
    assert args.quantization == "int8"
