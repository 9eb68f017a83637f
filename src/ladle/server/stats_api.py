"""GET /admin/stats: the live series of each model over the last minutes, for the dashboard and
for scripts (behind the admin key, as the whole admin API).

    GET /admin/stats?window_s=600

Per model: its state and load now (the numbers GET /admin/models and the engine's Prometheus
gauges give), the window summed, and one entry per 5-second bucket (metering/live.py), with the
peaks of those gauges as sample_gauges saw them each second. A server younger than the window
shows the buckets since its start.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ladle.server.errors import APIError
from ladle.server.state import ServerState

log = logging.getLogger(__name__)
DEFAULT_WINDOW_S = 600.0
GAUGE_INTERVAL_S = 1.0  # how often sample_gauges reads each model's gauges


def _window_s(request: Request, max_s: float) -> float:
    raw = request.query_params.get("window_s")
    if raw is None:
        return min(DEFAULT_WINDOW_S, max_s)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= max_s:  # also refuses nan
        raise APIError(
            400, f"window_s must be a number of seconds in (0, {max_s:g}], got {raw!r}", param="window_s",
            code="invalid_value",
        )  # fmt: skip
    return value


def current(endpoint, metrics) -> dict:
    """A model's state and load now: phase, requests in flight, running and waiting (its engine's
    load estimate, or a batcher's queue), the share of its KV cache in use."""
    status = endpoint.status()
    out = {
        "state": status.phase.value,
        "in_flight": status.num_in_flight,
        "running": None,
        "waiting": None,
        "kv_usage": None,
        "kv_cache_tokens": None,
    }
    load = endpoint.load()
    if load is not None:
        out["running"], out["waiting"] = load.num_running, load.num_waiting
    elif hasattr(endpoint, "num_queued"):  # an embedding or tensor model's batcher
        out["waiting"] = endpoint.num_queued
    stats = metrics.engine_stats(endpoint.name)
    if stats is not None:
        out["kv_usage"] = round(stats.kv_usage, 4)
    info = getattr(endpoint, "info", None)  # None while not loaded
    if info is not None and hasattr(info, "kv_capacity_tokens"):
        out["kv_cache_tokens"] = info.kv_capacity_tokens
    return out


async def sample_gauges(state: ServerState, interval_s: float = GAUGE_INTERVAL_S) -> None:
    """Until cancelled: each model's running, waiting and KV usage into the live series, so the
    dashboard's queue and KV charts cover the window whether or not a page was open."""
    live = state.metrics.live
    failing: set[str] = set()  # models whose sampling failed (logged once each)
    while True:
        for endpoint in list(state.registry.endpoints.values()):
            try:
                if endpoint.is_loaded:
                    now = current(endpoint, state.metrics)
                    live.observe_gauges(endpoint.name, now["running"], now["waiting"], now["kv_usage"])
            except Exception:  # a bug here must not stop the server, nor fill its log
                if endpoint.name not in failing:
                    failing.add(endpoint.name)
                    log.exception("sampling the gauges of model %s failed", endpoint.name)
        await asyncio.sleep(interval_s)


def _rounded(view) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(view).items()}


async def stats(request: Request) -> Response:
    state: ServerState = request.app.state.ladle
    live = state.metrics.live
    window_s = _window_s(request, live.window_s)
    shown_s = max(min(window_s, live.clock() - state.started_s), live.bucket_s)  # nothing before the start
    models = []
    for endpoint in list(state.registry.endpoints.values()):
        models.append(
            {
                "name": endpoint.name,
                "kind": endpoint.kind,
                **current(endpoint, state.metrics),
                "window": _rounded(live.window(endpoint.name, shown_s)),
                "buckets": [_rounded(b) for b in live.buckets(endpoint.name, shown_s)],
            }
        )
    body = {
        "object": "stats",
        "now": round(live.clock(), 3),
        "started": round(state.started_s, 3),
        "window_s": window_s,
        "bucket_s": live.bucket_s,
        "models": models,
    }
    return JSONResponse(body)
