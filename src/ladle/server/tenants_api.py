"""The admin API for tenants and their keys (docs/tenants.md):

    POST   /admin/tenants              {"id", "models", "priority_class", "weight", "quota": {...}} -> 201
    GET    /admin/tenants              every tenant
    GET    /admin/tenants/{id}         one tenant
    PATCH  /admin/tenants/{id}         the fields given (quota fields merge into the current quota)
    DELETE /admin/tenants/{id}         the tenant and its keys (its usage rows stay)
    POST   /admin/tenants/{id}/keys    {"name"} -> 201 {"id", "key", "prefix", ...}: the key, this once
    GET    /admin/keys[?tenant=]       the keys (never the key itself: its id and prefix)
    DELETE /admin/keys/{key_id}        revoke: refused from the next request on

Behind the admin keys, as every /admin/ path. A change goes to the store first, then to the
server's directory, so what authentication reads is never ahead of the database.
"""

from __future__ import annotations

import dataclasses

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ladle.config_file import ConfigFileError, from_options
from ladle.errors import LadleError
from ladle.metering.store import Conflict, NotFound, Store
from ladle.metering.tenants import KeyRecord, Tenant, new_key
from ladle.server.errors import APIError, read_json_object
from ladle.server.state import ServerState

TENANT_FIELDS = ("id", "models", "priority_class", "weight", "quota")  # what a request body may set


def describe_tenant(t: Tenant) -> dict:
    return {"object": "tenant", "id": t.id, "models": list(t.models), "priority_class": t.priority_class,
            "weight": t.weight, "quota": dataclasses.asdict(t.quota), "created_s": t.created_s}  # fmt: skip


def describe_key(k: KeyRecord) -> dict:
    return {"object": "api_key", "id": k.id, "tenant": k.tenant, "prefix": k.prefix, "name": k.name,
            "created_s": k.created_s, "revoked_s": k.revoked_s}  # fmt: skip


def _state(request: Request) -> ServerState:
    return request.app.state.ladle


def _store(request: Request) -> Store:
    store = _state(request).store
    if store is None:
        raise APIError(503, "this server has no metering database", code="no_database")
    return store


async def _call(fn, *args):
    """A blocking store call, off the event loop; its refusals as the API's errors."""
    try:
        return await run_in_threadpool(fn, *args)
    except NotFound as e:
        raise APIError(404, str(e), code="not_found") from None
    except Conflict as e:
        raise APIError(409, str(e), code="conflict") from None


async def _body(request: Request, required: bool = True) -> dict:
    if not required and not await request.body():
        return {}
    return await read_json_object(request)


def _tenant_from(data: dict) -> Tenant:
    """A Tenant from a body's fields, validated; errors name the field (`tenant: weight: ...`)."""
    unknown = sorted(set(data) - set(TENANT_FIELDS))
    if unknown:
        raise APIError(400, f"{unknown[0]}: unknown field (known: {', '.join(TENANT_FIELDS)})",
                       param=unknown[0], code="invalid_value")  # fmt: skip
    try:
        return from_options(Tenant, data, "tenant")
    except (ConfigFileError, LadleError) as e:
        raise APIError(400, str(e), code="invalid_value") from None


async def create_tenant(request: Request) -> Response:
    data = await _body(request)
    if "id" not in data:
        raise APIError(400, "id: field required", param="id", code="invalid_value")
    tenant = await _call(_store(request).create_tenant, _tenant_from(data))
    _state(request).directory.put(tenant)
    return JSONResponse(describe_tenant(tenant), status_code=201)


async def list_tenants(request: Request) -> Response:
    tenants = await _call(_store(request).tenants)
    return JSONResponse({"object": "list", "data": [describe_tenant(t) for t in tenants]})


async def get_tenant(request: Request) -> Response:
    tenant = await _call(_store(request).tenant, request.path_params["id"])
    return JSONResponse(describe_tenant(tenant))


async def update_tenant(request: Request) -> Response:
    tenant_id = request.path_params["id"]
    data = await _body(request)
    if data.get("id", tenant_id) != tenant_id:
        raise APIError(400, "id: a tenant's id cannot change", param="id", code="invalid_value")
    store = _store(request)
    current = describe_tenant(await _call(store.tenant, tenant_id))
    quota = data.get("quota")
    if isinstance(quota, dict):
        data["quota"] = {**current["quota"], **quota}
    merged = {k: v for k, v in {**current, **data}.items() if k in TENANT_FIELDS}
    tenant = dataclasses.replace(_tenant_from(merged), created_s=current["created_s"])
    tenant = await _call(store.update_tenant, tenant)
    _state(request).directory.put(tenant)
    return JSONResponse(describe_tenant(tenant))


async def delete_tenant(request: Request) -> Response:
    tenant_id = request.path_params["id"]
    await _call(_store(request).delete_tenant, tenant_id)
    _state(request).directory.remove(tenant_id)
    return JSONResponse({"object": "tenant", "id": tenant_id, "deleted": True})


async def create_key(request: Request) -> Response:
    data = await _body(request, required=False)
    name = data.get("name", "")
    if not isinstance(name, str) or len(name) > 255:
        raise APIError(400, "name: expected a string of at most 255 characters", param="name", code="invalid_value")
    record, key = new_key(request.path_params["id"], name)
    await _call(_store(request).create_key, record)
    _state(request).directory.add_key(record)
    return JSONResponse({**describe_key(record), "key": key}, status_code=201)


async def list_keys(request: Request) -> Response:
    keys = await _call(_store(request).keys, request.query_params.get("tenant"))
    return JSONResponse({"object": "list", "data": [describe_key(k) for k in keys]})


async def revoke_key(request: Request) -> Response:
    record = await _call(_store(request).revoke_key, request.path_params["key_id"])
    _state(request).directory.revoke(record.id)
    return JSONResponse(describe_key(record))


def routes(route) -> list:
    return [
        route("/admin/tenants", create_tenant, methods=["POST"]),
        route("/admin/tenants", list_tenants, methods=["GET"]),
        route("/admin/tenants/{id}", get_tenant, methods=["GET"]),
        route("/admin/tenants/{id}", update_tenant, methods=["PATCH"]),
        route("/admin/tenants/{id}", delete_tenant, methods=["DELETE"]),
        route("/admin/tenants/{id}/keys", create_key, methods=["POST"]),
        route("/admin/keys", list_keys, methods=["GET"]),
        route("/admin/keys/{key_id}", revoke_key, methods=["DELETE"]),
    ]
