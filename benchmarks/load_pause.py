"""How long do a served model's streams stall while another model loads at runtime?

    .venv/bin/python benchmarks/load_pause.py [--quantization none] [--streams 4]

Starts `ladle serve` with the embedded model as `a` (and an admin key), keeps --streams streams
of `a` generating, adds model `b` (the same weights, --quantization) through POST /admin/models,
waits until `b` is ready, and reports the inter-token gaps of `a`'s streams before, during and
after the load: the largest gap is how long `a`'s users waited. The JSON goes to
benchmarks/results/load-pause-STAMP.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from ladle.bench.compare import RunningServer, System

ADMIN = {"Authorization": "Bearer admin-bench"}


def stream(url: str, stop: threading.Event, stamps: list[float]) -> None:
    body = {"model": "a", "prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True,
            "stream": True, "temperature": 0}  # fmt: skip
    with httpx.Client(timeout=None) as client, client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
            if stop.is_set():
                return


def gaps(stamps: list[float], start: float, end: float) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False) if start <= b <= end]


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median_ms": round(1e3 * statistics.median(values), 1),
            "max_ms": round(1e3 * max(values), 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantization", default="none", help="of the model added at runtime")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--port", type=int, default=8330)
    ap.add_argument("--results-dir", default="benchmarks/results")
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "a.yaml"
        config.write_text("server: {admin_keys: [admin-bench]}\nmodels:\n  - {name: a, kv_cache_memory_gib: 1, "
                          "max_model_len: 2048, pinned: true}\n")  # fmt: skip
        command = [sys.executable, "-m", "ladle", "serve", "--config", str(config), "--port", str(args.port)]
        server = RunningServer(System("load-pause", command, "/ready"), args.port, Path(tmp) / "server.log")
        try:
            server.wait_ready()
            stop, stamps = threading.Event(), [[] for _ in range(args.streams)]
            threads = [threading.Thread(target=stream, args=(url, stop, s), daemon=True) for s in stamps]
            for t in threads:
                t.start()
            time.sleep(5)  # the streams reach their steady pace
            added = time.monotonic()
            entry = {"name": "b", "quantization": args.quantization, "kv_cache_memory_gib": 1, "max_model_len": 2048}
            resp = httpx.post(f"{url}/admin/models", json=entry, headers=ADMIN, timeout=30)
            resp.raise_for_status()
            while True:
                models = httpx.get(f"{url}/admin/models", headers=ADMIN, timeout=30).json()["models"]
                state = {m["name"]: m["state"] for m in models}["b"]
                if state in ("ready", "failed"):
                    break
                time.sleep(0.05)
            ready = time.monotonic()
            time.sleep(5)
            stop.set()
            for t in threads:
                t.join(30)
        finally:
            server.stop()
    report = {
        "command": "benchmarks/load_pause.py " + " ".join(sys.argv[1:]),
        "model_b_state": state,
        "load_s": round(ready - added, 2),
        "before": summary([g for s in stamps for g in gaps(s, added - 5, added)]),
        "during": summary([g for s in stamps for g in gaps(s, added, ready)]),
        "after": summary([g for s in stamps for g in gaps(s, ready, ready + 5)]),
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"load-pause-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
