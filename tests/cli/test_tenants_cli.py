"""`ladle tenants`, `ladle keys`, `ladle usage report` against a live HTTP server (the real app and
store on SQLite, no models: uvicorn in a thread of the test)."""

from __future__ import annotations

import csv
import io
import json
import threading
import time

import pytest
import uvicorn

from helpers import free_port, metered_state
from ladle.cli import main
from ladle.cli_admin import parse_since
from ladle.metering.usage import UsageRecord
from ladle.server.app import build_app

ADMIN_KEY = "admin-secret"


@pytest.fixture
def server(tmp_path):
    """(url, state): the admin and usage APIs served on 127.0.0.1."""
    state = metered_state(tmp_path / "data")
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    uv.should_exit = True
    thread.join(10)
    state.close_sinks()


def usage_row(time_s: float, tenant: str, model: str) -> UsageRecord:
    return UsageRecord(time_s=time_s, request_id=f"r{time_s}", tenant=tenant, key_id=None, api="/v1/completions",
                       model_requested=model, model=model, prompt_tokens=100, cached_tokens=10, completion_tokens=20,
                       queue_s=0.0, ttft_s=0.1, duration_s=0.3, engine_s=0.25, finish_reason="stop", status=200,
                       outcome="served", cost=0.5)  # fmt: skip


def ladle(capsys, url, *argv) -> tuple[int, str, str]:
    code = main([*argv, "--url", url, "--admin-key", ADMIN_KEY])
    out, err = capsys.readouterr()
    return code, out, err


def test_tenants_and_keys_from_the_command_line(server, capsys):
    url, state = server
    code, out, _ = ladle(capsys, url, "tenants", "create", "team-a", "--models", "tiny,big", "--weight", "2",
                         "--rpm", "60", "--priority-class", "batch")  # fmt: skip
    assert code == 0 and "team-a" in out and "tiny,big" in out and "batch" in out
    code, out, _ = ladle(capsys, url, "tenants", "update", "team-a", "--tpm", "5000")
    assert code == 0
    code, out, _ = ladle(capsys, url, "tenants", "list", "--json")
    (tenant,) = json.loads(out)["data"]
    assert (tenant["weight"], tenant["quota"]["requests_per_minute"], tenant["quota"]["tokens_per_minute"]) == (
        2.0, 60, 5000)  # fmt: skip
    code, out, err = ladle(capsys, url, "tenants", "create", "team-a")
    assert code == 2 and "409" in err and "already exists" in err
    code, out, err = ladle(capsys, url, "tenants", "create", "team-b", "--weight", "-1")
    assert code == 2 and "weight must be positive" in err

    code, key, err = ladle(capsys, url, "keys", "create", "team-a", "--name", "ci")
    key = key.strip()
    assert code == 0 and key.startswith("ladle-") and "only time" in err
    assert state.directory.authenticate(key).tenant.id == "team-a"
    code, out, _ = ladle(capsys, url, "keys", "list", "--tenant", "team-a")
    assert code == 0 and key[:10] in out and key not in out
    key_id = out.splitlines()[1].split()[0]
    code, out, _ = ladle(capsys, url, "keys", "revoke", key_id)
    assert code == 0 and "revoked" in out and state.directory.authenticate(key) is None
    code, out, _ = ladle(capsys, url, "tenants", "delete", "team-a")
    assert code == 0 and state.directory.get("team-a") is None


def test_a_wrong_admin_key_or_no_server_is_one_line(server, capsys):
    url, _ = server
    assert main(["tenants", "list", "--url", url, "--admin-key", "wrong"]) == 2
    assert "403" in capsys.readouterr().err
    assert main(["tenants", "list", "--url", f"http://127.0.0.1:{free_port()}", "--admin-key", "k"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


def test_usage_report_as_a_table_and_as_csv(server, capsys):
    url, state = server
    now = time.time()
    for i, (tenant, model) in enumerate([("a", "tiny"), ("a", "tiny"), ("b", "big")]):
        state.record_usage(usage_row(now - 3600 - i, tenant, model))
    state.record_usage(usage_row(now - 30 * 86400, "a", "tiny"))  # older than --since
    code, out, _ = ladle(capsys, url, "usage", "report", "--by", "tenant,model", "--since", "7d")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["tenant", "model", "requests", "prompt_tokens", "cached_tokens",
                                "completion_tokens", "total_tokens", "engine_s", "cost"]  # fmt: skip
    assert lines[1].split() == ["a", "tiny", "2", "200", "20", "40", "240", "0.500", "1.000000"]
    code, out, _ = ladle(capsys, url, "usage", "report", "--by", "tenant", "--since", "1d", "--granularity", "day",
                         "--csv")  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["tenant"], r["requests"], r["cost"]) for r in rows] == [("a", "2", "1.000000"), ("b", "1", "0.500000")]
    assert rows[0]["bucket"].endswith("T00:00:00Z")
    code, _, err = ladle(capsys, url, "usage", "report", "--by", "colour")
    assert code == 2 and "group_by: unknown column 'colour'" in err


def test_since_reads_durations_times_and_refuses_the_rest():
    assert float(parse_since("7d", "--since", 1_000_000.0)) == 1_000_000.0 - 7 * 86400
    assert float(parse_since("90m", "--since", 10_000.0)) == 10_000.0 - 5400
    assert parse_since("2026-12-01", "--since", 0.0) == "2026-12-01"
    assert parse_since("1790000000", "--since", 0.0) == "1790000000"
    with pytest.raises(Exception, match="--since: expected a duration"):
        parse_since("last week", "--since", 0.0)
