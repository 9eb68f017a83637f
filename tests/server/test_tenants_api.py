"""The admin API for tenants and keys, in process (starlette's TestClient on the real app and a
SQLite store): validation, 404/409, a key shown once and refused once revoked."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from helpers import ADMIN, metered_state
from ladle.metering.store import Store
from ladle.server.app import build_app


@pytest.fixture
def state(tmp_path):
    s = metered_state(tmp_path / "data")
    yield s
    s.close_sinks()


@pytest.fixture
def client(state):
    return TestClient(build_app(state))


def test_tenants_are_created_listed_updated_and_deleted(client, state):
    body = {
        "id": "team-a",
        "models": ["tiny"],
        "priority_class": "batch",
        "weight": 2,
        "quota": {"requests_per_minute": 5},
    }
    r = client.post("/admin/tenants", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["quota"]["requests_per_minute"] == 5 and r.json()["weight"] == 2.0
    assert client.post("/admin/tenants", json={"id": "team-a"}, headers=ADMIN).status_code == 409
    assert [t["id"] for t in client.get("/admin/tenants", headers=ADMIN).json()["data"]] == ["team-a"]
    r = client.patch("/admin/tenants/team-a", json={"weight": 3, "quota": {"token_budget": 1000}}, headers=ADMIN)
    assert r.status_code == 200, r.text
    quota = r.json()["quota"]
    assert (r.json()["weight"], quota["requests_per_minute"], quota["token_budget"]) == (3.0, 5, 1000)
    assert state.directory.get("team-a").weight == 3.0
    assert Store.open(state.config.metering).tenant("team-a").quota.token_budget == 1000  # persisted
    assert client.get("/admin/tenants/team-a", headers=ADMIN).json()["priority_class"] == "batch"
    assert client.delete("/admin/tenants/team-a", headers=ADMIN).status_code == 200
    assert client.get("/admin/tenants/team-a", headers=ADMIN).status_code == 404
    assert state.directory.get("team-a") is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"id": "Bad Name"}, "tenant id 'Bad Name'"),
        ({"id": "t", "weight": 0}, "weight must be positive"),
        ({"id": "t", "weight": "heavy"}, "weight: expected a number"),
        ({"id": "t", "priority_class": "vip"}, "priority_class must be one of"),
        ({"id": "t", "quota": {"requests_per_minute": -1}}, "requests_per_minute must be positive"),
        ({"id": "t", "quota": {"rpm": 1}}, "quota.rpm: unknown key"),
        ({"id": "t", "colour": "red"}, "colour: unknown field"),
        ({"models": []}, "id: field required"),
    ],
)
def test_a_bad_tenant_is_a_400_naming_the_field(client, body, fragment):
    r = client.post("/admin/tenants", json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_tenants_and_keys_are_404(client):
    assert client.patch("/admin/tenants/nobody", json={"weight": 2}, headers=ADMIN).status_code == 404
    assert client.delete("/admin/tenants/nobody", headers=ADMIN).status_code == 404
    assert client.post("/admin/tenants/nobody/keys", json={}, headers=ADMIN).status_code == 404
    assert client.delete("/admin/keys/key_000000000000", headers=ADMIN).status_code == 404


def test_a_key_is_shown_once_works_at_once_and_is_refused_once_revoked(client):
    client.post("/admin/tenants", json={"id": "team-a"}, headers=ADMIN)
    created = client.post("/admin/tenants/team-a/keys", json={"name": "ci"}, headers=ADMIN).json()
    key, key_id = created["key"], created["id"]
    assert key.startswith("ladle-") and created["prefix"] == key[:10]
    listed = client.get("/admin/keys?tenant=team-a", headers=ADMIN).json()["data"]
    assert [k["id"] for k in listed] == [key_id] and key not in str(listed)
    user = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/no-such-route", headers=user).status_code == 404  # past the key check: live at once
    assert client.get("/admin/tenants", headers=user).status_code == 403  # no admin key
    assert client.get("/v1/no-such-route").status_code == 401  # tenants exist: the server is closed
    assert client.delete(f"/admin/keys/{key_id}", headers=ADMIN).json()["revoked_s"] is not None
    assert client.get("/v1/no-such-route", headers=user).status_code == 401  # refused from the next request
