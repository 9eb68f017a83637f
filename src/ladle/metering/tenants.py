"""Tenants (teams or products), their API keys, and who a request's bearer token belongs to.

A key is 32 random bytes shown once at creation (`ladle-` + urlsafe base64); the server keeps its
SHA-256 only, looks a token up by its hash and confirms it with a constant-time compare. The
directory lives in memory and is the one place authentication reads; the store (ladle.metering
.store) persists it and loads it at start; an admin change updates both at once, so a revoked key
is refused from the next request on. With no tenant configured every request is the `default`
tenant's (docs/tenants.md).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass, field, replace

from ladle.config import BUDGET_PERIODS, PRIORITY_CLASSES
from ladle.errors import LadleError

DEFAULT_TENANT = "default"
KEY_PREFIX = "ladle-"
_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Quota:
    """A tenant's limits; None is no limit. Minutes and budget periods are UTC calendar windows."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion tokens
    token_budget: int | None = None  # tokens per budget_period
    cost_budget: float | None = None  # cost (MeteringConfig.prices) per budget_period
    budget_period: str = "month"  # BUDGET_PERIODS

    def __post_init__(self):
        if self.budget_period not in BUDGET_PERIODS:
            raise LadleError(f"budget_period must be one of {', '.join(BUDGET_PERIODS)}, got {self.budget_period!r}")
        for name in ("requests_per_minute", "tokens_per_minute", "token_budget", "cost_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise LadleError(f"{name} must be positive (or unset for no limit), got {value}")

    @property
    def is_unlimited(self) -> bool:
        return all(
            v is None for v in (self.requests_per_minute, self.tokens_per_minute, self.token_budget, self.cost_budget)
        )


@dataclass(frozen=True)
class Tenant:
    id: str  # lower-case name: [a-z0-9._-], used in URLs, labels and the ledger
    models: tuple[str, ...] = ()  # the model names (or aliases, routers) it may use; empty: all
    priority_class: str = "interactive"  # PRIORITY_CLASSES: interactive requests are scheduled first
    weight: float = 1.0  # its share under fair scheduling, relative to other tenants'
    quota: Quota = field(default_factory=Quota)
    created_s: float = field(default_factory=time.time)

    def __post_init__(self):
        if not _TENANT_ID.match(self.id):
            raise LadleError(f"tenant id {self.id!r}: use 1-63 characters of a-z, 0-9, '.', '_', '-'")
        if self.priority_class not in PRIORITY_CLASSES:
            choices = ", ".join(PRIORITY_CLASSES)
            raise LadleError(f"priority_class must be one of {choices}, got {self.priority_class!r}")
        if not self.weight > 0:
            raise LadleError(f"weight must be positive, got {self.weight}")

    @property
    def priority(self) -> int:
        """The engine's priority value (lower first): interactive 0, batch 1."""
        return PRIORITY_CLASSES.index(self.priority_class)

    def may_use(self, model: str | None) -> bool:
        return not self.models or (model is not None and model in self.models)


@dataclass(frozen=True)
class KeyRecord:
    id: str  # "key_" + 12 hex: how rows, logs and the admin API name a key
    tenant: str  # the tenant it belongs to
    key_hash: str  # hex SHA-256 of the key
    prefix: str  # the key's first 10 characters, to recognise it in a list
    name: str = ""  # what the admin called it
    created_s: float = field(default_factory=time.time)
    revoked_s: float | None = None  # when it was revoked (refused from then on)


@dataclass(frozen=True)
class Principal:
    """Who sent a request."""

    tenant: Tenant
    key_id: str | None  # None: no key (an open server) or a --api-key key
    is_admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key(tenant: str, name: str = "") -> tuple[KeyRecord, str]:
    """A fresh key: its record (to store) and the key itself (to show once)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return KeyRecord("key_" + secrets.token_hex(6), tenant, hash_key(key), key[:10], name), key


class TenantDirectory:
    """Tenants and their live keys, in memory; thread-safe (admin writes, many readers)."""

    def __init__(self, tenants=(), keys=()):
        self._lock = threading.Lock()
        self._tenants: dict[str, Tenant] = {t.id: t for t in tenants}
        self._keys: dict[str, KeyRecord] = {k.key_hash: k for k in keys if k.revoked_s is None}
        self.default = Tenant(DEFAULT_TENANT)

    @property
    def is_open(self) -> bool:
        """No tenant is configured: requests need no tenant key (only --api-key, if given)."""
        return not self._tenants

    def tenants(self) -> list[Tenant]:
        return sorted(self._tenants.values(), key=lambda t: t.id)

    def get(self, tenant_id: str) -> Tenant | None:
        return self.default if tenant_id == DEFAULT_TENANT and self.is_open else self._tenants.get(tenant_id)

    def put(self, tenant: Tenant) -> None:
        with self._lock:
            self._tenants[tenant.id] = tenant

    def remove(self, tenant_id: str) -> None:
        """Drop a tenant and every key of it."""
        with self._lock:
            self._tenants.pop(tenant_id, None)
            self._keys = {h: k for h, k in self._keys.items() if k.tenant != tenant_id}

    def add_key(self, key: KeyRecord) -> None:
        with self._lock:
            self._keys[key.key_hash] = key

    def revoke(self, key_id: str) -> None:
        with self._lock:
            self._keys = {h: k for h, k in self._keys.items() if k.id != key_id}

    def authenticate(self, token: str) -> Principal | None:
        """The tenant a key belongs to, or None for an unknown or revoked key."""
        if not token:
            return None
        digest = hash_key(token)
        record = self._keys.get(digest)
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            return None
        tenant = self._tenants.get(record.tenant)
        return Principal(tenant, record.id) if tenant is not None else None

    def updated(self, tenant_id: str, **changes) -> Tenant:
        """The tenant with `changes` applied (validated), not yet stored."""
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            raise KeyError(tenant_id)
        quota = changes.pop("quota", None)
        if quota is not None:
            changes["quota"] = replace(tenant.quota, **quota) if isinstance(quota, dict) else quota
        return replace(tenant, **changes)


def prefix_cache_salt(tenant_id: str, request_salt: str | None, share: bool) -> str | None:
    """The engine's cache_salt for a tenant's request: the tenant's id with the request's own salt,
    so no tenant hits (and can time) another's prefix-cache blocks; only the request's salt where
    the config shares the cache (metering.share_prefix_cache), and for the default tenant, whose
    unsalted requests stay as they were before tenants existed."""
    if share or tenant_id == DEFAULT_TENANT:
        return request_salt
    return f"tenant:{tenant_id}" if request_salt is None else f"tenant:{tenant_id}\x00{request_salt}"
