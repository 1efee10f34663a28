"""What CURVE (ipc/security.py) costs on the tcp KV path: ZeroMQ PUSH → PULL between two
processes, plain vs CURVE with the cluster key, side by side in one run.

A transfer is one prompt's KV as the tcp backend sends it: per layer of the built-in
model's layout (8 layers, 4 KV heads x 64, block 16, fp32: 32 KiB per block and layer),
a keys frame and a values frame of N blocks each. The receiver reads every frame and
answers once the last one is in; timed from the first send to that answer. Median of
`--repeats` after `--warmup`. CURVE encrypts and authenticates every byte (libsodium's
XSalsa20-Poly1305) on both sides, so the question is how much of the loopback rate is
left on this machine.

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


def receiver(port_queue, key, num_frames: int, rounds: int) -> None:
    ctx = zmq.Context()
    auth = security.secure_context(ctx, key)
    pull = security.as_server(ctx.socket(zmq.PULL), key)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    done = ctx.socket(zmq.PUSH)
    port_queue.put(port)
    done.connect(f"tcp://127.0.0.1:{port_queue.get()}")
    for _ in range(rounds):
        for _ in range(num_frames):
            pull.recv(copy=False)
        done.send(b"ok")
    for sock in (pull, done):
        sock.close(0)
    if auth is not None:
        auth.stop()
    ctx.term()


def measure(key, num_blocks: int, warmup: int, repeats: int) -> float:
    """Median seconds per transfer of `num_blocks` blocks."""
    frame = bytes(num_blocks * BLOCK_BYTES)
    num_frames = 2 * NUM_LAYERS
    queue = mp.Queue()
    proc = mp.Process(target=receiver, args=(queue, key, num_frames, warmup + repeats))
    proc.start()
    ctx = zmq.Context()
    auth = security.secure_context(ctx, key)
    answers = security.as_server(ctx.socket(zmq.PULL), key)
    answer_port = answers.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{queue.get()}")
    queue.put(answer_port)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        for _ in range(num_frames):
            push.send(frame, copy=False)
        answers.recv()
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
    print("| blocks | MiB | plain ms | plain GB/s | CURVE ms | CURVE GB/s | CURVE / plain |")
    print("|---|---|---|---|---|---|---|")
    for num_blocks in (int(b) for b in args.blocks.split(",")):
        num_bytes = 2 * NUM_LAYERS * num_blocks * BLOCK_BYTES
        plain = measure(None, num_blocks, args.warmup, args.repeats)
        curve = measure(key, num_blocks, args.warmup, args.repeats)
        print(
            f"| {num_blocks} | {num_bytes / 2**20:.0f} | {plain * 1e3:.2f} | "
            f"{num_bytes / plain / 1e9:.2f} | {curve * 1e3:.2f} | {num_bytes / curve / 1e9:.2f} | "
            f"{plain / curve:.2f} |"
        )


if __name__ == "__main__":
    main()
