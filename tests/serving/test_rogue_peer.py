"""A rogue process against real workers (issue 14, part 4): it knows every address and
speaks valid msgpack, but holds no cluster key. It sends `Shutdown`, `Fence` and `Abort`
to every worker's command socket, a `PrefillRequest` that would make the prefill worker
write KV into the decode worker's pool, forged `KVLayer`/`KVDone` batches to the decode
worker's KV socket, and a `Register` to the router. CURVE refuses every one: the pool is
unchanged, every worker keeps serving, greedy output afterwards equals before."""

from __future__ import annotations

import contextlib
import time

import zmq

from pdserve.ipc import messages as m
from pdserve.sampling_params import SamplingParams
from pdserve.transfer.base import checksum

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def forged_kv(layout: m.KVLayout) -> list[bytes]:
    block_bytes = 2 * layout.block_size * layout.num_kv_heads * layout.head_dim * 4
    frame = bytes([0x7F]) * block_bytes
    layer = m.KVLayer("forged", 0, [0], checksum(frame), len(frame), [1])
    return [m.encode(layer), frame]


def attack(cluster) -> None:
    handles = {h.role: h for h in cluster.client.pool.workers.values()}
    decode, prefill = handles["decode"].info, handles["prefill"].info
    dest = m.KVDestination(decode.worker_id, "forged", list(range(4)), decode.kv_addr, "tcp")
    prompt = list(range(10, 60))
    ctx = zmq.Context()
    # NOTE: a refused peer's queue never drains: no socket may wait on it (LINGER 0, for
    # the context's every socket, even one garbage-collected early), and a send that
    # finds no pipe left (the handshake already failed) gives up instead of blocking.
    ctx.setsockopt(zmq.LINGER, 0)
    ctx.setsockopt(zmq.SNDTIMEO, 500)
    evil = m.Register(
        "evil", "decode", 1, decode.ctrl_addr, decode.kv_addr, decode.kv_layout, 1, ["tcp"]
    )
    plan = [(cluster.client.router_addr, [m.encode(evil)])]
    for handle in cluster.client.pool.workers.values():
        commands = [m.Abort(["x"]), m.Fence(handle.incarnation)]
        if handle.info is prefill:
            commands.append(m.PrefillRequest("forged", prompt, GREEDY, dest, 30.0))
        commands.append(m.Shutdown())
        plan.append((handle.info.ctrl_addr, [m.encode(c) for c in commands]))
    done = m.encode(m.KVDone("forged", "forged", 1, first_token_id=1))
    plan.append((decode.kv_addr, [forged_kv(decode.kv_layout), done]))
    try:
        for addr, messages in plan:
            sock = ctx.socket(zmq.PUSH)
            sock.connect(addr)
            for message in messages:
                with contextlib.suppress(zmq.Again):
                    sock.send_multipart(message if isinstance(message, list) else [message])
        time.sleep(1.5)  # a worker that obeyed Shutdown would be gone by now
    finally:
        ctx.destroy(linger=0)


def test_a_peer_without_the_key_changes_nothing(cluster):
    prompt = list(range(100, 180))
    outputs = {}
    for mode, backend in (("aggregated", "shm"), ("disaggregated", "tcp")):
        cluster.set_routing(mode=mode, kv_backend=backend)
        outputs[mode] = cluster.generate(prompt, GREEDY, f"rogue-before-{mode}")[0]
    before = {w: h.incarnation for w, h in cluster.client.pool.workers.items()}
    attack(cluster)
    after = {w: h.incarnation for w, h in cluster.client.pool.workers.items()}
    assert after == before  # no "evil", nobody fenced, replaced or gone
    assert all(h.is_accepting for h in cluster.client.pool.workers.values())
    assert all(cluster.workers.procs[w].poll() is None for w in before)
    for mode, backend in (("aggregated", "shm"), ("disaggregated", "tcp")):
        cluster.set_routing(mode=mode, kv_backend=backend)
        output = cluster.generate(prompt, GREEDY, f"rogue-after-{mode}")[0]
        assert output.outputs[0].token_ids == outputs[mode].outputs[0].token_ids
    stats = cluster.wait_idle()
    assert all(free == total for free, total in stats.values()), stats
