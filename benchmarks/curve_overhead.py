"""What securing the tcp KV path costs (ipc/security.py): ZeroMQ PUSH → PULL between two
processes, plain vs CURVE vs a MAC per message, side by side in one run.

A transfer is one prompt's KV as the tcp backend sends it: per layer of the built-in
model's layout (8 layers, 4 KV heads x 64, block 16, fp32: 32 KiB per block and layer),
one message of a keys frame and a values frame of N blocks each. The receiver reads every
message (and in `mac` mode checks it) and answers once the last one is in; timed from the
first send to that answer. Median of `--repeats` after `--warmup`. Modes:

- `plain`: no security (`--insecure-no-curve`);
- `curve` (`kv_transport_security: encrypt`, the default): libzmq encrypts and
  authenticates every byte (libsodium's XSalsa20-Poly1305) in its I/O threads;
- `mac` (`kv_transport_security: mac`): plain ZeroMQ, each message carrying a nonce and a
  Poly1305 tag (`security.KVMac`) that the receiver checks before using it.

    python benchmarks/curve_overhead.py [--blocks 64,256] [--repeats 15]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import zmq

from pdserve.ipc import security

NUM_LAYERS = 8
BLOCK_BYTES = 16 * 4 * 64 * 4  # per block, keys or values, one layer
MODES = ("plain", "curve", "mac")


def sockets(ctx: zmq.Context, mode: str, key) -> tuple[zmq.Socket, zmq.Socket, object]:
    """(a bound KV PULL, a PUSH to connect to another one, the context's authenticator)
    as a worker of `mode` makes them."""
    auth = security.secure_context(ctx, None if mode == "plain" else key)
    if mode == "mac":
        mac = security.KVMac(key)
        pull = security.plain(ctx.socket(zmq.PULL))
        return pull, security.MacSocket(security.plain(ctx.socket(zmq.PUSH)), mac), auth
    pull = security.as_server(ctx.socket(zmq.PULL), key if mode == "curve" else None)
    return pull, ctx.socket(zmq.PUSH), auth


def receiver(ports_out, ports_in, mode: str, key, rounds: int) -> None:
    ctx = zmq.Context()
    pull, done, auth = sockets(ctx, mode, key)
    mac = security.KVMac(key) if mode == "mac" else None
    ports_out.put(pull.bind_to_random_port("tcp://127.0.0.1"))
    done.connect(f"tcp://127.0.0.1:{ports_in.get()}")  # one queue each way: no race
    for _ in range(rounds):
        for _ in range(NUM_LAYERS):
            frames = pull.recv_multipart(copy=False)
            if mac is not None and mac.open(frames) is None:
                raise RuntimeError("a KV message failed its MAC")
        done.send(b"ok")
    for sock in (pull, done):
        sock.close(0)
    if auth is not None:
        auth.stop()
    ctx.term()


def measure(mode: str, key, num_blocks: int, warmup: int, repeats: int) -> float:
    """Median seconds per transfer of `num_blocks` blocks."""
    frame = bytes(num_blocks * BLOCK_BYTES)
    from_child, to_child = mp.Queue(), mp.Queue()
    proc = mp.Process(target=receiver, args=(from_child, to_child, mode, key, warmup + repeats))
    proc.start()
    ctx = zmq.Context()
    answers, push, auth = sockets(ctx, mode, key)
    answer_port = answers.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{from_child.get()}")
    to_child.put(answer_port)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        for _ in range(NUM_LAYERS):
            push.send(frame, zmq.SNDMORE, copy=False)  # keys
            push.send(frame, copy=False)  # values
        answers.recv_multipart()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    proc.join()
    for sock in (push, answers):
        sock.close(0)
    if auth is not None:
        auth.stop()
    ctx.term()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="64,256")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    key = security.generate_key()
    head = " | ".join(f"{m} ms | {m} GB/s" for m in MODES)
    print(f"| blocks | MiB | {head} | CURVE / plain | mac / plain |")
    print("|---" * (4 + 2 * len(MODES)) + "|")
    for num_blocks in (int(b) for b in args.blocks.split(",")):
        num_bytes = 2 * NUM_LAYERS * num_blocks * BLOCK_BYTES
        seconds = {m: measure(m, key, num_blocks, args.warmup, args.repeats) for m in MODES}
        cells = " | ".join(f"{s * 1e3:.2f} | {num_bytes / s / 1e9:.2f}" for s in seconds.values())
        ratios = (
            f"{seconds['plain'] / seconds['curve']:.2f} | {seconds['plain'] / seconds['mac']:.2f}"
        )
        print(f"| {num_blocks} | {num_bytes / 2**20:.0f} | {cells} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
