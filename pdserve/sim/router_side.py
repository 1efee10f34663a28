"""The router's half of the simulation (sim/cluster.py runs the event loop and the workers).

`SimRouter` is what `router/cluster.py`'s `ClusterClient` does for a request, on the real
policy code: validate it (engine/limits.py), plan it (`plan_request` over `SimHandle`s,
with the real prefix index's matches), charge the load ledger, send `AddRequest` or the
remote path's `ReserveKV` → `KVReserved` → `PrefillRequest`, hand the first token's KV
over (`KVDone`), and keep the client's clock: TTFT when the first token reaches the
router, one inter-token gap per later token (a decode run's tokens carry the end times of
their steps), E2E at the last. Every request and token also queues its CPU cost on the
front end (sim/sharing.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from pdserve.bench.types import RequestRecord
from pdserve.engine.limits import check_request
from pdserve.errors import InvalidRequestError
from pdserve.router.kv_index import prompt_hashes
from pdserve.router.ledger import Charges
from pdserve.router.policy import plan_request
from pdserve.sim.handles import SimHandle
from pdserve.sim.worker import Output, Reserved, SimWorker, make_request


@dataclass(eq=False)
class Flight:
    """One request from the router's side (`router/samples.py`'s `Sample`)."""

    index: int
    request_id: str
    token_ids: list[int]
    max_tokens: int
    record: RequestRecord
    charges: Charges  # the router's load ledger (router/ledger.py), as in ClusterClient
    prefill: SimHandle | None = None
    decode: SimHandle | None = None
    num_cached_on_prefill: int = 0
    num_kv_bytes: int = 0  # KV sent to the decode worker (remote prefill)
    num_tokens: int = 0
    last_token_s: float = 0.0
    is_user: bool = False  # closed loop: its user sends the next request when it ends
    block_hashes: list | None = None  # the prompt's, as the router hashed it


class SimRouter:
    """Mixed into `ClusterSim`, whose state (workers, pool, ledger, index, clock) it uses."""

    def dispatch(self, index: int, token_ids: list[int], max_tokens: int) -> Flight:
        """A request reaching the router now (`Samples.place`, router/samples.py)."""
        record = RequestRecord(start_s=self.now, num_prompt_tokens=len(token_ids))
        charges = Charges(len(token_ids))
        flight = Flight(index, f"req-{index}", token_ids, max_tokens, record, charges)
        self._frontend_work(self.profile.frontend_s_per_request)
        error = self._validate(flight)
        if error is None:
            error = self._plan(flight)
        if error is not None:
            record.error, record.e2e_s, record.has_usage = error, 0.0, False
            self.on_done(flight)
        return flight

    def _validate(self, flight: Flight) -> str | None:
        pools = [w for w in self.workers.values() if w.role != "prefill"]
        smallest = min(pools, key=lambda w: w.block_manager.num_blocks) if pools else None
        try:
            check_request(
                flight.token_ids,
                make_request(flight.request_id, [], flight.max_tokens, 0).sampling_params,
                max_model_len=self.max_model_len,
                vocab_size=self.profile.model["vocab_size"],
                block_size=smallest.block_size if smallest else None,
                num_blocks=smallest.block_manager.num_blocks if smallest else None,
            )
        except InvalidRequestError as e:
            return f"HTTP 400: {e}"
        return None

    def _plan(self, flight: Flight) -> str | None:
        size = self.serve.engine.block_size
        hashes = flight.block_hashes = prompt_hashes(flight.token_ids, size)
        alive = [w.worker_id for w in self.pool.workers.values() if w.is_alive]
        matches = self.kv_index.match(hashes, alive)

        def cached(worker: SimHandle) -> int:
            return matches[worker.worker_id].num_blocks * worker.block_size

        num_prompt = len(flight.token_ids)
        plan = plan_request(self.pool, self.routing, num_prompt, cached, self.selector)
        if plan is None:
            return f"HTTP 503: no live worker for mode {self.routing.mode!r}"
        flight.decode = plan.decode
        self._flights[flight.request_id] = flight
        request = make_request(
            flight.request_id, flight.token_ids, flight.max_tokens, self.now, flight.block_hashes
        )
        worker = self.workers[plan.decode.worker_id]
        if plan.prefill is None:
            self.ledger.charge(flight.charges, plan.decode, num_prompt + flight.max_tokens)
            self.ledger.charge_prefill(flight.charges, plan.decode, cached(plan.decode))
            self._to_worker(worker.worker_id, worker.on_add, request)
            return None
        flight.prefill = plan.prefill
        flight.num_cached_on_prefill = cached(plan.prefill)
        self.ledger.charge(flight.charges, plan.decode, flight.max_tokens)
        self._to_worker(worker.worker_id, self._reserve, worker, request)
        return None

    def _reserve(self, worker: SimWorker, request) -> None:
        for reserved in worker.on_reserve(request):
            self._reply_reserved(reserved)

    def _reply_reserved(self, reserved: Reserved) -> None:
        self._to_router(self._on_reserved, reserved)

    def _on_reserved(self, reserved: Reserved) -> None:
        flight = self._flights[reserved.request_id]
        prefill = flight.prefill
        self.ledger.charge(flight.charges, prefill, len(flight.token_ids))
        self.ledger.charge_prefill(flight.charges, prefill, flight.num_cached_on_prefill)
        num_sent = reserved.num_blocks - reserved.num_cached_blocks
        flight.num_kv_bytes = (
            num_sent * self.serve.engine.block_size * self.profile.kv_bytes_per_token
        )
        request = make_request(
            flight.request_id, flight.token_ids, flight.max_tokens, self.now, flight.block_hashes
        )
        worker = self.workers[prefill.worker_id]
        self._to_worker(worker.worker_id, worker.on_add, request, flight)

    def _on_worker_output(self, worker: SimWorker, out: Output, step_s: float) -> None:
        flight = self._flights[out.request_id]
        if flight.prefill is not None and worker.worker_id == flight.prefill.worker_id:
            self._send_kv_done(flight, out, step_s)

    def _send_kv_done(self, flight: Flight, out: Output, step_s: float) -> None:
        """`KVDone` with the first token, at the decode worker once the KV is there."""
        decode = self.workers[flight.decode.worker_id]
        delay = self.profile.ipc_latency_s + self._transfer_tail(flight, step_s)
        args = (flight.request_id, out.token_id, out.is_finished)
        self.at(self.now + delay, self._deliver, decode.worker_id, decode.on_kv_done, args)

    def _transfer_tail(self, flight: Flight, step_s: float) -> float:
        """Hand-over time left after the prefill step (layer-wise streaming overlaps)."""
        if self.transfer.on_sender:
            return 0.0
        total = self.transfer.seconds(flight.num_kv_bytes)
        if not self.serve.kv_layerwise:
            return total
        return max(total / self.profile.model["num_layers"], total - step_s)

    def _on_step_outputs(self, worker_id: str, outputs: list[Output]) -> None:
        profile = self.profile
        self._frontend_work(
            len(outputs) * profile.frontend_s_per_token + profile.frontend_s_per_step
        )
        flights, now = self._flights, self.now
        for out in outputs:
            flight = flights[out.request_id]
            if flight.num_tokens and not out.is_finished:  # a decode token: only the clock
                flight.record.itl_s.append(now - flight.last_token_s)
                flight.num_tokens += 1
                flight.last_token_s = now
            else:
                self._on_token(flight, worker_id, out)

    def _on_run_outputs(
        self, worker_id: str, request_ids: list[str], ends: list[float], finished: list[Output]
    ) -> None:
        """A run's tokens, each at the time its step's `StepOutputs` would have arrived:
        only the clock, but for the requests that stop at its last step."""
        ipc = self.profile.ipc_latency_s
        arrivals = [t + ipc for t in ends]
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        stopping = {out.request_id for out in finished}
        num_steps = len(arrivals)
        per_step = len(request_ids) * self.profile.frontend_s_per_token
        self._frontend_work(num_steps * (per_step + self.profile.frontend_s_per_step))
        for request_id in request_ids:
            flight = self._flights[request_id]
            plain = num_steps - 1 if request_id in stopping else num_steps
            if plain:
                itl = flight.record.itl_s
                itl.append(arrivals[0] - flight.last_token_s)
                itl.extend(gaps[: plain - 1])
                flight.num_tokens += plain
                flight.last_token_s = arrivals[plain - 1]
        for out in finished:
            self._on_token(self._flights[out.request_id], worker_id, out)

    def _on_token(self, flight: Flight, worker_id: str, out: Output) -> None:
        """`Inbound.on_outputs` (router/inbound.py) for one output, and the client's clock."""
        self.ledger.prefill_done(flight.charges)
        is_from_prefill = flight.prefill is not None and worker_id == flight.prefill.worker_id
        if out.is_finished or is_from_prefill:
            self.ledger.release(flight.charges, worker_id)
        record = flight.record
        if flight.num_tokens == 0:
            record.ttft_s = self.now - record.start_s
            record.num_cached_tokens = out.num_cached_tokens
        else:
            record.itl_s.append(self.now - flight.last_token_s)
        flight.num_tokens += 1
        flight.last_token_s = self.now
        if out.is_finished:
            self.ledger.release_all(flight.charges)
            del self._flights[flight.request_id]
            record.num_output_tokens = flight.num_tokens
            record.e2e_s = self.now - record.start_s
            self.on_done(flight)
