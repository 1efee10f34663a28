"""`Inbound`: what workers say about requests, turned into client updates and ledger steps.

- `StepOutputs`: each output is matched to its attempt by the worker-side request id
  (outputs of an ended attempt are dropped), put in token order (`in_order`), accounted
  (`Inbound.accept`: charges released where the sample is done, the attempt finished on
  its last token), detokenised by the one `OutputProcessor`, and queued on its request's
  stream; a stop string aborts the sample on its workers.
- `KVReserved`: completes the reservation an attempt is waiting on (router/dispatch.py),
  or frees blocks nobody waits for.
- `RequestFailed`: a retryable failure migrates the sample, any other fails the request.

What workers say about themselves (registration, stats) is router/liveness.py's; the
receive loop that hands each message to one of the two is in router/cluster.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from pdserve.control.workers import WorkerPool
from pdserve.engine.output_processor import OutputProcessor
from pdserve.errors import RequestFailedError, ServiceUnavailableError
from pdserve.ipc import messages as m
from pdserve.router.dispatch import Attempt
from pdserve.router.ledger import LoadLedger
from pdserve.router.samples import Sample, Samples

if TYPE_CHECKING:
    from pdserve.router.metrics import RouterMetrics


class Inbound:
    def __init__(
        self,
        pool: WorkerPool,
        ledger: LoadLedger,
        processor: OutputProcessor,
        samples: Samples,
        metrics: Callable[[], RouterMetrics | None],
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.processor = processor
        self.samples = samples
        self._metrics = metrics

    def on_outputs(self, message: m.StepOutputs) -> None:
        outputs = []
        for out in message.outputs:
            attempt = self.samples.attempts.get(out.request_id)
            if attempt is None:
                continue  # finished, aborted, or an attempt that was moved elsewhere
            for worker_id, ready in in_order(attempt, message.worker_id, out):
                outputs.append(self.accept(attempt, worker_id, ready))
        updates, stopped = self.processor.process_stream(outputs)
        for child_id in stopped:  # finished by a stop string: stop the workers too
            sample = self.samples.children.get(child_id)
            if sample is not None:
                self.samples.abort_sample(sample)
        for request_id, update in updates.items():
            stream = self.samples.streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(update)

    def accept(self, attempt: Attempt, worker_id: str, out: m.CoreOutput):
        """Account one in-order output of `attempt`; its engine output for the client."""
        sample = attempt.sample
        assert isinstance(sample, Sample)
        self.ledger.prefill_done(attempt.charges)  # any output: the prompt is computed
        if out.finish_reason is not None or worker_id == attempt.prefill_worker:
            self.ledger.release(attempt.charges, worker_id)  # done on that worker
            attempt.workers.discard(worker_id)
        if out.finish_reason is not None:
            self.samples.finish_attempt(attempt)
        if out.queue_time_s is not None and not attempt.is_resumed:
            self._note_queue_time(sample.parent_id, out.queue_time_s)
        sample.output_token_ids += out.new_token_ids
        engine_out = out.to_engine_output()
        engine_out.request_id = sample.child_id
        if attempt.is_resumed:  # its prompt included outputs: not the client's cache
            metrics = self._metrics()
            if metrics is not None and not attempt.has_output:
                num_cached = engine_out.num_cached_tokens
                metrics.observe_migration_replay(attempt.charges.num_prompt_tokens, num_cached)
            engine_out.num_cached_tokens = 0
        attempt.has_output = True
        return engine_out

    def _note_queue_time(self, request_id: str, queue_time_s: float) -> None:
        """The worker measured its queue on its own clock; place it on ours."""
        state = self.processor.states.get(request_id)
        if state is not None and state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = state.metrics.arrival_time + queue_time_s

    def on_reserved(self, message: m.KVReserved) -> None:
        attempt = self.samples.attempts.get(message.request_id)
        if attempt is None or attempt.reservation is None or attempt.reservation.done():
            handle = self.pool.workers.get(message.worker_id)
            if handle is not None:  # nobody waits, and no writer was told: free now
                handle.send(m.Abort([message.request_id], is_writer_absent=True))
            return
        attempt.reservation.set_result(message)

    def on_failed(self, message: m.RequestFailed) -> None:
        attempt = self.samples.attempts.get(message.request_id)
        if attempt is None:
            return
        reason = f"worker {message.worker_id}: {message.message}"
        if message.retryable:
            self.samples.migrate(attempt, reason, lost_worker=message.worker_id, writer_gone=False)
            return
        sample = attempt.sample
        assert isinstance(sample, Sample)
        if attempt.reservation is not None and not attempt.reservation.done():
            self.samples.end_attempt(attempt, lost_worker=message.worker_id)
            attempt.reservation.set_exception(ServiceUnavailableError(message.message))
            return
        self.samples.fail_request(sample.parent_id, RequestFailedError(reason))


def in_order(attempt: Attempt, worker_id: str, out: m.CoreOutput) -> list[tuple[str, m.CoreOutput]]:
    """The outputs that can go to the client now, in token order. Outputs of one sample
    come from several workers on separate sockets (a decode worker's second token can
    overtake the prefill worker's first), so each carries the output index of its first
    token: one past what the client has is held until the gap fills, tokens the client
    already has are cut off (NOTE: the stream never shows a token twice or out of place)."""
    sample = attempt.sample
    assert isinstance(sample, Sample)
    if out.first_index is None:  # a worker that does not say: trust the arrival order
        return [(worker_id, out)]
    attempt.pending.setdefault(out.first_index, []).append((worker_id, out))
    ready: list[tuple[str, m.CoreOutput]] = []
    expected = len(sample.output_token_ids)
    while attempt.pending:
        index = min(attempt.pending)
        if index > expected:
            break  # a gap: wait for the missing tokens
        held = attempt.pending[index]
        w, o = held.pop(0)
        if not held:
            del attempt.pending[index]
        skip = expected - index
        if skip:
            logprobs = o.new_logprobs[skip:] if o.new_logprobs is not None else None
            tokens = o.new_token_ids[skip:]
            o = msgspec.structs.replace(
                o, new_token_ids=tokens, new_logprobs=logprobs, first_index=expected
            )
            if not tokens and o.finish_reason is None:
                continue
        ready.append((w, o))
        expected += len(o.new_token_ids)
        if o.finish_reason is not None:
            break
    return ready
