"""Showback: `GET /v1/usage?group_by=tenant,model&start=&end=&granularity=hour|day&tenant=`.

`start` and `end` are ISO 8601 (UTC where no offset is given) or Unix seconds; by default the
last 30 days up to now. `group_by` is a comma-separated subset of the store's GROUP_COLUMNS
(default `tenant,model`; empty for one total). A tenant's key sees its own rows only (asking for
another tenant is a 403); the admin key sees every tenant and may pick one with `tenant=`. The
ledger is flushed first, so a client's own just-finished requests are in its report.
"""

from __future__ import annotations

import datetime as dt

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ladle.metering.store import GRANULARITIES, GROUP_COLUMNS
from ladle.server.errors import APIError
from ladle.server.state import ServerState

DEFAULT_GROUP_BY = ("tenant", "model")
DEFAULT_RANGE_S = 30 * 86400  # a report without `start` covers this much before `end`


def iso(time_s: float | None) -> str | None:
    if time_s is None:
        return None
    return dt.datetime.fromtimestamp(time_s, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(value: str, param: str) -> float:
    """Unix seconds from `value`: a number, or an ISO 8601 date or time (UTC without an offset)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise APIError(400, f"{param}: expected ISO 8601 or Unix seconds, got {value!r}", param=param,
                       code="invalid_value") from None  # fmt: skip
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _group_by(value: str | None) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_GROUP_BY
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in GROUP_COLUMNS]
    if unknown:
        raise APIError(400, f"group_by: unknown column {unknown[0]!r} (choose from {', '.join(GROUP_COLUMNS)})",
                       param="group_by", code="invalid_value")  # fmt: skip
    return names


def _granularity(value: str | None) -> str | None:
    if value in (None, "", "none"):
        return None
    if value not in GRANULARITIES:
        raise APIError(400, f"granularity: expected {' or '.join(GRANULARITIES)}, got {value!r}",
                       param="granularity", code="invalid_value")  # fmt: skip
    return value


def _range(params) -> tuple[float, float]:
    end_s = parse_time(params["end"], "end") if params.get("end") else dt.datetime.now(dt.timezone.utc).timestamp()
    start_s = parse_time(params["start"], "start") if params.get("start") else end_s - DEFAULT_RANGE_S
    if start_s >= end_s:
        raise APIError(400, f"start: must be before end ({iso(start_s)} is not before {iso(end_s)})",
                       param="start", code="invalid_value")  # fmt: skip
    return start_s, end_s


def _tenant_filter(request: Request) -> str | None:
    """The tenant the report may show: the caller's own, or (the admin) any, or all."""
    principal = ServerState.principal(request)
    asked = request.query_params.get("tenant") or None
    if principal.is_admin:
        return asked
    if asked is not None and asked != principal.tenant.id:
        raise APIError(403, "tenant: this key may read its own tenant's usage only", param="tenant",
                       code="forbidden")  # fmt: skip
    return principal.tenant.id


async def usage(request: Request) -> Response:
    state: ServerState = request.app.state.ladle
    params = request.query_params
    group_by, granularity = _group_by(params.get("group_by")), _granularity(params.get("granularity"))
    start_s, end_s = _range(params)
    tenant = _tenant_filter(request)
    if state.store is None:
        raise APIError(503, "this server has no metering database", code="no_database")
    if state.ledger is not None:
        await run_in_threadpool(state.ledger.flush)
    rows = await run_in_threadpool(state.store.usage_report, group_by, start_s, end_s, granularity, tenant)
    body = {
        "object": "list",
        "start": iso(start_s),
        "end": iso(end_s),
        "granularity": granularity,
        "group_by": list(group_by),
        "data": [{**r, "bucket": iso(r["bucket"])} for r in rows],
    }
    return JSONResponse(body)
