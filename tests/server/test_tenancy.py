"""What the server tells the engine of a request's tenant: tenant, weight, priority, cache salt."""

from __future__ import annotations

from types import SimpleNamespace

from ladle.config import LadleConfig, MeteringConfig
from ladle.metering.tenants import Principal, Tenant, TenantDirectory
from ladle.server.openai_api import _tenancy
from ladle.server.state import ServerState


def tenancy(tenant: Tenant, share: bool = False, priority: int = 5, salt: str | None = None) -> dict:
    request = SimpleNamespace(scope={"state": {"principal": Principal(tenant, None)}})
    state = SimpleNamespace(config=LadleConfig(metering=MeteringConfig(share_prefix_cache=share)),
                            principal=ServerState.principal)  # fmt: skip
    return _tenancy(request, state, SimpleNamespace(priority=priority, cache_salt=salt))


def test_the_default_tenant_keeps_the_bodys_priority_and_salt():
    default = TenantDirectory().default
    assert tenancy(default) == {"tenant": "default", "weight": 1.0, "priority": 5, "cache_salt": None}
    assert tenancy(default, salt="mine")["cache_salt"] == "mine"


def test_a_tenant_gets_its_class_weight_and_own_cache_salt():
    batch = Tenant("team-a", priority_class="batch", weight=2.5)
    got = tenancy(batch, priority=0, salt="mine")
    assert (got["tenant"], got["weight"], got["priority"]) == ("team-a", 2.5, 1)  # the class, not the body's 0
    assert got["cache_salt"] not in (None, "mine")
    assert got["cache_salt"] != tenancy(Tenant("team-b"), salt="mine")["cache_salt"]
    assert tenancy(Tenant("team-b", priority_class="interactive"))["priority"] == 0
    assert tenancy(batch, share=True, salt="mine")["cache_salt"] == "mine"  # shared cache: only the request's salt
