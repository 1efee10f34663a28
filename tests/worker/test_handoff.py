"""`HandOffs`, a worker's bookkeeping of KV imports and hand-offs, on a real engine core (a
tiny Llama, 16 blocks of 16 tokens):

- decode side: reservations, backpressure, timeouts, damaged imports recomputed to the same
  tokens, aborts during a transfer;
- prefill side: an expired prefill, an aborted one; the decode worker is told either way;
- a whole prefill → decode hand-off in one process, messages routed by hand, for each
  backend with and without layer-wise streaming: the decode side continues with exactly
  the greedy tokens of a plain local run.

shm pools live in a temporary folder standing in for /dev/shm (`shm.SHM_DIR` patched).
"""

from __future__ import annotations

import time

import msgspec
import pytest
import torch

from pdserve.config import ModelConfig
from pdserve.engine.core import EngineCore
from pdserve.engine.request import RequestStatus
from pdserve.ipc import messages as m
from pdserve.sampling_params import SamplingParams
from pdserve.transfer import shm
from pdserve.transfer.base import KVReceiver
from pdserve.transfer.shm import ShmSender
from pdserve.transfer.streamer import KVStreamer
from pdserve.transfer.tcp import TcpSender
from pdserve.worker.handoff import HandOffs
from tests.helpers import make_engine_core, make_hf_model_dir, torch_threads
from tests.transfer.helpers import Wire, destination, xxh3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    return tmp_path


@pytest.fixture
def wire():
    w = Wire()
    yield w
    w.close()


DECODE, PREFILL = "decode-0", "prefill-0"
NUM_BLOCKS = 16  # of 16 tokens
PROMPT = list(range(100, 170))  # 70 tokens: 5 blocks, prefilled in 3 chunks of <= 32
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("transfer"), "llama_mha")


def make_core(model_dir, allocator=None) -> EngineCore:
    return make_engine_core(
        model_dir, allocator, num_kv_blocks=NUM_BLOCKS, max_num_batched_tokens=32, num_threads=1
    )


def run_to_end(core: EngineCore) -> list[int]:
    """Step until idle; the tokens produced, in order (one request at a time here)."""
    tokens = []
    while core.has_unfinished_requests():
        for out in core.step():
            tokens += out.new_token_ids
    return tokens


@pytest.fixture(scope="module")
def reference(model_dir) -> list[int]:
    """The greedy tokens of PROMPT on one aggregated core."""
    core = make_core(model_dir)
    core.add_request("ref", PROMPT, GREEDY)
    return run_to_end(core)


@pytest.fixture
def decode(model_dir) -> HandOffs:
    core = make_core(model_dir)
    return HandOffs(DECODE, core, {}, KVReceiver(core.runner.kv_cache))


def reserve(request_id: str, prompt=PROMPT, timeout_s: float = 30.0) -> m.ReserveKV:
    return m.ReserveKV(request_id, f"t-{request_id}", prompt, GREEDY, timeout_s)


def num_free(handoffs: HandOffs) -> int:
    return handoffs.core.block_manager.num_free_blocks


def assert_idle(handoffs: HandOffs) -> None:
    core = handoffs.core
    assert core.requests == {} and not core.has_unfinished_requests()
    assert num_free(handoffs) == NUM_BLOCKS
    core.block_manager.check_integrity()


def test_reserve_answers_with_the_blocks_it_holds(decode):
    assert decode.on_command(reserve("r1")) == [m.KVReserved(DECODE, "r1", "t-r1", [0, 1, 2, 3, 4])]
    assert decode.on_command(reserve("r2", PROMPT[:20])) == [
        m.KVReserved(DECODE, "r2", "t-r2", [5, 6])
    ]
    assert num_free(decode) == NUM_BLOCKS - 7
    assert decode.core.requests["r1"].status == RequestStatus.WAITING_FOR_KV
    assert not decode.core.has_unfinished_requests()  # reservations only wait


def test_priority_reaches_the_engine_requests(decode):
    decode.on_command(m.AddRequest("local", PROMPT[:20], GREEDY, priority=-4))
    decode.on_command(m.ReserveKV("remote", "t-remote", PROMPT[:20], GREEDY, 30.0, priority=7))
    assert decode.core.requests["local"].priority == -4
    assert decode.core.requests["remote"].priority == 7
    decode.on_command(m.Abort(["local", "remote"], is_writer_absent=True))
    assert_idle(decode)


def test_a_silent_prefill_worker_times_out_and_frees_the_blocks(decode):
    decode.on_command(reserve("r1", timeout_s=0.2))
    assert decode.tick() == []
    time.sleep(0.25)
    assert decode.tick() == [m.RequestFailed(DECODE, "r1", "KV transfer timed out")]
    assert_idle(decode)
    decode.on_kv_done(m.KVDone("t-r1", "r1", 0, first_token_id=1))  # too late: ignored
    assert_idle(decode)


def test_a_full_pool_makes_reservations_wait_in_order(decode):
    big = list(range(1, 201))  # 13 blocks
    assert decode.on_command(reserve("r1", big))[0].block_ids == list(range(13))
    assert decode.on_command(reserve("r2")) == []  # 5 blocks needed, 3 free
    assert decode.on_command(reserve("r3", PROMPT[:20])) == []  # fits, but r2 is first
    assert (decode.num_pending, decode.tick()) == (2, [])
    decode.on_kv_done(m.KVDone("t-r1", "r1", 0, first_token_id=7, is_finished=True))
    assert decode.tick() == [
        m.KVReserved(DECODE, "r2", "t-r2", [0, 1, 2, 3, 4]),
        m.KVReserved(DECODE, "r3", "t-r3", [5, 6]),
    ]
    assert num_free(decode) == NUM_BLOCKS - 7


def test_the_kv_deadline_runs_from_admission_not_receipt(decode):
    decode.on_command(reserve("r1", list(range(1, 201))))
    decode.on_command(reserve("r2", timeout_s=0.6))
    time.sleep(0.4)
    decode.on_kv_done(m.KVDone("t-r1", "r1", 0, first_token_id=7, is_finished=True))
    assert decode.tick()[0].request_id == "r2"  # admitted 0.4 s after receipt
    time.sleep(0.3)
    assert decode.tick() == []  # 0.7 s after receipt, 0.3 s after admission
    time.sleep(0.35)
    assert decode.tick() == [m.RequestFailed(DECODE, "r2", "KV transfer timed out")]
    assert_idle(decode)


def test_a_reservation_waiting_too_long_for_room_fails(decode):
    decode.on_command(reserve("r1", list(range(1, 201))))
    decode.on_command(reserve("r2", timeout_s=0.1))
    time.sleep(0.15)
    assert decode.tick() == [m.RequestFailed(DECODE, "r2", "no KV blocks free in time")]
    assert decode.num_pending == 0


def test_an_id_taken_while_waiting_for_room_fails_that_reservation_only(decode):
    decode.on_command(reserve("r1", list(range(1, 201))))
    decode.on_command(reserve("r2"))
    decode.on_command(reserve("r3", PROMPT[:20]))
    decode.on_command(m.AddRequest("r2", [1, 2, 3], GREEDY))  # same id, run locally
    decode.on_kv_done(m.KVDone("t-r1", "r1", 0, first_token_id=7, is_finished=True))
    failed, reserved = decode.tick()
    assert failed == m.RequestFailed(DECODE, "r2", "request id 'r2' is already in use")
    assert reserved.request_id == "r3"
    assert decode.num_pending == 0


def one_block_frames(handoffs: HandOffs) -> list[memoryview]:
    """The keys and values frames of one block of one layer, not all zeros."""
    kv = handoffs.core.runner.kv_cache
    num_bytes = kv[0, 0, :1].numel() * kv.element_size()
    pattern = bytes(range(256))
    return [memoryview(bytearray(p * (num_bytes // 256))) for p in (pattern, pattern[::-1])]


def one_block_batch(layer: int, block_ids: list[int], frames, signature=None) -> m.KVLayer:
    signature = xxh3(frames) if signature is None else signature
    return m.KVLayer("t-r1", layer, block_ids, signature, sum(map(len, frames)), [1])


DAMAGED = {  # how: the one batch sent (layer, block ids, signed right, frames), KVDone's count, error
    "bad-checksum": ((0, [0], False, 2), 1, None),
    "foreign-block": ((0, [9], True, 2), 1, None),
    "bad-layer": ((2, [0], True, 2), 1, None),
    "keys-frame-only": ((0, [0], True, 1), 1, None),
    "missing-batch": (None, 1, None),
    "sender-error": (None, 0, "send failed"),
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_import_is_recomputed_to_the_same_tokens(decode, reference, kind):
    batch, num_batches, error = DAMAGED[kind]
    decode.on_command(reserve("r1"))
    if batch is not None:
        layer, block_ids, is_signed, num_frames = batch
        frames = one_block_frames(decode)[:num_frames]
        signature = xxh3(frames) ^ (0 if is_signed else 1)
        decode.on_kv_layer(one_block_batch(layer, block_ids, frames, signature), frames)
    assert not decode.core.runner.kv_cache.any()  # nothing written
    decode.on_kv_done(m.KVDone("t-r1", "r1", num_batches, reference[0], error=error))
    request = decode.core.requests["r1"]
    assert (request.status, request.num_computed_tokens) == (RequestStatus.PREEMPTED, 0)
    assert request.output_token_ids == reference[:1]
    assert num_free(decode) == NUM_BLOCKS and decode.core.scheduler.num_waiting == 1
    assert run_to_end(decode.core) == reference[1:]
    assert_idle(decode)


def test_an_intact_batch_lands_in_its_reserved_block(decode):
    """The control for the damaged cases above: the same batch, signed, is written."""
    (reserved,) = decode.on_command(reserve("r1"))
    frames = one_block_frames(decode)
    block = reserved.block_ids[3]
    decode.on_kv_layer(one_block_batch(1, [block], frames), frames)
    kv = decode.core.runner.kv_cache
    for kv_index, frame in enumerate(frames):  # keys, then values
        assert kv[1, kv_index, block].view(torch.uint8).numpy().tobytes() == bytes(frame)
    written = torch.zeros_like(kv, dtype=torch.bool)
    written[1, :, block] = True
    assert not kv[~written].any()  # and nothing else
    decode.on_kv_done(m.KVDone("t-r1", "r1", 1, first_token_id=7))
    request = decode.core.requests["r1"]  # intact: decodes from its first token
    assert (request.status, request.num_computed_tokens) == (RequestStatus.RUNNING, len(PROMPT))
    decode.core.abort_requests(["r1"])
    assert_idle(decode)


def test_an_abort_during_a_transfer_keeps_the_blocks_until_kv_done(decode):
    decode.on_command(reserve("r1"))
    assert decode.on_command(m.Abort(["r1"])) == []
    assert num_free(decode) == NUM_BLOCKS - 5  # the prefill worker may still write them
    assert decode.core.requests["r1"].status == RequestStatus.WAITING_FOR_KV
    frames = one_block_frames(decode)
    decode.on_kv_layer(one_block_batch(0, [0], frames), frames)
    assert not decode.core.runner.kv_cache.any()  # late batches of an abort are dropped
    decode.on_kv_done(m.KVDone("t-r1", "r1", 1, first_token_id=5))
    assert_idle(decode)


def test_an_aborted_transfer_expires_silently(decode):
    decode.on_command(reserve("r1", timeout_s=0.1))
    decode.on_command(m.Abort(["r1"]))
    time.sleep(0.15)
    assert decode.tick() == []  # the router already forgot r1
    assert_idle(decode)


def prefill_worker(model_dir, wire: Wire, layerwise: bool = True) -> HandOffs:
    core = make_core(model_dir)
    kv = core.runner.kv_cache
    layout = m.KVLayout(kv.shape[0], kv.shape[2], kv.shape[3], kv.shape[4], kv.shape[5], "float32")
    senders = {
        "tcp": TcpSender(kv, layout, wire.peers),
        "shm": ShmSender(kv, layout, wire.peers),
    }
    core.kv_streamer = KVStreamer(senders, layout.num_layers, layout.block_size, layerwise)
    return HandOffs(PREFILL, core, senders, KVReceiver(kv))


def test_a_prefill_past_its_deadline_is_aborted_and_the_decode_side_told(model_dir, wire):
    prefill = prefill_worker(model_dir, wire)
    dest = destination("tcp", [0, 1, 2, 3, 4], kv_addr=wire.addr)
    assert prefill.on_command(m.PrefillRequest("r1", PROMPT, GREEDY, dest, 0.0)) == []
    assert prefill.after_step(prefill.core.step()) == []  # first chunk: 2 blocks held
    assert num_free(prefill) == NUM_BLOCKS - 2
    assert prefill.tick() == [m.RequestFailed(PREFILL, "r1", "prefill did not finish in time")]
    assert_idle(prefill)
    done, frames = wire.receive()  # and no KV batch before it: the deadline had passed
    assert (done, frames) == (m.KVDone("t-1", "r1", 0, error="prefill timed out"), [])


def test_an_aborted_prefill_tells_the_decode_side(model_dir, wire):
    prefill = prefill_worker(model_dir, wire)
    dest = destination("tcp", [0, 1, 2, 3, 4], kv_addr=wire.addr)
    prefill.on_command(m.PrefillRequest("r1", PROMPT, GREEDY, dest, 30.0))
    prefill.after_step(prefill.core.step())
    assert prefill.on_command(m.Abort(["r1"])) == []
    assert_idle(prefill)
    messages = [wire.receive()[0] for _ in range(3)]  # two layers of the first chunk
    assert [type(msg) for msg in messages] == [m.KVLayer, m.KVLayer, m.KVDone]
    assert messages[-1] == m.KVDone("t-1", "r1", 2, error="aborted")


# ---- a whole hand-off, in one process -----------------------------------------------------


def hand_off(prefill: HandOffs, decode: HandOffs, wire: Wire, request_id: str, backend: str):
    """Reserve on `decode`, prefill on `prefill`, carry the KV socket's messages across by
    hand, then decode to the end. Returns the tokens, the `KVSent` and the `KVDone`."""
    (reserved,) = decode.on_command(reserve(request_id))
    num_cached = reserved.num_cached_blocks  # as the router does: only the rest is sent
    dest = m.KVDestination(
        DECODE,
        reserved.transfer_id,
        reserved.block_ids[num_cached:],
        wire.addr,
        backend,
        str(shm.shm_pool_path(DECODE)),
        first_block=num_cached,
    )
    assert prefill.on_command(m.PrefillRequest(request_id, PROMPT, GREEDY, dest, 30.0)) == []
    replies = []
    while prefill.core.has_unfinished_requests():
        replies += prefill.after_step(prefill.core.step())
    assert_idle(prefill)
    (step, sent) = replies
    (first,) = step.outputs
    assert (first.request_id, first.finish_reason) == (request_id, None)
    num_batches = 0
    while True:
        message, frames = wire.receive()
        if isinstance(message, m.KVDone):
            break
        assert len(frames) == 2 * len(message.run_lengths) > 0
        decode.on_kv_layer(message, frames)
        num_batches += 1
    assert message.num_batches == num_batches
    decode.on_kv_done(message)
    request = decode.core.requests[request_id]  # intact: decodes from its first token
    assert (request.status, request.num_computed_tokens) == (RequestStatus.RUNNING, len(PROMPT))
    assert request.output_token_ids == first.new_token_ids
    return first.new_token_ids + run_to_end(decode.core), sent, message


def shared_allocator(model_dir):
    """Like `Worker._shared_allocator`: the decode pool in a shared file."""
    model_config = ModelConfig.from_pretrained(model_dir)

    def allocate(num_blocks: int) -> torch.Tensor:
        c = model_config
        layout = m.KVLayout(c.num_layers, num_blocks, 16, c.num_kv_heads, c.head_dim, "float32")
        return shm.create_shared_pool(shm.shm_pool_path(DECODE), layout)

    return allocate


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "after-forward"])
@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_a_handed_off_request_decodes_to_the_local_greedy_tokens(
    model_dir, reference, shm_dir, wire, backend, layerwise
):
    decode_core = make_core(model_dir, shared_allocator(model_dir))
    decode = HandOffs(DECODE, decode_core, {}, KVReceiver(decode_core.runner.kv_cache))
    prefill = prefill_worker(model_dir, wire, layerwise)
    kv = prefill.core.runner.kv_cache
    prompt_bytes = 5 * kv[:, :, :1].numel() * kv.element_size()  # 5 blocks, every layer
    # r1 prefills in 3 chunks; r2 in one, its first 4 blocks cached on the prefill worker
    # and on the decode worker too (delta hand-over: only its last block moves).
    num_batches = {"r1": 3 * 2, "r2": 1 * 2} if backend == "tcp" else {"r1": 0, "r2": 0}
    num_bytes = {"r1": prompt_bytes, "r2": prompt_bytes // 5}
    for request_id in ("r1", "r2"):
        tokens, sent, done = hand_off(prefill, decode, wire, request_id, backend)
        assert tokens == reference
        assert (sent.request_id, sent.num_bytes) == (request_id, num_bytes[request_id])
        assert (done.num_batches, done.error) == (num_batches[request_id], None)
        assert_idle(decode)


BAD_PREFILLS = {  # PROMPT needs 5 destination blocks (ipc/validate.py)
    "too few blocks": ([0, 1, 2, 3], {}, 30.0),
    "too many blocks": ([0, 1, 2, 3, 4, 5], {}, 30.0),
    "repeated block": ([0, 1, 1, 2, 3], {}, 30.0),
    "negative block": ([-1, 1, 2, 3, 4], {}, 30.0),
    "first_block past the prompt": ([0], {"first_block": 9}, 30.0),
    "unknown backend": ([0, 1, 2, 3, 4], {"backend": "rdma"}, 30.0),
    "infinite deadline": ([0, 1, 2, 3, 4], {}, float("inf")),
}


@pytest.mark.parametrize("case", BAD_PREFILLS)
def test_a_prefill_request_outside_its_reservation_is_refused(model_dir, wire, case):
    """Validated before any work: the prefill worker would otherwise write KV where the
    decode worker reserved nothing for this request (shm and nixl write in place)."""
    block_ids, changes, deadline_s = BAD_PREFILLS[case]
    prefill = prefill_worker(model_dir, wire)
    dest = destination("tcp", block_ids, kv_addr=wire.addr)
    dest = msgspec.structs.replace(dest, **changes)
    (reply,) = prefill.on_command(m.PrefillRequest("r1", PROMPT, GREEDY, dest, deadline_s))
    assert isinstance(reply, m.RequestFailed) and reply.request_id == "r1"
    assert not reply.retryable
    assert_idle(prefill)
    assert wire.is_empty()  # not one KV batch
