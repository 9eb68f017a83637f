"""Two models under traffic at once, against one model alone under the same total load.

    .venv/bin/python benchmarks/two_models.py [--rounds 2] [--concurrency 32] [--num-prompts 96]

Models `a` and `b` are the same embedded weights in the default dtype, so "alone" and "together"
differ only in how the CPU is shared. Three ways to share it (issue 15, item 3):

  one-process    one `ladle serve --config` holding both engines: one compute thread steps them
                 in turn (Ladle's design)
  two-processes  a `ladle serve` per model, each with every core (two OpenMP teams on the cores)
  split-cores    a `ladle serve` per model, each with half the cores (OMP_NUM_THREADS)

Each design and round runs `ladle bench serve` (random prompts of --input-len, --output-len
tokens, ignore_eos) with: a alone at --concurrency, b alone at --concurrency, a alone at half of
it, then a and b together at half each (the same total). The report: the sum of output tok/s
together over the model alone at the same total load, and each model's TPOT together against
alone (at the same total and at its own half). Medians over rounds; the JSON goes to
benchmarks/results/two-models-STAMP.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ladle.bench.compare import RunningServer, System
from ladle.bench.serve import ServeBenchOptions, measure

MODEL = """  - name: {name}
    kv_cache_memory_gib: 1
    max_num_seqs: {seqs}
    max_model_len: 2048
    pinned: true
"""


def servers(design: str, port: int, seqs: int, tmp: Path) -> list[tuple[System, dict[str, int]]]:
    """The servers of a design, each with the port its models answer on."""
    serve = [sys.executable, "-m", "ladle", "serve", "--no-admission"]

    def config(names: list[str]) -> str:
        path = tmp / f"{'-'.join(names)}.yaml"
        path.write_text("models:\n" + "".join(MODEL.format(name=n, seqs=seqs) for n in names))
        return str(path)

    if design == "one-process":
        return [(System(design, [*serve, "--config", config(["a", "b"]), "--port", str(port)], "/ready"),
                 {"a": port, "b": port})]  # fmt: skip
    threads = max(1, (os.cpu_count() or 2) // 2) if design == "split-cores" else os.cpu_count() or 1
    env = {"OMP_NUM_THREADS": str(threads)}
    return [
        (System(f"{design}-{n}", [*serve, "--config", config([n]), "--port", str(port + i)], "/ready", env),
         {n: port + i})
        for i, n in enumerate(["a", "b"])
    ]  # fmt: skip


def point(opts: ServeBenchOptions, ports: dict[str, int], names: list[str], concurrency: int) -> dict:
    """One `bench serve` load: every name in `names` shares `concurrency` (on one server) or gets
    its share of it (a server each)."""
    by_port: dict[int, list[str]] = {}
    for n in names:
        by_port.setdefault(ports[n], []).append(n)
    if len(by_port) == 1:
        ((port, served),) = by_port.items()
        run = replace(opts, base_url=f"http://127.0.0.1:{port}/v1", served_model_name=",".join(served),
                      concurrency=concurrency)  # fmt: skip
        ((_, summary),) = measure(run)
        return summary if len(served) == 1 else {"total": summary, **summary["per_model"]}
    # a server per model: load them at once, from one process per server
    import multiprocessing

    share = concurrency // len(names)
    runs = [replace(opts, base_url=f"http://127.0.0.1:{ports[n]}/v1", served_model_name=n, concurrency=share,
                    num_prompts=opts.num_prompts // len(names), label=f"{opts.label}-{n}") for n in names]  # fmt: skip
    with multiprocessing.get_context("spawn").Pool(len(runs)) as pool:
        summaries = [s for ((_, s),) in pool.map(measure, runs)]
    per = dict(zip(names, summaries, strict=True))
    duration = max(s["duration_s"] for s in summaries)
    total = {"output_tokens_per_s": sum(s["output_tokens"] for s in summaries) / duration}
    return {"total": total, **per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--designs", default="one-process,two-processes,split-cores")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=96)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8310)
    ap.add_argument("--results-dir", default="benchmarks/results")
    args = ap.parse_args()
    c, half = args.concurrency, args.concurrency // 2
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rounds: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:  # configs, server logs, each point's own files
        base = ServeBenchOptions(
            num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len, warmup=2,
            results_dir=tmp, label="two-models",
        )  # fmt: skip
        for r in range(args.rounds):
            for design in args.designs.split(","):
                running = []
                ports: dict[str, int] = {}
                try:
                    for system, answers in servers(design, args.port, c, Path(tmp)):
                        log = Path(tmp) / f"{system.label}-{r}.log"
                        running.append(RunningServer(system, next(iter(answers.values())), log))
                        ports.update(answers)
                    for server in running:
                        server.wait_ready()
                    row = {
                        "a_alone": point(base, ports, ["a"], c),
                        "b_alone": point(base, ports, ["b"], c),
                        "a_alone_half": point(replace(base, num_prompts=args.num_prompts // 2), ports, ["a"], half),
                        "together": point(base, ports, ["a", "b"], c),
                    }
                finally:
                    for server in running:
                        server.stop()
                rounds.setdefault(design, []).append(row)
                print(f"[two-models] round {r + 1} {design}: {json.dumps(figures([row]))}", file=sys.stderr)
    report = {
        "command": "benchmarks/two_models.py " + " ".join(sys.argv[1:]),
        "cpu": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "figures": {design: figures(rows) for design, rows in rounds.items()},
        "rounds": rounds,
    }
    path = results / f"two-models-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    for design, f in report["figures"].items():
        print(f"{design:14s} {json.dumps(f)}")
    print(f"saved {path}")


def figures(rows: list[dict]) -> dict:
    """Medians over rounds of what the issue asks for."""

    def med(fn):
        return round(statistics.median(fn(row) for row in rows), 3)

    def tpot(s):
        return s["tpot"]["p50_ms"]

    alone_tps = lambda row: (row["a_alone"]["output_tokens_per_s"] + row["b_alone"]["output_tokens_per_s"]) / 2  # noqa: E731
    return {
        "alone_output_tok_s": med(alone_tps),
        "together_output_tok_s": med(lambda row: row["together"]["total"]["output_tokens_per_s"]),
        "together_over_alone": med(lambda row: row["together"]["total"]["output_tokens_per_s"] / alone_tps(row)),
        "tpot_p50_ms_alone": med(lambda row: tpot(row["a_alone"])),
        "tpot_p50_ms_alone_half": med(lambda row: tpot(row["a_alone_half"])),
        "tpot_p50_ms_together_a": med(lambda row: tpot(row["together"]["a"])),
        "tpot_p50_ms_together_b": med(lambda row: tpot(row["together"]["b"])),
        "tpot_together_over_alone": med(lambda row: max(tpot(row["together"][n]) for n in "ab") / tpot(row["a_alone"])),
    }


if __name__ == "__main__":
    main()
