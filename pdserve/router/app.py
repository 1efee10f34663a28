"""The OpenAI-compatible HTTP app: routes, API keys, and errors as OpenAI shapes them.

`build_app(client, metrics, api_key, gateway)` serves one `EngineClient` (router/client.py):

    POST /v1/completions        POST /v1/chat/completions     GET /v1/models
    GET  /health  (the router is up)   GET /ready  (503 until workers are)   GET /metrics
    /admin/*  (router/admin.py: drain, resume, list workers; admin key only)
    GET  /dashboard  (router/dashboard.py: the live page; its data guarded like /metrics)

This module owns the HTTP surface; `serving.py` runs generations and `responses.py` builds
the bodies. The gateway (`router/gateway/`, configured by `GatewayConfig`) checks keys,
quotas, limits and admission; this module calls it in order (see `gateway/gate.py`). It
imports no torch, so the router starts fast.

Errors (always `{"error": {"message", "type", "param", "code"}}`):

    400 invalid_request_error  malformed JSON, a body that does not parse (param = the
                               field, e.g. `messages[0].role`), a limit passed, an
                               unsupported field, InvalidRequestError
    401 invalid_request_error  missing or wrong API key (code invalid_api_key when wrong)
    404 invalid_request_error  unknown model (code model_not_found) or route
    408 invalid_request_error  the request's deadline passed (code deadline_exceeded)
    413 invalid_request_error  body over max_body_bytes (code request_too_large)
    429 requests | tokens      a key's quota (code rate_limit_exceeded), with Retry-After
        | overloaded           and x-ratelimit-* headers; admission (code queue_full,
                               ttft_unattainable, evicted), with Retry-After
    500 server_error           RequestFailedError after output started, or anything
                               unexpected (logged with its traceback; the body says only
                               "internal server error")
    503 server_error           ServiceUnavailableError (code service_unavailable), also a
                               request that failed before producing anything; Retry-After

A client that hangs up before its answer is ready gets 499 (nginx's "client closed
request"), which only logs will ever see.

Bodies are parsed here, not by FastAPI, so that these rules (400 rather than FastAPI's
422, JSON accepted whatever the content type) hold, and a route catches every exception
itself rather than letting starlette's error middleware re-raise it into the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from pdserve.router.admin import admin_router
from pdserve.router.client import EngineClient
from pdserve.router.dashboard import dashboard_router
from pdserve.router.gateway import Gateway, GatewayConfig
from pdserve.router.gateway.edge import Edge
from pdserve.router.gateway.limits import read_body
from pdserve.router.metrics import RouterMetrics
from pdserve.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    error_body,
    validation_error_param,
)
from pdserve.router.serving import (
    STATUS_CLIENT_CLOSED,
    ApiError,
    ClientDisconnected,
    Serving,
    describe_error,
    error_headers,
)

logger = logging.getLogger(__name__)

BodyModel = TypeVar("BodyModel", bound=BaseModel)


def build_app(
    client: EngineClient,
    metrics: RouterMetrics | None = None,
    api_key: str | None = None,
    gateway: GatewayConfig | None = None,
    admin_key: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `client`. `metrics` defaults to a fresh `RouterMetrics`;
    `gateway` to the default limits with `api_key` (if any) as the one key: with a key,
    every `/v1` route requires `Authorization: Bearer <key>`. The `/admin` routes
    (router/admin.py) require `admin_key` and are closed without one."""
    metrics = metrics if metrics is not None else RouterMetrics(client.model_name)
    metrics.watch_workers(client.readiness)
    config = gateway if gateway is not None else GatewayConfig(api_key=api_key)
    gate = Gateway(config, client, metrics.registry)
    serving = Serving(client, metrics, gate)
    # protect_probes: FastAPI's own open schema and docs routes are not added (ours are)
    docs = dict(docs_url=None, redoc_url=None, openapi_url=None) if config.protect_probes else {}
    app = _EdgeFirstApp(gate, title="pdserve", summary="OpenAI-compatible LLM serving", **docs)
    app.router.route_class = _OpenAIRoute  # the probes too: no exception escapes a route
    app.state.client = client
    app.state.metrics = metrics
    app.state.gateway = gate
    probe_auth = [Depends(_bearer_auth(gate))] if config.protect_probes else []
    _add_probes(app, client, metrics, probe_auth)
    app.include_router(
        dashboard_router(client, metrics, probe_auth_checks(gate, config), _OpenAIRoute)
    )
    if config.protect_probes:
        _add_docs(app, probe_auth)
    app.include_router(_v1_router(client, serving, gate))
    app.include_router(admin_router(client, admin_key, _OpenAIRoute))
    app.add_exception_handler(HTTPException, _http_exception)
    return app


class _EdgeFirstApp(FastAPI):
    """FastAPI with the gateway's edge (`gateway/edge.py`) in front of all of it, so that
    refusals known from headers and queue state cost no routing, middleware or parsing."""

    def __init__(self, gate: Gateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.edge = Edge(super().__call__, gate)

    async def __call__(self, scope, receive, send) -> None:
        await self.edge(scope, receive, send)


# -- routes ---------------------------------------------------------------------------------


class _OpenAIRoute(APIRoute):
    """A route that turns every exception from its handler into an OpenAI error response."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(exc)

        return guarded


def _v1_router(client: EngineClient, serving: Serving, gate: Gateway) -> APIRouter:
    dependencies = [Depends(_bearer_auth(gate))]
    router = APIRouter(prefix="/v1", route_class=_OpenAIRoute, dependencies=dependencies)

    @router.get("/models")
    async def list_models() -> JSONResponse:
        card = ModelCard(
            id=client.model_name, root=client.model_name, max_model_len=client.max_model_len
        )
        return JSONResponse(ModelList(data=[card]).model_dump())

    @router.post("/completions")
    async def create_completion(request: Request) -> Response:
        return await _generate(request, gate, CompletionRequest, serving.completions)

    @router.post("/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await _generate(request, gate, ChatCompletionRequest, serving.chat)

    async def _generate(request: Request, gate: Gateway, model: type, run: Callable) -> Response:
        """The gateway's steps around one generation; the lease is closed on any error
        (a stream closes it when it ends)."""
        lease = getattr(request.state, "lease", None) or gate.open(request.state.api_key)
        try:
            body = await _parse_body(request, model, gate.config.max_body_bytes)
            gate.check(body)
            _check_model(client, body.model)
            response = await run(body, request, lease)
        except BaseException as exc:
            lease.close()
            gate.note_refusal(exc)
            if isinstance(exc, Exception):
                response = error_response(exc)
                response.headers.update(lease.headers)
                return response
            raise
        response.headers.update(lease.headers)
        return response

    return router


def _add_probes(
    app: FastAPI, client: EngineClient, metrics: RouterMetrics, dependencies: list
) -> None:
    """Liveness, readiness and metrics: open unless `protect_probes` (then readiness and
    metrics need a key; liveness never does)."""

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready", dependencies=dependencies)
    async def ready() -> JSONResponse:
        try:
            readiness = client.readiness()
        except Exception as exc:
            logger.exception("readiness check failed")
            return JSONResponse({"ready": False, "reason": f"readiness check failed: {exc}"}, 503)
        body = {
            "ready": readiness.is_ready,
            "reason": readiness.reason,
            "workers": [msgspec.to_builtins(w) for w in readiness.workers],  # tiers: structs
        }
        return JSONResponse(body, 200 if readiness.is_ready else 503)

    @app.get("/metrics", dependencies=dependencies)
    async def prometheus_metrics() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)


# -- request checks -------------------------------------------------------------------------


def probe_auth_checks(gate, config) -> list:
    """The checks that guard `/metrics` (none unless `protect_probes`)."""
    return [_bearer_auth(gate)] if config.protect_probes else []


def _add_docs(app: FastAPI, dependencies: list) -> None:
    """The OpenAPI schema and Swagger page behind a key (`protect_probes`)."""
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/openapi.json", include_in_schema=False, dependencies=dependencies)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="pdserve")


def _bearer_auth(gate: Gateway) -> Callable:
    """A dependency that sets `request.state.api_key` (None when keys are off) or
    raises 401. The key check itself is constant-time (`gateway/keys.py`)."""

    async def check(request: Request) -> None:
        if hasattr(request.state, "lease"):  # the edge authenticated it (gateway/edge.py)
            return
        header = request.headers.get("authorization")
        token = None
        if header is not None:
            scheme, _, token = header.partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            request.state.api_key = gate.authenticate(token)
        except LookupError:
            if header is None:
                raise ApiError(
                    401,
                    "You didn't provide an API key: send the header 'Authorization: Bearer <key>'.",
                ) from None
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key") from None

    return check


async def _parse_body(request: Request, model: type[BodyModel], max_bytes: int) -> BodyModel:
    raw = await read_body(request, max_bytes)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _as_api_error(model, exc.errors()) from exc


def _as_api_error(model: type[BaseModel] | None, errors: list[dict[str, Any]]) -> ApiError:
    if not errors:
        return ApiError(400, "the request body is invalid")
    error = errors[0]
    if error["type"] == "json_invalid":
        return ApiError(400, f"We could not parse the JSON body of your request: {error['msg']}")
    loc = error.get("loc", ())
    if model is None:  # FastAPI's own validation: the first element says body, query, ...
        loc = loc[1:]
    param = validation_error_param(model, loc) if model is not None else None
    message = f"{param}: {error['msg']}" if param else error["msg"]
    return ApiError(400, message, param=param)


def _check_model(client: EngineClient, name: str | None) -> None:
    if name is not None and name != client.model_name:
        raise ApiError(
            404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
        )


# -- errors ---------------------------------------------------------------------------------


def error_response(exc: BaseException) -> Response:
    if isinstance(exc, (ClientDisconnected, ClientDisconnect)):  # nobody is left to answer
        return Response(status_code=STATUS_CLIENT_CLOSED)
    if isinstance(exc, RequestValidationError):
        exc = _as_api_error(None, list(exc.errors()))
    status_code, body = describe_error(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else error_headers(exc)
    return JSONResponse(body, status_code, headers=headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    else:
        message = str(exc.detail)
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(
        error_body(message, error_type), exc.status_code, headers=getattr(exc, "headers", None)
    )
