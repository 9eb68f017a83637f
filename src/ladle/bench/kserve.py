"""`ladle bench kserve`: concurrent clients against an ONNX classifier over KServe v2, served
twice from the same model file: with dynamic batching (max_batch_size 64), then with
max_batch_size 1 (every request its own ONNX Runtime call).

The model: an MLP trained on scikit-learn's digits data (bench/onnx_classifier.py; big enough
hidden layers that one call costs milliseconds, so batching has something to win). Each client
keeps one connection and sends single-row requests in a closed loop (binary tensors, as
tritonclient sends them; the probabilities asked back binary) for `warmup_s`, then
`duration_s` measured. The result: throughput, P50/P99 latency, the mean batch size the server's
/metrics saw, per mode, the ratio, and the machine's load average, in
benchmarks/results/kserve-*.json with a plot.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ladle.bench.compare import RunningServer, System
from ladle.errors import LadleError


@dataclass(frozen=True)
class KServeBenchOptions:
    concurrency: int = 64  # clients, each one request in flight
    duration_s: float = 20.0  # measured, per mode
    warmup_s: float = 3.0  # run before measuring, per mode
    hidden: int = 4096  # the MLP's hidden units per layer
    num_layers: int = 3
    max_iter: int = 4  # training epochs (the model is for timing; it still classifies digits)
    max_queue_delay_ms: float = 2.0  # the batched mode's delay
    port: int = 8292
    cache_dir: str = "~/.cache/ladle/bench-kserve"  # the trained model is kept here between runs
    results_dir: str = "benchmarks/results"
    client: str = "raw"  # raw: prepared binary requests on kept-alive sockets; tritonclient: the official aio client


MODES = {"batched": 64, "batch-1": 1}  # mode -> max_batch_size


def build_repositories(opts: KServeBenchOptions) -> dict[str, Path]:
    """One repository per mode, the same model.onnx in each (trained once, then reused)."""
    from ladle.bench.onnx_classifier import build_classifier_repository

    cache = Path(opts.cache_dir).expanduser() / f"digits-{opts.hidden}x{opts.num_layers}-{opts.max_iter}"
    out = {}
    for mode, max_batch in MODES.items():
        repo = cache / mode
        onnx = repo / "digits" / "1" / "model.onnx"
        first = cache / "batched" / "digits" / "1" / "model.onnx"
        if not onnx.exists() and first.exists():
            shutil.copytree(first.parent.parent.parent, repo, dirs_exist_ok=True)
        if not onnx.exists():
            print(f"[kserve] training the {opts.hidden}x{opts.num_layers} digits MLP ...", file=sys.stderr)
            build_classifier_repository(repo, "digits", "digits", 64, opts.max_queue_delay_ms, opts.hidden,
                                        num_layers=opts.num_layers, max_iter=opts.max_iter)  # fmt: skip
        _write_config(repo / "digits" / "config.yaml", max_batch, opts.max_queue_delay_ms)
        out[mode] = repo
    return out


def _write_config(path: Path, max_batch_size: int, delay_ms: float) -> None:
    """The mode's batching in the model's config.yaml (inputs and outputs as exported)."""
    import yaml

    cfg = yaml.safe_load(path.read_text())
    cfg["max_batch_size"] = max_batch_size
    cfg["dynamic_batching"] = {"max_queue_delay_ms": delay_ms if max_batch_size > 1 else 0.0}
    cfg["warmup"] = [{"name": "one row", "batch_size": 1}, {"name": "a full batch", "batch_size": max_batch_size}]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _request(rows, i: int) -> bytes:
    import numpy as np

    x = np.ascontiguousarray(rows[i % len(rows) : i % len(rows) + 1], dtype=np.float32)
    binary = {"binary_data_size": x.nbytes}
    header = json.dumps({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "parameters": binary}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    head = (
        f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + x.nbytes}\r\n\r\n"
    ).encode()
    return head + header + x.tobytes()


async def _exchange(reader, writer, request: bytes) -> int:
    writer.write(request)
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def _raw_client(port: int, requests: list[bytes], rows):
    """A client on one kept-alive connection sending prepared requests; (call(i) -> status, close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def close():
        writer.close()

    return (lambda i: _exchange(reader, writer, requests[i % len(requests)])), close


async def _triton_client(port: int, requests: list[bytes], rows):
    """The official tritonclient.http.aio client (binary tensors in and out, as it sends by default)."""
    import numpy as np
    from tritonclient.http.aio import InferenceServerClient, InferInput, InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    client = InferenceServerClient(f"127.0.0.1:{port}", conn_limit=1)

    async def call(i: int) -> int:
        x = np.ascontiguousarray(rows[i % len(rows) : i % len(rows) + 1], dtype=np.float32)
        tensor = InferInput("input", [1, x.shape[1]], "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        try:
            await client.infer("digits", [tensor], outputs=[InferRequestedOutput("probabilities", binary_data=True)])
        except InferenceServerException:
            return 500
        return 200

    return call, client.close


CLIENTS = {"raw": _raw_client, "tritonclient": _triton_client}  # --client


async def _load(port: int, requests: list[bytes], rows, opts: KServeBenchOptions) -> tuple[list[float], int]:
    """Latencies of the requests finished in the measured window, and the failures."""
    latencies: list[float] = []
    failures = [0]
    start = time.perf_counter()
    measure_from, stop_at = start + opts.warmup_s, start + opts.warmup_s + opts.duration_s

    async def client(c: int):
        call, close = await CLIENTS[opts.client](port, requests, rows)
        i = c
        try:
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                status = await call(i)
                done = time.perf_counter()
                i += opts.concurrency
                if status != 200:
                    failures[0] += 1
                elif measure_from <= sent and done <= stop_at:
                    latencies.append(done - sent)
        finally:
            await close()

    await asyncio.gather(*(client(c) for c in range(opts.concurrency)))
    return latencies, failures[0]


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _batch_stats(port: int) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {"ladle_batch_size_count": 0.0, "ladle_batch_size_sum": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in found and s.labels.get("model_name") == "digits":
                found[s.name] += s.value
    return found["ladle_batch_size_count"], found["ladle_batch_size_sum"]


def run_mode(mode: str, repo: Path, requests: list[bytes], rows, opts: KServeBenchOptions, log_dir: Path, stamp: str):
    command = [sys.executable, "-m", "ladle", "serve", "--model-repository", str(repo), "--port", str(opts.port),
               "--log-level", "warning"]  # fmt: skip
    server = RunningServer(System(mode, command, "/v2/health/ready"), opts.port, log_dir / f"kserve-{stamp}-{mode}.log")
    try:
        server.wait_ready()
        print(f"[kserve] {mode}: {opts.concurrency} clients, {opts.duration_s:g} s", file=sys.stderr)
        load_before = os.getloadavg()
        count0, sum0 = _batch_stats(opts.port)
        latencies, failures = asyncio.run(_load(opts.port, requests, rows, opts))
        count1, sum1 = _batch_stats(opts.port)
    finally:
        server.stop()
    ms = lambda v: None if v is None else round(v * 1e3, 2)  # noqa: E731
    return {
        "max_batch_size": MODES[mode],
        "requests": len(latencies),
        "failures": failures,
        "throughput_rps": round(len(latencies) / opts.duration_s, 1),
        "latency_ms": {f"p{p}": ms(_percentile(latencies, p)) for p in (50, 90, 99)},
        "mean_batch_size": round((sum1 - sum0) / (count1 - count0), 2) if count1 > count0 else None,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }, latencies


def main(opts: KServeBenchOptions) -> int:
    import numpy as np
    from sklearn.datasets import load_digits

    if opts.concurrency < 1 or opts.duration_s <= 0:
        raise LadleError("--concurrency must be at least 1 and --duration positive")
    repos = build_repositories(opts)
    rows = load_digits(return_X_y=True)[0].astype(np.float32)
    requests = [_request(rows, i) for i in range(len(rows))]
    results = Path(opts.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"command": "ladle bench kserve", "options": asdict(opts), "cpu_count": os.cpu_count(), "modes": {}}
    all_latencies = {}
    for mode, repo in repos.items():
        report["modes"][mode], all_latencies[mode] = run_mode(mode, repo, requests, rows, opts, results, stamp)
        print(mode, json.dumps(report["modes"][mode]))
    batched, single = report["modes"]["batched"], report["modes"]["batch-1"]
    report["throughput_ratio"] = round(batched["throughput_rps"] / max(single["throughput_rps"], 1e-9), 2)
    path = results / f"kserve-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"throughput batched / batch-1: {report['throughput_ratio']}x")
    if _plot(results / f"kserve-{stamp}.png", report, all_latencies):
        print(f"plot: {results / f'kserve-{stamp}.png'}")
    print(f"saved {path}")
    return 0


def _plot(path: Path, report: dict, latencies: dict[str, list[float]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modes = list(report["modes"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = ax1.bar(modes, [report["modes"][m]["throughput_rps"] for m in modes], color=["tab:green", "tab:gray"])
    ax1.bar_label(bars, fmt="%.0f")
    ax1.set_ylabel("requests/s (one row each)")
    ax1.set_title(f"{report['options']['concurrency']} clients, KServe v2 binary tensors")
    for m, color in zip(modes, ["tab:green", "tab:gray"], strict=True):
        values = sorted(v * 1e3 for v in latencies[m])
        if values:
            ax2.plot(values, [i / len(values) for i in range(len(values))], color=color, label=m)
    ax2.set_xscale("log")
    ax2.set_xlabel("latency (ms)")
    ax2.set_ylabel("share of requests")
    ax2.set_title("latency CDF")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
