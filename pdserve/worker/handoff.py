"""A worker's request bookkeeping for commands, KV imports and KV hand-offs.

Decode side (imports). `ReserveKV` queues a reservation; it is admitted, in arrival
order, as soon as the pool has room (backpressure: a full decode worker makes requests
wait rather than fail). Once admitted the worker answers `KVReserved` with the block ids
and how many leading ones its prefix cache already filled (delta hand-over: the prefill
worker sends only the rest, and a batch aimed at a cached block, which other requests may
share, is refused) and waits for the prefill worker's `KVDone`. Then:
- intact (every announced batch arrived with a good checksum) → the request decodes from
  its first token;
- damaged, or the prefill worker failed after sampling the first token → the prompt is
  recomputed here (nothing is lost; the client never sees the difference);
- the first token already finished the request, or the request was aborted → blocks freed.
NOTE: an aborted reservation keeps its blocks until the prefill worker's `KVDone` or the
deadline: with the shm backend the prefill worker may still be writing into them, and
reusing them earlier would corrupt another request's KV.

Prefill side (hand-offs). `PrefillRequest` adds a request that stops after its first
token (`Request.kv_dest`); the streamer sends its KV during the steps; after the step that
samples the first token, `KVDone` (with that token) goes to the decode worker and the
token goes to the router at once, so TTFT does not wait for anything on the decode side.

Timeouts on both ends: a reservation not completed by its deadline is freed and reported;
a prefill not finished by its deadline is aborted, its blocks freed, and the decode worker
told.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from pdserve.engine.core import EngineCore, RequestFailure
from pdserve.engine.request import Request, RequestStatus
from pdserve.errors import InvalidRequestError
from pdserve.ipc import messages as m
from pdserve.ipc.validate import prefill_problem, reserve_problem
from pdserve.outputs import EngineCoreOutput
from pdserve.transfer.base import KVReceiver, KVSender
from pdserve.transfer.streamer import HandOff

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    request: Request
    transfer_id: str
    deadline: float  # to be admitted by
    timeout_s: float  # then, from admission, for the KV to arrive


@dataclass(slots=True)
class _Import:
    request_id: str
    deadline: float
    num_cached_blocks: int = 0  # leading blocks already held: never written by a transfer
    num_batches: int = 0
    is_damaged: bool = False
    is_aborted: bool = False


def _check(problem: str | None) -> None:
    """A command that fails `ipc/validate.py` is refused like any invalid request."""
    if problem is not None:
        raise InvalidRequestError(problem)


class HandOffs:
    def __init__(
        self,
        worker_id: str,
        core: EngineCore,
        senders: dict[str, KVSender],
        receiver: KVReceiver,
    ) -> None:
        self.worker_id = worker_id
        self.core = core
        self.senders = senders
        self.receiver = receiver
        self._pending: deque[_Pending] = deque()  # reservations waiting for room
        self._imports: dict[str, _Import] = {}  # by transfer id
        self._hand_offs: dict[str, HandOff] = {}  # prefill side, by request id

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ---- commands from the router ----------------------------------------------------------

    def on_command(self, message: m.Message) -> list[m.Message]:
        try:
            if isinstance(message, m.AddRequest):
                self.core.add_request(
                    message.request_id,
                    message.prompt_token_ids,
                    message.params,
                    priority=message.priority,
                    output_token_ids=message.output_token_ids,
                )
            elif isinstance(message, m.ReserveKV):
                _check(reserve_problem(message))
                request = self.core.make_request(
                    message.request_id,
                    message.prompt_token_ids,
                    message.params,
                    priority=message.priority,
                )
                deadline = time.monotonic() + message.timeout_s
                self._pending.append(
                    _Pending(request, message.transfer_id, deadline, message.timeout_s)
                )
                return self._admit()
            elif isinstance(message, m.PrefillRequest):
                _check(prefill_problem(message, self.core.block_manager.block_size))
                deadline = time.monotonic() + message.deadline_s
                hand_off = HandOff(message.dest, deadline)
                self.core.add_request(
                    message.request_id,
                    message.prompt_token_ids,
                    message.params,
                    priority=message.priority,
                    kv_dest=hand_off,
                )
                self._hand_offs[message.request_id] = hand_off
            elif isinstance(message, m.Abort):
                return self._abort(message.request_ids, message.is_writer_absent)
            else:
                logger.warning("ignoring unexpected command %s", type(message).__name__)
        except InvalidRequestError as e:
            request_id = getattr(message, "request_id", "?")
            return [m.RequestFailed(self.worker_id, request_id, str(e))]
        return []

    def _abort(self, request_ids: list[str], is_writer_absent: bool) -> list[m.Message]:
        ids = set(request_ids)
        self._pending = deque(p for p in self._pending if p.request.request_id not in ids)
        to_abort = []
        for request_id in request_ids:
            request = self.core.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.WAITING_FOR_KV:
                for transfer_id, imp in list(self._imports.items()):
                    if imp.request_id != request_id:
                        continue
                    if is_writer_absent:
                        del self._imports[transfer_id]
                        to_abort.append(request_id)
                    else:
                        imp.is_aborted = True  # freed on KVDone or deadline (see NOTE)
                continue
            to_abort.append(request_id)
            hand_off = self._hand_offs.pop(request_id, None)
            if hand_off is not None:
                self._finish_hand_off(request_id, hand_off, None, error="aborted")
        self.core.abort_requests(to_abort)
        return []

    def on_failures(self, failures: list[RequestFailure]) -> list[m.Message]:
        """Requests the engine dropped in a step: tell their decode workers (hand-offs)
        and the router, which moves the retryable ones elsewhere."""
        replies: list[m.Message] = []
        for failure in failures:
            hand_off = self._hand_offs.pop(failure.request_id, None)
            if hand_off is not None:
                self._finish_hand_off(failure.request_id, hand_off, None, error=failure.message)
            replies.append(
                m.RequestFailed(
                    self.worker_id, failure.request_id, failure.message, failure.retryable
                )
            )
        return replies

    def drop_all(self) -> None:
        """Drop every request, reservation and hand-off (fenced, or the router is gone).
        Reservations a prefill worker may still write into stay held until its `KVDone`
        or their deadline, as for any abort."""
        ids = [p.request.request_id for p in self._pending] + list(self.core.requests)
        self._abort(ids, is_writer_absent=False)

    # ---- decode side: reservations and imports ----------------------------------------------

    def _admit(self) -> list[m.Message]:
        replies: list[m.Message] = []
        while self._pending:
            try:
                if not self.core.try_reserve(self._pending[0].request):
                    break
            except InvalidRequestError as e:  # its id came into use while it waited
                pending = self._pending.popleft()
                replies.append(self._failed(pending.request.request_id, str(e)))
                continue
            pending = self._pending.popleft()
            request = pending.request
            # NOTE: the KV deadline runs from admission, not from receipt: the router gives
            # the prefill worker `timeout_s` from `KVReserved` (minus a margin), and blocks
            # freed while that worker may still write into them (shm) would corrupt
            # whichever request reuses them.
            deadline = time.monotonic() + pending.timeout_s
            num_cached_blocks = request.num_cached_tokens // self.core.block_manager.block_size
            self._imports[pending.transfer_id] = _Import(
                request.request_id, deadline, num_cached_blocks
            )
            replies.append(
                m.KVReserved(
                    self.worker_id,
                    request.request_id,
                    pending.transfer_id,
                    list(request.block_ids),
                    num_cached_blocks,
                )
            )
        return replies

    def on_kv_layer(self, message: m.KVLayer, frames: list[memoryview]) -> None:
        imp = self._imports.get(message.transfer_id)
        if imp is None or imp.is_aborted or imp.is_damaged:
            return  # a late batch of a finished, failed or aborted transfer
        request = self.core.requests.get(imp.request_id)
        if not self._is_reserved_range(request, imp, message.block_ids, message.layer):
            imp.is_damaged = True
            return
        if self.receiver.write_layer(message, frames):
            imp.num_batches += 1
        else:
            logger.warning("KV batch for %s failed its checksum", imp.request_id)
            imp.is_damaged = True

    def _is_reserved_range(
        self, request: Request | None, imp: _Import, block_ids: list[int], layer: int
    ) -> bool:
        """A batch may only write blocks its request holds, past its cached prefix (those
        may be shared), in a layer that exists."""
        if request is None or not 0 <= layer < self.receiver.kv_cache.shape[0]:
            return False
        return set(block_ids) <= set(request.block_ids[imp.num_cached_blocks :])

    def on_kv_done(self, message: m.KVDone) -> None:
        imp = self._imports.pop(message.transfer_id, None)
        if imp is None:
            return
        request_id = imp.request_id
        if imp.is_aborted or message.is_finished or message.first_token_id is None:
            self.core.abort_requests([request_id])
            return
        is_intact = (
            message.error is None and not imp.is_damaged and imp.num_batches == message.num_batches
        )
        if not is_intact:
            reason = message.error or "damaged or missing KV batches"
            logger.warning("recomputing %s here: %s", request_id, reason)
        self.core.finish_import(request_id, message.first_token_id, is_intact)

    # ---- timeouts -------------------------------------------------------------------------

    def tick(self) -> list[m.Message]:
        """Expire what timed out; admit reservations that now fit."""
        now = time.monotonic()
        replies: list[m.Message] = []
        for pending in [p for p in self._pending if p.deadline < now]:
            self._pending.remove(pending)
            replies.append(self._failed(pending.request.request_id, "no KV blocks free in time"))
        for transfer_id, imp in list(self._imports.items()):
            if imp.deadline < now:
                del self._imports[transfer_id]
                self.core.abort_requests([imp.request_id])
                if not imp.is_aborted:
                    replies.append(self._failed(imp.request_id, "KV transfer timed out"))
        for request_id, hand_off in list(self._hand_offs.items()):
            if hand_off.deadline < now:
                del self._hand_offs[request_id]
                self.core.abort_requests([request_id])
                self._finish_hand_off(request_id, hand_off, None, error="prefill timed out")
                replies.append(self._failed(request_id, "prefill did not finish in time"))
        return replies + self._admit()

    def _failed(self, request_id: str, message: str) -> m.RequestFailed:
        return m.RequestFailed(self.worker_id, request_id, message)

    # ---- after a step -----------------------------------------------------------------------

    def after_step(self, outputs: list[EngineCoreOutput]) -> list[m.Message]:
        replies: list[m.Message] = []
        core_outputs = []
        for out in outputs:
            core_outputs.append(m.CoreOutput.of(out))
            hand_off = self._hand_offs.pop(out.request_id, None)
            if hand_off is not None:
                first = m.CoreOutput.of(out)
                self._finish_hand_off(out.request_id, hand_off, first, error=hand_off.error)
                replies.append(
                    m.KVSent(self.worker_id, out.request_id, hand_off.num_bytes, hand_off.seconds)
                )
        if core_outputs:
            replies.insert(0, m.StepOutputs(self.worker_id, core_outputs))
        return replies

    def _finish_hand_off(
        self,
        request_id: str,
        hand_off: HandOff,
        first: m.CoreOutput | None,
        error: str | None,
    ) -> None:
        dest = hand_off.dest
        # `KVDone` travels over ZeroMQ whatever the backend: any sender can tell the decode
        # worker, even when this one lacks the requested backend (the streamer then set
        # `error`, so the decode worker recomputes instead of waiting for its deadline).
        sender = self.senders.get(dest.backend) or next(iter(self.senders.values()), None)
        if sender is None:
            return
        done = m.KVDone(
            transfer_id=dest.transfer_id,
            request_id=request_id,
            num_batches=hand_off.num_batches if sender.sends_messages else 0,
            first_token_id=first.new_token_ids[0] if first else None,
            is_finished=first is not None and first.finish_reason is not None,
            error=error,
        )
        sender.finish(dest, done)
