"""Who may speak on pdserve's ZeroMQ sockets: CURVE with one cluster key.

Every pdserve process of a cluster (router, workers) holds the same CURVE keypair, the
*cluster key*. Every bound socket (the router's PULL, a worker's `ctrl` and `kv`) is a
CURVE server with it; every connecting socket (router → worker commands, worker → router
outputs and heartbeats, prefill → decode KV) is a CURVE client presenting it; and a ZAP
handler (pyzmq's `zmq.auth`) in each process accepts only the cluster's public key. A
peer that lacks the secret half fails the handshake inside libzmq, so nothing it sends
reaches `messages.decode` (and everything that does is encrypted on the wire).

How the sockets get it, with small edits at the call sites:
- `secure_context(ctx, key)` sets the context's *default* socket options to those of a
  CURVE client, so every socket the context makes afterwards (`WorkerPool.connect`,
  `PeerSockets.get`, the worker's output and heartbeat sockets) presents the key without
  knowing about it, and it starts the ZAP handler for that context;
- `as_server(sock, key)` turns a socket into a CURVE server before it binds. A bound
  socket that forgot it still speaks CURVE as a client, so the mistake fails loudly
  (no handshake) instead of silently accepting anyone.

`key=None` is the operator's explicit opt-out (`--insecure-no-curve`): plain ZeroMQ,
logged as a warning by whoever chose it.

Key files use pyzmq's certificate format (`zmq.auth.load_certificate` reads them), are
created 0600 and never copied into argv, environment or logs: children get the path.
The Redis KV tier's HMAC key is derived from the secret half (`kv_tier_secret`), so every
worker of a cluster shares it without another file.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.thread import ThreadAuthenticator

from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

KEY_FILE_NAME = "cluster.key"
_BANNER = "#   pdserve cluster key (ZeroMQ CURVE): the secret half admits a process to the\n"
_BANNER += "#   cluster. Keep it 0600; copy it only to hosts that run pdserve router/worker.\n"


@dataclass(frozen=True)
class ClusterKey:
    """One CURVE keypair, both halves z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print the secret half
        return f"ClusterKey(public={self.public.decode()!r})"

    def kv_tier_secret(self) -> bytes:
        """The HMAC key for KV tier blocks shared between workers (Redis), derived from
        the secret half so that it needs no file of its own."""
        return hashlib.blake2b(self.secret, person=b"pdserve-kvtier", digest_size=32).digest()


def generate_key() -> ClusterKey:
    public, secret = zmq.curve_keypair()
    return ClusterKey(public, secret)


def write_key_file(key: ClusterKey, path: Path) -> Path:
    """Create `path` (it must not exist) readable by its owner alone, holding `key`."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(_BANNER)
        f.write("metadata\ncurve\n")
        f.write(f'    public-key = "{key.public.decode()}"\n')
        f.write(f'    secret-key = "{key.secret.decode()}"\n')
    return path


def load_key_file(path: Path | str) -> ClusterKey:
    """The key in `path`; refuses a file others can read or one without a secret half."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError("cluster_key_file", f"cannot read {path}: {e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError("cluster_key_file", f"{path} is readable by others; chmod 600 it")
    if not secret or len(public) != 40 or len(secret) != 40:
        raise ConfigError("cluster_key_file", f"{path} holds no CURVE keypair")
    return ClusterKey(public, secret)


class TemporaryKey:
    """A fresh cluster key in a private temporary folder, removed by `remove()`: what
    `pdserve serve` hands its worker children (as a path)."""

    def __init__(self) -> None:
        self.key = generate_key()
        self.folder = Path(tempfile.mkdtemp(prefix="pdserve-key-"))  # 0700
        self.path = write_key_file(self.key, self.folder / KEY_FILE_NAME)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _OnlyClusterKey:
    """ZAP credentials: a client is admitted iff it presents the cluster's public key
    (the CURVE handshake has already proved it holds the matching secret)."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, client_key: bytes) -> bool:
        return hmac.compare_digest(client_key, self.public)


def secure_context(ctx: zmq.Context, key: ClusterKey | None):
    """Make every socket `ctx` creates from now on a CURVE client with `key`, and start
    the ZAP handler that admits only `key` to this context's servers. Returns the
    authenticator (`stop()` it before closing the context), or None when `key` is None.
    An asyncio context needs a running event loop."""
    if key is None:
        return None
    is_async = isinstance(ctx, zmq.asyncio.Context)
    auth = AsyncioAuthenticator(ctx) if is_async else ThreadAuthenticator(ctx)
    auth.start()  # its inproc socket first: the defaults below are for tcp peers
    auth.configure_curve_callback("*", _OnlyClusterKey(key.public))
    ctx.setsockopt(zmq.CURVE_PUBLICKEY, key.public)
    ctx.setsockopt(zmq.CURVE_SECRETKEY, key.secret)
    ctx.setsockopt(zmq.CURVE_SERVERKEY, key.public)
    return auth


def as_server(sock: zmq.Socket, key: ClusterKey | None) -> zmq.Socket:
    """Make `sock` (about to bind) a CURVE server with `key`; nothing when key is None."""
    if key is not None:
        sock.curve_secretkey = key.secret
        sock.curve_publickey = key.public
        sock.curve_server = True
    return sock


# -- KV data with a MAC instead of CURVE (kv_transport_security: mac) -------------------------

KV_SECURITY_MODES = ("encrypt", "mac")
NONCE_BYTES = 16
TAG_BYTES = 16


class KVMac:
    """Authenticates the messages of a decode worker's `kv` socket without encrypting them.

    Why: CURVE encrypts every frame in libzmq's I/O thread (XSalsa20-Poly1305, plus a copy
    into a new message on each side), which costs the tcp KV leg 2-14x its plain rate
    (docs/benchmarks.md). KV blocks need integrity and origin (a forged batch would poison
    a decode worker's pool and, from there, the shared tiers); on a private network they
    may not need secrecy. This gives the first two at ~12 GB/s.

    On the wire, one message = `nonce | part_1 .. part_n | tag`: `nonce` is 16 random bytes
    per message; the one-time Poly1305 key is BLAKE2b(nonce) keyed with a key derived from
    the cluster secret (`kv_mac_key`), so no two messages share one; the tag covers every
    part with its length (a different split of the same bytes does not verify). The
    receiver checks the tag before anything is decoded and drops what fails.

    Threat model: a peer without the cluster key can neither inject a message nor alter
    one in flight; it can read KV on the wire (not confidential) and replay a captured
    message, which only repeats a batch of the same transfer (the transfer id is covered,
    and finished transfers ignore late batches).
    """

    def __init__(self, key: ClusterKey) -> None:
        from cryptography.hazmat.primitives.poly1305 import Poly1305  # mac mode only

        self._poly1305 = Poly1305
        self._key = hashlib.blake2b(key.secret, person=b"pdserve-kvmac", digest_size=32).digest()

    def start(self, nonce: bytes | None = None):
        """A fresh (nonce, authenticator) for one message; `update` it with `add`."""
        nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
        one_time = hashlib.blake2b(nonce, key=self._key, digest_size=32).digest()
        return nonce, self._poly1305(one_time)

    @staticmethod
    def add(mac, part) -> None:
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)

    def open(self, frames: list) -> list | None:
        """The message parts of `nonce | parts | tag` frames (zmq Frames or bytes), or
        None when the tag does not verify."""
        if len(frames) < 3:
            return None
        nonce, parts, tag = _buffer(frames[0]), frames[1:-1], _buffer(frames[-1])
        if len(nonce) != NONCE_BYTES or len(tag) != TAG_BYTES:
            return None
        _, mac = self.start(bytes(nonce))
        for part in parts:
            self.add(mac, _buffer(part))
        return parts if hmac.compare_digest(mac.finalize(), bytes(tag)) else None


class MacSocket:
    """A PUSH socket whose messages `KVMac` authenticates: the same `send` as a zmq
    socket (parts flagged SNDMORE until the last), so senders need not know."""

    def __init__(self, sock: zmq.Socket, mac: KVMac) -> None:
        self.sock = sock
        self._mac = mac
        self._open = None  # the authenticator of the message being sent

    def send(self, data, flags: int = 0, copy: bool = True, track: bool = False):
        if self._open is None:
            nonce, self._open = self._mac.start()
            self.sock.send(nonce, zmq.SNDMORE)
        self._mac.add(self._open, _buffer(data))
        try:
            result = self.sock.send(data, flags | zmq.SNDMORE, copy=copy, track=track)
            if not flags & zmq.SNDMORE:  # the last part: the tag ends the message
                self.sock.send(self._open.finalize())
                self._open = None
        except zmq.ZMQError:
            self._open = None  # the sender drops this socket (`PeerSockets.drop`)
            raise
        return result

    def __getattr__(self, name: str):  # setsockopt, close, ...: the socket's own
        return getattr(self.sock, name)


def plain(sock: zmq.Socket) -> zmq.Socket:
    """Make `sock` speak ZeroMQ's NULL mechanism, overriding the CURVE client defaults
    `secure_context` gave its context (for a `kv` socket in mac mode)."""
    sock.curve_server = False  # libzmq: CURVE_SERVER=0 selects the NULL mechanism
    return sock


def _buffer(frame):
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


def warn_insecure(who: str) -> None:
    logger.warning(
        "%s: CURVE is OFF (--insecure-no-curve): any process that reaches the internal "
        "ZeroMQ ports can register workers, inject KV and shut workers down",
        who,
    )
