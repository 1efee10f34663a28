"""A simulated worker: pdserve's real `Scheduler` and `BlockManager`, without a model.

Everything a worker decides runs here as in `worker/worker.py`, `worker/handoff.py` and
`engine/core.py`: admission, chunked prefill under the token budget, `max_num_seqs`,
preemption by recompute, prefix-cache hits, reservations for KV coming from a prefill
worker (queued in arrival order until the pool has room), imports, and the prefill side's
stop after the first token (`Request.kv_dest`). Only the model is missing: a step's
duration comes from the cost model (`StepCost.step_seconds` of the scheduled batch) and
the sampled token of each row is a made-up id that never stops a request (outputs run to
`max_tokens`, as with `ignore_eos`). A received hand-over's own CPU (the receive path's
bookkeeping, `Profile.receive_s_per_*`, sim/receive.py) is added to the next step.

Its KV events come from the block manager through the real `KVEventPublisher`, so the
router's prefix index (`router/kv_index.py`) is fed exactly as in a deployment.

The event loop (sim/cluster.py) calls, per loop pass of a real worker: `on_*` for the
messages that arrived, `admit` (reservations that now fit), `start_step` → (batch,
seconds), and after those seconds `finish_step` → the outputs.
"""

from __future__ import annotations

import functools
import zlib
from collections import deque
from dataclasses import dataclass

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from pdserve.sampling_params import SamplingParams
from pdserve.sim.cost_model import StepCost, StepTimer
from pdserve.sim.profile import ITEMSIZE, Profile
from pdserve.worker.kv_events import DeviceEvents, KVEventPublisher

MAX_RUN_STEPS = 1024  # decode steps simulated as one event at most
DEFAULT_TOKEN_BUDGET = 2048  # NOTE: the same rule as engine/core.py (which imports torch)


def token_budget(config: EngineConfig, max_model_len: int) -> int:
    budget = config.max_num_batched_tokens
    if config.enable_chunked_prefill:
        return budget or DEFAULT_TOKEN_BUDGET
    return budget if budget is not None else max(DEFAULT_TOKEN_BUDGET, max_model_len)


@dataclass(frozen=True, slots=True)
class Reserved:
    """`KVReserved`: the decode worker's blocks for a prompt, the first `num_cached_blocks`
    already filled by its prefix cache (not sent)."""

    request_id: str
    num_blocks: int
    num_cached_blocks: int


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """Steps the scheduler foresaw as identical decodes of its running batch (applied
    when they end: `SimWorker.finish_run`)."""

    num_steps: int


@dataclass(slots=True)
class Output:
    """One token of a request from one step (`StepOutputs` entry)."""

    request_id: str
    token_id: int
    is_finished: bool  # the request ends here (length): not for a hand-off
    is_handed_off: bool  # prefill side: the first token; the KV goes to the decode worker
    num_cached_tokens: int


class SimWorker:
    def __init__(
        self,
        worker_id: str,
        role: str,
        engine: EngineConfig,
        cost: StepCost,
        num_blocks: int,
        max_model_len: int,
        threads: int = 1,
        decode_runs: bool = True,
        receive_cost: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        self.worker_id = worker_id
        self.receive_cost = receive_cost  # seconds per hand-over, per its block (sim/receive.py)
        self._receive_s = 0.0  # owed by the next step
        self.decode_runs = decode_runs
        self.role = role
        self.cost = cost
        self.threads = threads
        self.block_manager = BlockManager(
            num_blocks, engine.block_size, engine.enable_prefix_caching, record_events=True
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=engine.max_num_seqs,
                max_num_batched_tokens=token_budget(engine, max_model_len),
                enable_chunked_prefill=engine.enable_chunked_prefill,
            ),
            self.block_manager,
        )
        self.kv_events = KVEventPublisher(worker_id, [DeviceEvents(self.block_manager)])
        self.step_seconds = StepTimer(cost, self.scheduler.config.max_num_batched_tokens)
        self.memory_s = cost.tokens_seconds(1)  # reading the weights once (sim/sharing.py)
        self.requests: dict[str, Request] = {}
        self._pending: deque[Request] = deque()  # reservations waiting for room
        self.num_steps = 0
        self.num_preemptions = 0
        self.busy_s = 0.0

    @property
    def block_size(self) -> int:
        return self.block_manager.block_size

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- commands ------------------------------------------------------------------------

    def on_add(self, request: Request, kv_dest: object | None = None) -> None:
        """`AddRequest` (whole request) or, with `kv_dest`, `PrefillRequest`."""
        request.kv_dest = kv_dest
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def on_reserve(self, request: Request) -> list[Reserved]:
        """`ReserveKV`: queue it; returns the reservations admitted now (in order)."""
        self._pending.append(request)
        return self.admit()

    def admit(self) -> list[Reserved]:
        admitted = []
        while self._pending and self.scheduler.can_reserve(self._pending[0]):
            request = self._pending.popleft()
            self.scheduler.reserve(request)
            self.requests[request.request_id] = request
            num_cached = request.num_cached_tokens // self.block_size
            admitted.append(Reserved(request.request_id, len(request.block_ids), num_cached))
        return admitted

    def on_kv_done(self, request_id: str, first_token_id: int, is_finished: bool) -> None:
        """`KVDone`: the prompt's KV is in the reserved blocks (always intact here)."""
        request = self.requests[request_id]
        per_request, per_block = self.receive_cost
        self._receive_s += per_request + per_block * len(request.block_ids)
        if is_finished:
            self.scheduler.abort_requests([request])
            del self.requests[request_id]
            return
        self.scheduler.finish_import(request, first_token_id, is_intact=True)

    def take_receive_seconds(self) -> float:
        """The CPU the hand-overs received since the last step cost this worker (the
        real worker spends it between steps, in its loop pass): the next step carries it."""
        seconds, self._receive_s = self._receive_s, 0.0
        return seconds

    # ---- steps ---------------------------------------------------------------------------

    def start_step(self) -> tuple[SchedulerOutput | DecodeRun, list[float]] | None:
        """The next step — or, when the scheduler can tell that the next steps are the same
        decode batch, that run of steps — and the seconds of each at full speed; None when
        nothing can run."""
        scheduler = self.scheduler
        if self.decode_runs:
            num_steps = scheduler.decode_run_length(MAX_RUN_STEPS)
            if num_steps >= 2:
                running = scheduler.running
                context = sum(r.num_tokens for r in running)  # Σ (c+1) over decode rows
                return DecodeRun(num_steps), self.step_seconds.decode_steps(
                    len(running), context, num_steps
                )
        output = scheduler.schedule()
        self.block_manager.drain_evicted()
        if output.is_empty:
            return None
        return output, [self.step_seconds(output.scheduled)]

    def finish_run(self, num_steps: int) -> tuple[list[str], list[Output]]:
        """The first `num_steps` steps of a run are done (a run is cut short when a message
        arrives): the batch's request ids, and the outputs of those that stop at its end."""
        scheduler = self.scheduler
        sampled = {}
        for request in scheduler.running:
            sampled[request.request_id] = sampled_tokens(request, num_steps)
        batch = scheduler.advance_decodes(num_steps, sampled)
        self.block_manager.drain_evicted()
        self.num_steps += num_steps
        finished = []
        for request in batch:
            if request.is_finished:
                request_id = request.request_id
                token = request.output_token_ids[-1]
                finished.append(Output(request_id, token, True, False, request.num_cached_tokens))
                del self.requests[request_id]
        return [r.request_id for r in batch], finished

    def finish_step(self, output: SchedulerOutput) -> list[Output]:
        sampled = {}
        for item in output.scheduled:
            request = item.request
            num_outputs = len(request.output_token_ids)
            if item.start + item.num_new_tokens == len(request.prompt_token_ids) + num_outputs:
                # `item.is_sampling`; `sampled_token(request)`, inlined (once per row)
                base = _token_base(request.request_id)
                sampled[request.request_id] = (base + 7919 * num_outputs) % 30000 + 1000
        self.num_steps += 1
        self.num_preemptions += len(output.preempted_ids)
        outputs = []
        handed_off = RequestStatus.FINISHED_HANDED_OFF
        for request in self.scheduler.update_from_output(output, sampled):
            request_id = request.request_id
            status = request.status
            is_finished = status.is_finished
            outputs.append(
                Output(
                    request_id,
                    sampled[request_id],
                    is_finished and status != handed_off,
                    status == handed_off,
                    request.num_cached_tokens,
                )
            )
            if is_finished:
                del self.requests[request_id]
        return outputs

    def free_blocks(self) -> int:
        return self.block_manager.num_free_blocks


def sampled_token(request: Request) -> int:
    """A made-up token id, fixed by the request and its position (never an EOS: the
    simulated requests carry no EOS ids)."""
    base = _token_base(request.request_id)
    return (base + 7919 * len(request.output_token_ids)) % 30000 + 1000


def sampled_tokens(request: Request, num: int) -> list[int]:
    """The made-up ids of `request`'s next `num` tokens."""
    base, first = _token_base(request.request_id), len(request.output_token_ids)
    return [(base + 7919 * n) % 30000 + 1000 for n in range(first, first + num)]


@functools.lru_cache(maxsize=1 << 16)
def _token_base(request_id: str) -> int:
    return zlib.crc32(request_id.encode())


def make_request(
    request_id: str,
    token_ids: list[int],
    max_tokens: int,
    arrival_s: float,
    block_hashes: list | None = None,
) -> Request:
    """A simulated request; `block_hashes`: its prompt's hash chain if already known (the
    router's: the same function of the same tokens), so no worker computes it again."""
    request = Request(
        request_id,
        list(token_ids),
        _params(max_tokens),
        max_tokens=max_tokens,
        arrival_time=arrival_s,
    )
    if block_hashes:
        request.block_hashes = list(block_hashes)
    return request


@functools.lru_cache(maxsize=4096)
def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # frozen: shared


def num_kv_blocks(profile: Profile, engine, size: int) -> int:
    """A worker's KV pool in blocks: as `ModelRunner` sizes it on a CPU (explicit count,
    else `kv_cache_memory_gib`); on an accelerator, 90 % of its memory minus the weights."""
    if engine.num_kv_blocks is not None:
        return engine.num_kv_blocks
    block_bytes = profile.kv_bytes_per_token * engine.block_size
    if profile.hardware.get("device") == "cpu":
        return max(1, int(engine.kv_cache_memory_gib * 2**30) // block_bytes)
    weights = profile.model["num_params"] * ITEMSIZE[profile.model["dtype"]]
    free = 0.9 * profile.hardware["memory_bytes"] * size - weights
    return max(1, int(free // block_bytes))
