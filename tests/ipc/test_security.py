"""CURVE on pdserve's sockets (ipc/security.py): key files, and who gets through."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat

import pytest
import zmq
import zmq.asyncio

from pdserve.errors import ConfigError
from pdserve.ipc import messages as m
from pdserve.ipc import security


def key_file(tmp_path, key=None):
    return security.write_key_file(key or security.generate_key(), tmp_path / "cluster.key")


def test_key_file_round_trips_at_0600_and_is_never_overwritten(tmp_path):
    key = security.generate_key()
    path = key_file(tmp_path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert security.load_key_file(path) == key
    assert key.secret.decode() not in repr(key)
    with pytest.raises(FileExistsError):
        security.write_key_file(security.generate_key(), path)


def test_a_key_file_others_can_read_or_without_secret_is_refused(tmp_path):
    path = key_file(tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        security.load_key_file(path)
    public_only = tmp_path / "public.key"
    public_only.write_text('curve\n    public-key = "' + "a" * 40 + '"\n')
    os.chmod(public_only, 0o600)
    with pytest.raises(ConfigError, match="no CURVE keypair"):
        security.load_key_file(public_only)
    with pytest.raises(ConfigError, match="cannot read"):
        security.load_key_file(tmp_path / "missing.key")


def test_temporary_key_lives_in_a_private_folder_until_removed():
    temp = security.TemporaryKey()
    assert stat.S_IMODE(temp.folder.stat().st_mode) == 0o700
    assert security.load_key_file(temp.path) == temp.key
    temp.remove()
    assert not temp.folder.exists()


def test_kv_tier_secret_is_shared_by_holders_of_one_key_only():
    key, other = security.generate_key(), security.generate_key()
    same = security.ClusterKey(key.public, key.secret)
    assert key.kv_tier_secret() == same.kv_tier_secret() != other.kv_tier_secret()
    assert len(key.kv_tier_secret()) == 32


def rogue_sockets(ctx: zmq.Context, cluster: security.ClusterKey, addr: str) -> list:
    """Peers without the cluster's secret: plain ZeroMQ, and CURVE with their own keypair
    (the cluster's public key is no secret)."""
    plain = ctx.socket(zmq.PUSH)
    public, secret = zmq.curve_keypair()
    own = ctx.socket(zmq.PUSH)
    own.curve_publickey, own.curve_secretkey, own.curve_serverkey = public, secret, cluster.public
    stolen_public = ctx.socket(zmq.PUSH)  # claims the cluster's public key, lacks its secret
    stolen_public.curve_publickey, stolen_public.curve_secretkey = cluster.public, secret
    stolen_public.curve_serverkey = cluster.public
    socks = [plain, own, stolen_public]
    for sock in socks:
        sock.setsockopt(zmq.LINGER, 0)  # a refused peer's queue never drains
        sock.setsockopt(zmq.SNDTIMEO, 500)  # nor blocks once the handshake failed
        sock.connect(addr)
    return socks


def test_only_holders_of_the_cluster_key_reach_a_bound_socket():
    key = security.generate_key()
    server_ctx, client_ctx, rogue_ctx = zmq.Context(), zmq.Context(), zmq.Context()
    auth = security.secure_context(server_ctx, key)
    security.secure_context(client_ctx, key).stop()  # client defaults; no server here
    pull = security.as_server(server_ctx.socket(zmq.PULL), key)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    addr = f"tcp://127.0.0.1:{port}"
    try:
        for sock in rogue_sockets(rogue_ctx, key, addr):
            with contextlib.suppress(zmq.Again):
                sock.send(m.encode(m.Shutdown()))
        assert pull.poll(1000) == 0  # nothing got through, not even to the decoder
        good = client_ctx.socket(zmq.PUSH)
        good.connect(addr)
        good.send(m.encode(m.Shutdown()))
        assert pull.poll(5000) == zmq.POLLIN
        assert m.decode(pull.recv()) == m.Shutdown()
        assert pull.poll(300) == 0  # and the rogue messages never arrive later
        good.close(0)
    finally:
        pull.close(0)
        auth.stop()
        rogue_ctx.destroy(0)
        client_ctx.destroy(0)
        server_ctx.term()


def test_the_asyncio_context_is_protected_the_same_way():
    async def main():
        key = security.generate_key()
        ctx = zmq.asyncio.Context()
        auth = security.secure_context(ctx, key)
        pull = security.as_server(ctx.socket(zmq.PULL), key)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        addr = f"tcp://127.0.0.1:{port}"
        rogue_ctx = zmq.Context()
        for sock in rogue_sockets(rogue_ctx, key, addr):
            with contextlib.suppress(zmq.Again):
                sock.send(b"forged")
        assert await pull.poll(1000) == 0
        good = ctx.socket(zmq.PUSH)  # the context's defaults make it a keyed client
        good.connect(addr)
        await good.send(b"ok")
        assert await asyncio.wait_for(pull.recv(), 5) == b"ok"
        good.close(0)
        pull.close(0)
        auth.stop()
        rogue_ctx.destroy(0)
        ctx.term()

    asyncio.run(main())


def test_without_a_key_sockets_stay_plain():
    ctx = zmq.Context()
    assert security.secure_context(ctx, None) is None
    pull = security.as_server(ctx.socket(zmq.PULL), None)
    assert pull.mechanism == zmq.NULL
    pull.close(0)
    ctx.term()


# -- kv_transport_security "mac": plain ZeroMQ, every message authenticated ----------------


def mac_pair(key: security.ClusterKey):
    """A decode worker's plain `kv` PULL in a keyed context (as `Worker` makes it) and a
    prefill worker's MAC'd peers."""
    from pdserve.transfer.base import PeerSockets

    ctx = zmq.Context()
    auth = security.secure_context(ctx, key)
    pull = security.plain(ctx.socket(zmq.PULL))
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, 5000)
    addr = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    peers = PeerSockets(ctx, linger_ms=0, kv_mac=security.KVMac(key))
    return ctx, auth, pull, addr, peers


def test_kv_mac_passes_the_cluster_messages_and_refuses_tampered_or_forged_ones():
    key = security.generate_key()
    mac = security.KVMac(key)
    ctx, auth, pull, addr, peers = mac_pair(key)
    rogue = zmq.Context()
    try:
        header, data = m.encode(m.Shutdown()), memoryview(bytes(range(256)) * 64)
        sock = peers.get(addr)
        sock.send(header, zmq.SNDMORE)
        tracker = sock.send(data, copy=False, track=True)  # zero-copy, as TcpSender sends
        frames = pull.recv_multipart(copy=False)
        assert tracker.done or tracker.wait(5) is None
        assert len(frames) == 4  # nonce | header | data | tag
        assert [bytes(f.buffer) for f in mac.open(frames)] == [header, bytes(data)]
        raw = [bytes(f.buffer) for f in frames]
        for i in (0, 1, 2, 3):  # any bit of nonce, header, data or tag
            tampered = list(raw)
            tampered[i] = bytes([tampered[i][0] ^ 1]) + tampered[i][1:]
            assert mac.open(tampered) is None, i
        resplit = [raw[0], raw[1] + raw[2][:1], raw[2][1:], raw[3]]  # same bytes, cut elsewhere
        assert mac.open(resplit) is None
        assert mac.open(raw[1:3]) is None  # a plain peer's message: no nonce, no tag
        other = security.KVMac(security.generate_key())  # another cluster's key
        forged = security.MacSocket(security.plain(rogue.socket(zmq.PUSH)), other)
        forged.setsockopt(zmq.LINGER, 0)
        forged.connect(addr)
        forged.send(header, zmq.SNDMORE)
        forged.send(bytes(data))
        assert mac.open(pull.recv_multipart(copy=False)) is None
    finally:
        peers.close()
        pull.close(0)
        auth.stop()
        rogue.destroy(0)
        ctx.term()


def test_kv_mac_socket_is_plain_zeromq_and_a_curve_peer_cannot_reach_it():
    """mac mode changes the kv socket only: a CURVE client (an encrypt-mode worker) fails
    the handshake with it, so a cluster with mixed modes loses KV, never accepts it
    unchecked."""
    key = security.generate_key()
    ctx, auth, pull, addr, peers = mac_pair(key)
    try:
        assert pull.mechanism == zmq.NULL
        curve_client = ctx.socket(zmq.PUSH)  # the context's defaults: a keyed CURVE client
        curve_client.setsockopt(zmq.LINGER, 0)
        curve_client.setsockopt(zmq.SNDTIMEO, 500)
        assert curve_client.mechanism == zmq.CURVE
        curve_client.connect(addr)
        with contextlib.suppress(zmq.Again):
            curve_client.send(b"encrypted")
        assert pull.poll(1000) == 0
        curve_client.close(0)
    finally:
        peers.close()
        pull.close(0)
        auth.stop()
        ctx.term()
