"""A hand-off over the tcp backend with `kv_transport_security: mac` (ipc/security.py,
`KVMac`): the decode side drops every message whose MAC fails, as `Worker._drain` does,
before decoding it. A batch tampered with on the wire is then missing, so the transfer
counts as damaged and the decode worker recomputes the prompt: the request still ends
with exactly the greedy tokens of a local run. A forged batch from a peer without the key
never reaches the pool."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from pdserve.ipc import messages as m
from pdserve.ipc import security
from pdserve.transfer.base import KVReceiver
from pdserve.worker.handoff import HandOffs
from tests.helpers import make_hf_model_dir, torch_threads
from tests.transfer.helpers import Wire, xxh3
from tests.worker.test_handoff import (
    DECODE,
    GREEDY,
    PROMPT,
    assert_idle,
    make_core,
    prefill_worker,
    reserve,
    run_to_end,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("kv-mac"), "llama_mha")


@pytest.fixture(scope="module")
def reference(model_dir) -> list[int]:
    """The greedy tokens of PROMPT on one aggregated core."""
    core = make_core(model_dir)
    core.add_request("ref", PROMPT, GREEDY)
    return run_to_end(core)


def rewrite(frames: list[bytearray]) -> list[bytearray]:
    """What an attacker on the path does to a `nonce | KVLayer | data.. | tag` message:
    change the KV bytes and fix the batch's checksum to match, so only the MAC can tell."""
    frames[-2][0] ^= 0x40  # the last part before the tag: KV bytes
    layer = m.decode(bytes(frames[1]))
    fixed = msgspec.structs.replace(layer, checksum=xxh3(frames[2:-1]))
    frames[1] = bytearray(m.encode(fixed))
    return frames


def received(wire: Wire, mac: security.KVMac, tamper_at: int | None) -> list:
    """The KV socket's messages up to `KVDone`, opened with `mac` like the worker does;
    the one at index `tamper_at` (a KVLayer) is rewritten on the way (`rewrite`)."""
    opened, index = [], 0
    while True:
        frames = [bytearray(f.buffer) for f in wire.pull.recv_multipart(copy=False)]
        if index == tamper_at:
            frames = rewrite(frames)
        parts = mac.open(frames)
        index += 1
        if parts is None:
            continue  # dropped before decoding
        message = m.decode(bytes(parts[0]))
        opened.append((message, [memoryview(p) for p in parts[1:]]))
        if isinstance(message, m.KVDone):
            return opened


def run_hand_off(model_dir, tamper_at: int | None) -> tuple[list[int], HandOffs, int]:
    key = security.generate_key()
    mac = security.KVMac(key)
    wire = Wire(kv_mac=mac)
    try:
        decode_core = make_core(model_dir)
        decode = HandOffs(DECODE, decode_core, {}, KVReceiver(decode_core.runner.kv_cache))
        prefill = prefill_worker(model_dir, wire)
        (reserved,) = decode.on_command(reserve("r1"))
        dest = m.KVDestination(DECODE, reserved.transfer_id, reserved.block_ids, wire.addr, "tcp")
        prefill.on_command(m.PrefillRequest("r1", PROMPT, GREEDY, dest, 30.0))
        replies = []
        while prefill.core.has_unfinished_requests():
            replies += prefill.after_step(prefill.core.step())
        step, _sent = replies
        (first,) = step.outputs
        messages = received(wire, mac, tamper_at)
        for message, frames in messages:
            if isinstance(message, m.KVLayer):
                decode.on_kv_layer(message, frames)
            else:
                decode.on_kv_done(message)
        num_computed = decode.core.requests["r1"].num_computed_tokens
        return first.new_token_ids + run_to_end(decode.core), decode, num_computed
    finally:
        wire.close()


def test_an_authenticated_hand_off_decodes_from_the_transferred_kv(model_dir, reference):
    tokens, decode, num_computed = run_hand_off(model_dir, tamper_at=None)
    assert num_computed == len(PROMPT)  # intact: decoding went on from the sent KV
    assert tokens == reference
    assert_idle(decode)


def test_a_tampered_batch_is_dropped_and_the_prompt_recomputed(model_dir, reference):
    tokens, decode, num_computed = run_hand_off(model_dir, tamper_at=1)
    assert num_computed == 0  # damaged: preempted to recompute here
    assert tokens == reference
    assert_idle(decode)


def test_a_forged_batch_from_a_peer_without_the_key_never_lands(model_dir):
    key = security.generate_key()
    mac = security.KVMac(key)
    wire = Wire(kv_mac=mac)
    rogue = zmq.Context()
    try:
        decode_core = make_core(model_dir)
        decode = HandOffs(DECODE, decode_core, {}, KVReceiver(decode_core.runner.kv_cache))
        (reserved,) = decode.on_command(reserve("r1"))
        kv = decode_core.runner.kv_cache
        frame = bytes([0x7F]) * (kv[0, 0, 0].numel() * kv.element_size())
        layer = m.KVLayer(reserved.transfer_id, 0, reserved.block_ids[:1], 0, 2 * len(frame), [1])
        for forger in (security.KVMac(security.generate_key()), None):  # other key, no MAC
            sock = rogue.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock = security.MacSocket(sock, forger) if forger else sock
            sock.connect(wire.addr)
            sock.send(m.encode(layer), zmq.SNDMORE)
            sock.send(frame, zmq.SNDMORE)
            sock.send(frame)
            assert mac.open(wire.pull.recv_multipart(copy=False)) is None
        assert not kv.any()
        decode.core.abort_requests(["r1"])
    finally:
        rogue.destroy(0)
        wire.close()
