"""Helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys


def run_ladle(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ladle", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    assert lines[0].startswith("ladle: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- a real server on 127.0.0.1 --------------------------------------------------------------------

import http.client  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`ladle serve` in a subprocess, as a user starts it. Unless the test gives --data-dir or
    --database, its metering database is a fresh SQLite file under a temporary folder (never the
    user's ~/.local/share/ladle, where a tenant made by one test would close every later server).
    It serves the LLM alone (--no-embedding-model: loading MiniLM beside every test server would
    cost the suite minutes) unless `embeddings`, an --embedding-* flag or a --config says otherwise."""

    def __init__(self, *args: str, ready_timeout_s: float = 180, embeddings: bool = False):
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = None if {"--data-dir", "--database"} & set(args) else tempfile.mkdtemp(prefix="ladle-data-")
        metering = ("--data-dir", self.data_dir) if self.data_dir else ()
        chosen = embeddings or any(a.startswith(("--embedding", "--no-embedding", "--config")) for a in args)
        if not chosen:
            metering += ("--no-embedding-model",)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ladle", "serve", "--port", str(self.port), *metering, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"},
        )
        self.output: list[str] = []
        import threading

        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_ready(ready_timeout_s)

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.output))
            try:
                status, _, _ = self.request("GET", "/ready")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready:\n" + "".join(self.output))

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 120):
        """(status, headers, parsed JSON or text) over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read().decode()
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                parsed = raw
            return resp.status, dict(resp.getheaders()), parsed
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Samples of /metrics as {(name, sorted labels): value}, parsed by prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        status, _, text = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels) -> float:
        total = 0.0
        for (n, lbls), v in self.metrics().items():
            if n == name and all(dict(lbls).get(k) == val for k, val in labels.items()):
                total += v
        return total

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def long_context_copy(model_dir, dest, context: int):
    """The same tiny weights with a longer context, so one generation outlasts what a test waits for."""
    import shutil
    from pathlib import Path

    dest = Path(dest)
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["max_position_embeddings"] = context
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def open_stream(server, path: str, body: dict, headers=None):
    """A streamed request, its 200 checked; returns (connection, response) to read events from."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json",
                                                                     **(headers or {})})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def send_request(server, path: str, body: dict):
    """A request sent, its response not read (a stream's headers wait for its first token): the
    connection, to close (which cancels it)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn


def read_events(resp, count: int) -> list[str]:
    events = []
    while len(events) < count:
        line = resp.readline().decode()
        if not line:
            break
        if line.startswith("data: "):
            events.append(line[6:].strip())
    return events


def wait_for_metric(server, name: str, value: float, timeout_s: float = 60, **labels) -> None:
    """Until the server's metric reaches value (a state to reach, not a time to measure)."""
    deadline = time.monotonic() + timeout_s
    while server.metric(name, **labels) != value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        time.sleep(0.02)


# -- the metering APIs in process ------------------------------------------------------------------

ADMIN = {"Authorization": "Bearer admin-secret"}  # the admin key of metered_state's server


def metered_state(metering, **server):
    """A ServerState with a store (a MeteringConfig, or a data dir for SQLite) and a ledger and no
    models: enough for the admin tenants and usage APIs under starlette's TestClient (or uvicorn in
    a thread). Close with close_sinks()."""
    from ladle.config import LadleConfig, MeteringConfig, ServerConfig
    from ladle.metering.prometheus import ServerMetrics
    from ladle.metering.store import Store
    from ladle.server.serve import attach_metering
    from ladle.server.state import ServerState

    if not isinstance(metering, MeteringConfig):
        metering = MeteringConfig(data_dir=str(metering))
    cfg = LadleConfig(server=ServerConfig(admin_keys=("admin-secret",), **server), metering=metering)
    state = ServerState(config=cfg, metrics=ServerMetrics(), registry=None, router=None)
    return attach_metering(state, Store.open(cfg.metering))


def usage_rows(path, request_ids, timeout_s: float = 60) -> dict:
    """The rows of these requests in a --usage-log file, once all are written (a stream's row
    follows its last byte): {request id: UsageRecord}."""
    from ladle.metering.usage_log import read_usage_log

    deadline = time.monotonic() + timeout_s
    while True:
        rows = {r.request_id: r for r in read_usage_log(path) if r.request_id in request_ids}
        if len(rows) == len(request_ids) or time.monotonic() > deadline:
            assert set(rows) == set(request_ids), f"rows missing: {set(request_ids) - set(rows)}"
            return rows
        time.sleep(0.05)
