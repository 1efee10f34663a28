"""Every message that crosses a process boundary, and the one codec for them.

Messages are msgspec Structs with a type tag, encoded as msgpack. Decoding goes through a
single typed `Decoder` over the union of known messages: anything else on a socket is
rejected with `msgspec.ValidationError`, and nothing received is ever unpickled.

Grouped by who sends them:

    router → worker      AddRequest, ReserveKV, PrefillRequest, Abort, Shutdown,
                         SendKVSnapshot, Fence, SetRole
    worker → router      Register, WorkerStats, StepOutputs, KVReserved, RequestFailed,
                         KVSent, KVEvents, Draining
    prefill → decode     KVLayer (+ raw key/value frames, tcp backend), KVDone

A ZeroMQ message is `[encoded message, *raw frames]`; bulk KV bytes travel as raw frames
so they are never copied into msgpack.
"""

from __future__ import annotations

from typing import Union

import msgspec

from pdserve.kv.events import AnyKVEvent
from pdserve.outputs import EngineCoreOutput, Logprob
from pdserve.sampling_params import SamplingParams


class Message(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Base of every message; the tag is the class name."""


# ---- router → worker ---------------------------------------------------------------------


class AddRequest(Message):
    """Run a whole request (prefill and decode) on this worker.

    `output_token_ids`: tokens the request already generated elsewhere (a migrated
    request: its worker died or was drained). The engine recomputes prompt + these, as
    after a preemption, and continues from the next output index, so budgets, stop state
    and seeded sampling go on exactly where they stopped."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first (the engine's priority scheduling)
    output_token_ids: list[int] = []


class ReserveKV(Message):
    """Decode worker: reserve blocks for the prompt, then wait for its KV from a prefill
    worker. Answer with `KVReserved` as soon as the blocks are held."""

    request_id: str
    transfer_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    timeout_s: float  # from admission (KVReserved): free the blocks if no KV arrived by then
    priority: int = 0


class NixlPeer(msgspec.Struct, frozen=True):
    """A worker's NIXL agent and its registered KV pool (see transfer/nixl.py)."""

    agent_metadata: bytes  # nixl_agent.get_agent_metadata()
    pool_addr: int  # address of the pool tensor in that process
    num_blocks: int  # of that pool


class KVDestination(msgspec.Struct, frozen=True):
    """Where a prefill worker sends a request's KV: the reserved blocks on a decode worker.

    Delta hand-over: the decode worker already holds the prompt's first `first_block`
    blocks (its prefix cache), so `block_ids` are the destinations of the prompt's blocks
    `first_block, first_block + 1, ...` only, and nothing before them is sent."""

    worker_id: str
    transfer_id: str
    block_ids: list[int]
    kv_addr: str  # the decode worker's KV socket (tcp backend, and KVDone for every backend)
    backend: str  # "shm" | "tcp" | "nixl"
    shm_path: str | None = None  # the decode worker's shared KV pool (shm backend)
    nixl: NixlPeer | None = None  # how to reach the decode worker's pool (nixl backend)
    # "int8": tcp batches travel quantised (see kv/int8.py); None: in the pool's dtype.
    # Backends that write in place (shm, nixl) ignore it and always move full precision.
    wire_dtype: str | None = None
    first_block: int = 0  # prompt blocks before this one are already at the destination


class PrefillRequest(Message):
    """Prefill worker: compute the prompt, send its KV to `dest`, return the first token."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    dest: KVDestination
    deadline_s: float  # seconds from receipt; past it the reserved blocks may be reused
    priority: int = 0


class Abort(Message):
    request_ids: list[str]
    # No prefill worker was ever told to write these requests' reserved blocks, so a
    # decode worker may free them at once (otherwise it waits for KVDone; see handoff.py).
    is_writer_absent: bool = False


class Shutdown(Message):
    pass


class SetRole(Message):
    """Serve as `role` from now on (the router drained this worker first): the KV pool,
    its blocks and the prefix cache stay; the worker registers again with the new role."""

    role: str


class Fence(Message):
    """The router declared this worker incarnation dead (its lease ran out) and moved its
    requests elsewhere: drop every request without writing any more KV, then register
    again as a new incarnation. Stale outputs of the old incarnation are ignored."""

    incarnation: str


class SendKVSnapshot(Message):
    """Send a `KVEvents` snapshot now: the router's index of this worker is out of date
    (a gap in the sequence numbers, or a router that has just started)."""


# ---- worker → router ---------------------------------------------------------------------


class KVLayout(msgspec.Struct, frozen=True):
    """Shape of a worker's KV pool: `[num_layers, 2, num_blocks, block_size, heads, dim]`."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (
            self.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )

    def is_compatible(self, other: KVLayout) -> bool:
        """Blocks can be copied between the two pools as they are."""
        return (
            self.num_layers == other.num_layers
            and self.block_size == other.block_size
            and self.num_kv_heads == other.num_kv_heads
            and self.head_dim == other.head_dim
            and self.dtype == other.dtype
        )


class Register(Message):
    worker_id: str
    role: str
    pid: int
    ctrl_addr: str
    kv_addr: str
    kv_layout: KVLayout
    max_model_len: int
    backends: list[str]  # transfer backends this worker can send and receive with
    hostname: str = ""  # the shm backend needs both workers on one host
    shm_path: str | None = None
    nixl: NixlPeer | None = None
    # Unique per worker process start (and per re-registration after a `Fence`): the
    # router tells a restarted or fenced worker from the one it knew by this.
    incarnation: str = ""


class KVTierCounters(msgspec.Struct, array_like=True, frozen=True):
    """One KV tier of a worker (host, disk, redis): what it holds now, and cumulative
    counts since the worker started."""

    tier: str
    num_blocks: int
    used_bytes: int
    num_hit_blocks: int
    read_bytes: int
    written_bytes: int
    num_corrupt_blocks: int = 0
    # Admission into slow tiers (kvstore/admission.py), and blocks lookups asked for.
    admission: str = "all"
    num_admitted_blocks: int = 0
    num_rejected_blocks: int = 0
    num_lookup_blocks: int = 0


class WorkerStats(Message):
    """Sent after every step that changed something, and at least once a second."""

    worker_id: str
    num_running: int
    num_waiting: int  # includes reservations waiting for room
    num_free_blocks: int
    num_blocks: int
    num_waiting_prefill_tokens: int = 0  # prompt tokens queued, not yet computed
    # Cumulative prefix-cache counters (tokens, first admissions; hits from any tier).
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    kv_tiers: list[KVTierCounters] = []
    num_tier_dropped_writes: int = 0  # slow-tier writes dropped by a full writer queue
    # Liveness: seconds since the worker's engine loop last completed a pass, as measured
    # by the heartbeat thread. A hung loop (deadlock, a step stuck in a KV send) keeps the
    # heartbeat alive but this grows; the router's lease covers both.
    loop_stalled_s: float = 0.0
    # The longest recent pass (never below the worker's predicted longest step): a loop
    # is stalled only past `lease_s + STALL_MARGIN x loop_pass_max_s` (worker/liveness.py).
    loop_pass_max_s: float = 0.0
    incarnation: str = ""


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True):
    token_id: int
    logprob: float
    rank: int


class CoreOutput(msgspec.Struct, array_like=True, frozen=True):
    """`EngineCoreOutput` on the wire."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    queue_time_s: float | None = None  # set on a request's first output
    first_index: int | None = None  # output index of new_token_ids[0]

    @classmethod
    def of(cls, out: EngineCoreOutput) -> CoreOutput:
        logprobs = None
        if out.new_logprobs is not None:
            logprobs = [
                [TokenLogprob(t, lp.logprob, lp.rank) for t, lp in entry.items()]
                for entry in out.new_logprobs
            ]
        return cls(
            out.request_id,
            out.new_token_ids,
            logprobs,
            out.finish_reason,
            out.stop_reason,
            out.num_cached_tokens,
            out.queue_time_s,
            out.first_index,
        )

    def to_engine_output(self) -> EngineCoreOutput:
        logprobs = None
        if self.new_logprobs is not None:
            logprobs = [
                {e.token_id: Logprob(e.logprob, e.rank) for e in entry}
                for entry in self.new_logprobs
            ]
        return EngineCoreOutput(
            self.request_id,
            list(self.new_token_ids),
            logprobs,
            self.finish_reason,
            self.stop_reason,
            self.num_cached_tokens,
            self.queue_time_s,
            self.first_index,
        )


class StepOutputs(Message):
    worker_id: str
    outputs: list[CoreOutput]


class KVReserved(Message):
    worker_id: str
    request_id: str
    transfer_id: str
    block_ids: list[int]  # every block of the prompt, in order
    # Leading blocks of `block_ids` that already hold the prompt's KV (prefix cache hits on
    # the decode worker): the prefill worker sends only the blocks after them.
    num_cached_blocks: int = 0


class RequestFailed(Message):
    """A request cannot continue on this worker; it has been dropped and its blocks freed.

    `retryable`: the failure was not the request's own (a step that raised, a transfer
    that timed out): the router may migrate it. Otherwise (bad parameters) it fails."""

    worker_id: str
    request_id: str
    message: str
    retryable: bool = False


class Draining(Message):
    """The worker is shutting down (SIGTERM): send it no new work and move what it holds;
    it exits once the router sends `Shutdown` or its grace period ends."""

    worker_id: str
    incarnation: str = ""


class KVSent(Message):
    """Prefill worker: a request's KV left for its destination (for metrics)."""

    worker_id: str
    request_id: str
    num_bytes: int
    seconds: float


class KVEvents(Message):
    """Changes to the block hashes a worker holds, per tier (for the router's prefix index).

    `seq` counts this worker's `KVEvents` from 0 (the first is a snapshot, sent right after
    `Register`); the router applies them in order and asks for a snapshot
    (`SendKVSnapshot`) when one is missing. A snapshot (`is_snapshot`) replaces everything
    the router knew of the worker: its events are `BlocksStored` of every hash held, per
    tier."""

    worker_id: str
    seq: int
    events: list[AnyKVEvent]
    is_snapshot: bool = False


# ---- prefill worker → decode worker ------------------------------------------------------


class KVLayer(Message):
    """One layer's KV for some of a request's blocks (tcp backend). Followed by two raw
    frames per entry of `run_lengths` — keys then values of that many blocks, each
    `[n, block_size, heads, dim]` in the pool's dtype — covering `block_ids` in order.
    With `wire_dtype="int8"` those frames hold int8 values instead, and one more frame
    follows: float32 scales `[2 (k, v), len(block_ids), heads]` (see kv/int8.py)."""

    transfer_id: str
    layer: int
    block_ids: list[int]  # destination block ids
    checksum: int  # xxh3_64 over the raw frames, in order
    num_bytes: int  # of all raw frames
    run_lengths: list[int] = msgspec.field(default_factory=list)  # blocks per frame pair
    wire_dtype: str | None = None  # None: the pool's dtype; "int8": quantised + scales


class KVDone(Message):
    """Every KV batch of a transfer has been sent (or the prefill worker gave up)."""

    transfer_id: str
    request_id: str
    num_batches: int  # KVLayer messages sent (0 for shm, which writes in place)
    first_token_id: int | None = None
    first_logprobs: list[TokenLogprob] | None = None
    is_finished: bool = False  # the first token already finished the request
    error: str | None = None


AnyMessage = Union[  # noqa: UP007 — msgspec needs a real Union of the tagged types
    AddRequest,
    ReserveKV,
    PrefillRequest,
    Abort,
    Shutdown,
    SendKVSnapshot,
    Fence,
    SetRole,
    Register,
    WorkerStats,
    StepOutputs,
    KVReserved,
    RequestFailed,
    KVSent,
    KVEvents,
    Draining,
    KVLayer,
    KVDone,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes | memoryview) -> Message:
    """Decode one message; raises `msgspec.ValidationError`/`DecodeError` on anything else."""
    return _decoder.decode(data)
