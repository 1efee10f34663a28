"""`RayLauncher`: pdserve's workers as Ray actors, behind the same `Launcher` interface.

Why an actor that *owns* the worker process (control/ray_worker_host.py) rather than the
engine running inside the actor: the worker keeps its own process, ZeroMQ sockets,
shared-memory KV pool and torch threads exactly as under the local launcher, so the data
path (and every test of it) is the same; Ray only places, watches and restarts. The actor
process stays light (no torch), a fenced worker dies with its actor (SIGKILL), and Ray's
GPU assignment (`CUDA_VISIBLE_DEVICES` in the actor's environment) passes to the child.

Placement, per role (`worker_resources`, control/ray_config.py): the role's `num_cpus`,
`num_gpus`, custom `resources` and `label_selector` go on the actor; `spread` adds Ray's
SPREAD strategy; `pack` puts worker *i* of each packing role into placement group *i*
(STRICT_PACK), so a P/D pair shares a node and hands KV over shared memory. Which KV
backend a pair uses is still the router's choice (same host → shm, else tcp/nixl).

Addresses: with `worker_host` on loopback (the default) workers bind 127.0.0.1 — every Ray
node must then be this machine; otherwise each worker binds its node's IP (Ray's view of
it) and the router's wildcard address is replaced by the driver node's IP. CURVE keys
make that safe across nodes: the key's content goes to each actor as a hidden constructor
argument, and the actor writes it 0600 on its node.

Lifecycle: Ray reports the death of an actor (killed, crashed, or lost with its node) by
failing the actor's pending `wait()` call; a worker process that exits returns its code
through the same call. `exited()` turns both into the watchdog's (worker, how), exactly
like a local process exit: the router marks it dead, its requests migrate, and the
watchdog re-creates it with backoff (control/launcher.py). Ray's own actor restarts stay
off (`max_restarts=0`): they would re-run the constructor with the old role and no
backoff. A new actor goes wherever Ray finds the resources; until it does it is *pending*
(`pending()`, shown in `/admin/workers`), which blocks nothing: the router serves with the
workers it has, and Ray's autoscaler may add a node for it (README, "Ray").

Ray is imported lazily, so `pdserve serve` without Ray stays fast.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.control.launcher import Launcher, next_worker_id
from pdserve.control.ray_config import ROLES, RoleResources
from pdserve.control.ray_worker_host import Secret, WorkerHost, remove_leftovers
from pdserve.control.worker_spec import WorkerSpec, encode_spec
from pdserve.errors import PdserveError

logger = logging.getLogger("pdserve.launcher.ray")

STOP_TIMEOUT_S = 5.0


@dataclass
class RayActor:
    """One worker's current actor, and the two calls that report on it."""

    worker_id: str
    role: str
    handle: Any  # ray.actor.ActorHandle
    done: Any  # ObjectRef of `wait()`: its exit code, or an error when the actor dies
    placed: Any  # ObjectRef of `info()`: ready once Ray placed the actor
    info: dict[str, Any] | None = None  # node_id, node_ip, pid (once placed)
    is_reported: bool = False  # `exited` returned its death


class RayLauncher(Launcher):
    def __init__(
        self,
        spec: Callable[[str, str], WorkerSpec],
        num_threads: Callable[[str], int],
        resources: dict[str, RoleResources],
        key_file: Path | None,
        log_level: str = "INFO",
        bind_loopback: bool = True,
        builtin_model: bool = False,
    ) -> None:
        import ray

        self._ray = ray
        self._spec = spec  # (role, worker id) -> WorkerSpec
        self._num_threads = num_threads  # role -> engine threads
        self.resources = resources
        self._key = Secret(Path(key_file).read_bytes()) if key_file else None
        self._log_level = log_level
        self._bind_loopback = bind_loopback
        self._builtin_model = builtin_model
        self._host_class = ray.remote(WorkerHost)
        self._leftovers = ray.remote(num_cpus=0)(remove_leftovers)
        self.actors: dict[str, RayActor] = {}
        self.roles: dict[str, str] = {}
        self.started: dict[str, float] = {}  # the watchdog's "stayed up" clock
        self._packs: dict[int, Any] = {}  # pack index -> placement group
        self._num_spawned = 0
        self.run_id = uuid.uuid4().hex[:8]  # in actor names: pdserve-<run>:<worker>:<n>

    # ---- Launcher --------------------------------------------------------------------------

    def start(self, counts: dict[str, int]) -> None:
        for role, count in counts.items():
            for i in range(count):
                self.spawn(role, f"{role}-{i}")

    def add(self, role: str) -> str:
        worker_id = next_worker_id(role, set(self.roles))
        self.spawn(role, worker_id)
        return worker_id

    def exited(self) -> list[tuple[str, str]]:
        # list(): `remove` may run in another thread (scale in runs it in an executor)
        waiting = [a for a in list(self.actors.values()) if not a.is_reported]
        ended = self._ready([a.done for a in waiting])
        dead = []
        for actor in waiting:
            if actor.done.hex() in ended:
                actor.is_reported = True
                dead.append((actor.worker_id, self._how(actor)))
        return dead

    def failed(self) -> str | None:
        """A worker whose actor or process has already ended (start-up checks)."""
        actors = list(self.actors.values())
        ended = self._ready([a.done for a in actors])
        actor = next((a for a in actors if a.done.hex() in ended), None)
        if actor is None:
            return None
        logger.error("worker %s %s", actor.worker_id, self._how(actor))
        return actor.worker_id

    def pending(self) -> dict[str, str]:
        """Workers whose actor Ray has not placed yet (no node has the resources): id -> role."""
        self._refresh_placement()
        return {w: a.role for w, a in list(self.actors.items()) if a.info is None}

    def restart(self, worker_id: str) -> None:
        if worker_id not in self.actors:
            return  # removed (scale in) after it was scheduled
        try:
            self._retire(self.actors.pop(worker_id))
        finally:  # the worker comes back even if cleaning up after the old one failed
            self.spawn(self.roles[worker_id], worker_id)

    def kill(self, worker_id: str) -> None:
        actor = self.actors.get(worker_id)
        if actor is not None:
            logger.warning("killing worker %s's actor: declared dead", worker_id)
            self._ray.kill(actor.handle, no_restart=True)  # its child gets SIGKILL

    def remove(self, worker_id: str, timeout_s: float = 10.0) -> None:
        actor = self.actors.pop(worker_id, None)
        self.roles.pop(worker_id, None)
        if actor is None:
            return
        try:
            self._ray.get(actor.handle.stop.remote(timeout_s), timeout=timeout_s + 10)
        except Exception as e:  # the actor or its node is gone: nothing left to stop
            logger.info("worker %s: stop: %s", worker_id, type(e).__name__)
        self._retire(actor)
        self._release_packs()

    def set_role(self, worker_id: str, role: str) -> None:
        if worker_id in self.roles:
            self.roles[worker_id] = role  # its next actor asks for the new role's resources

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self._refresh_placement()
        stops = [a.handle.stop.remote(timeout_s) for a in self.actors.values() if a.info]
        try:
            self._ray.wait(stops, num_returns=len(stops), timeout=timeout_s + 5)
        finally:
            # Waited for: they are this process's tasks, and it may end (a router actor
            # killed after its stop) before they run.
            cleanups = [c for c in map(self._retire, self.actors.values()) if c is not None]
            self._ray.wait(cleanups, num_returns=len(cleanups), timeout=timeout_s + 5)
            self.actors.clear()
            for group in self._packs.values():
                self._ray.util.remove_placement_group(group)
            self._packs.clear()

    # ---- actors ----------------------------------------------------------------------------

    def spawn(self, role: str, worker_id: str) -> None:
        self.roles[worker_id] = role
        self.started[worker_id] = time.monotonic()
        self._num_spawned += 1
        threads = self._num_threads(role)
        options = self._options(role, worker_id, threads)
        handle = self._host_class.options(**options).remote(
            encode_spec(self._spec(role, worker_id)),
            self._key,
            {"OMP_NUM_THREADS": str(threads)},
            self._log_level,
            self._bind_loopback,
            self._builtin_model,
        )
        self.actors[worker_id] = RayActor(
            worker_id, role, handle, handle.wait.remote(), handle.info.remote()
        )

    def _options(self, role: str, worker_id: str, threads: int) -> dict[str, Any]:
        wanted = self.resources[role]
        options: dict[str, Any] = {
            # Unique per launcher and actor: two `pdserve serve` may share a cluster, and a
            # restarted worker's old name may still be held.
            "name": f"pdserve-{self.run_id}:{worker_id}:{self._num_spawned}",
            "max_restarts": 0,
            "num_cpus": wanted.cpus(threads),
            "num_gpus": wanted.num_gpus,
        }
        if wanted.resources:
            options["resources"] = dict(wanted.resources)
        if wanted.label_selector:
            options["label_selector"] = dict(wanted.label_selector)
        if wanted.placement == "spread":
            options["scheduling_strategy"] = "SPREAD"
        elif wanted.placement == "pack":
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            index, bundle = self._pack_slot(role, worker_id)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._pack_group(index), placement_group_bundle_index=bundle
            )
        return options

    def _pack_roles(self) -> list[str]:
        return [r for r in ROLES if self.resources[r].placement == "pack"]

    def _pack_slot(self, role: str, worker_id: str) -> tuple[int, int]:
        """(placement group, bundle) of a packing worker: group i holds worker i of each
        packing role, one bundle per role."""
        suffix = worker_id.rsplit("-", 1)[-1]
        index = int(suffix) if suffix.isdigit() else 0
        return index, self._pack_roles().index(role)

    def _pack_group(self, index: int):
        if index not in self._packs:
            roles = self._pack_roles()
            bundles = [self.resources[r].bundle(self._num_threads(r)) for r in roles]
            selectors = [dict(self.resources[r].label_selector) for r in roles]
            self._packs[index] = self._ray.util.placement_group(
                bundles,
                strategy="STRICT_PACK",
                bundle_label_selector=selectors if any(selectors) else None,
            )
        return self._packs[index]

    def _release_packs(self) -> None:
        """Remove placement groups no worker uses any more (after a scale in)."""
        used = set()
        for worker_id, role in self.roles.items():
            if self.resources[role].placement == "pack":
                used.add(self._pack_slot(role, worker_id)[0])
        for index in sorted(set(self._packs) - used):
            self._ray.util.remove_placement_group(self._packs.pop(index))

    def _retire(self, actor: RayActor) -> Any:
        """Kill an actor (if it lives) and remove what its worker left on its node (the
        task doing it, if any)."""
        self._ray.kill(actor.handle, no_restart=True)
        if actor.info is None:
            self._refresh([actor])
        if actor.info:  # {}: it died before Ray placed it, and left nothing
            return self._remove_leftovers(actor)
        return None

    def _remove_leftovers(self, actor: RayActor) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # soft: if the node is gone the task runs elsewhere, where it finds nothing to remove
        where = NodeAffinitySchedulingStrategy(actor.info["node_id"], soft=True)
        return self._leftovers.options(scheduling_strategy=where).remote(
            actor.info["pid"], actor.info["folder"]
        )

    def _ready(self, refs: list[Any]) -> set[str]:
        """The ids of those of `refs` that have a result (or an error) now."""
        if not refs:
            return set()
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        return {ref.hex() for ref in ready}

    def _refresh_placement(self) -> None:
        self._refresh(list(self.actors.values()))

    def _refresh(self, actors: list[RayActor]) -> None:
        """Record where each of `actors` runs, for those Ray has placed by now."""
        waiting = [a for a in actors if a.info is None]
        placed = self._ready([a.placed for a in waiting])
        for actor in waiting:
            if actor.placed.hex() in placed:
                try:
                    actor.info = self._ray.get(actor.placed)
                except Exception:  # died before it was placed: `exited` reports it
                    actor.info = {}

    def _how(self, actor: RayActor) -> str:
        try:
            code = self._ray.get(actor.done)
        except self._ray.exceptions.RayActorError as e:
            cause = str(e).strip().splitlines()[0][:200]
            return f"lost its Ray actor ({type(e).__name__}: {cause})"
        except Exception as e:
            return f"lost its Ray actor ({type(e).__name__})"
        return f"exited with code {code}"

    def location(self, worker_id: str) -> dict[str, Any] | None:
        """Where a worker runs (node id, node IP, pid), once placed."""
        self._refresh_placement()
        actor = self.actors.get(worker_id)
        return actor.info or None if actor else None


def connect(address: str | None, namespace: str = "pdserve") -> None:
    """Join the Ray cluster at `address` (None: `RAY_ADDRESS`, or a new local Ray) as this
    process's driver, unless it already is one (tests share one cluster)."""
    try:
        import ray
    except ImportError:
        raise PdserveError(
            "launcher: ray needs Ray installed: pip install -e '.[ray]' (make setup does)"
        ) from None
    if ray.is_initialized():
        return
    _check_reachable(address)
    ray.init(
        address=address,
        namespace=namespace,
        logging_level="WARNING",
        log_to_driver=True,
        include_dashboard=False if address is None else None,
    )
    logger.info("ray: connected to %s", ray.get_runtime_context().gcs_address)


def _check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """Fail fast on a GCS address nobody answers at (ray.init would retry for minutes)."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout_s).close()
    except (OSError, ValueError) as e:
        raise PdserveError(f"no Ray cluster answers at ray_address {address!r}: {e}") from None


def driver_node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


__all__ = ["RayLauncher", "connect", "driver_node_ip"]
