"""KV tier admission on a request trace, without a model: the policy's hit share and
bytes written over many workload shapes in seconds.

The real `TieredKVStore` with a real `DiskTier` (a temporary folder, tiny blocks) and
the real admission policies replay a Zipf `rag` trace (`--documents` documents of
128-320 tokens picked with Zipf weights, each followed by a question asked once) the way
an engine drives them: per request, the device pool's leading hits (an LRU of
`--pool-blocks` blocks), `record` (the admission count), the blocks that just became hot
written from the device, a lookup of the rest in the disk tier, the computed blocks
written through, and evictions from the device put down. What it cannot show is time:
TTFT comes from `benchmarks/tier_admission.py`, which runs the same policies in a real
server. Reported per tier size and policy: the share of prompt tokens served from disk
(after `--warmup` requests) and the blocks written.

    python benchmarks/tier_admission_replay.py [--documents 32] [--requests 200]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import Counter, OrderedDict

import common
import torch

from pdserve.kv.block_hash import hash_block_chain
from pdserve.kvstore import BlockLayout, DiskTier, StoredBlock, TieredKVStore
from pdserve.kvstore.admission import make_admission
from pdserve.kvstore.block import encode

BLOCK = 16
LAYOUT = BlockLayout(1, 1, 4, BLOCK, torch.float32, 7)  # tiny: the policy, not the bytes
KV = torch.zeros(LAYOUT.kv_shape)
TOKENS = tuple(range(BLOCK))  # token ids are not checked here: hashes stand for prompts
FILE_BYTES = len(encode(StoredBlock(1, TOKENS, KV), LAYOUT))


def trace(args) -> list[list[int]]:
    rng = random.Random(args.seed)
    docs = [[rng.randrange(30000) for _ in range(rng.randint(128, 320))]
            for _ in range(args.documents)]  # fmt: skip
    weights = [1 / (i + 1) ** args.zipf for i in range(len(docs))]
    return [
        rng.choices(docs, weights)[0] + [rng.randrange(30000) for _ in range(rng.randint(8, 64))]
        for _ in range(args.requests)
    ]


def replay(policy: str, prompts: list[list[int]], tier_blocks: int, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        disk = DiskTier(folder, tier_blocks * FILE_BYTES, LAYOUT)
        admission = make_admission(policy, tier_blocks, args.threshold)
        store = TieredKVStore([disk], disk.events, admission=admission)
        device: OrderedDict[int, None] = OrderedDict()
        for i, prompt in enumerate(prompts):
            if i == args.warmup:
                base = store.stats().tiers["disk"]
            step(store, device, prompt, args.pool_blocks)
        end = store.stats().tiers["disk"]
        store.close()
    tokens = sum(len(p) for p in prompts[args.warmup :])
    return {
        "tokens_from_disk": (end.num_hit_blocks - base.num_hit_blocks) * BLOCK / tokens,
        "blocks_written": (end.written_bytes - base.written_bytes) // FILE_BYTES,
    }


def step(store: TieredKVStore, device: OrderedDict, prompt: list[int], pool_blocks: int):
    hashes = hash_block_chain(prompt, BLOCK)
    usable = hash_block_chain(prompt[:-1], BLOCK)  # the last token is always computed
    num_device = next((i for i, h in enumerate(usable) if h not in device), len(usable))
    blocks = [StoredBlock(h, TOKENS, KV) for h in hashes]
    hot = store.record(hashes)
    store.write_through([blocks[i] for i in hot if i < num_device])
    found = store.lookup(usable[num_device:], lambda i: TOKENS)
    store.write_through(blocks[num_device + len(found) :])
    for h in hashes:
        device[h] = None
        device.move_to_end(h)
    while len(device) > pool_blocks:
        evicted, _ = device.popitem(last=False)
        store.put([StoredBlock(evicted, TOKENS, KV)])
    store.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--pool-blocks", type=int, default=64)
    parser.add_argument("--tier-fractions", default="0.1,0.25,0.5,1.0,1.5")
    parser.add_argument("--threshold", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prompts = trace(args)
    seen = Counter(h for p in prompts for h in set(hash_block_chain(p, BLOCK)))
    recurring = sum(1 for n in seen.values() if n >= 2)
    print(f"{len(prompts)} requests, {len(seen)} distinct blocks, {recurring} recurring")
    rows = []
    for fraction in (float(f) for f in args.tier_fractions.split(",")):
        tier_blocks = max(1, int(fraction * recurring))
        result = {p: replay(p, prompts, tier_blocks, args) for p in ("all", "frequency")}
        every, freq = result["all"], result["frequency"]
        ratio = every["blocks_written"] / max(1, freq["blocks_written"])
        rows.append([fraction, tier_blocks, every["tokens_from_disk"], freq["tokens_from_disk"],
                     every["blocks_written"], freq["blocks_written"], ratio])  # fmt: skip
    headers = ["tier / recurring", "tier blocks", "from disk: all", "from disk: frequency",
               "written: all", "written: frequency", "written all / freq"]  # fmt: skip
    print(common.format_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
