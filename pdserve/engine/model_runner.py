"""The model runner: owns the model weights and the KV pool; turns a `SchedulerOutput` into
one forward pass and samples the rows that reach the end of their known tokens.

Batch layout per step: single-token rows (decodes) first, then prefill spans, all flattened
into `[T]` token ids with their positions and pool slots. The scheduler deals in block ids;
only this class touches tensors.

Batch-invariant mode (`EngineConfig.batch_invariant`): every token, prompt or decode, is laid
out as a single-token row attending over its own causal context in the pool (its position
+ 1 keys), so all rows go through the one per-row attention kernel; the model's products
and norms run on the batch-invariant kernels, and the sampler works row by row. A row's
logits then depend on its tokens alone, not on the batch, chunk or step it ran in.

The KV pool is one tensor `[num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads,
head_dim]`, zero-filled at start (see `model/attention.py` for why zeros) and allocated once:
later issues back it with shared memory so a prefill worker can write into it directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler, SampleResult, SamplingRow
from pdserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from pdserve.errors import ConfigError
from pdserve.model import cpu_blas, cpu_malloc, kernels
from pdserve.model.attention import AttentionMetadata, PrefillSpan, causal_mask_with_context
from pdserve.model.loader import load_model

logger = logging.getLogger(__name__)

# Makes the KV pool for a block count (e.g. in shared memory for the shm transfer backend);
# it must return zeros shaped `[L, 2, num_blocks, block_size, Hkv, D]` on the engine's device.
KVAllocator = Callable[[int], torch.Tensor]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_block_bytes(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers (keys and values)."""
    per_token = 2 * model_config.num_kv_heads * model_config.head_dim * dtype.itemsize
    return model_config.num_layers * block_size * per_token


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        max_model_len: int,
        kv_allocator: KVAllocator | None = None,
    ) -> None:
        self.config = engine_config
        self.model_config = model_config
        self.device = _checked_device(engine_config.device)
        self.dtype = DTYPES[engine_config.dtype]
        self.block_size = engine_config.block_size
        self._warn_if_bf16_is_emulated()
        self.batch_invariant = engine_config.batch_invariant
        if self.batch_invariant:
            _check_batch_invariant_kernels()
        self.model = load_model(
            model_dir,
            self.dtype,
            self.device,
            max_model_len,
            model_config,
            self.batch_invariant,
            engine_config.quantization,
        )
        self.num_blocks = self._decide_num_blocks()
        self.kv_cache = (kv_allocator or self._allocate_kv_cache)(self.num_blocks)
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        self.sampler = Sampler(engine_config.seed, self.batch_invariant)
        self.num_threads = engine_config.num_threads or torch.get_num_threads()
        self._torch_threads = torch.get_num_threads()
        if self.device.type == "cpu":
            cpu_malloc.tune_malloc()
            cpu_blas.set_num_threads(self.num_threads)
            kernels.set_num_threads(self.num_threads)
            # Build (or load) the C kernels now, not inside the first step: a compile there
            # can take seconds on a busy machine and stall the engine loop with a request in it.
            kernels.is_available()

    def _warn_if_bf16_is_emulated(self) -> None:
        if self.device.type != "cpu" or self.dtype != torch.bfloat16:
            return
        flags = kernels.cpu_flags()
        # With the C kernels a bfloat16 model computes in float32 on any CPU (model/llama.py).
        emulated = flags and "avx512_bf16" not in flags and "amx_bf16" not in flags
        if emulated and not kernels.is_available():
            logger.warning(
                "this CPU has no bfloat16 instructions (AVX512-BF16/AMX) and the C kernels are "
                "not built: torch emulates bfloat16 matmuls, several times slower than "
                "float32; prefer dtype=float32"
            )

    def _decide_num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        block_bytes = kv_block_bytes(self.model_config, self.block_size, self.dtype)
        return max(1, int(self.config.kv_cache_memory_gib * 2**30) // block_bytes)

    def _allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        c = self.model_config
        shape = (c.num_layers, 2, num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        logger.info("KV pool: %d blocks of %d tokens, %s", num_blocks, self.block_size, shape)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    # ---- one step ------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self, output: SchedulerOutput, after_layer: Callable[[int], None] | None = None
    ) -> dict[str, SampleResult]:
        """Run the scheduled tokens; return the sampled token of each request that yields one.
        `after_layer(i)` is called when layer i's KV is in the pool (see the model)."""
        batch = self._prepare(output.scheduled)
        self._assign_threads(len(batch.input_ids))
        hidden = self.model(
            batch.input_ids, batch.positions, self.kv_caches, batch.meta, after_layer
        )
        if not batch.sampling:
            return {}
        if len(hidden) > len(batch.sampling):  # a model that returned every row
            hidden = hidden[batch.logits_indices]
        logits = self.model.compute_logits(hidden)
        rows = [_sampling_row(item.request) for item in batch.sampling]
        results = self._sample(logits, rows)
        return {
            item.request.request_id: result
            for item, result in zip(batch.sampling, results, strict=True)
        }

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        """Sample every row at once; if that raises, each row alone, so one request's
        parameters that break the sampler fail that request only (`SampleResult.error`)
        and the rest of the batch still gets its tokens."""
        try:
            return self.sampler(logits, rows)
        except Exception as e:
            if len(rows) == 1:
                logger.warning("sampling failed: %r", e)
                return [SampleResult(0, error=f"sampling failed: {e!r}")]
            logger.warning("sampling a batch failed (%r); sampling its rows one by one", e)
        return [self._sample(logits[i : i + 1], [row])[0] for i, row in enumerate(rows)]

    def _assign_threads(self, num_tokens: int) -> None:
        """Give the cores to whichever thread pool does this step's heavy work.

        Steps whose products all run on OpenBLAS (one decode row under the default `auto`
        backend; up to 64 rows under `openblas`, see `cpu_blas`) leave torch one thread:
        its OpenMP threads would otherwise wait on the cores OpenBLAS and the attention
        kernel use (measured: batch-32 decode 160 ms/step with both pools at 2 threads,
        60 ms with torch at 1). Every other step (oneDNN products, which run on torch's
        threads) gives torch every thread.
        """
        if self.device.type != "cpu" or not self.model.max_blas_rows:
            return
        wanted = 1 if num_tokens <= self.model.max_blas_rows else self.num_threads
        if wanted != self._torch_threads:
            torch.set_num_threads(wanted)
            self._torch_threads = wanted

    def reset_threads(self) -> None:
        """Give torch back all the engine's threads (call when the engine goes idle, so
        torch code outside pdserve is not left with one thread)."""
        if self._torch_threads != self.num_threads:
            torch.set_num_threads(self.num_threads)
            self._torch_threads = self.num_threads

    def _prepare(self, scheduled: list[ScheduledRequest]) -> _Batch:
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        logits_indices: list[int] = []
        sampling: list[ScheduledRequest] = []
        for item in decodes + prefills:
            end = item.start + item.num_new_tokens
            input_ids += item.request.token_ids(item.start, end)
            positions += range(item.start, end)
            if item.is_sampling:
                logits_indices.append(len(input_ids) - 1)
                sampling.append(item)
        device = self.device
        positions_t = torch.tensor(positions, dtype=torch.int64, device=device)
        meta = AttentionMetadata(
            slot_mapping=self._slot_mapping(decodes + prefills),
            num_decode_tokens=len(decodes),
        )
        if self.batch_invariant:
            self._prepare_rows(decodes + prefills, meta)
        else:
            if decodes:
                self._prepare_decodes(decodes, meta)
            meta.prefills = self._prepare_prefills(prefills, start=len(decodes))
        logits_indices_t = torch.tensor(logits_indices, dtype=torch.int64, device=device)
        if len(sampling) < len(input_ids):  # a pure decode step keeps every row
            self._prepare_output_rows(sampling, logits_indices_t, meta)
        return _Batch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
            positions=positions_t,
            meta=meta,
            logits_indices=logits_indices_t,
            sampling=sampling,
        )

    def _prepare_output_rows(
        self, sampling: list[ScheduledRequest], rows: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Only the sampled rows go on past the last layer's attention (see the model)."""
        size = self.block_size
        lens = [s.start + s.num_new_tokens for s in sampling]
        tables = [s.request.block_ids[: -(-n // size)] for s, n in zip(sampling, lens, strict=True)]
        width = max(map(len, tables), default=0)
        meta.output_rows = rows
        meta.output_block_tables = torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=self.device
        ).view(len(tables), width)
        meta.output_context_lens = torch.tensor(lens, dtype=torch.int64, device=self.device)

    def _slot_mapping(self, items: list[ScheduledRequest]) -> torch.Tensor:
        size = self.block_size
        slots: list[int] = []
        for item in items:
            block_ids = item.request.block_ids
            for p in range(item.start, item.start + item.num_new_tokens):
                slots.append(block_ids[p // size] * size + p % size)
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def _prepare_decodes(self, decodes: list[ScheduledRequest], meta: AttentionMetadata) -> None:
        max_blocks = max(len(d.request.block_ids) for d in decodes)
        tables = [
            d.request.block_ids + [0] * (max_blocks - len(d.request.block_ids)) for d in decodes
        ]
        meta.decode_block_tables = torch.tensor(tables, dtype=torch.int64, device=self.device)
        meta.decode_context_lens = torch.tensor(
            [d.start + 1 for d in decodes], dtype=torch.int64, device=self.device
        )

    def _prepare_rows(self, items: list[ScheduledRequest], meta: AttentionMetadata) -> None:
        """Batch-invariant mode: every token a single-token row over its causal context (the
        kernel reads only the first ceil(len / block_size) entries of a row's table)."""
        size = self.block_size
        tables = [s.request.block_ids[: -(-(s.start + s.num_new_tokens) // size)] for s in items]
        width = max(map(len, tables))
        per_item = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
        counts = torch.tensor([s.num_new_tokens for s in items], dtype=torch.int64)
        lens = [p + 1 for s in items for p in range(s.start, s.start + s.num_new_tokens)]
        meta.num_decode_tokens = len(lens)
        meta.decode_block_tables = per_item.repeat_interleave(counts, dim=0).to(self.device)
        meta.decode_context_lens = torch.tensor(lens, dtype=torch.int64, device=self.device)

    def _prepare_prefills(self, prefills: list[ScheduledRequest], start: int) -> list[PrefillSpan]:
        spans = []
        size = self.block_size
        for item in prefills:
            context_len = item.start + item.num_new_tokens
            table = item.request.block_ids[: -(-context_len // size)]
            span = PrefillSpan(
                start=start,
                query_len=item.num_new_tokens,
                context_len=context_len,
                block_table=torch.tensor(table, dtype=torch.int64, device=self.device),
            )
            if not span.is_fresh:
                span.mask = causal_mask_with_context(span.query_len, context_len, self.device)
            spans.append(span)
            start += item.num_new_tokens
        return spans


class _Batch:
    __slots__ = ("input_ids", "logits_indices", "meta", "positions", "sampling")

    def __init__(self, input_ids, positions, meta, logits_indices, sampling) -> None:
        self.input_ids = input_ids  # [T]
        self.positions = positions  # [T]
        self.meta = meta
        self.logits_indices = logits_indices  # [S]
        self.sampling = sampling  # the S scheduled requests that yield a token


def _sampling_row(request: Request) -> SamplingRow:
    params = request.sampling_params
    blocked: tuple[int, ...] = ()
    if request.num_output_tokens < params.min_tokens:
        eos = () if params.ignore_eos else request.eos_token_ids
        blocked = eos + params.stop_token_ids
    return SamplingRow(params, request.num_output_tokens, blocked)


def _check_batch_invariant_kernels() -> None:
    from pdserve.model.kernels import invariant

    if not invariant.is_available():
        raise ConfigError(
            "batch_invariant",
            "needs the C kernels, which could not be built here (a C compiler is required; "
            "PDSERVE_DISABLE_KERNELS must be unset)",
        )


def _checked_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError("device", f"{name!r} is not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but CUDA is not available here")
    return device
