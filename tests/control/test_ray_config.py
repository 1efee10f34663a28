"""The Ray launcher's settings: `launcher`, `ray_address` and per-role `worker_resources`
from YAML and flags, the errors that name a bad key, and the actor options they become.
No Ray cluster here (tests/serving/test_ray.py runs one)."""

from __future__ import annotations

import pytest
import yaml

from pdserve.cli import build_parser
from pdserve.control.ray_config import RoleResources, parse_worker_resources
from pdserve.errors import ConfigError
from pdserve.serve import ServeConfig


def parse(*argv: str) -> ServeConfig:
    return ServeConfig.from_args(build_parser().parse_args(["serve", *argv]))


def test_yaml_keys_and_flags(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "launcher": "ray",
                "ray_address": "10.0.0.1:6379",
                "worker_resources": {
                    "prefill": {"num_cpus": 4, "resources": {"prefill_node": 1}},
                    "decode": {"num_gpus": 1, "label_selector": {"zone": "a"}, "placement": "pack"},
                },
            }
        )
    )
    config = parse("--config", str(path))
    assert (config.launcher, config.ray_address) == ("ray", "10.0.0.1:6379")
    resources = config.ray_resources()
    assert resources["prefill"] == RoleResources(num_cpus=4, resources={"prefill_node": 1})
    assert resources["decode"].num_gpus == 1
    assert resources["decode"].label_selector == {"zone": "a"}
    assert resources["decode"].placement == "pack"
    assert resources["mixed"] == RoleResources()  # roles not given: defaults
    flags = parse("--config", str(path), "--launcher", "local", "--ray-address", "h:1")
    assert (flags.launcher, flags.ray_address) == ("local", "h:1")
    assert parse().launcher == "local"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"gpu": {}}, "worker_resources.gpu"),
        ({"decode": {"num_gpus": "one"}}, "worker_resources.decode.num_gpus"),
        ({"decode": {"num_cpus": -1}}, "worker_resources.decode.num_cpus"),
        ({"decode": {"resources": {"x": -2}}}, "worker_resources.decode.x"),
        ({"decode": {"placement": "anywhere"}}, "worker_resources.decode.placement"),
        ({"decode": {"label_selector": {"zone": 1}}}, "worker_resources.decode.label_selector"),
        ({"decode": [1]}, "worker_resources.decode"),
        ({"decode": {"cpus": 1}}, "worker_resources.decode"),
    ],
)
def test_bad_worker_resources_name_the_key(data, field):
    with pytest.raises(ConfigError) as e:
        parse_worker_resources(data)
    assert e.value.field.startswith(field)


def test_bad_launcher_names_the_field():
    with pytest.raises(ConfigError) as e:
        ServeConfig(launcher="k8s")
    assert e.value.field == "launcher"
    with pytest.raises(ConfigError) as e:
        ServeConfig(worker_resources={"decode": {"num_gpus": -1}})
    assert e.value.field == "worker_resources.decode.num_gpus"


def test_bundle_defaults_cpus_to_the_worker_threads():
    assert RoleResources().bundle(3) == {"CPU": 3.0}
    role = RoleResources(num_cpus=1, num_gpus=0.5, resources={"decode_node": 1})
    assert role.bundle(3) == {"CPU": 1.0, "decode_node": 1.0, "GPU": 0.5}


def test_actor_options_carry_each_roles_resources(tmp_path):
    pytest.importorskip("ray")
    from pdserve.control.ray_launcher import RayLauncher

    resources = parse_worker_resources(
        {
            "prefill": {"resources": {"prefill_node": 1}, "placement": "spread"},
            "decode": {"num_cpus": 0.5, "num_gpus": 1, "label_selector": {"zone": "a"}},
        }
    )
    launcher = RayLauncher(lambda r, w: None, lambda role: 2, resources, key_file=None)
    prefill = launcher._options("prefill", "prefill-0", 2)
    assert prefill["num_cpus"] == 2.0 and prefill["num_gpus"] == 0.0
    assert prefill["resources"] == {"prefill_node": 1}
    assert prefill["scheduling_strategy"] == "SPREAD"
    assert prefill["max_restarts"] == 0  # the watchdog restarts, with backoff
    decode = launcher._options("decode", "decode-0", 2)
    assert (decode["num_cpus"], decode["num_gpus"]) == (0.5, 1)
    assert decode["label_selector"] == {"zone": "a"}
    assert "scheduling_strategy" not in decode and "resources" not in decode


def test_pack_slots_pair_worker_i_of_each_role(tmp_path):
    pytest.importorskip("ray")
    from pdserve.control.ray_launcher import RayLauncher

    resources = parse_worker_resources(
        {"prefill": {"placement": "pack"}, "decode": {"placement": "pack"}}
    )
    launcher = RayLauncher(lambda r, w: None, lambda role: 1, resources, key_file=None)
    assert launcher._pack_slot("prefill", "prefill-0") == (0, 0)
    assert launcher._pack_slot("decode", "decode-0") == (0, 1)
    assert launcher._pack_slot("decode", "decode-3") == (3, 1)


def test_an_address_nobody_answers_at_fails_fast():
    pytest.importorskip("ray")
    import socket

    from pdserve.control.ray_launcher import _check_reachable
    from pdserve.errors import PdserveError

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PdserveError, match=f"127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}", timeout_s=5)
    _check_reachable(None)  # unset: ray.init finds RAY_ADDRESS or starts a local Ray


def test_router_on_ray_settings_and_the_actor_options(tmp_path):
    from pdserve.control.ray_config import RouterResources
    from pdserve.serve_ray import router_options

    path = tmp_path / "serve.yaml"
    router = {"num_cpus": 2, "resources": {"head_node": 1}, "label_selector": {"pool": "edge"}}
    path.write_text(yaml.safe_dump({"launcher": "ray", "router_resources": router}))
    config = parse("--config", str(path), "--router-on-ray", "--host", "node-ip")
    assert (config.router_on_ray, config.host, config.router_max_restarts) == (True, "node-ip", 3)
    assert config.router_placement() == RouterResources(2, {"head_node": 1}, {"pool": "edge"})
    options = router_options(config, "pdserve-router-x")
    assert options["name"] == "pdserve-router-x" and options["num_cpus"] == 2
    assert options["resources"] == {"head_node": 1}
    assert options["label_selector"] == {"pool": "edge"}
    assert (options["max_restarts"], options["max_task_retries"]) == (3, 0)
    default = parse("--launcher", "ray", "--router-on-ray", "--router-max-restarts", "0")
    assert default.router_placement() == RouterResources(num_cpus=1.0)
    assert router_options(default, "r")["max_restarts"] == 0
    assert parse().router_on_ray is False


@pytest.mark.parametrize(
    ("argv", "settings", "message"),
    [
        (["--router-on-ray"], {}, "router_on_ray: needs launcher: ray"),
        ([], {"router_on_ray": True, "launcher": "local"}, "router_on_ray: needs launcher: ray"),
        (["--launcher", "ray"], {"router_resources": {"num_cpus": 1}}, "router_resources: "),
        (["--launcher", "ray", "--host", "node-ip"], {}, "host: 'node-ip' means the router"),
        (["--router-on-ray", "--launcher", "ray", "--router-max-restarts", "-1"], {}, "restarts"),
        (
            ["--router-on-ray", "--launcher", "ray"],
            {"router_resources": {"num_gpus": 1}},
            "router_resources",
        ),
        (
            ["--router-on-ray", "--launcher", "ray"],
            {"router_resources": {"resources": {"head": -1}}},
            "router_resources.head: must be >= 0",
        ),
        (
            ["--router-on-ray", "--launcher", "ray"],
            {"router_resources": [1]},
            "router_resources: expected dict",
        ),
    ],
)
def test_router_on_ray_errors_name_the_setting(tmp_path, argv, settings, message):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match=message):
        parse("--config", str(path), *argv)
