"""What the HTTP layer knows of the running server: the engine (once loaded), its phase, metrics."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ladle.config import LadleConfig
from ladle.metering.prometheus import ServerMetrics
from ladle.server.errors import APIError


class Phase(enum.Enum):
    LOADING = "loading"  # the model is loading
    WARMING = "warming"  # loaded, running its warm-up passes
    READY = "ready"  # serving
    DRAINING = "draining"  # shutting down: in-flight requests finish, new ones get 503
    FAILED = "failed"  # loading failed; the process is exiting


@dataclass
class ServerState:
    config: LadleConfig
    model_name: str  # the name requests address the model by
    metrics: ServerMetrics
    engine: object | None = None  # AsyncEngine, once loaded
    phase: Phase = Phase.LOADING
    failure: str | None = None  # why loading failed
    started_s: float = field(default_factory=time.time)
    exit_code: int = 0

    @property
    def info(self):
        return self.engine.engine.info if self.engine is not None else None

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    def check_serving(self) -> None:
        """503 unless requests can be served now."""
        if self.phase == Phase.READY:
            return
        if self.phase == Phase.DRAINING:
            raise APIError(
                503,
                "the server is shutting down and takes no new requests",
                code="draining",
                headers={"Retry-After": "5", "Connection": "close"},
            )
        if self.phase == Phase.FAILED:
            raise APIError(503, f"the model failed to load: {self.failure}", code="model_load_failed")
        raise APIError(
            503,
            f"the model is {self.phase.value}; retry when /ready answers 200",
            code="not_ready",
            headers={"Retry-After": "2"},
        )

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested not in self.served_names:
            raise APIError(
                404,
                f"The model `{requested}` does not exist. This server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )

    @property
    def served_names(self) -> set[str]:
        return {self.model_name}

    def admit(self) -> None:
        """429 when the queue of waiting requests is full."""
        waiting = self.engine.num_waiting
        limit = self.config.server.max_waiting_requests
        if waiting >= limit:
            raise APIError(
                429,
                f"the server is overloaded: {waiting} requests are already waiting (limit {limit}); "
                "retry after the delay given in Retry-After",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
