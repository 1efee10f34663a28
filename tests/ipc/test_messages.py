"""The wire codec: every message type survives encode → decode unchanged and keeps its
type; `CoreOutput` carries an `EngineCoreOutput` (logprobs included) both ways; and
anything that is not a known message (garbage, an unknown tag, a pickle, wrong field
types) is rejected with a msgspec error, never executed."""

from __future__ import annotations

import pickle
import typing

import msgspec
import pytest

from pdserve.ipc import messages as m
from pdserve.kv.events import AllBlocksCleared, BlocksRemoved, BlocksStored
from pdserve.outputs import EngineCoreOutput, Logprob
from pdserve.sampling_params import SamplingParams

PARAMS = SamplingParams(
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    seed=1234,
    max_tokens=32,
    min_tokens=2,
    stop=("\n\n", "END"),
    stop_token_ids=(7, 9),
    logprobs=3,
)
LAYOUT = m.KVLayout(
    num_layers=8, num_blocks=1024, block_size=16, num_kv_heads=4, head_dim=64, dtype="float32"
)
DEST = m.KVDestination(
    worker_id="decode-0",
    transfer_id="t-1",
    block_ids=[3, 4, 9],
    kv_addr="tcp://127.0.0.1:5601",
    backend="shm",
    shm_path="/dev/shm/pdserve-kv-decode-0-123",
)
LOGPROBS = [m.TokenLogprob(11, -0.25, 1), m.TokenLogprob(12, -1.5, 2)]

ADD = m.AddRequest("r1", [1, 2, 3], PARAMS)
RESERVE = m.ReserveKV("r2", "t-1", [5, 6, 7, 8], SamplingParams(temperature=0), timeout_s=30.0)
STEP = m.StepOutputs(
    "decode-0",
    [
        m.CoreOutput("r1", [42], [LOGPROBS], None, None, 16, 0.003),
        m.CoreOutput("r2", [7], None, "stop", 7),
        m.CoreOutput("r3", [], finish_reason="stop", stop_reason="END"),
    ],
)
LAYER = m.KVLayer("t-1", 5, [3, 4, 9], 0xFFFF_FFFF_FFFF_FFFF, 196608, run_lengths=[2, 1])
DONE = m.KVDone("t-1", "r2", 24, 42, LOGPROBS, is_finished=False, error=None)

# One instance of every message type; optional fields set where a type has them.
SAMPLES: list[m.Message] = [
    ADD,
    RESERVE,
    m.PrefillRequest("r2", [5, 6, 7, 8], PARAMS, DEST, deadline_s=29.0),
    m.PrefillRequest("r4", [5], PARAMS, DEST, deadline_s=1.0, priority=-3),
    m.AddRequest("r5", [1], PARAMS, priority=2**62),
    m.Abort(["r1", "r2"]),
    m.Abort(["r3"], is_writer_absent=True),
    m.Shutdown(),
    m.SendKVSnapshot(),
    m.Fence("3f2a"),
    m.SetRole("mixed"),
    m.Draining("decode-0", "3f2a"),
    m.AddRequest("r4", [1, 2], PARAMS, output_token_ids=[9, 8, 7]),
    m.RequestFailed("mixed-0", "r4", "the engine step failed", retryable=True),
    m.WorkerStats(
        "decode-0", 0, 0, 100, 1024, loop_stalled_s=7.5, loop_pass_max_s=0.25, incarnation="3f2a"
    ),
    m.KVEvents("decode-0", 0, [BlocksStored([2**64 - 1, 7]), AllBlocksCleared("disk")], True),
    m.KVEvents("decode-0", 1, [BlocksRemoved([7], "host")]),
    m.Register(
        worker_id="decode-0",
        role="decode",
        pid=4321,
        ctrl_addr="tcp://127.0.0.1:5600",
        kv_addr="tcp://127.0.0.1:5601",
        kv_layout=LAYOUT,
        max_model_len=2048,
        backends=["shm", "tcp"],
        hostname="box",
        shm_path="/dev/shm/pdserve-kv-decode-0-123",
    ),
    m.WorkerStats("decode-0", 3, 1, 100, 1024, num_waiting_prefill_tokens=512),
    STEP,
    m.KVReserved("decode-0", "r2", "t-1", [3, 4, 9]),
    m.RequestFailed("decode-0", "r2", "KV transfer timed out"),
    m.KVSent("prefill-0", "r2", 196608, 0.0125),
    LAYER,
    DONE,
    m.KVDone("t-1", "r2", 0, error="prefill timed out"),
]


def test_samples_cover_every_message_type():
    sampled = {type(s) for s in SAMPLES}
    assert sampled == set(typing.get_args(m.AnyMessage))
    assert sampled == set(m.Message.__subclasses__())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip_keeps_value_and_type(message):
    data = m.encode(message)
    assert isinstance(data, bytes)
    decoded = m.decode(data)
    assert type(decoded) is type(message)
    assert decoded == message
    assert m.decode(memoryview(data)) == message  # what a ZeroMQ frame buffer gives


def test_the_tag_is_the_class_name():
    raw = msgspec.msgpack.decode(m.encode(m.Shutdown()))
    assert raw == {"type": "Shutdown"}


def test_sampling_params_survive_as_sampling_params():
    decoded = m.decode(m.encode(ADD))
    assert isinstance(decoded.params, SamplingParams)
    assert decoded.params.stop == ("\n\n", "END")
    assert decoded.params.stop_token_ids == (7, 9)


def test_kv_layer_run_lengths_travel_and_default_to_none():
    """A `KVLayer` is followed by two raw frames per entry of `run_lengths`; a header
    without any (as older senders wrote it) announces no frames at all, so the receiver
    refuses the one frame such a sender adds."""
    raw = msgspec.msgpack.decode(m.encode(LAYER))
    assert raw["run_lengths"] == [2, 1]
    old = {k: v for k, v in raw.items() if k != "run_lengths"}
    assert m.decode(msgspec.msgpack.encode(old)).run_lengths == []
    empty = m.KVLayer("t-1", 0, [], 0, 0)
    assert "run_lengths" not in msgspec.msgpack.decode(m.encode(empty))  # defaults omitted
    assert m.decode(m.encode(empty)) == empty


def test_kv_layout_shape_and_compatibility():
    assert LAYOUT.shape == (8, 2, 1024, 16, 4, 64)
    other = m.KVLayout(8, 7, 16, 4, 64, "float32")  # block counts may differ
    assert LAYOUT.is_compatible(other)
    assert not LAYOUT.is_compatible(m.KVLayout(8, 1024, 16, 4, 64, "bfloat16"))
    assert not LAYOUT.is_compatible(m.KVLayout(8, 1024, 32, 4, 64, "float32"))


# ---- CoreOutput <-> EngineCoreOutput ------------------------------------------------------


def test_core_output_round_trip_with_logprobs():
    out = EngineCoreOutput(
        request_id="r1",
        new_token_ids=[42],
        new_logprobs=[{42: Logprob(-0.125, 1), 17: Logprob(-2.5, 2), 3: Logprob(-3.0, 3)}],
        finish_reason="length",
        stop_reason=None,
        num_cached_tokens=32,
        queue_time_s=0.004,
    )
    wire = m.decode(m.encode(m.StepOutputs("w", [m.CoreOutput.of(out)])))
    back = wire.outputs[0].to_engine_output()
    assert back == out
    assert list(back.new_logprobs[0]) == [42, 17, 3]  # order: sampled token, then by rank


def test_core_output_round_trip_without_logprobs():
    out = EngineCoreOutput("r2", [5], None, "stop", 5)
    back = m.decode(m.encode(m.StepOutputs("w", [m.CoreOutput.of(out)]))).outputs[0]
    assert back.to_engine_output() == out
    assert back.new_logprobs is None


def test_core_output_drops_the_decoded_text_of_logprobs():
    """Token text is the router's job; only ids, logprobs and ranks cross the wire."""
    out = EngineCoreOutput("r3", [1], [{1: Logprob(-0.5, 1, decoded_token="hi")}])
    back = m.CoreOutput.of(out).to_engine_output()
    assert back.new_logprobs == [{1: Logprob(-0.5, 1)}]


# ---- rejection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\xff\xfe\xfd", b"not msgpack at all", m.encode(m.Shutdown())[:-3]],
    ids=["empty", "never-used-byte", "negative-fixints", "text", "truncated"],
)
def test_garbage_is_rejected(data):
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        m.decode(data)


def test_trailing_bytes_are_rejected():
    with pytest.raises(msgspec.DecodeError):
        m.decode(m.encode(m.Shutdown()) + b"\x00")


def test_unknown_tag_is_rejected():
    data = msgspec.msgpack.encode({"type": "Exec", "request_ids": ["r1"]})
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'Exec'"):
        m.decode(data)


def test_untagged_map_is_rejected():
    with pytest.raises(msgspec.ValidationError, match="missing required field `type`"):
        m.decode(msgspec.msgpack.encode({"request_ids": ["r1"]}))


def test_nested_struct_is_not_a_message():
    """`KVDestination` and `KVLayout` travel only inside messages."""
    with pytest.raises(msgspec.ValidationError):
        m.decode(msgspec.msgpack.encode(LAYOUT))


_UNPICKLED: list[str] = []


def _record(what: str) -> str:
    _UNPICKLED.append(what)
    return what


class _Payload:
    """Records itself when unpickled: decoding must never get that far."""

    def __reduce__(self):
        return (_record, ("unpickled",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_is_rejected_and_never_unpickled(protocol):
    data = pickle.dumps(_Payload(), protocol=protocol)
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        m.decode(data)
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        m.decode(pickle.dumps(m.Shutdown(), protocol=protocol))
    assert _UNPICKLED == []


def _fields(message: m.Message, **changes) -> dict:
    """A message as the plain map it travels as, with some fields replaced."""
    return msgspec.to_builtins(message) | changes


WRONG_TYPES = {
    "str-for-list": _fields(m.Abort(["r1"]), request_ids="r1"),
    "int-for-str": _fields(m.Abort(["r1"]), request_ids=[1, 2]),
    "missing-field": {"type": "Abort"},
    "null-for-str": _fields(LAYER, transfer_id=None),
    "str-for-int": _fields(LAYER, layer="0"),
    "float-block-id": _fields(LAYER, block_ids=[1.5]),
    "int-for-run-lengths": _fields(LAYER, run_lengths=3),
    "str-run-length": _fields(LAYER, run_lengths=["2", "1"]),
    "float-run-length": _fields(LAYER, run_lengths=[1.5, 1.5]),
    "null-for-run-lengths": _fields(LAYER, run_lengths=None),
    "bool-for-int": _fields(DONE, num_batches=True),
    "bad-nested-param": _fields(RESERVE, params={"temperature": "hot"}),
    "list-for-params": _fields(RESERVE, params=[]),
    "map-for-array-like": _fields(STEP, outputs=[{"request_id": "r"}]),
}


@pytest.mark.parametrize("fields", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_wrong_field_types_are_rejected(fields):
    with pytest.raises(msgspec.ValidationError):
        m.decode(msgspec.msgpack.encode(fields))


def test_the_wrong_type_fixtures_start_from_valid_messages():
    assert m.decode(msgspec.msgpack.encode(_fields(LAYER))) == LAYER
    assert m.decode(msgspec.msgpack.encode(_fields(RESERVE))) == RESERVE


def test_invalid_sampling_params_are_rejected_at_decode():
    """Types right but values wrong: `SamplingParams` validates as it is rebuilt, and its
    error comes out as a `ValidationError`, which the worker loop drops and logs."""
    fields = {
        "type": "AddRequest",
        "request_id": "r",
        "prompt_token_ids": [1],
        "params": {"top_p": 0.0},
    }
    with pytest.raises(msgspec.ValidationError, match="top_p"):
        m.decode(msgspec.msgpack.encode(fields))
