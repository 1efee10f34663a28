"""KV transfer throughput: each backend vs this machine's raw limit, side by side.

One transfer is what a prefill worker sends a decode worker for one prompt: N blocks of
every layer of the model's KV layout. Sender and receiver are two processes, as in
serving (the receiver owns a shared pool in /dev/shm, like a decode worker):

    backend  path measured                                    raw limit
    shm      ShmSender.send_layer per layer into the          memcpy (torch copy_) of the same
             receiver's mapped pool, then KVDone              bytes in the same per-layer sizes,
                                                              two warm preallocated buffers
    tcp      TcpSender.send_layer per layer (keys and         loopback TCP socket: sendall /
             values frames straight from the pool per run     recv_into of the same bytes in
             of source blocks, gathered first only past       the same per-layer messages,
             8 runs; xxh3 checksum; zero-copy send), flush,   into a preallocated buffer
             KVDone; the receiver checks, verifies and
             writes each batch (KVReceiver.write_layer)
    zmq      the tcp path's ZeroMQ leg alone: prebuilt        (same socket limit)
             keys and values frames per layer, no gather,
             checksum or write
    nixl     NixlSender.send_layer per layer (a NIXL WRITE    (same memcpy limit)
             of each run of blocks into the receiver's
             registered pool), flush, KVDone; only where
             the optional `nixl` package is installed

The nixl agents (UCX) exist only while the nixl row is measured: for each transfer size
the receiver registers its pool with a new agent and hands the sender its `peer_info()`
over the control socket, the sender registers its own pool; both agents are dropped
before the next row, because each keeps a progress thread that polls without pause (a
core each) and would slow every other row on a small machine. UCX picks the transport;
between two processes on one host without xpmem or knem that is `cma`
(process_vm_writev: the kernel copies into the receiver's pages).

Timing: shm, nixl and memcpy end when the sender's last copy or write (and KVDone)
returns: the bytes are then in the receiver's pages (nixl: `flush()` saw every write
complete). tcp, zmq and socket end when the receiver answers a request sent after the
last byte (one small round trip, the same in all three). Reported:
the median of `--repeats` timed transfers after `--warmup` untimed ones; the receiver's
pool is checked against the source blocks after each backend's runs. GB/s are 1e9 bytes
per second. The last table times the tcp path's stages in one process, per transfer:
the gather (only when a layer's source blocks form more than `MAX_ZERO_COPY_RUNS` runs,
e.g. with --fragmented; consecutive ids go out as zero-copy frames, nothing to gather), the
xxh3 checksum over a batch's frames (computed on each side), and the receiver's whole
`write_layer` (size checks, checksum, copy into the destination blocks).

    python benchmarks/kv_transfer.py [--blocks 64,256] [--repeats 15] [--fragmented]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import common
import msgspec
import torch
import xxhash
import zmq

from pdserve.config import ModelConfig
from pdserve.ipc import messages as m
from pdserve.transfer import shm
from pdserve.transfer.backends import make_sender
from pdserve.transfer.base import KVReceiver, PeerSockets, block_runs, checksum
from pdserve.transfer.nixl import nixl_available
from pdserve.transfer.shm import TORCH_DTYPES, ShmSender
from pdserve.transfer.tcp import MAX_ZERO_COPY_RUNS, TcpSender

GOALS = {"shm": 0.70, "tcp": 0.60}  # nixl: none yet, its rows say "(info)"
RAW = {"shm": "memcpy", "tcp": "socket", "zmq": "socket", "nixl": "memcpy"}
MODES = ("memcpy", "shm", "socket", "zmq", "tcp", "nixl")


def model_layout(model: str | None, block_size: int, dtype: str, num_blocks: int) -> m.KVLayout:
    """The KV layout of `--model`, or of the built-in model (its config; no weights)."""
    if model:
        config = ModelConfig.from_pretrained(model)
    else:
        from pdserve.model.builtin import MODEL_CONFIG

        config = ModelConfig.from_hf(MODEL_CONFIG)
    return m.KVLayout(
        config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype
    )


def block_ids(num_blocks: int, pool_blocks: int, fragmented: bool, seed: int) -> list[int]:
    """Consecutive ids (one run per layer), or a seeded scatter over the pool."""
    if not fragmented:
        return list(range(num_blocks))
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(pool_blocks, generator=gen)[:num_blocks].tolist()


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes as a flat memoryview (what a ZeroMQ frame holds)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def frames_checksum(frames: list[memoryview]) -> int:
    """A `KVLayer`'s checksum: xxh3_64 over its raw frames, in order."""
    h = xxhash.xxh3_64()
    for frame in frames:
        h.update(frame)
    return h.intdigest()


def digest(pool: torch.Tensor, ids: list[int]) -> int:
    """xxh3 of blocks `ids` of every layer, in order: equal iff the bytes are."""
    blocks = pool[:, :, ids].contiguous()  # [L, 2, n, B, H, D]
    return checksum(as_bytes(blocks))


# ----------------------------------------------------------------------------- receiver


def receiver_main(conn, layout: m.KVLayout, threads: int) -> None:
    """The decode side: a shared pool, a KV socket, a raw socket; serves the sender."""
    torch.set_num_threads(threads)
    ctx = zmq.Context()
    kv, ctrl = ctx.socket(zmq.PULL), ctx.socket(zmq.REP)
    kv_port = kv.bind_to_random_port("tcp://127.0.0.1")
    ctrl_port = ctrl.bind_to_random_port("tcp://127.0.0.1")
    listener = socket.create_server(("127.0.0.1", 0))
    path = shm.shm_pool_path("bench-receiver")
    nixl = None  # the NIXL agent that registers the pool, while the nixl row runs
    try:
        pool = shm.create_shared_pool(path, layout)
        conn.send((f"tcp://127.0.0.1:{kv_port}", f"tcp://127.0.0.1:{ctrl_port}"))
        conn.send((listener.getsockname()[1], str(path)))
        raw, _ = listener.accept()
        receivers = {
            "shm": lambda cmd: _until_done(kv, lambda msg, frames: True),
            "tcp": lambda cmd: _until_done(kv, KVReceiver(pool).write_layer),
            "zmq": lambda cmd: _until_done(kv, lambda msg, frames: True),
            "nixl": lambda cmd: _until_done(kv, lambda msg, frames: True),
            "socket": lambda cmd: _recv_raw(raw, cmd["layer_bytes"], layout.num_layers),
            "memcpy": lambda cmd: True,
        }
        while (cmd := ctrl.recv_json())["mode"] != "stop":
            if cmd["mode"] == "verify":
                ctrl.send_json(digest(pool, cmd["dst_ids"]) == cmd["digest"])
                continue
            if cmd["mode"] == "nixl-register":  # this pool's NixlPeer, or why there is none
                try:
                    nixl = make_sender("nixl", pool, layout, None, agent_name=cmd["agent_name"])
                    ctrl.send(msgspec.msgpack.encode(nixl.peer_info()))
                except Exception as e:
                    ctrl.send(msgspec.msgpack.encode(f"{type(e).__name__}: {e}"))
                continue
            if cmd["mode"] == "nixl-release":  # after the sender dropped its own agent
                if nixl is not None:
                    nixl.close()
                nixl = None  # the last reference: the agent and its progress thread end
                ctrl.send_json("released")
                continue
            pool.zero_()  # each backend must write its own blocks
            ctrl.send_json("ready")
            for _ in range(cmd["runs"]):
                is_ok = receivers[cmd["mode"]](cmd)
                ctrl.recv_json()  # the sender's "done?" after its last byte
                ctrl.send_json(is_ok)
        ctrl.send_json("bye")
        raw.close()
    finally:
        if nixl is not None:
            nixl.close()
        path.unlink(missing_ok=True)
        listener.close()
        kv.close(linger=0)
        ctrl.close(linger=0)
        ctx.term()


def _until_done(kv: zmq.Socket, write: Callable) -> bool:
    """Take KV batches until the transfer's KVDone; True if every batch was good."""
    num_good = 0
    while True:
        frames = kv.recv_multipart(copy=False)
        msg = m.decode(frames[0].buffer)
        if isinstance(msg, m.KVDone):
            return num_good == msg.num_batches
        num_good += bool(write(msg, [f.buffer for f in frames[1:]]))


def _recv_raw(raw: socket.socket, layer_bytes: int, num_layers: int) -> bool:
    buffer = memoryview(bytearray(layer_bytes))  # preallocated once per transfer size
    for _ in range(num_layers):
        received = 0
        while received < layer_bytes:
            received += raw.recv_into(buffer[received:], layer_bytes - received)
    return True


# ----------------------------------------------------------------------------- sender


class Sender:
    """The prefill side: a local pool with seeded contents and one sender per backend."""

    def __init__(self, layout: m.KVLayout, addrs: tuple, args: argparse.Namespace) -> None:
        (self.kv_addr, ctrl_addr), (raw_port, self.shm_path) = addrs
        self.layout, self.args = layout, args
        self.ctx = zmq.Context()
        self.ctrl = self.ctx.socket(zmq.REQ)
        self.ctrl.connect(ctrl_addr)
        self.peers = PeerSockets(self.ctx)
        self.raw = socket.create_connection(("127.0.0.1", raw_port))
        gen = torch.Generator().manual_seed(args.seed)
        self.pool = torch.randn(layout.shape, generator=gen).to(TORCH_DTYPES[layout.dtype])
        self.senders = {
            "shm": ShmSender(self.pool, layout, self.peers),
            "tcp": TcpSender(self.pool, layout, self.peers),
        }  # and "nixl" while its row runs (see _nixl_register)
        self.nixl_peer: m.NixlPeer | None = None  # the receiver's registered pool
        self.nixl_agents = 0  # agents created so far: each gets a new name

    def measure(self, num_blocks: int) -> dict[str, float]:
        """Median seconds per transfer of `num_blocks` blocks, per mode."""
        args, layers = self.args, range(self.layout.num_layers)
        src = block_ids(num_blocks, self.layout.num_blocks, args.fragmented, args.seed + 1)
        dst = block_ids(num_blocks, self.layout.num_blocks, args.fragmented, args.seed + 2)
        layer_slices = [self.pool[i][:, src].contiguous() for i in layers]  # pre-gathered
        layer_bytes = layer_slices[0].numel() * layer_slices[0].element_size()
        copies = [(s, torch.empty_like(s)) for s in layer_slices]
        frames = [[as_bytes(s[0]), as_bytes(s[1])] for s in layer_slices]  # keys, values
        sends = {
            "memcpy": lambda: [out.copy_(s) for s, out in copies],
            "shm": lambda: self._send("shm", src, dst),
            "tcp": lambda: self._send("tcp", src, dst),
            "nixl": lambda: self._send("nixl", src, dst),
            "zmq": lambda: self._send_frames(frames, dst),
            "socket": lambda: [self.raw.sendall(f) for pair in frames for f in pair],
        }
        results = {}
        for mode in args.modes:
            if mode == "nixl":
                self._nixl_register()
            results[mode] = self._time(mode, sends[mode], layer_bytes)
            if mode == "nixl":
                self._nixl_release()
            if mode in ("shm", "tcp", "nixl"):
                self.ctrl.send_json(
                    {"mode": "verify", "dst_ids": dst, "digest": digest(self.pool, src)}
                )
                if not self.ctrl.recv_json():
                    raise RuntimeError(f"{mode}: the receiver's blocks differ from the source")
        return results

    def _nixl_register(self) -> None:
        """Both pools registered with NIXL agents: the receiver's first, its `peer_info()`
        back over the control socket, then this side's (agent names unique per run)."""
        self.nixl_agents += 1
        suffix = f"{self.nixl_agents}-{os.getpid()}"
        self.ctrl.send_json({"mode": "nixl-register", "agent_name": f"kvbench-recv-{suffix}"})
        reply = msgspec.msgpack.decode(self.ctrl.recv(), type=m.NixlPeer | str)
        if isinstance(reply, str):
            raise RuntimeError(f"nixl: the receiver could not register its pool: {reply}")
        self.nixl_peer = reply
        agent_name = f"kvbench-send-{suffix}"
        self.senders["nixl"] = make_sender(
            "nixl", self.pool, self.layout, self.peers, agent_name=agent_name
        )

    def _nixl_release(self) -> None:
        """Drop both agents (this side's first: it holds a connection to the other), so
        their polling threads stop before the next row."""
        sender = self.senders.pop("nixl", None)
        if sender is not None:
            sender.close()
        del sender  # the last reference: the agent and its progress thread end
        self.ctrl.send_json({"mode": "nixl-release"})
        self.ctrl.recv_json()
        self.nixl_peer = None

    def _time(self, mode: str, send: Callable[[], object], layer_bytes: int) -> float:
        runs = self.args.warmup + self.args.repeats
        self.ctrl.send_json({"mode": mode, "runs": runs, "layer_bytes": layer_bytes})
        self.ctrl.recv_json()
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            send()
            if mode in ("shm", "nixl", "memcpy"):  # the bytes are in place when these return
                elapsed = time.perf_counter() - start
                self.ctrl.send_json("done?")
                is_ok = self.ctrl.recv_json()
            else:
                self.ctrl.send_json("done?")
                is_ok = self.ctrl.recv_json()
                elapsed = time.perf_counter() - start
            if not is_ok:
                raise RuntimeError(f"{mode}: the receiver refused a batch")
            seconds.append(elapsed)
        return statistics.median(seconds[self.args.warmup :])

    def _dest(self, backend: str, dst: list[int]) -> m.KVDestination:
        return m.KVDestination(
            "receiver", "t", dst, self.kv_addr, backend, self.shm_path, self.nixl_peer
        )

    def _send(self, backend: str, src: list[int], dst: list[int]) -> None:
        dest, sender = self._dest(backend, dst), self.senders[backend]
        for layer in range(self.layout.num_layers):
            sender.send_layer(dest, layer, src, dst)
        sender.flush()  # as KVStreamer.end_step: frames read the pool until sent
        num_batches = self.layout.num_layers if sender.sends_messages else 0
        sender.finish(dest, m.KVDone("t", "r", num_batches, first_token_id=0))

    def _send_frames(self, frames: list[list[memoryview]], dst: list[int]) -> None:
        sock = self.peers.get(self.kv_addr)
        for layer, (keys, values) in enumerate(frames):
            msg = m.KVLayer("t", layer, dst, 0, len(keys) + len(values), [len(dst)])
            sock.send(m.encode(msg), zmq.SNDMORE)
            sock.send(keys, zmq.SNDMORE, copy=False)
            sock.send(values, copy=False)
        sock.send(m.encode(m.KVDone("t", "r", len(frames), first_token_id=0)))

    def close(self) -> None:
        self.ctrl.send_json({"mode": "stop"})
        self.ctrl.recv_json()
        self.raw.close()
        self.peers.close()
        self.ctrl.close(linger=0)
        self.ctx.term()


def sender_main(conn, layout: m.KVLayout, addrs: tuple, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    sender = Sender(layout, addrs, args)
    try:
        conn.send({n: sender.measure(n) for n in args.blocks})
    finally:
        sender.close()


# ----------------------------------------------------------------------------- stages


def stage_seconds(layout: m.KVLayout, num_blocks: int, args: argparse.Namespace) -> dict:
    """The tcp path's stages for one transfer, in one process: the path its batches take
    (as `TcpSender.send_layer` chooses) and each stage's median seconds per transfer, None
    for a stage that path does not have."""
    gen = torch.Generator().manual_seed(args.seed)
    pool = torch.randn(layout.shape, generator=gen).to(TORCH_DTYPES[layout.dtype])
    ids = block_ids(num_blocks, layout.num_blocks, args.fragmented, args.seed + 1)
    layers = range(layout.num_layers)
    runs = [(start, n) for start, _, n in block_runs(ids, ids)]
    gather: Callable[[], None] | None = None
    if len(runs) > MAX_ZERO_COPY_RUNS:  # as TcpSender._gather: one reused buffer per layer
        buffers = [
            torch.empty((2, num_blocks, *layout.shape[3:]), dtype=pool.dtype) for _ in layers
        ]

        def gather() -> None:
            for i in layers:
                offset = 0
                for start, n in runs:
                    buffers[i][:, offset : offset + n].copy_(pool[i][:, start : start + n])
                    offset += n

        gather()
        frames = [[as_bytes(b[0]), as_bytes(b[1])] for b in buffers]
        run_lengths = [num_blocks]
        path = f"gathered ({len(runs)} runs)"
    else:  # keys and values of each run straight from the pool: nothing to gather
        frames = [
            [as_bytes(pool[i][kv, s : s + n]) for s, n in runs for kv in (0, 1)] for i in layers
        ]
        run_lengths = [n for _, n in runs]
        path = f"zero-copy ({len(runs)} run{'s' if len(runs) > 1 else ''})"
    msgs = [
        m.KVLayer("t", i, ids, frames_checksum(fs), sum(len(f) for f in fs), run_lengths)
        for i, fs in zip(layers, frames, strict=True)
    ]
    receiver = KVReceiver(torch.zeros_like(pool))

    def write() -> bool:
        return all(receiver.write_layer(msg, fs) for msg, fs in zip(msgs, frames, strict=True))

    if not write() or digest(receiver.kv_cache, ids) != digest(pool, ids):
        raise RuntimeError("write_layer refused a batch or wrote the wrong bytes")
    stages = {
        f"gather (sender, > {MAX_ZERO_COPY_RUNS} runs)": gather,
        "xxh3 checksum (each side)": lambda: [frames_checksum(fs) for fs in frames],
        "write_layer: checks + checksum + write (receiver)": write,
    }
    num_runs = args.warmup + args.repeats
    seconds = {
        name: None
        if fn is None
        else statistics.median([common.timed(fn)[0] for _ in range(num_runs)][args.warmup :])
        for name, fn in stages.items()
    }
    return {"path": path, "frames per layer": len(frames[0]), "seconds": seconds}


# ----------------------------------------------------------------------------- driver


def run_pair(layout: m.KVLayout, args: argparse.Namespace) -> dict:
    """Start the receiver, then the sender; the sender's timings."""
    spawn = mp.get_context("spawn")  # fresh interpreters: no inherited threads or pools
    recv_end, recv_child = spawn.Pipe()
    receiver = spawn.Process(target=receiver_main, args=(recv_child, layout, args.threads))
    receiver.start()
    addrs = (recv_end.recv(), recv_end.recv())
    try:
        send_end, send_child = spawn.Pipe()
        sender = spawn.Process(target=sender_main, args=(send_child, layout, addrs, args))
        sender.start()
        results = send_end.recv() if send_end.poll(args.timeout) else None
        sender.join(10)
        if results is None:
            raise RuntimeError(f"the sender gave no results (exit code {sender.exitcode})")
        return results
    finally:
        receiver.join(10)
        if receiver.is_alive():
            receiver.terminate()
            receiver.join()
            Path(addrs[1][1]).unlink(missing_ok=True)  # its shared pool, which it left


def result_rows(layout: m.KVLayout, block_bytes: int, timings: dict) -> list[dict]:
    rows = []
    for num_blocks, seconds in timings.items():
        num_bytes = num_blocks * block_bytes
        for backend in ("shm", "tcp", "zmq", "nixl"):
            if backend not in seconds or RAW[backend] not in seconds:
                continue
            gbps, raw = num_bytes / seconds[backend] / 1e9, num_bytes / seconds[RAW[backend]] / 1e9
            goal = GOALS.get(backend)
            rows.append(
                {
                    "tokens": num_blocks * layout.block_size,
                    "blocks": num_blocks,
                    "MiB": num_bytes / 2**20,
                    "backend": backend,
                    "ms": seconds[backend] * 1e3,
                    "GB/s": gbps,
                    "raw limit": RAW[backend],
                    "raw ms": seconds[RAW[backend]] * 1e3,
                    "raw GB/s": raw,
                    "ratio": gbps / raw,
                    "goal": f"≥{goal}" if goal else "(info)",
                    "verdict": common.goal_verdict(gbps / raw, goal) if goal else "",
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    layout = model_layout(args.model, args.block_size, args.dtype, max(args.blocks))
    block_bytes = layout.num_layers * 2 * layout.block_size * layout.num_kv_heads
    block_bytes *= layout.head_dim * TORCH_DTYPES[layout.dtype].itemsize
    nixl_skipped = "nixl" in args.modes and not nixl_available()
    if nixl_skipped:  # an optional extra: the other rows still run
        args.modes = [mode for mode in args.modes if mode != "nixl"]
    common.print_header(
        "KV transfer: backends vs raw limits",
        {
            "hardware": common.hardware_info() | {"load_avg_1m": round(common.machine_load(), 2)},
            "model KV layout": {
                "model": args.model or "built-in pdserve-tiny-llama (config only)",
                "layers": layout.num_layers,
                "kv_heads x head_dim": f"{layout.num_kv_heads} x {layout.head_dim}",
                "block_size": layout.block_size,
                "dtype": layout.dtype,
                "bytes per block (all layers, k+v)": f"{block_bytes} ({block_bytes / 2**10:g} KiB)",
            },
            "workload": {
                "transfers (blocks)": ", ".join(str(b) for b in args.blocks),
                "block ids": "seeded scatter" if args.fragmented else "consecutive",
                "repeats": f"median of {args.repeats} after {args.warmup} warm-up",
                "processes": f"sender + receiver (spawned), torch threads each: {args.threads}",
                "shm dir": str(shm.SHM_DIR),
            }
            | ({"nixl agents": "UCX, for the nixl rows only"} if "nixl" in args.modes else {}),
        },
    )
    if nixl_skipped:
        print("note: no nixl row: nixl._api is not importable (pip install pdserve[nixl])\n")
    timings = run_pair(layout, args)
    rows = result_rows(layout, block_bytes, timings)
    headers = list(rows[0]) if rows else []
    print(common.format_table(headers, [list(r.values()) for r in rows]))
    stages = {n: stage_seconds(layout, n, args) for n in args.blocks}
    print("\ntcp path stages, one process, GB/s (median; — where the path has no such stage):\n")
    names = list(next(iter(stages.values()))["seconds"])
    stage_rows = [
        [
            n,
            st["path"],
            st["frames per layer"],
            *(None if t is None else n * block_bytes / t / 1e9 for t in st["seconds"].values()),
        ]
        for n, st in stages.items()
    ]
    print(common.format_table(["blocks", "tcp path", "frames/layer", *names], stage_rows))
    layout_facts = msgspec.to_builtins(layout)
    common.write_json(args.json_out, {"layout": layout_facts, "results": rows, "stages": stages})
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument(
        "--model", default=None, help="HF model folder for the layout (default: built-in)"
    )
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--blocks",
        default="64,256",
        type=lambda s: [int(x) for x in s.split(",")],
        help="blocks per transfer, comma-separated (default: 64,256 = 1k and 4k tokens)",
    )
    p.add_argument("--repeats", type=int, default=15, help="timed transfers per size and mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed transfers first")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    p.add_argument("--fragmented", action="store_true", help="scatter block ids over the pools")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        type=lambda s: s.split(","),
        help=f"what to time, comma-separated (default: all of {','.join(MODES)})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the sender")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; choose from {MODES}")
    return args


if __name__ == "__main__":
    sys.exit(main())
