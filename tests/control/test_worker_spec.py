"""`WorkerSpec`: every engine setting reaches a worker through the spec, and bad specs are
refused with the field named."""

from __future__ import annotations

import dataclasses
import os
import stat
import typing
from pathlib import Path

import pytest

from pdserve.cli import build_parser, worker_config
from pdserve.config import EngineConfig
from pdserve.control.worker_spec import (
    SECRET_ENGINE_FIELDS,
    SpecFolder,
    WorkerSpec,
    decode_spec,
    encode_spec,
)
from pdserve.errors import ConfigError
from pdserve.serve import ServeConfig, WorkerProcesses

# Fields whose valid values are a fixed set: a changed value that passes validation.
CHOICES = {
    "dtype": "bfloat16",
    "kv_tier_dtype": "int8",
    "quantization": "int8",
    "kv_tier_admission": "frequency",
}


def changed(field: dataclasses.Field, hint) -> object:
    """A valid value of `field` other than its default, derived from its type."""
    if field.name in CHOICES:
        return CHOICES[field.name]
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    default = field.default
    if kinds[0] is bool:
        return not default
    if kinds[0] is int:
        return 7 if default is None else default + 7
    if kinds[0] is float:
        return 1.5 if default is None else default + 1.5
    if kinds[0] is str:
        return f"changed-{field.name}"
    raise AssertionError(f"EngineConfig.{field.name}: add a changed value for {hint} here")


ENGINE_FIELDS = [f for f in dataclasses.fields(EngineConfig) if f.name not in SECRET_ENGINE_FIELDS]


def through_serve(config: ServeConfig, role: str, tmp_path: Path):
    """ServeConfig -> the spec file `pdserve serve` writes -> `pdserve worker` -> config."""
    workers = WorkerProcesses(config, tmp_path, "tcp://127.0.0.1:1", tmp_path / "cluster.key")
    try:
        argv = workers._command(role, f"{role}-0")
        assert argv[argv.index("worker") :][1] == "--spec" and len(argv) == 8
        return worker_config(build_parser().parse_args(argv[3:]))
    finally:
        workers.stop()


@pytest.mark.parametrize("field", ENGINE_FIELDS, ids=lambda f: f.name)
def test_every_engine_field_survives_serve_to_worker(field, tmp_path):
    hints = typing.get_type_hints(EngineConfig)
    value = changed(field, hints[field.name])
    config = ServeConfig.from_dict({"engine": {field.name: value}, "threads_per_worker": 2})
    got = through_serve(config, "decode", tmp_path)
    assert getattr(got.engine, field.name) == value
    threads = value if field.name == "num_threads" else 2
    assert got.engine == dataclasses.replace(config.engine, num_threads=threads)
    assert (got.worker_id, got.role, got.router_addr) == ("decode-0", "decode", "tcp://127.0.0.1:1")
    assert (got.model_dir, got.cluster_key_file) == (tmp_path, tmp_path / "cluster.key")


def test_a_health_file_goes_with_a_spec(tmp_path):
    workers = WorkerProcesses(ServeConfig(), tmp_path, "tcp://127.0.0.1:1", None)
    try:
        argv = [*workers._command("decode", "decode-0")[3:], "--health-file", "/run/alive"]
        got = worker_config(build_parser().parse_args(argv))
        assert (got.worker_id, got.health_file) == ("decode-0", Path("/run/alive"))
    finally:
        workers.stop()


def test_spec_fields_reach_the_worker(tmp_path):
    config = ServeConfig(
        kv_backend="tcp", kv_layerwise=False, worker_host="127.0.0.2", kv_transport_security="mac"
    )
    got = through_serve(config, "prefill", tmp_path)
    assert (got.backends, got.kv_layerwise, got.host) == (("tcp",), False, "127.0.0.2")
    assert got.kv_transport_security == "mac"
    assert through_serve(ServeConfig(), "mixed", tmp_path).backends == ("shm", "tcp")


def spec(**engine) -> WorkerSpec:
    return WorkerSpec("w", "decode", "/m", "tcp://127.0.0.1:1", EngineConfig(**engine))


def test_round_trip_and_no_secret_written():
    one = spec(max_num_seqs=3, kv_tier_secret=b"s3cret-key-bytes")
    raw = encode_spec(one)
    assert b"kv_tier_secret" not in raw and b"s3cret" not in raw
    assert decode_spec(raw) == spec(max_num_seqs=3)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["engine"].update(max_num_seq=4), "engine.max_num_seq"),
        (lambda d: d["engine"].update(kv_tier_secret="x"), "engine.kv_tier_secret"),
        (lambda d: d["engine"].update(max_num_seqs=0), "engine.max_num_seqs"),
        (lambda d: d["engine"].update(dtype="int4"), "engine.dtype"),
        (lambda d: d.pop("role"), "spec"),
    ],
)
def test_bad_specs_name_the_field(edit, field):
    import msgspec

    data = msgspec.json.decode(encode_spec(spec()))
    edit(data)
    with pytest.raises(ConfigError) as info:
        decode_spec(msgspec.json.encode(data))
    assert info.value.field == field


def test_mistyped_value_is_named():
    raw = encode_spec(spec()).replace(b'"max_num_seqs":64', b'"max_num_seqs":"64"')
    with pytest.raises(ConfigError, match=r"engine\.max_num_seqs"):
        decode_spec(raw)


def test_spec_files_are_private_and_removed():
    folder = SpecFolder()
    path = folder.write(spec())
    assert stat.S_IMODE(os.stat(folder.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert decode_spec(path.read_bytes()) == spec()
    folder.remove()
    assert not folder.path.exists()


def test_worker_needs_a_spec_or_role_and_router():
    with pytest.raises(SystemExit, match="--spec FILE, or --role and --router"):
        worker_config(build_parser().parse_args(["worker", "--role", "decode"]))
