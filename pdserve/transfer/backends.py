"""The KV transfer backends by name. Importing this module registers the built-in ones
(`shm`, `tcp`, `nixl`: each registers itself with `base.register_sender`), so `base.py`
never imports its own backends and the registry has one direction: backends -> base."""

from __future__ import annotations

import torch

from pdserve.ipc.messages import KVLayout
from pdserve.transfer import nixl, shm, tcp  # noqa: F401  (register the built-in backends)
from pdserve.transfer.base import SENDERS, KVSender, PeerSockets, TransferError


def make_sender(
    name: str, kv_cache: torch.Tensor, layout: KVLayout, peers: PeerSockets, **options
) -> KVSender:
    """The sender of backend `name`; `options` go to its constructor (e.g. the NIXL agent
    name)."""
    if name not in SENDERS:
        raise TransferError(f"unknown KV transfer backend {name!r}; have {sorted(SENDERS)}")
    return SENDERS[name](kv_cache, layout, peers, **options)
