"""The ASGI application: routes, and the middleware every request passes (request id, body size
limit, API key, status metrics). Bad input ends in a 4xx in the API's own format (OpenAI's, or
Anthropic's on /v1/messages); only bugs give a 500."""

from __future__ import annotations

import hmac
import logging
import re
import uuid

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ladle.metering.tenants import Principal
from ladle.server import admin, anthropic_api, embeddings_api, kserve_api, openai_api, tenants_api, usage_api
from ladle.server.errors import APIError, BodyTooLarge, ClientDisconnected
from ladle.server.state import ServerPhase, ServerState

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
PUBLIC_PATHS = {"/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready"}  # no API key needed


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """200 once the models declared for the start are ready (or failed, if another is ready)."""
    state: ServerState = request.app.state.ladle
    models = {name: e.status().phase.value for name, e in state.registry.endpoints.items()}
    body = {"status": state.phase.value, "models": models}
    if state.phase == ServerPhase.READY:
        return JSONResponse({**body, "model": state.registry.default_name})
    if state.failure:
        body["error"] = state.failure
    return JSONResponse(body, status_code=503)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.ladle
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/models", openai_api.list_models, methods=["GET"]),
    Route("/v1/completions", openai_api.completions, methods=["POST"]),
    Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings_api.embeddings, methods=["POST"]),
    Route("/v1/messages", anthropic_api.messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", anthropic_api.count_tokens, methods=["POST"]),
    Route("/tokenize", openai_api.tokenize, methods=["POST"]),
    Route("/detokenize", openai_api.detokenize, methods=["POST"]),
    Route("/v1/usage", usage_api.usage, methods=["GET"]),
    Route("/admin/models", admin.list_models, methods=["GET"]),
    Route("/admin/models", admin.add_model, methods=["POST"]),
    Route("/admin/models/{name:path}", admin.remove_model, methods=["DELETE"]),
    *tenants_api.routes(Route),
    *kserve_api.routes(Route),
]
ROUTE_PATHS = {r.path for r in ROUTES}
_ADMIN_TEMPLATES = [r for r in ROUTES if r.path.startswith("/admin/") and "{" in r.path]
ADMIN_PREFIX = "/admin/"
ADMIN_READABLE = {"/v1/usage"}  # user paths that also take the admin key (seeing every tenant)


def _route_label(path: str) -> str:
    """The route a path counts under in ladle_http_requests (templates, not model names)."""
    if path in ROUTE_PATHS:
        return path
    if path.startswith(ADMIN_PREFIX):  # a tenant's id or a model's name is no label value
        found = next((r.path for r in _ADMIN_TEMPLATES if r.path_regex.match(path)), None)
        return (found or "/admin/models/{name}").replace("{name:path}", "{name}")
    if path.startswith("/v2/repository/models/"):
        return "/v2/repository/models/{name}/" + path.rsplit("/", 1)[-1]
    if path.startswith("/v2/models/"):
        tail = path.rsplit("/", 1)[-1]
        return "/v2/models/{name}/" + tail if tail in ("infer", "ready", "config") else "/v2/models/{name}"
    return "other"


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response(request.url.path)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    messages = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
    return APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail))).response(request.url.path)


async def _too_large(request: Request, exc: BodyTooLarge) -> Response:
    limit = request.app.state.ladle.config.server.max_request_bytes
    return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large").response(
        request.url.path
    )


async def _disconnected(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response(request.url.path)


def _matches(token: str, keys) -> bool:
    return any(hmac.compare_digest(token, key) for key in keys)


def _admin_refusal(cfg, token: str) -> Response | None:
    """The admin API takes admin keys only: none given is 401, a user's key 403."""
    if not cfg.admin_keys:
        message = "the admin API is off: start the server with --admin-key KEY"
        return APIError(403, message, code="admin_disabled").response()
    if _matches(token, cfg.admin_keys):
        return None
    if not token:
        return APIError(
            401, "the admin API needs an admin key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key"
        ).response()
    return APIError(403, "this key may not use the admin API: it needs an admin key", code="forbidden").response()


class LadleMiddleware:
    """Pure ASGI (no buffering of streamed responses): request id in and out, the body size limit,
    API keys, and a status counter per route."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        incoming = headers.get(REQUEST_ID_HEADER, b"").decode("latin-1")
        request_id = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope.get("path", "")
        route = _route_label(path)
        status_box = [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            early = self._reject_early(scope, headers, path)
            if early is not None:
                return await early(scope, receive, send_with_id)
            await self.app(scope, self._limited(receive, headers), send_with_id)
        finally:
            model = scope["state"].get("model", "")  # set by the handler once it knows the model
            self.state.metrics.observe_http(model, route, status_box[0] or 499)

    def _reject_early(self, scope, headers, path) -> Response | None:
        cfg = self.state.config.server
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_request_bytes:
            return APIError(
                413, f"the request body is larger than {cfg.max_request_bytes} bytes", code="request_too_large"
            ).response(path)
        auth = headers.get(b"authorization", b"").decode("latin-1")
        # a bearer token, or Anthropic's header (its clients send the key as x-api-key)
        token = auth[7:] if auth.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode("latin-1")
        if path.startswith(ADMIN_PREFIX):
            refusal = _admin_refusal(cfg, token)
            if refusal is None:
                scope["state"]["principal"] = Principal(self.state.directory.default, None, is_admin=True)
            return refusal
        principal = self._principal(cfg, token, path)
        if principal is None and path not in PUBLIC_PATHS:
            what = "no API key was given" if not token else "the API key is not valid"
            return APIError(
                401,
                f"Incorrect API key provided: {what}. Send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
                code="invalid_api_key",
            ).response(path)
        scope["state"]["principal"] = principal
        return None

    def _principal(self, cfg, token: str, path: str) -> Principal | None:
        """Who the token is: a tenant's key, the admin (on the paths it may read beside the admin
        API: an admin key is no user key), or (as the default tenant) a --api-key key or anyone
        where the server needs no key; None: refused."""
        directory = self.state.directory
        found = directory.authenticate(token)
        if found is not None:
            return found
        if path in ADMIN_READABLE and token and cfg.admin_keys and _matches(token, cfg.admin_keys):
            return Principal(directory.default, None, is_admin=True)
        if cfg.api_keys:
            return Principal(directory.default, None) if token and _matches(token, cfg.api_keys) else None
        return Principal(directory.default, None) if directory.is_open else None

    def _limited(self, receive, headers):
        limit = self.state.config.server.max_request_bytes
        seen = [0]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise BodyTooLarge
            return message

        return limited_receive


def build_app(state: ServerState, lifespan=None) -> Starlette:
    app = Starlette(
        routes=ROUTES,
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            BodyTooLarge: _too_large,
            ClientDisconnected: _disconnected,
            Exception: _server_error,
        },
        lifespan=lifespan,
    )
    app.state.ladle = state
    app.add_middleware(LadleMiddleware, state=state)
    return app
