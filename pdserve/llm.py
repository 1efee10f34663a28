"""The offline API, shaped like vLLM's `LLM` so that scripts switch by changing one import:

from pdserve import LLM, SamplingParams
llm = LLM()                                   # the built-in model
outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdserve.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine, PromptType
from pdserve.errors import InvalidRequestError
from pdserve.outputs import RequestOutput
from pdserve.sampling_params import SamplingParams


class LLM:
    """Generate offline from a local Hugging Face folder, or the built-in model if none."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int = 0,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gib: float = 2.0,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        num_threads: int | None = None,
        skip_tokenizer_init: bool = False,
        kv_host_cache_gib: float = 0.0,
        kv_disk_cache_dir: str | None = None,
        kv_disk_cache_gib: float = 16.0,
        kv_redis_url: str | None = None,
        kv_tier_dtype: str = "auto",
        kv_tier_admission: str = "all",
        kv_tier_admission_threshold: int = 2,
        batch_invariant: bool = False,
        quantization: str | None = None,
    ) -> None:
        if model is None:
            from pdserve.model.builtin import ensure_builtin_model

            model = ensure_builtin_model()
        config = EngineConfig(
            dtype=dtype,
            device=device,
            seed=seed,
            max_model_len=max_model_len,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory_gib=kv_cache_memory_gib,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            enable_prefix_caching=enable_prefix_caching,
            num_threads=num_threads,
            kv_host_cache_gib=kv_host_cache_gib,
            kv_disk_cache_dir=kv_disk_cache_dir,
            kv_disk_cache_gib=kv_disk_cache_gib,
            kv_redis_url=kv_redis_url,
            kv_tier_dtype=kv_tier_dtype,
            kv_tier_admission=kv_tier_admission,
            kv_tier_admission_threshold=kv_tier_admission_threshold,
            batch_invariant=batch_invariant,
            quantization=quantization,
        )
        self.engine = LLMEngine(model, config, skip_tokenizer_init)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Write cached KV down to the persistent tiers (if any) and stop their writers."""
        self.engine.core.close()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in the order given."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params_list = _per_prompt(sampling_params, len(prompts), "sampling_params")
        priorities = _per_prompt(priority, len(prompts), "priority", default=0)
        request_ids = []
        try:
            for prompt, params, prio in zip(prompts, params_list, priorities, strict=True):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, params or SamplingParams(), prio)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tokenizer = self.engine.tokenizer
        prompts = [
            {
                "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False),
                "prompt": text,
            }
            for text in (
                tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt)
                for c in conversations
            )
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = _progress_bar(len(request_ids)) if use_tqdm else None
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in request_ids:  # leave the engine clean for the next call
                if request_id not in finished:
                    self.engine.abort_request(request_id)
            raise
        finally:
            self.engine.core.runner.reset_threads()
            if bar is not None:
                bar.close()
        return [finished[request_id] for request_id in request_ids]


def _per_prompt(value, count: int, name: str, default=None) -> list:
    if value is None or not isinstance(value, (list, tuple)):
        return [value if value is not None else default] * count
    if len(value) != count:
        raise InvalidRequestError(f"{name} has {len(value)} entries for {count} prompts", name)
    return list(value)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)
