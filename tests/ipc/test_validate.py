"""Internal messages checked beyond their types (ipc/validate.py)."""

from __future__ import annotations

import msgspec
import pytest

from pdserve.ipc import messages as m
from pdserve.ipc.validate import register_problem

LAYOUT = m.KVLayout(8, 256, 16, 4, 64, "float32")
MODEL = (8, 4, 64)  # layers, kv heads, head dim
GOOD = m.Register(
    "decode-0", "decode", 1, "tcp://10.0.0.2:5000", "tcp://10.0.0.2:5001", LAYOUT, 2048, ["tcp"]
)

BAD_REGISTERS = {
    "unknown role": {"role": "x"},
    "empty worker id": {"worker_id": ""},
    "control characters in the id": {"worker_id": "a\nb"},
    "max_model_len 1": {"max_model_len": 1},
    "max_model_len huge": {"max_model_len": 1 << 40},
    "another model's layers": {"kv_layout": msgspec.structs.replace(LAYOUT, num_layers=2)},
    "another model's heads": {"kv_layout": msgspec.structs.replace(LAYOUT, num_kv_heads=8)},
    "unknown dtype": {"kv_layout": msgspec.structs.replace(LAYOUT, dtype="int4")},
    "zero blocks": {"kv_layout": msgspec.structs.replace(LAYOUT, num_blocks=0)},
    "zero block size": {"kv_layout": msgspec.structs.replace(LAYOUT, block_size=0)},
    "unknown backend": {"backends": ["tcp", "rdma"]},
    "not a tcp address": {"ctrl_addr": "ipc:///tmp/x"},
}


def test_a_sound_registration_passes():
    assert register_problem(GOOD, *MODEL) is None
    mixed = msgspec.structs.replace(GOOD, role="mixed", backends=["shm", "tcp", "nixl"])
    assert register_problem(mixed, *MODEL) is None


@pytest.mark.parametrize("case", BAD_REGISTERS)
def test_a_registration_that_would_break_routing_is_refused(case):
    problem = register_problem(msgspec.structs.replace(GOOD, **BAD_REGISTERS[case]), *MODEL)
    assert isinstance(problem, str) and problem
