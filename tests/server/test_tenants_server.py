"""Tenants over HTTP against a real `ladle serve` (security, docs/tenants.md): a tenant's key reads
its own usage only, a revoked key is refused on the very next request, the admin API refuses user
keys, tenants and keys persist across a restart, and no key string reaches the log, the database
file or /metrics."""

from __future__ import annotations

import time

import pytest

from helpers import ServerProcess
from ladle.config import MeteringConfig
from ladle.metering.store import Store
from ladle.metering.usage import UsageRecord

ADMIN_KEY = "admin-key-for-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def start(tiny_models, data_dir) -> ServerProcess:
    return ServerProcess("--model", str(tiny_models["llama"].gguf_path), "--served-model-name", "tiny",
                         "--kv-cache-memory", "0.02", "--no-embedding-model", "--no-warmup",
                         "--admin-key", ADMIN_KEY, "--data-dir", str(data_dir))  # fmt: skip


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def usage_row(tenant: str, key_id: str, tokens: int) -> UsageRecord:
    return UsageRecord(time_s=time.time() - 60, request_id=f"seed-{tenant}", tenant=tenant, key_id=key_id,
                       api="/v1/completions", model_requested="tiny", model="tiny", prompt_tokens=tokens,
                       cached_tokens=0, completion_tokens=1, queue_s=0.0, ttft_s=0.01, duration_s=0.02,
                       engine_s=0.01, finish_reason="length", status=200, outcome="served")  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tenants-data")


def test_tenant_keys_are_kept_apart_revoked_at_once_and_never_written(tiny_models, data_dir):
    server = start(tiny_models, data_dir)
    keys, ids = {}, {}
    try:
        for tenant in ("team-a", "team-b"):
            status, _, _ = server.request("POST", "/admin/tenants", {"id": tenant, "models": ["tiny"]}, ADMIN)
            assert status == 201
            status, _, created = server.request("POST", f"/admin/tenants/{tenant}/keys", {"name": "t"}, ADMIN)
            assert status == 201
            keys[tenant], ids[tenant] = created["key"], created["id"]
        # the ledger rows other code records: written straight into the server's database here
        store = Store.open(MeteringConfig(data_dir=str(data_dir)))
        store.insert_usage([usage_row("team-a", ids["team-a"], 11), usage_row("team-b", ids["team-b"], 22)])
        store.close()

        status, _, body = server.request("GET", "/v1/usage?group_by=tenant", headers=bearer(keys["team-a"]))
        assert status == 200 and [(d["tenant"], d["prompt_tokens"]) for d in body["data"]] == [("team-a", 11)]
        status, _, body = server.request("GET", "/v1/usage?tenant=team-b", headers=bearer(keys["team-a"]))
        assert status == 403 and body["error"]["param"] == "tenant"
        status, _, body = server.request("GET", "/v1/usage?group_by=tenant", headers=ADMIN)
        assert status == 200 and [d["tenant"] for d in body["data"]] == ["team-a", "team-b"]

        status, _, body = server.request("GET", "/admin/tenants", headers=bearer(keys["team-a"]))
        assert status == 403 and body["error"]["code"] == "forbidden"
        status, _, _ = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2},
                                      bearer(keys["team-b"]))  # fmt: skip
        assert status == 200
        assert server.request("GET", "/v1/models", headers={})[0] == 401  # tenants exist: no key, no entry

        assert server.request("DELETE", f"/admin/keys/{ids['team-a']}", headers=ADMIN)[0] == 200
        assert server.request("GET", "/v1/usage", headers=bearer(keys["team-a"]))[0] == 401  # the very next one
        metrics_text = server.request("GET", "/metrics")[2]
    finally:
        server.stop()
    log = "".join(server.output)
    files = b"".join(p.read_bytes() for p in data_dir.iterdir() if p.is_file())
    for key in keys.values():
        assert key not in log and key not in metrics_text
        assert key.encode() not in files

    again = start(tiny_models, data_dir)  # the tenants and keys come back from the database
    try:
        assert again.request("GET", "/v1/usage", headers=bearer(keys["team-a"]))[0] == 401
        status, _, body = again.request("GET", "/v1/usage?group_by=tenant", headers=bearer(keys["team-b"]))
        assert status == 200 and [d["tenant"] for d in body["data"]] == ["team-b"]
    finally:
        again.stop()
