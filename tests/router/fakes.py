"""Engine clients for testing the HTTP layer without sockets or worker processes.

- `InProcessEngineClient`: a real `LLMEngine` stepping in a background thread. Requests
  and aborts reach the thread through a queue; each update is handed back to the asyncio
  loop of the request that asked for it. Text comes from the engine's own
  `OutputProcessor.process_stream`, as in the real client, so the app sees real deltas
  (stop-string hold-back, n > 1 fan-in, logprobs). `aborts` records every `abort()` call.
- `ScriptedEngineClient`: plays back fixed updates, then optionally raises; or fails at the
  start, or reports no workers — for the error paths a real engine cannot be made to take.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from pdserve.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.errors import RequestFailedError, ServiceUnavailableError
from pdserve.outputs import CompletionOutput, RequestOutput, SampleDelta, StreamUpdate
from pdserve.router.client import EngineClient, Readiness, WorkerStatus
from pdserve.sampling_params import SamplingParams
from pdserve.tokenizer import Tokenizer

_END = object()  # the engine thread delivers this after the final update of a request


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """Engine state read inside the engine thread, between steps."""

    has_unfinished_requests: bool
    num_tracked_requests: int  # in the output processor
    num_free_blocks: int
    num_blocks: int


class InProcessEngineClient(EngineClient):
    def __init__(self, model_dir: Path, config: EngineConfig, model_name: str = "pdserve-tiny"):
        self.engine = LLMEngine(model_dir, config)
        self.model_name = model_name
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.core.max_model_len
        self.aborts: list[str] = []
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (loop, asyncio queue) of the coroutine waiting for its updates
        self._subscribers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- EngineClient
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.core.validate_request(prompt_token_ids, params)

    async def generate(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[StreamUpdate]:
        updates: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        command = ("add", request_id, prompt, prompt_token_ids, params, priority, loop, updates)
        self._commands.put(command)
        is_done = False
        try:
            while (item := await updates.get()) is not _END:
                if isinstance(item, BaseException):
                    is_done = True
                    raise item
                yield item
            is_done = True
        finally:
            if not is_done:  # closed early: the interface says this aborts the request
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self.aborts.append(request_id)
        self._commands.put(("abort", request_id))

    def readiness(self) -> Readiness:
        scheduler = self.engine.core.scheduler
        worker = WorkerStatus(
            "inproc-0",
            "mixed",
            True,
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_usage=self.engine.core.block_manager.usage,
        )
        return Readiness(True, workers=[worker])

    # -- test helpers
    async def snapshot(self) -> EngineSnapshot:
        """The engine's state once every command sent so far has been applied."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._commands.put(("snapshot", done))
        return await asyncio.wait_for(done, timeout=30)

    def close(self) -> None:
        self._commands.put(("stop",))
        self._thread.join(timeout=30)

    # -- the engine thread
    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                command = None
            if command is not None:
                if command[0] == "stop":
                    return
                self._apply(command)
                continue  # drain every pending command before the next step
            self._step()

    def _apply(self, command: tuple) -> None:
        kind, *args = command
        if kind == "add":
            request_id, prompt, token_ids, params, priority, loop, updates = args
            self._subscribers[request_id] = (loop, updates)
            try:
                self.engine.add_request(
                    request_id, {"prompt": prompt, "prompt_token_ids": token_ids}, params, priority
                )
            except Exception as exc:
                self._deliver(request_id, exc)
                self._deliver(request_id, _END)
        elif kind == "abort":
            (request_id,) = args
            self._subscribers.pop(request_id, None)
            self.engine.abort_request(request_id)
        elif kind == "snapshot":
            (done,) = args
            snapshot = self._snapshot()
            done.get_loop().call_soon_threadsafe(_resolve, done, snapshot)

    def _step(self) -> None:
        engine = self.engine
        try:
            updates, stopped = engine.processor.process_stream(engine.core.step())
            if stopped:
                engine.core.abort_requests(stopped)
        except Exception as exc:  # fail every request rather than kill the thread
            for request_id in list(self._subscribers):
                self._deliver(request_id, RequestFailedError(f"engine step failed: {exc}"))
                self._deliver(request_id, _END)
                engine.abort_request(request_id)
            return
        for request_id, update in updates.items():
            self._deliver(request_id, update)
            if update.finished:
                self._deliver(request_id, _END)
        if not engine.has_unfinished_requests():
            engine.core.runner.reset_threads()

    def _deliver(self, request_id: str, item: Any) -> None:
        subscriber = self._subscribers.get(request_id)
        if subscriber is None:
            return
        if item is _END:
            del self._subscribers[request_id]
        loop, updates = subscriber
        try:
            loop.call_soon_threadsafe(updates.put_nowait, item)
        except RuntimeError:  # that request's event loop has closed
            self._subscribers.pop(request_id, None)

    def _snapshot(self) -> EngineSnapshot:
        block_manager = self.engine.core.block_manager
        return EngineSnapshot(
            self.engine.has_unfinished_requests(),
            len(self.engine.processor.states),
            block_manager.num_free_blocks,
            block_manager.num_blocks,
        )


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


class ScriptedEngineClient(EngineClient):
    """Plays back `script` (lists of (text, token_ids) deltas of sample 0), then raises
    `fail_with` if given; `unavailable` makes it not ready and raise at generate. With
    `finish`, the last scripted update finishes the request (finish reason "length")."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        script: list[tuple[str, list[int]]] = (),
        *,
        fail_with: BaseException | None = None,
        unavailable: bool = False,
        hang: bool = False,
        finish: bool = False,
        model_name: str = "scripted",
        max_model_len: int = 256,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.script = list(script)
        self.fail_with = fail_with
        self.unavailable = unavailable
        self.hang = hang  # after the script, wait forever (until cancelled)
        self.finish = finish
        self.aborts: list[str] = []
        self.started: list[str] = []
        self.priorities: list[int] = []

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        pass

    async def generate(self, request_id, prompt, prompt_token_ids, params, priority=0):
        self.priorities.append(priority)
        if self.unavailable:
            raise ServiceUnavailableError("no decode worker is alive")
        self.started.append(request_id)
        text, token_ids = "", []
        for step, (piece, ids) in enumerate(self.script, 1):
            text, token_ids = text + piece, token_ids + ids
            done = self.finish and step == len(self.script)
            reason = "length" if done else None
            samples = [
                CompletionOutput(i, text, list(token_ids), finish_reason=reason)
                for i in range(params.n)
            ]
            output = RequestOutput(request_id, prompt, prompt_token_ids, samples, done)
            deltas = [SampleDelta(i, piece, ids, finish_reason=reason) for i in range(params.n)]
            yield StreamUpdate(deltas, output, done)
        if self.hang:
            await asyncio.Event().wait()
        if self.fail_with is not None:
            raise self.fail_with

    async def abort(self, request_id: str) -> None:
        self.aborts.append(request_id)

    def readiness(self) -> Readiness:
        if self.unavailable:
            return Readiness(False, "no decode worker is alive", [])
        return Readiness(True, workers=[WorkerStatus("w0", "prefill", True, 2, 1, 0.25)])


# -- an HTTP client that can hang up ----------------------------------------------------------


@dataclass
class HangUpResult:
    status_code: int | None
    chunks: list[bytes]  # response body pieces received before hanging up (or to the end)
    on_return: Any = None  # what `on_return()` gave the moment the app returned


async def call_and_hang_up(
    app: Any,
    path: str,
    body: bytes,
    *,
    hang_up: Any,
    spec_version: str = "2.3",
    on_return: Any = None,
    timeout: float = 30,
) -> HangUpResult:
    """POST `body` to the ASGI `app` and disconnect once `await hang_up(result)` returns
    True (polled every 10 ms). `on_return()`, if given, is called as soon as the app
    returns, before anything else can run on the event loop.

    httpx's ASGI transport cannot do this: it collects the whole response before returning.
    With `spec_version` 2.3 (uvicorn's) the disconnect arrives as an `http.disconnect`
    message; with 2.4, `send` also raises OSError once the client is gone, as the spec says.
    """
    result = HangUpResult(None, [])
    gone = asyncio.Event()

    async def watch() -> None:
        while not gone.is_set():
            if await hang_up(result):
                gone.set()
            await asyncio.sleep(0.01)

    sent_body = False

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set() and spec_version >= "2.4":
            raise OSError("client disconnected")
        if message["type"] == "http.response.start":
            result.status_code = message["status"]
        elif message.get("body"):
            result.chunks.append(message["body"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    watcher = asyncio.ensure_future(watch())
    try:
        with anyio.fail_after(timeout):  # in this task: nothing runs between return and on_return
            await app(scope, receive, send)
        if on_return is not None:
            result.on_return = on_return()
    finally:
        gone.set()
        await watcher
    return result
