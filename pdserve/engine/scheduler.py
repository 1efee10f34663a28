"""The scheduler: which requests run in the next step, and how many tokens each.

One loop, no separate prefill and decode paths: every request has `num_computed_tokens`
catching up to `num_tokens`; each step gives it up to the remaining token budget. A long
prompt therefore spreads over several steps (chunked prefill) while decodes keep flowing.

Policy, in order:
1. Running requests first, most important first (priority, then arrival). When a request's
   next tokens need a block and none is free, the least important running request not yet
   scheduled this step is preempted (its blocks freed; it restarts later by recompute,
   usually helped by the prefix cache), possibly the request itself.
2. Then waiting requests, most important first, strictly in order (no skipping ahead), while
   there is budget, a free sequence slot (`max_num_seqs`) and room for their blocks. Their
   cached prefix is taken from the prefix cache, extended by blocks the KV tiers hold
   (`kv_tiers`, loaded before the step runs), and not computed again. No admissions in a
   step that had to preempt: the pool is under pressure.

Disaggregation adds two paths, both plain block bookkeeping:
- decode side: `reserve` pins blocks for a prompt whose KV a prefill worker will write
  (status WAITING_FOR_KV, outside the running list so it is never preempted): the cached
  prefix's blocks, shared (delta hand-over: only the rest is sent), and fresh ones;
  `finish_import` then makes it a running request that has computed its prompt and holds
  its first token, or — when the KV did not arrive intact — frees the blocks and queues it
  for recompute, exactly like a preempted request.
- prefill side: a request with a `kv_dest` finishes as FINISHED_HANDED_OFF after its first
  token unless that token already ends it.

For the simulator (`pdserve sim`), `decode_run_length` says how many of the next steps
would be the same decode batch and `advance_decodes` applies them at once, leaving the
state those steps would leave one by one.

The scheduler alone changes a request's status. It hands the runner plain data
(`SchedulerOutput`) and takes back the sampled token ids.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from pdserve.engine.kv_tiers import KVTierConnector


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    # Tokens [start, start + num_new_tokens) are computed this step.
    start: int = 0

    @property
    def is_sampling(self) -> bool:
        """True when this step reaches the request's last known token: it yields a token."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.running: list[Request] = []
        self._waiting: list[tuple[int, int, Request]] = []  # heap of (priority, seq, request)
        self._num_waiting = 0
        self._order: dict[str, int] = {}  # arrival sequence number, kept across preemption
        self._counter = itertools.count()
        self.reserved: dict[str, Request] = {}  # WAITING_FOR_KV, by request id
        # Prefix cache, over first admissions (vLLM's prefix_cache_queries/hits, tokens):
        # hits count the device pool and every KV tier below it.
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0
        # Extends admission prefix hits with blocks held in host/disk/Redis (kvstore/).
        self.kv_tiers: KVTierConnector | None = None

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        """Work the step loop can make progress on (reservations only wait)."""
        return bool(self.running) or self._num_waiting > 0

    @property
    def num_waiting_prefill_tokens(self) -> int:
        """Tokens queued for computation in waiting requests (a load signal)."""
        return sum(
            r.num_tokens - r.num_computed_tokens for *_, r in self._waiting if not r.is_finished
        )

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self._order[request.request_id] = next(self._counter)
        self._push_waiting(request)

    def abort_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            if request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
                self.block_manager.free(request)
            elif request.status == RequestStatus.WAITING_FOR_KV:
                del self.reserved[request.request_id]
                self.block_manager.free(request)
            else:
                self._num_waiting -= 1  # lazily dropped from the heap when it surfaces
            self._finish(request, RequestStatus.FINISHED_ABORTED)

    # ---- disaggregation: KV arriving from a prefill worker -------------------------------

    def can_reserve(self, request: Request) -> bool:
        num_seqs = len(self.running) + len(self.reserved)
        if num_seqs >= self.config.max_num_seqs:
            return False
        cached = self.block_manager.find_cached_blocks(request)
        num_new = request.num_prompt_tokens - len(cached) * self.block_manager.block_size
        return self.block_manager.can_allocate(request, num_new, cached)

    def reserve(self, request: Request) -> None:
        """Pin blocks for `request`'s prompt (call `can_reserve` first): its cached prefix
        (`num_cached_tokens`; that KV is not sent again) and fresh blocks for the rest."""
        cached = self.block_manager.find_cached_blocks(request)
        num_cached = len(cached) * self.block_manager.block_size
        self.block_manager.allocate(request, request.num_prompt_tokens - num_cached, cached)
        request.num_cached_tokens = num_cached
        if self.kv_tiers is not None:
            self.kv_tiers.on_admit(request, cached)
        request.status = RequestStatus.WAITING_FOR_KV
        self._order[request.request_id] = next(self._counter)
        self.reserved[request.request_id] = request

    def finish_import(self, request: Request, first_token_id: int | None, is_intact: bool) -> None:
        """The prefill worker is done with `request`'s blocks. If its KV is intact, the
        request runs from its first token; else it is recomputed here (the first token, if
        any, is kept: recompute reproduces it, and the client already has it)."""
        del self.reserved[request.request_id]
        if first_token_id is not None:
            request.output_token_ids.append(first_token_id)
        if is_intact and first_token_id is not None:
            request.num_computed_tokens = request.num_prompt_tokens
            self.block_manager.commit_full_blocks(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            return
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self._push_waiting(request)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(output, budget)
        if not output.preempted_ids:
            self._schedule_waiting(output, budget)
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        running = self.running
        running.sort(key=self._key)
        block_manager = self.block_manager
        kept: list[Request] = []
        # The queue is running[first:end]: taken from the front, victims from the back.
        first, end = 0, len(running)
        while first < end and budget > 0:
            request = running[first]
            first += 1
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not block_manager.try_allocate(request, num_new):
                if first < end:  # the least important request still queued goes first
                    end -= 1
                    victim = running[end]
                else:
                    victim = request
                self._preempt(victim)
                output.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                output.scheduled.append(
                    ScheduledRequest(request, num_new, request.num_computed_tokens)
                )
                kept.append(request)
                budget -= num_new
        # Requests left unscheduled by the budget stay running.
        self.running = kept + running[first:end]
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        block_manager = self.block_manager
        while self._num_waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._peek_waiting()
            cached = block_manager.find_cached_blocks(request)
            num_loaded = self._num_tier_tokens(request, len(cached))
            num_cached = len(cached) * block_manager.block_size + num_loaded
            num_new = request.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            # Blocks loaded from the tiers take fresh device blocks but no compute budget.
            if not block_manager.can_allocate(request, num_loaded + num_new, cached):
                break
            self._pop_waiting()
            block_manager.allocate(request, num_loaded + num_new, cached)
            request.num_computed_tokens = num_cached
            if num_loaded:
                self.kv_tiers.schedule_load(request, len(cached))
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
                self.num_prefix_query_tokens += request.num_tokens
                self.num_prefix_hit_tokens += num_cached
                if self.kv_tiers is not None:
                    self.kv_tiers.on_admit(request, cached)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            output.scheduled.append(ScheduledRequest(request, num_new, num_cached))
            budget -= num_new

    def _num_tier_tokens(self, request: Request, num_cached_blocks: int) -> int:
        """Prompt tokens past the device hit that the KV tiers hold (0 without tiers)."""
        if self.kv_tiers is None:
            return 0
        return self.kv_tiers.lookup(request, num_cached_blocks)

    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: Mapping[str, int]
    ) -> list[Request]:
        """Advance every scheduled request; append sampled tokens; finish the ones that
        stop. Returns the requests that produced a token or finished this step."""
        updated: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:  # aborted after this step was scheduled
                continue
            request.num_computed_tokens += item.num_new_tokens
            token_id = sampled_token_ids.get(request.request_id)
            if token_id is None:
                self.block_manager.commit_full_blocks(request)
                continue
            request.output_token_ids.append(token_id)
            self.block_manager.commit_full_blocks(request)
            status = self._stop_status(request, token_id)
            if status is not None:
                self.running.remove(request)
                self.block_manager.free(request)
                self._finish(request, status)
            updated.append(request)
        return updated

    # ---- runs of identical decode steps (the simulator's fast-forward) -------------------

    def decode_run_length(self, limit: int) -> int:
        """How many of the next steps (up to `limit`) `schedule` would make the same step:
        every running request decodes one token; nothing is admitted, preempted or left
        out; no request stops before the last of them. 0 when the next step is not such a
        step. Only length stops are foreseen: a request that may stop on a token it samples
        limits the run to one step."""
        running, config = self.running, self.config
        num_running = len(running)
        if not running or num_running > config.max_num_batched_tokens:
            return 0
        room = num_running < min(config.max_num_seqs, config.max_num_batched_tokens)
        if self._num_waiting and room:
            return 0  # an admission would be tried
        steps = limit
        for request in running:
            if request.num_tokens - request.num_computed_tokens != 1 or request.kv_dest is not None:
                return 0
            params = request.sampling_params
            if params.stop_token_ids or (request.eos_token_ids and not params.ignore_eos):
                steps = 1
            steps = min(steps, request.max_tokens - request.num_output_tokens)
        num_free = self.block_manager.num_free_blocks
        if self._num_new_blocks(steps) <= num_free:
            return steps
        if self._num_new_blocks(1) > num_free:
            return 0  # the step preempts
        low, high = 1, steps - 1  # the longest run whose new blocks fit
        while low < high:
            mid = (low + high + 1) // 2
            if self._num_new_blocks(mid) <= num_free:
                low = mid
            else:
                high = mid - 1
        return low

    def advance_decodes(
        self, num_steps: int, sampled_token_ids: Mapping[str, Sequence[int]]
    ) -> list[Request]:
        """Apply `num_steps` (at most `decode_run_length`) decode steps of the running
        batch at once, with each request's sampled tokens: the state `schedule` +
        `update_from_output` would leave, block for block (fresh blocks taken in step
        order, then batch order). Returns the batch in order; requests stop only at the
        last step (`is_finished`)."""
        self.running.sort(key=self._key)
        batch = list(self.running)
        block_manager = self.block_manager
        size = block_manager.block_size
        crossings = []  # (step, position): that step's token opens a new block
        for position, request in enumerate(batch):
            step = len(request.block_ids) * size - request.num_computed_tokens + 1
            while step <= num_steps:
                crossings.append((step, position))
                step += size
        crossings.sort()
        block_manager.extend_blocks([batch[position] for _, position in crossings])
        for request in batch:
            tokens = sampled_token_ids[request.request_id]
            request.output_token_ids.extend(tokens)
            request.num_computed_tokens += num_steps
            block_manager.commit_full_blocks(request)
        for request in batch:
            status = self._stop_status(request, request.output_token_ids[-1])
            if status is not None:
                self.running.remove(request)
                block_manager.free(request)
                self._finish(request, status)
        return batch

    def _num_new_blocks(self, num_steps: int) -> int:
        size = self.block_manager.block_size
        return sum(
            max(0, -(-(r.num_computed_tokens + num_steps) // size) - len(r.block_ids))
            for r in self.running
        )

    # ---- internals -----------------------------------------------------------------------

    @staticmethod
    def _stop_status(request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.kv_dest is not None:
            return RequestStatus.FINISHED_HANDED_OFF
        return None

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self._push_waiting(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._order.pop(request.request_id, None)

    def _key(self, request: Request) -> tuple[int, int]:
        return (request.priority, self._order[request.request_id])

    def _push_waiting(self, request: Request) -> None:
        heapq.heappush(self._waiting, (*self._key(request), request))
        self._num_waiting += 1

    def _peek_waiting(self) -> Request:
        while self._waiting[0][2].is_finished:  # drop aborted entries
            heapq.heappop(self._waiting)
        return self._waiting[0][2]

    def _pop_waiting(self) -> Request:
        request = self._peek_waiting()
        heapq.heappop(self._waiting)
        self._num_waiting -= 1
        return request
