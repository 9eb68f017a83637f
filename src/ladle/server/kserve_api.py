"""KServe v2 / Open Inference Protocol over HTTP, with Triton's binary tensor and model
repository extensions (what the official `tritonclient.http` speaks):

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     liveness, readiness
    GET  /v2/models/{name}[/versions/{v}]      model metadata (inputs, outputs, datatypes, shapes)
    GET  /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models/{name}[/versions/{v}]/config
    POST /v2/models/{name}[/versions/{v}]/infer
    POST /v2/repository/index                  every model and its state
    POST /v2/repository/models/{name}/load     start it (wait until ready or failed); a folder added
                                               to --model-repository since the start is read first
    POST /v2/repository/models/{name}/unload   drain and unload it: unavailable until loaded again

Errors are `{"error": "..."}` (APIError.response formats them for /v2 paths).
"""

from __future__ import annotations

import json
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ladle import __version__
from ladle.engine.batcher import BatchQueueTimeout, QueueFull
from ladle.errors import LadleError
from ladle.model.tensor_repository import scan_repository
from ladle.router.endpoint import INFER, Phase
from ladle.router.onnx import tensor_model_entry
from ladle.router.registry import ModelNotFound
from ladle.server.accounting import Meter, metered
from ladle.server.errors import APIError
from ladle.server.kserve_tensors import HEADER_LENGTH, encode_infer_response, parse_infer_request
from ladle.server.state import ServerPhase, ServerState

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration"]
PLATFORMS = {"onnxruntime": "onnxruntime_onnx"}  # a repository config's platform -> Triton's name for it
# registry phases -> the model repository extension's states
REPOSITORY_STATES = {
    Phase.UNLOADED: "UNAVAILABLE",
    Phase.LOADING: "LOADING",
    Phase.WARMING: "LOADING",
    Phase.READY: "READY",
    Phase.DRAINING: "UNLOADING",
    Phase.FAILED: "UNAVAILABLE",
}


def _state(request: Request) -> ServerState:
    return request.app.state.ladle


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "ladle", "version": __version__, "extensions": EXTENSIONS})


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    is_ready = _state(request).phase == ServerPhase.READY
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


def _endpoint(request: Request):
    """The endpoint the path names (404 if none), with its version checked."""
    state = _state(request)
    name = request.path_params["name"]
    try:
        endpoint = state.registry.resolve(name)
    except ModelNotFound as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None
    request.scope["state"]["model"] = endpoint.name
    version = request.path_params.get("version")
    served = _version(endpoint)
    if version is not None and version != served:
        raise APIError(404, f"the model {endpoint.name!r} has no version {version!r} (it serves version {served})")
    return endpoint


def _version(endpoint) -> str:
    model = getattr(endpoint, "model", None)
    return model.version if model is not None else "1"


def _tensor_config(endpoint):
    if INFER not in endpoint.tasks:
        raise APIError(
            400,
            f"the model {endpoint.name!r} is a {endpoint.kind} model: it does not take tensors over /v2 "
            "(use the /v1 API for it)",
            param="model",
        )
    return endpoint.model.config


def _specs(specs, batched: bool) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": ([-1] if batched else []) + list(s.shape)} for s in specs]


async def model_metadata(request: Request) -> Response:
    endpoint = _endpoint(request)
    if INFER not in endpoint.tasks:
        body = {
            "name": endpoint.name,
            "versions": ["1"],
            "platform": f"ladle_{endpoint.kind}",
            "inputs": [],
            "outputs": [],
        }
        return JSONResponse(body)
    cfg = _tensor_config(endpoint)
    batched = cfg.max_batch_size > 0
    return JSONResponse({
        "name": endpoint.name, "versions": [_version(endpoint)], "platform": PLATFORMS[cfg.platform],
        "inputs": _specs(cfg.inputs, batched), "outputs": _specs(cfg.outputs, batched),
    })  # fmt: skip


async def model_config(request: Request) -> Response:
    """Triton's model configuration extension: the repository config as Triton names it."""
    endpoint = _endpoint(request)
    cfg = _tensor_config(endpoint)

    def tensors(specs):
        return [{"name": s.name, "data_type": f"TYPE_{s.datatype.replace('BYTES', 'STRING')}", "dims": list(s.shape)}
                for s in specs]  # fmt: skip

    batching = cfg.dynamic_batching
    return JSONResponse({
        "name": endpoint.name, "platform": PLATFORMS[cfg.platform], "backend": "onnxruntime",
        "max_batch_size": cfg.max_batch_size, "input": tensors(cfg.inputs), "output": tensors(cfg.outputs),
        "dynamic_batching": {
            "preferred_batch_size": list(batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": int(batching.max_queue_delay_ms * 1000),
        },
        "instance_group": [{"count": cfg.instances, "kind": "KIND_CPU"}],
    })  # fmt: skip


async def model_ready(request: Request) -> Response:
    endpoint = _endpoint(request)
    is_ready = endpoint.status().phase == Phase.READY
    body = {"name": endpoint.name, "ready": is_ready}
    return JSONResponse(body, status_code=200 if is_ready else 503)


@metered("/v2/models/{name}/infer")
async def infer(request: Request, meter: Meter) -> Response:
    state = _state(request)
    meter.requesting(request.path_params["name"])
    endpoint = _endpoint(request)
    cfg = _tensor_config(endpoint)
    body = await request.body()
    parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), cfg)
    endpoint = await state.acquire(endpoint.name, INFER)  # waits for (or starts) its load; 503 if it cannot
    state.reserve_quota(state.principal(request), request.state.request_id, 0)  # tensors: the request counts
    meter.answered(endpoint.name)  # tensors: no tokens to count
    try:
        results = await endpoint.infer(parsed.inputs, parsed.num_rows)
    except LadleError as e:
        raise _infer_error(e) from None
    content, headers = encode_infer_response(endpoint.name, _version(endpoint), parsed, results, cfg)
    return Response(content, headers=headers)


def _infer_error(e: LadleError) -> APIError:
    """The batcher's refusals as 503 (as Triton answers a full queue), ONNX Runtime's complaints
    about the inputs as 400."""
    from ladle.runner.onnx_session import OnnxRunError

    if isinstance(e, QueueFull):
        return APIError(503, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, BatchQueueTimeout):
        return APIError(503, str(e), code="queue_timeout", headers={"Retry-After": "1"})
    if isinstance(e, OnnxRunError):
        return APIError(400, str(e), code="invalid_value")
    return APIError(503, str(e), code="model_not_ready")


# -- the model repository extension ----------------------------------------------------------------


async def repository_index(request: Request) -> Response:
    state = _state(request)
    body = await request.body()
    try:
        options = json.loads(body) if body.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    only_ready = bool(options.get("ready", False)) if isinstance(options, dict) else False
    models = []
    for endpoint in state.registry.endpoints.values():
        status = endpoint.status()
        if only_ready and status.phase != Phase.READY:
            continue
        entry = {"name": endpoint.name, "version": _version(endpoint), "state": REPOSITORY_STATES[status.phase]}
        reason = status.failure or ("unloaded" if status.phase == Phase.UNLOADED else "")
        if reason:
            entry["reason"] = reason
        models.append(entry)
    if not only_ready:
        new = _new_folders(state)
        models += [{"name": n, "version": "", "state": "UNAVAILABLE", "reason": "not loaded"} for n in new]
    return JSONResponse(models)


async def repository_load(request: Request) -> Response:
    """Load a model: one the registry holds, or a folder added to --model-repository since the start."""
    state = _state(request)
    state.check_serving()
    name = request.path_params["name"]
    if name not in state.registry:
        await _declare_from_repository(state, name)
    endpoint = _endpoint(request)
    await state.registry.load(endpoint.name)
    status = endpoint.status()
    if status.phase != Phase.READY:
        raise APIError(400, f"failed to load {endpoint.name!r}: {status.failure or status.phase.value}")
    return JSONResponse({})


async def repository_unload(request: Request) -> Response:
    """Unload a model; it stays unavailable (requests get 503) until it is loaded again."""
    state = _state(request)
    endpoint = _endpoint(request)
    await state.registry.unload(endpoint.name, hold=True)
    return JSONResponse({})


def _new_folders(state: ServerState) -> list[str]:
    """Model folders of --model-repository that the registry does not serve (added since the start)."""
    repo = state.config.model_repository
    if not repo:
        return []
    try:
        return [p.name for p in scan_repository(repo) if p.name not in state.registry]
    except LadleError:
        return []  # the folder went away


async def _declare_from_repository(state: ServerState, name: str) -> None:
    """Add the repository folder `name` to the registry (404 where there is none, 400 where its
    config is wrong, naming the file)."""
    if name not in _new_folders(state):
        return  # _endpoint answers 404
    folder = Path(state.config.model_repository) / name
    try:
        await state.registry.add(tensor_model_entry(folder))
    except LadleError as e:
        raise APIError(400, f"failed to load {name!r}: {e}") from None


def routes(route_cls) -> list:
    """The /v2 routes, each model route with and without /versions/{version}."""
    out = [
        route_cls("/v2", server_metadata, methods=["GET"]),
        route_cls("/v2/health/live", live, methods=["GET"]),
        route_cls("/v2/health/ready", ready, methods=["GET"]),
        route_cls("/v2/repository/index", repository_index, methods=["POST"]),
        route_cls("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        route_cls("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
    ]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        out += [
            route_cls(base, model_metadata, methods=["GET"]),
            route_cls(f"{base}/ready", model_ready, methods=["GET"]),
            route_cls(f"{base}/config", model_config, methods=["GET"]),
            route_cls(f"{base}/infer", infer, methods=["POST"]),
        ]
    return out
