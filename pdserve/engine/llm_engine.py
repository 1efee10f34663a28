"""`LLMEngine`: text in, `RequestOutput`s out — tokenizer + engine core + output processor.

The offline `LLM` class drives it in a loop; a serving worker runs only the core and lets
the router do the text side.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.core import EngineCore
from pdserve.engine.output_processor import OutputProcessor
from pdserve.errors import InvalidRequestError, RequestFailedError
from pdserve.outputs import RequestOutput
from pdserve.sampling_params import SamplingParams, child_params
from pdserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# A prompt: text, or a dict with "prompt_token_ids" (and optionally "prompt" text).
PromptType = str | dict[str, Any]


class LLMEngine:
    def __init__(
        self, model_dir: str | Path, config: EngineConfig, skip_tokenizer_init: bool = False
    ) -> None:
        model_dir = Path(model_dir)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.model_dir = model_dir
        self.config = config
        self.model_config = ModelConfig.from_pretrained(model_dir)
        # Without a tokenizer, prompts must be token ids and outputs carry no text.
        self.tokenizer = None if skip_tokenizer_init else Tokenizer.from_pretrained(model_dir)
        self.core = EngineCore(model_dir, self.model_config, config)
        self.processor = OutputProcessor(self.tokenizer)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
    ) -> None:
        if request_id in self.processor.states:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        text, token_ids = self.tokenize_prompt(prompt)
        self.core.validate_request(token_ids, params)  # fail before tracking anything
        child_ids = self.processor.add_request(request_id, text, token_ids, params)
        for index, child_id in enumerate(child_ids):
            self.core.add_request(child_id, token_ids, child_params(params, index), priority)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "text prompts need a tokenizer (skip_tokenizer_init is set)", "prompt"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not all(isinstance(t, int) for t in token_ids):
                raise InvalidRequestError("prompt_token_ids must be a list of integers", "prompt")
            return prompt.get("prompt"), list(token_ids)
        raise InvalidRequestError(
            "a prompt is a string or a dict with 'prompt_token_ids'", "prompt"
        )

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.processor.abort_request(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.processor.process(self.core.step())
        if stopped:
            self.core.abort_requests(stopped)
        failures = self.core.take_failures()
        if failures:  # one engine, nowhere to move them: their requests fail
            for child_id in {f.request_id for f in failures}:
                self.abort_request(child_id.partition("#")[0])  # child_request_id's parent
            raise RequestFailedError("; ".join(f"{f.request_id}: {f.message}" for f in failures))
        return outputs
