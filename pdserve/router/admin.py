"""The operator's HTTP API, `/admin/*`, behind its own key.

    GET    /admin/workers                every worker: role, state, load ("pending": the
                                         launcher waits for a node with room for it)
    POST   /admin/workers/{id}/drain     stop new work, move (or finish) what it holds;
                                         answers when the worker holds nothing
    POST   /admin/workers/{id}/resume    take new work again after a drain
    POST   /admin/workers/{id}/role      {"role": "mixed"}: drain, switch, serve again
                                         (router/elastic.py); answers once it serves
    POST   /admin/workers                {"role": "decode"}: one more worker (201)
    DELETE /admin/workers/{id}           drain, then stop it for good
    GET    /admin/planner                the SLO planner's recent decisions and reasons
    GET    /admin/prefixes?limit=20      the hottest prompt prefixes: hashes, lengths, hit
                                         counts, tiers holding them (router/prefixes.py)

Auth: `Authorization: Bearer <admin key>` (`--admin-key` or `PDSERVE_ADMIN_KEY`); no
header → 401, another key (an API key included) → 403. Without an admin key configured
the routes answer 403 and say how to turn them on: an operator API must never be open by
default.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse

from pdserve.errors import ConfigError, PdserveError, ServiceUnavailableError
from pdserve.router.client import EngineClient
from pdserve.router.drain import UnknownWorkerError
from pdserve.router.prefixes import MAX_LIMIT, describe, parse_limit
from pdserve.router.serving import ApiError

DEFAULT_DRAIN_TIMEOUT_S = 60.0


class DrainBody(msgspec.Struct, forbid_unknown_fields=True):
    migrate: bool = True  # move requests now; False: let them finish for `timeout_s` first
    timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S


def admin_router(
    client: EngineClient, admin_key: str | None, route_class: type[APIRoute]
) -> APIRouter:
    router = APIRouter(
        prefix="/admin", route_class=route_class, dependencies=[Depends(_admin_auth(admin_key))]
    )

    @router.get("/workers")
    async def list_workers() -> JSONResponse:
        pool = _pool(client)
        launcher = getattr(client, "launcher", None)
        pending = launcher.pending() if launcher is not None else {}
        listed = [_describe(client, w, w.worker_id in pending) for w in pool.values()]
        listed += [_pending(w, role) for w, role in pending.items() if w not in pool]
        return JSONResponse({"workers": listed})

    @router.post("/workers/{worker_id}/drain")
    async def drain(worker_id: str, request: Request) -> JSONResponse:
        body = await _body(request)
        _worker(client, worker_id)
        report = await client.drain(worker_id, body.migrate, body.timeout_s)  # type: ignore[attr-defined]
        return JSONResponse(msgspec.to_builtins(report) | {"status": "drained"})

    @router.post("/workers/{worker_id}/role")
    async def set_role(worker_id: str, request: Request) -> JSONResponse:
        body = await _decode(request, RoleBody)
        _worker(client, worker_id)
        elastic = client.elastic  # type: ignore[attr-defined]
        switch = await _call(
            elastic.switch_role(worker_id, body.role, "admin", body.drain_timeout_s)
        )
        return JSONResponse(msgspec.to_builtins(switch) | {"status": "serving"})

    @router.post("/workers")
    async def add_worker(request: Request) -> JSONResponse:
        body = await _decode(request, RoleBody)
        worker_id = await _call(client.elastic.scale_out(body.role))  # type: ignore[attr-defined]
        return JSONResponse({"worker_id": worker_id, "role": body.role, "status": "serving"}, 201)

    @router.delete("/workers/{worker_id}")
    async def remove_worker(worker_id: str) -> JSONResponse:
        _worker(client, worker_id)
        await _call(client.elastic.scale_in(worker_id))  # type: ignore[attr-defined]
        return JSONResponse({"worker_id": worker_id, "status": "removed"})

    @router.get("/planner")
    async def planner() -> JSONResponse:
        loop = getattr(client, "planner", None)
        if loop is None:
            return JSONResponse({"planner": "none", "decisions": []})
        decisions = [
            {
                "age_s": round(time.monotonic() - when, 1),
                "target": d.target.as_dict(),
                "predicted_goodput": d.predicted_goodput,
                "current_goodput": d.current_goodput,
                "reason": d.reason,
                "moves": [list(move) for move in d.moves],
            }
            for when, d in loop.history
        ]
        return JSONResponse({"planner": "slo", "decisions": decisions})

    @router.get("/prefixes")
    async def prefixes(request: Request) -> JSONResponse:
        limit = parse_limit(request.query_params.get("limit"))
        if limit is None:
            raise ApiError(400, f"limit must be an integer in [1, {MAX_LIMIT}]", param="limit")
        dispatcher = getattr(client, "dispatcher", None)
        if dispatcher is None:
            raise ApiError(501, "this engine client does not count prompt prefixes")
        return JSONResponse(describe(dispatcher.prefixes, client.kv_index, limit))  # type: ignore[attr-defined]

    @router.post("/workers/{worker_id}/resume")
    async def resume(worker_id: str) -> JSONResponse:
        _worker(client, worker_id)
        client.drains.resume(worker_id)  # type: ignore[attr-defined]
        return JSONResponse({"worker_id": worker_id, "status": "serving"})

    return router


async def _call(work):
    """Await an operation; its errors as the admin API's status codes."""
    try:
        return await work
    except UnknownWorkerError as e:
        raise ApiError(404, f"no worker {e.args[0]!r}", code="worker_not_found") from None
    except ConfigError as e:
        raise ApiError(400, str(e), param=e.field) from None
    except ServiceUnavailableError:
        raise
    except PdserveError as e:
        raise ApiError(409, str(e)) from None


def _admin_auth(admin_key: str | None) -> Callable:
    expected = admin_key.encode() if admin_key else None

    async def check(request: Request) -> None:
        if expected is None:
            raise ApiError(403, "the admin API is off: start pdserve with --admin-key")
        header = request.headers.get("authorization")
        if header is None:
            raise ApiError(401, "the admin API needs 'Authorization: Bearer <admin key>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(403, "this key may not use the admin API", code="invalid_admin_key")

    return check


class RoleBody(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    # a switch: running requests finish this long, then the rest migrate (default: the
    # serve setting role_switch_drain_s; 0 migrates at once)
    drain_timeout_s: float | None = None


async def _body(request: Request) -> DrainBody:
    return await _decode(request, DrainBody)


async def _decode(request: Request, kind: type):
    raw = await request.body()
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as e:
        raise ApiError(400, f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from None


def _pool(client: EngineClient) -> dict:
    pool = getattr(client, "pool", None)
    if pool is None:
        raise ApiError(501, "this engine client has no workers to administer")
    return pool.workers


def _worker(client: EngineClient, worker_id: str):
    handle = _pool(client).get(worker_id)
    if handle is None:
        raise ApiError(404, f"no worker {worker_id!r}", param="worker_id", code="worker_not_found")
    return handle


def _describe(client: EngineClient, handle, is_pending: bool = False) -> dict:
    stats = handle.stats
    state = "dead" if not handle.is_alive else "draining" if handle.is_draining else "serving"
    if is_pending and not handle.is_alive:
        state = "pending"  # dead, and its replacement waits for a node with room
    return {
        "worker_id": handle.worker_id,
        "role": handle.role,
        "state": state,
        "incarnation": handle.incarnation,
        "pid": handle.info.pid,
        "num_requests": len(client.attempts_on(handle.worker_id)),  # type: ignore[attr-defined]
        "num_running": stats.num_running if stats else 0,
        "num_waiting": stats.num_waiting if stats else 0,
        "num_free_blocks": stats.num_free_blocks if stats else None,
        "num_blocks": stats.num_blocks if stats else None,
    }


def _pending(worker_id: str, role: str) -> dict:
    """A worker the launcher started that no node has room for yet: it never registered."""
    return {"worker_id": worker_id, "role": role, "state": "pending", "incarnation": None}


__all__ = ["UnknownWorkerError", "admin_router"]
