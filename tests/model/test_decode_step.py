"""The fused decode step (`kernels/decode_step.c`) against the layer-by-layer path it stands
in for: the same hidden states, logits and KV pool, bit for bit, for every model kind it
takes, float32 and 16-bit weights, 1 to the most rows it takes, on this CPU's kernels and on
the AVX2 build (on AVX-512 hosts too); and the steps it does not take fall back."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.model import kernels
from pdserve.model.attention import AttentionMetadata, PrefillSpan
from pdserve.model.kernels import gemv
from pdserve.model.loader import load_model
from tests.helpers import MODEL_KINDS, make_hf_model_dir, torch_threads

pytestmark = pytest.mark.skipif(not gemv.is_available(), reason="C kernels unavailable")

FUSED_KINDS = [kind for kind in MODEL_KINDS if kind != "qwen3_qk_norm"]
ISAS = ["native"] + (["avx2"] if "avx512f" in kernels.cpu_flags() else [])
BLOCK_SIZE, NUM_BLOCKS, MAX_LEN = 16, 64, 512


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: make_hf_model_dir(root, kind) for kind in MODEL_KINDS}


@contextlib.contextmanager
def kernels_built_for(isa: str):
    """Load models with the C kernels of `isa` (as `decode_roofline.py` switches them)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PDSERVE_KERNELS_ISA", "" if isa == "native" else isa)
    kernels._library.cache_clear()
    gemv.library.cache_clear()
    try:
        yield
    finally:
        mp.undo()
        kernels._library.cache_clear()
        gemv.library.cache_clear()


def count_calls(fused) -> list[int]:
    """The rows of every fused call from now on."""
    calls, real = [], fused.fn
    fused.fn = lambda *args: calls.append(args[5]) or real(*args)
    return calls


def random_pool(model, dtype: torch.dtype, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A pool full of random keys and values (attention reads whatever is there)."""
    cfg = model.config
    shape = (cfg.num_layers, 2, NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(shape, generator=gen).to(dtype)
    return [(layer[0], layer[1]) for layer in pool]


def decode_batch(rows: int, seed: int):
    """Token ids, positions and metadata of `rows` decodes over distinct blocks, contexts of
    1 to ~300 tokens (block-aligned and not)."""
    gen = torch.Generator().manual_seed(seed)
    lens = [1 + int(n) for n in torch.randint(0, 300, (rows,), generator=gen)]
    lens[0] = 2 * BLOCK_SIZE  # a context that ends on a block boundary
    blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, start = [], 0
    for n in lens:
        need = -(-n // BLOCK_SIZE)
        tables.append(blocks[start : start + need])
        start = (start + need) % (NUM_BLOCKS - 20)
    width = max(map(len, tables))
    padded = [t + [0] * (width - len(t)) for t in tables]
    slots = [
        t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
        for t, n in zip(tables, lens, strict=True)
    ]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=rows,
        decode_block_tables=torch.tensor(padded),
        decode_context_lens=torch.tensor(lens),
    )
    ids = torch.randint(0, 512, (rows,), generator=gen)
    return ids, torch.tensor([n - 1 for n in lens]), meta


def both_paths(model, dtype, rows: int, seed: int):
    """(hidden, pool) after one decode step, fused and layer by layer, from the same start."""
    results = []
    fused = model.fused_decode
    for use in (fused, None):
        model.fused_decode = use
        pool = random_pool(model, dtype, seed)
        ids, positions, meta = decode_batch(rows, seed)
        hidden = model(ids, positions, pool, meta)
        results.append((hidden, torch.stack([torch.stack(kv) for kv in pool])))
    model.fused_decode = fused
    return results


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_step_equals_the_layer_path_bit_for_bit(model_dirs, kind, dtype, isa):
    with kernels_built_for(isa):
        model = load_model(model_dirs[kind], dtype, "cpu", MAX_LEN)
        fused = model.fused_decode
        assert fused is not None
        calls = count_calls(fused)
        for rows in sorted({1, 2, 3, fused.max_rows}):
            (hidden, pool), (ref_hidden, ref_pool) = both_paths(model, dtype, rows, seed=rows)
            assert hidden.dtype == torch.float32 and hidden.shape == ref_hidden.shape
            assert torch.equal(hidden, ref_hidden), f"{rows} rows: hidden states differ"
            assert torch.equal(pool, ref_pool), f"{rows} rows: KV pools differ"
            logits = fused.logits_of(hidden)  # the C call's LM head product
            assert logits is not None and torch.equal(logits, model.compute_logits(ref_hidden))
        assert calls == sorted({1, 2, 3, fused.max_rows})  # the fused call did each step


def test_steps_it_does_not_take_fall_back(model_dirs):
    model = load_model(model_dirs["llama_gqa_llama3"], torch.float32, "cpu", MAX_LEN)
    fused = model.fused_decode
    pool = random_pool(model, torch.float32, 0)
    ids, positions, meta = decode_batch(fused.max_rows + 1, 0)
    assert fused(ids, positions, pool, meta) is None  # more rows than the gemv kernel takes
    ids, positions, meta = decode_batch(2, 0)
    meta.num_decode_tokens = 1  # the second row is a (one-token) prefill span
    meta.prefills = [PrefillSpan(1, 1, 5, torch.tensor([3]))]
    assert fused(ids, positions, pool, meta) is None
    _, positions, meta = decode_batch(2, 0)
    meta.output_rows = torch.tensor([1])
    assert fused(ids, positions, pool, meta) is None
    _, positions, meta = decode_batch(2, 0)
    handle = model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert fused(ids, positions, pool, meta) is None  # it would skip the hook
    handle.remove()
    assert fused(ids, positions, pool, meta) is not None
    qk_norm = load_model(model_dirs["qwen3_qk_norm"], torch.float32, "cpu", MAX_LEN)
    assert qk_norm.fused_decode is None  # its q/k norms run in torch: not fused


def test_fused_decode_can_be_turned_off(model_dirs, monkeypatch):
    monkeypatch.setenv("PDSERVE_FUSED_DECODE", "0")
    assert load_model(model_dirs["llama_mha"], torch.float32, "cpu", MAX_LEN).fused_decode is None


def test_bad_slot_position_and_token_raise_like_the_layer_path(model_dirs):
    model = load_model(model_dirs["llama_mha"], torch.float32, "cpu", MAX_LEN)
    pool = random_pool(model, torch.float32, 0)
    ids, positions, meta = decode_batch(2, 0)
    meta.slot_mapping = torch.tensor([0, NUM_BLOCKS * BLOCK_SIZE])
    with pytest.raises(IndexError, match="KV slot out of range"):
        model(ids, positions, pool, meta)
    ids, positions, meta = decode_batch(2, 0)
    with pytest.raises(IndexError, match="position outside the RoPE tables"):
        model(ids, torch.tensor([0, MAX_LEN]), pool, meta)
    with pytest.raises(IndexError, match="token id outside the embedding table"):
        model(torch.tensor([0, model.config.vocab_size]), positions, pool, meta)


def test_engine_decodes_through_it_with_the_same_tokens_and_logprobs(model_dirs, monkeypatch):
    """End to end: greedy tokens and logprobs with and without the fused step are equal."""
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 17)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outputs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("PDSERVE_FUSED_DECODE", flag)
        llm = LLM(model=str(model_dirs["llama_biases"]), num_threads=1, num_kv_blocks=64,
                  skip_tokenizer_init=True)  # fmt: skip
        fused = llm.engine.core.runner.model.fused_decode
        assert (fused is not None) == (flag == "1")
        calls = count_calls(fused) if fused is not None else []
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outputs[flag] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in results]
        assert len(calls) >= 11 if flag == "1" else not calls  # every pure-decode step
    assert outputs["1"] == outputs["0"]
