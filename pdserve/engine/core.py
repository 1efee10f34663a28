"""The engine core: scheduler + model runner, token ids in and token ids out.

`step()` is the whole loop: schedule → execute → update. Text (tokenising, detokenising,
stop strings) lives a layer up, in `LLMEngine` offline or in the router when serving, so
that a worker process runs only this and exchanges token ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.kv_tiers import KVTierConnector
from pdserve.engine.limits import check_request
from pdserve.engine.model_runner import KVAllocator, ModelRunner
from pdserve.engine.request import Request
from pdserve.engine.scheduler import (
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from pdserve.engine.step_log import StepLog, step_shape
from pdserve.errors import ConfigError, InvalidRequestError
from pdserve.kv.events import AnyKVEvent
from pdserve.outputs import EngineCoreOutput
from pdserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.transfer.streamer import KVStreamer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestFailure:
    """A request the engine dropped: `retryable` when it was not the request's fault (the
    step it ran in failed), so another engine may run it again."""

    request_id: str
    message: str
    retryable: bool


def resolve_max_model_len(model_config: ModelConfig, engine_config: EngineConfig) -> int:
    limit = model_config.max_position_embeddings
    if model_config.sliding_window is not None:
        # Full attention beyond the window would not be the model's maths: stop there.
        limit = min(limit, model_config.sliding_window)
    requested = engine_config.max_model_len
    if requested is None:
        return limit
    if requested > limit:
        raise ConfigError(
            "max_model_len",
            f"{requested} exceeds the model's limit of {limit} positions",
        )
    return requested


DEFAULT_TOKEN_BUDGET = 2048


def resolve_token_budget(config: EngineConfig, max_model_len: int) -> int:
    budget = config.max_num_batched_tokens
    if config.enable_chunked_prefill:
        return budget or DEFAULT_TOKEN_BUDGET
    if budget is None:
        return max(DEFAULT_TOKEN_BUDGET, max_model_len)
    if budget < max_model_len:
        raise ConfigError(
            "max_num_batched_tokens",
            f"{budget} is below max_model_len={max_model_len}; without chunked prefill "
            "a whole prompt must fit in one step's budget",
        )
    return budget


class EngineCore:
    def __init__(
        self,
        model_dir: Path,
        model_config: ModelConfig,
        config: EngineConfig,
        kv_allocator: KVAllocator | None = None,
    ) -> None:
        self.model_config = model_config
        self.config = config
        self.max_model_len = resolve_max_model_len(model_config, config)
        budget = resolve_token_budget(config, self.max_model_len)
        self.token_budget = budget
        # The longest step this engine should take, predicted by `warmup` (0: unknown).
        self.predicted_max_step_s = 0.0
        self.runner = ModelRunner(model_dir, model_config, config, self.max_model_len, kv_allocator)
        # Prefill worker: streams KV of requests that have a destination (see transfer/).
        self.kv_streamer: KVStreamer | None = None
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            record_events=config.has_kv_tiers,  # the tiers need the evicted-block list
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=budget,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            self.block_manager,
        )
        self.requests: dict[str, Request] = {}
        self.failures: list[RequestFailure] = []
        self.step_log = StepLog.from_env(config.num_threads)  # PDSERVE_STEP_LOG: off unless set
        # Host RAM / disk / Redis below the device pool (kvstore/); None when none is on.
        self.kv_tiers: KVTierConnector | None = None
        if config.has_kv_tiers:
            self.kv_tiers = KVTierConnector.from_config(
                config, model_config, model_dir, self.block_manager, self.runner.kv_cache
            )
            self.scheduler.kv_tiers = self.kv_tiers

    # ---- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        kv_dest: object | None = None,
        output_token_ids: list[int] | None = None,
    ) -> Request:
        """Queue a request. With `kv_dest` (prefill worker) it stops after its first token
        and the `kv_streamer` sends its KV there. With `output_token_ids` it resumes a
        request that generated those tokens elsewhere (migration): prompt + outputs are
        recomputed, as after a preemption, and sampling continues at the next index."""
        request = self.make_request(
            request_id, prompt_token_ids, params, priority, arrival_time, output_token_ids
        )
        request.kv_dest = kv_dest
        self.requests[request_id] = request
        self.scheduler.add_request(request)
        return request

    def make_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        output_token_ids: list[int] | None = None,
    ) -> Request:
        """A validated `Request`, not yet queued."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        max_tokens = self.validate_request(prompt_token_ids, params)
        outputs = list(output_token_ids or ())
        if outputs:
            vocab = self.model_config.vocab_size
            if min(outputs) < 0 or max(outputs) >= vocab:
                raise InvalidRequestError(f"output token ids must be in [0, {vocab})")
            if len(outputs) >= max_tokens:
                raise InvalidRequestError("a resumed request has no output budget left")
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            eos_token_ids=self.model_config.eos_token_ids,
            max_tokens=max_tokens,
            priority=priority,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            output_token_ids=outputs,
        )

    # ---- decode worker: KV from a prefill worker ------------------------------------------

    def try_reserve(self, request: Request) -> bool:
        """Pin blocks for `request`'s prompt if there is room now; False if not."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if not self.scheduler.can_reserve(request):
            return False
        self.scheduler.reserve(request)
        if self.kv_tiers is not None:  # before the prefill worker overwrites reused blocks
            self.kv_tiers.save_evicted()
        self.requests[request.request_id] = request
        return True

    def finish_import(self, request_id: str, first_token_id: int | None, is_intact: bool) -> None:
        """The reserved request's KV arrived (`is_intact`) or will not; see the scheduler."""
        self.scheduler.finish_import(self.requests[request_id], first_token_id, is_intact)

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request can be served (prompt, ids, length, pool); return its max_tokens."""
        return check_request(
            prompt_token_ids,
            params,
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            block_size=self.config.block_size,
            num_blocks=self.block_manager.num_blocks,
        )

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        requests = [self.requests.pop(rid) for rid in request_ids if rid in self.requests]
        self.scheduler.abort_requests(requests)
        return [EngineCoreOutput(r.request_id, [], finish_reason="abort") for r in requests]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        if self.step_log is None:
            return self._step(None)
        wall, start = time.time(), time.perf_counter()
        marks: list = []  # [shape, perf_counter after schedule, after execute]
        outputs = self._step(marks)
        if len(marks) == 3:
            phases = (marks[1] - start, marks[2] - marks[1], time.perf_counter() - marks[2])
            self.step_log.record(wall, phases, marks[0])
        return outputs

    def _step(self, marks: list | None) -> list[EngineCoreOutput]:
        scheduled = self.scheduler.schedule()
        if self.kv_tiers is not None:
            self.kv_tiers.before_execute()  # save evicted blocks, load tier hits
        else:
            self.block_manager.drain_evicted()  # events on but no tier: nothing to save
        if scheduled.is_empty:
            return []
        if marks is not None:
            marks += [step_shape(scheduled.scheduled), time.perf_counter()]
        streamer = self.kv_streamer
        after_layer = streamer.begin_step(scheduled.scheduled) if streamer is not None else None
        try:
            results = self.runner.execute(scheduled, after_layer)
        except Exception as e:  # the whole step is lost; the engine's state is not
            ids = [item.request.request_id for item in scheduled.scheduled]
            logger.exception("engine step failed; failing its %d requests", len(ids))
            if streamer is not None:
                streamer.abandon_step()
            self._fail(ids, f"the engine step failed: {e!r}", retryable=True)
            return []
        if streamer is not None:
            streamer.end_step()
        if marks is not None:
            marks.append(time.perf_counter())
        failed = [rid for rid, result in results.items() if result.error is not None]
        sampled = {rid: r.token_id for rid, r in results.items() if r.error is None}
        outputs = []
        for request in self.scheduler.update_from_output(scheduled, sampled):
            result = results[request.request_id]
            logprobs = [result.logprobs] if result.logprobs is not None else None
            outputs.append(
                EngineCoreOutput(
                    request.request_id,
                    [result.token_id],
                    logprobs,
                    request.status.finish_reason,
                    request.stop_reason,
                    request.num_cached_tokens,
                    _queue_time(request),
                    first_index=request.num_output_tokens - 1,
                )
            )
            if request.is_finished:
                del self.requests[request.request_id]
        for rid in failed:  # its own parameters broke the sampler: retrying cannot help
            self._fail([rid], results[rid].error or "", retryable=False)
        return outputs

    def _fail(self, request_ids: list[str], message: str, retryable: bool) -> None:
        """Drop requests the engine cannot continue (blocks freed); `take_failures` says
        which and why, so the caller can fail or move them."""
        self.abort_requests(request_ids)
        self.failures += [RequestFailure(rid, message, retryable) for rid in request_ids]

    def take_failures(self) -> list[RequestFailure]:
        """Requests dropped by `step` since the last call."""
        failures, self.failures = self.failures, []
        return failures

    def fail_all(self, message: str) -> None:
        """Drop every request (the engine's state can no longer be trusted for them)."""
        self._fail(list(self.requests), message, retryable=True)

    # ---- start-up -------------------------------------------------------------------------

    def warmup(self) -> None:
        """Run the model once on a prefill-sized and a decode-sized batch, outside the
        scheduler, so that the first real request does not pay first-touch costs (weights
        paged in, BLAS and OpenMP thread pools started, kernels loaded): ~0.3 s for the
        built-in model on a CPU, which would otherwise land on one unlucky TTFT.

        It also predicts the longest step (`predicted_max_step_s`: the token budget at the
        warm-up prefill's rate), which the worker's liveness allows for.

        It writes KV into the first pool blocks, which no request holds yet (a serving
        worker calls this before it registers), and zeroes them after."""
        if self.requests:
            raise RuntimeError("warmup must run before any request is added")
        size = self.config.block_size
        num_tokens = min(2 * 64, self.max_model_len - 1)  # > cpu_blas.MAX_ROWS: prefill path
        num_blocks = -(-(num_tokens + 1) // size)
        if num_blocks > self.block_manager.num_blocks:
            return  # a pool this small serves nothing long enough to matter
        vocab = self.model_config.vocab_size
        request = Request(
            request_id="pdserve-warmup",
            prompt_token_ids=[(7 * i + 1) % vocab for i in range(num_tokens)],
            sampling_params=SamplingParams(temperature=0.0, max_tokens=2),
            max_tokens=2,
            block_ids=list(range(num_blocks)),
        )
        prefill = SchedulerOutput([ScheduledRequest(request, num_tokens, 0)])
        start = time.perf_counter()
        results = self.runner.execute(prefill)
        # A full step's prefill at this rate (first-touch costs make it generous).
        seconds_per_token = (time.perf_counter() - start) / num_tokens
        self.predicted_max_step_s = seconds_per_token * self.token_budget
        request.output_token_ids.append(results[request.request_id].token_id)
        self.runner.execute(SchedulerOutput([ScheduledRequest(request, 1, num_tokens)]))
        self.runner.kv_cache[:, :, :num_blocks].zero_()
        self.runner.reset_threads()

    # ---- KV tiers and events -------------------------------------------------------------

    def drain_kv_events(self) -> list[AnyKVEvent]:
        """KV events since the last call: the device pool's, then the tiers'."""
        events = self.block_manager.events.drain() if self.block_manager.events else []
        if self.kv_tiers is not None:
            events += self.kv_tiers.drain_events()
        return events

    def close(self, persist_kv: bool = True) -> None:
        """Stop background KV writers; with `persist_kv`, first write the cached KV down to
        the persistent tiers (disk, Redis) so a restarted engine finds it."""
        if self.step_log is not None:
            self.step_log.flush()
        if self.kv_tiers is not None:
            self.kv_tiers.close(persist=persist_kv)
            self.kv_tiers = None
            self.scheduler.kv_tiers = None


def _queue_time(request: Request) -> float | None:
    if request.num_output_tokens != 1 or request.first_scheduled_time is None:
        return None
    return max(0.0, request.first_scheduled_time - request.arrival_time)
