"""Checks on internal messages beyond their types, at the boundary that receives them.

msgspec guarantees each field's type; these functions check that the values make sense
for this cluster before anything acts on them. CURVE (ipc/security.py) already keeps
out every process without the cluster key, so what these catch is a confused or buggy
member (a worker started for another model, a bad flag, a stale router), plus whatever
a key holder could do by mistake that would poison shared state:

- `register_problem` (router): a `Register` whose role is unknown, whose KV layout is not
  this model's, whose limits are nonsense, or whose addresses are not tcp endpoints would
  make every request routed to it fail (`max_model_len: 1` lowers the whole cluster's
  limit, an unknown role breaks pool selection);
- `prefill_problem` (prefill worker): a `PrefillRequest` whose destination blocks do not
  cover exactly the prompt, repeat, or lie below zero would write KV outside what the
  decode worker reserved for it (the shm and nixl backends write in place, where the
  decode worker cannot refuse a batch); an infinite deadline would pin blocks for ever.
  The decode side checks every message batch itself (`worker/handoff.py`: blocks held by
  the request, past its cached prefix, in the pool, in a layer that exists).

Each returns None when the message is fine, else a sentence for the log or the reply.
"""

from __future__ import annotations

import math

from pdserve.ipc import messages as m

ROLES = ("prefill", "decode", "mixed")
BACKENDS = ("shm", "tcp", "nixl")
DTYPES = ("float32", "bfloat16", "float16")
MAX_ID_CHARS = 256
MAX_MODEL_LEN = 1 << 24
MAX_BLOCK_SIZE = 4096
MAX_NUM_BLOCKS = 1 << 26
MAX_DEADLINE_S = 24 * 3600.0


def register_problem(
    info: m.Register, num_layers: int, num_kv_heads: int, head_dim: int
) -> str | None:
    """What is wrong with `info` for a cluster serving a model of this shape, or None."""
    if info.role not in ROLES:
        return f"unknown role {info.role!r}"
    if not 0 < len(info.worker_id) <= MAX_ID_CHARS or not info.worker_id.isprintable():
        return "worker id empty, too long or not printable"
    layout = info.kv_layout
    if (layout.num_layers, layout.num_kv_heads, layout.head_dim) != (
        num_layers,
        num_kv_heads,
        head_dim,
    ):
        return f"KV layout {layout} is not this model's"
    if layout.dtype not in DTYPES or not 0 < layout.block_size <= MAX_BLOCK_SIZE:
        return f"KV layout {layout} has an unknown dtype or block size"
    if not 0 < layout.num_blocks <= MAX_NUM_BLOCKS:
        return f"KV pool of {layout.num_blocks} blocks"
    if not layout.block_size <= info.max_model_len <= MAX_MODEL_LEN:
        return f"max_model_len {info.max_model_len} below one block or above {MAX_MODEL_LEN}"
    if not set(info.backends) <= set(BACKENDS):
        return f"unknown KV backends {sorted(set(info.backends) - set(BACKENDS))}"
    for addr in (info.ctrl_addr, info.kv_addr):
        if not addr.startswith("tcp://"):
            return f"address {addr!r} is not a tcp endpoint"
    return None


def prefill_problem(message: m.PrefillRequest, block_size: int) -> str | None:
    """What is wrong with a `PrefillRequest` for a worker of `block_size`, or None."""
    if not _is_deadline(message.deadline_s):
        return f"deadline_s {message.deadline_s} is not finite or above {MAX_DEADLINE_S:.0f}"
    dest = message.dest
    if dest.backend not in BACKENDS or not dest.kv_addr.startswith("tcp://"):
        return f"destination backend {dest.backend!r} at {dest.kv_addr!r}"
    num_prompt_blocks = -(-len(message.prompt_token_ids) // block_size)
    if not 0 <= dest.first_block <= num_prompt_blocks:
        return f"first_block {dest.first_block} outside the prompt's {num_prompt_blocks}"
    if dest.first_block + len(dest.block_ids) != num_prompt_blocks:
        return (
            f"{len(dest.block_ids)} destination blocks after {dest.first_block} cached ones "
            f"for a prompt of {num_prompt_blocks} blocks"
        )
    if len(set(dest.block_ids)) != len(dest.block_ids) or min(dest.block_ids, default=0) < 0:
        return "destination block ids repeat or are negative"
    if dest.nixl is not None and max(dest.block_ids, default=0) >= dest.nixl.num_blocks:
        return "destination block ids beyond the destination pool"
    return None


def reserve_problem(message: m.ReserveKV) -> str | None:
    if not _is_deadline(message.timeout_s):
        return f"timeout_s {message.timeout_s} is not finite or above {MAX_DEADLINE_S:.0f}"
    return None


def _is_deadline(seconds: float) -> bool:
    """Finite and at most a day; zero or below is legal (already expired: freed at once)."""
    return math.isfinite(seconds) and seconds <= MAX_DEADLINE_S
