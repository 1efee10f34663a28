"""Turns the engine core's token ids into text: detokenising, stop strings, `RequestOutput`s.

It runs wherever text is needed — beside the engine offline, in the router when serving —
and imports no torch. A stop string is found here (it spans token boundaries, so the core
cannot see it); the processor then reports the request finished and returns its id so the
caller can abort it in the core, freeing its blocks.

With several samples per prompt (`n > 1`) each sample is its own core request; the
processor gathers them back under the parent request id.

Streaming. `CompletionOutput.text` is cumulative; `RequestState.take_delta()` returns what
is new since the last call, holding back a tail that could still grow into a stop string so
a client never sees text that is later retracted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.outputs import (
    CompletionOutput,
    EngineCoreOutput,
    RequestMetrics,
    RequestOutput,
    SampleDelta,
    StreamUpdate,
)
from pdserve.sampling_params import SamplingParams
from pdserve.tokenizer import IncrementalDetokenizer, Tokenizer


def child_request_id(parent_id: str, index: int) -> str:
    return parent_id if index == 0 else f"{parent_id}#{index}"


def find_stop_string(
    text: str, num_new_chars: int, stops: tuple[str, ...]
) -> tuple[str, int] | None:
    """The earliest stop string that appears in the last `num_new_chars` characters (or
    straddles their start); returns it with its index in `text`."""
    best: tuple[str, int] | None = None
    for stop in stops:
        begin = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, begin)
        if index != -1 and (best is None or index < best[1]):
            best = (stop, index)
    return best


@dataclass(slots=True)
class SampleState:
    """One sample (one core request) of a request."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    params: SamplingParams
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_sent_chars: int = 0  # streaming: characters already handed out
    num_sent_tokens: int = 0  # streaming: token ids already handed out
    finish_sent: bool = False

    def add(self, out: EngineCoreOutput) -> bool:
        """Apply one core output; return True if a stop string just finished the sample."""
        self.token_ids += out.new_token_ids
        if out.new_logprobs is not None:
            self._add_logprobs(out)
        stopped_by_string = False
        if self.detokenizer is not None:
            delta = self.detokenizer.add_tokens(out.new_token_ids)
            if out.finished:
                delta += self.detokenizer.flush()
            self.text += delta
            stopped_by_string = self._check_stop_strings(len(delta))
        if out.finished and self.finish_reason is None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        return stopped_by_string

    def _add_logprobs(self, out: EngineCoreOutput) -> None:
        if self.logprobs is None:
            self.logprobs, self.cumulative_logprob = [], 0.0
        for token_id, entry in zip(out.new_token_ids, out.new_logprobs, strict=True):
            self.logprobs.append(entry)
            self.cumulative_logprob += entry[token_id].logprob

    def _check_stop_strings(self, num_new_chars: int) -> bool:
        if self.finish_reason is not None or not self.params.stop or not num_new_chars:
            return False
        found = find_stop_string(self.text, num_new_chars, self.params.stop)
        if found is None:
            return False
        stop, index = found
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self.text = self.text[:end]
        self.finish_reason, self.stop_reason = "stop", stop
        return True

    def take_delta(self) -> str:
        """New text since the last call, minus a tail that may become a stop string."""
        visible = len(self.text)
        if self.finish_reason is None and self.params.stop:
            visible -= max(len(s) for s in self.params.stop) - 1
        delta = self.text[self.num_sent_chars : max(visible, self.num_sent_chars)]
        self.num_sent_chars += len(delta)
        return delta

    def take_update(self) -> SampleDelta | None:
        """What is new since the last call (text, token ids, logprobs, the finish), or
        None when nothing is. The finish is reported exactly once."""
        start, end = self.num_sent_tokens, len(self.token_ids)
        text = self.take_delta()
        is_finishing = self.finish_reason is not None and not self.finish_sent
        if not text and start == end and not is_finishing:
            return None
        self.num_sent_tokens = end
        self.finish_sent = self.finish_reason is not None
        return SampleDelta(
            index=self.index,
            text=text,
            token_ids=self.token_ids[start:end],
            logprobs=self.logprobs[start:end] if self.logprobs is not None else None,
            finish_reason=self.finish_reason if is_finishing else None,
            stop_reason=self.stop_reason if is_finishing else None,
        )

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.to_output() for s in self.samples],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics,
        )


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._sample_of: dict[str, tuple[RequestState, SampleState]] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> list[str]:
        """Track a request; return the core request ids of its samples."""
        samples = [
            SampleState(i, self._detokenizer(prompt_token_ids, params), params)
            for i in range(params.n)
        ]
        state = RequestState(
            request_id,
            prompt,
            prompt_token_ids,
            samples,
            RequestMetrics(arrival_time or time.monotonic()),
        )
        self.states[request_id] = state
        child_ids = [child_request_id(request_id, i) for i in range(params.n)]
        for child_id, sample in zip(child_ids, samples, strict=True):
            self._sample_of[child_id] = (state, sample)
        return child_ids

    def _detokenizer(self, prompt_token_ids, params) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens
        )

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply core outputs. Returns the updated requests' outputs and the core request ids
        that a stop string finished (the caller aborts them in the core)."""
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self._sample_of.get(out.request_id)
            if entry is None:
                continue  # already finished by a stop string; the core's late output
            state, sample = entry
            if sample.add(out):
                to_abort.append(out.request_id)
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if state.metrics.first_token_time is None and out.new_token_ids:
                state.metrics.first_token_time = now
            if sample.finish_reason is not None:
                del self._sample_of[out.request_id]
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = now
                del self.states[state.request_id]
            results.append(state.to_output())
        return results, to_abort

    def process_stream(
        self, outputs: list[EngineCoreOutput]
    ) -> tuple[dict[str, StreamUpdate], list[str]]:
        """Like `process`, but per updated request a `StreamUpdate` holding only what is
        new for each sample, keyed by request id."""
        touched = {
            entry[0].request_id: entry[0]
            for o in outputs
            if (entry := self._sample_of.get(o.request_id)) is not None
        }
        results, to_abort = self.process(outputs)
        by_id = {r.request_id: r for r in results}
        updates = {}
        for state in touched.values():
            deltas = [d for s in state.samples if (d := s.take_update()) is not None]
            output = by_id[state.request_id]
            updates[state.request_id] = StreamUpdate(deltas, output, output.finished)
        return updates, to_abort

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; return the core request ids to abort."""
        state = self.states.pop(request_id, None)
        if state is None:
            return []
        child_ids = [child_request_id(request_id, s.index) for s in state.samples]
        for child_id in child_ids:
            self._sample_of.pop(child_id, None)
        return child_ids
