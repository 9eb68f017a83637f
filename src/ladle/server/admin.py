"""The admin API: the models of the running server, added and removed at runtime.

    GET    /admin/models          every model: state, why it failed, memory, live load
    POST   /admin/models          a model entry, as in a config file's `models:` list -> 202, loads
    DELETE /admin/models/{name}   drain its requests, unload it, forget it

Behind the admin keys (`--admin-key`, `server.admin_keys`), never the users' keys; without admin
keys the admin API is off.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ladle.config import ModelEntry
from ladle.config_file import ConfigFileError, from_options
from ladle.errors import LadleError
from ladle.router.registry import ModelNotFound
from ladle.server.errors import APIError
from ladle.server.state import ServerState


def _state(request: Request) -> ServerState:
    return request.app.state.ladle


def describe(endpoint) -> dict:
    status = endpoint.status()
    info, load, entry = endpoint.info, endpoint.load(), endpoint.entry
    out = {
        "name": endpoint.name,
        "aliases": list(entry.aliases),
        "kind": endpoint.kind,
        "tasks": sorted(endpoint.tasks),
        "state": status.phase.value,
        "error": status.failure,
        "pinned": entry.pinned,
        "memory_bytes": status.memory_bytes,
        "in_flight": status.num_in_flight,
        "targets": {"ttft_ms": entry.targets.ttft_ms, "tpot_ms": entry.targets.tpot_ms},
        "degrade_to": entry.degrade_to,
        "fallback": entry.fallback,
    }
    if info is not None:
        out["engine"] = {
            "weights": info.weights_description,
            "device": info.device,
            "max_model_len": info.max_model_len,
        }
        for key, attr in (("kv_cache_tokens", "kv_capacity_tokens"), ("dimensions", "dimensions")):
            if hasattr(info, attr):  # an LLM's KV cache; an embedding model's vector length
                out["engine"][key] = getattr(info, attr)
    batching = getattr(endpoint, "batcher", None)
    if batching is not None:
        b = entry.batching
        out["batching"] = {
            "max_batch_size": b.max_batch_size,
            "max_queue_delay_ms": b.max_queue_delay_ms,
            "preferred_batch_sizes": list(b.preferred_batch_sizes),
            "max_queue_size": b.max_queue_size,
            "instances": b.instances,
            "queued": batching.num_queued,
            "batches": batching.num_batches,
        }
    details = getattr(endpoint, "details", None)  # what a kind adds of its own (a tensor model's config)
    if details is not None:
        out.update(details())
    if load is not None and load.is_measured:
        out["load"] = {
            "running": load.num_running,
            "waiting": load.num_waiting,
            "backlog_tokens": load.backlog_tokens,
            "step_base_ms": round(load.step_base_s * 1e3, 3),
            "step_per_token_ms": round(load.step_per_token_s * 1e3, 5),
            "predicted_ttft_ms": round(load.predict_ttft_s(0) * 1e3, 1),
        }
    return out


async def list_models(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({"models": [describe(e) for e in state.registry.endpoints.values()]})


async def add_model(request: Request) -> Response:
    state = _state(request)
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    try:
        entry = from_options(ModelEntry, data, "model")
    except ConfigFileError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    if any(name in state.registry for name in entry.names):
        raise APIError(409, f"a model named {entry.name!r} (or one of its aliases) is already served", code="conflict")
    try:
        endpoint = await state.registry.add(entry)
    except LadleError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return JSONResponse(describe(endpoint), status_code=202)


async def remove_model(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["name"]
    try:
        endpoint = state.registry.resolve(name)
    except ModelNotFound as e:
        raise APIError(404, str(e), code="model_not_found") from None
    await state.registry.remove(endpoint.name)
    return JSONResponse({"name": endpoint.name, "state": "removed"})
