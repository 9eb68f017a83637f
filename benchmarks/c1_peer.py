"""One request at a time, offline: Ladle's engine and llama.cpp on the same GGUF file, in turns.

    .venv/bin/python benchmarks/c1_peer.py --rounds 2 --requests 5 -q w8a8 \
        --llamacpp-python ~/.cache/ladle/llamacpp-venv/bin/python      (benchmarks/install_llamacpp.sh)

Each request: 64 fresh random tokens (no prefix-cache hit), 128 greedy tokens. TTFT is the prompt
pass and the first token; TPOT the mean gap between the next 127. No HTTP on either side: this
measures the engines, `ladle bench compare` the servers. Medians per round, written to
benchmarks/results/c1-peer-*.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLAMACPP = r"""
import json, random, sys, time
from llama_cpp import Llama
path, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False)
rng = random.Random(seed)
out = []
for r in range(n + 1):  # the first is a warm-up
    llm.reset()
    ids = [rng.randrange(1000, 40000) for _ in range(64)]
    t0 = time.perf_counter()
    llm.eval(ids)
    times = []
    for _ in range(128):
        tok = llm.sample(temp=0.0)
        times.append(time.perf_counter())
        llm.eval([tok])
    if r:
        out.append((times[0] - t0, (times[-1] - times[0]) / 127))
print(json.dumps(out))
"""


def ladle_runs(llm, n: int, seed: int) -> list[tuple[float, float]]:
    from ladle.sample.params import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_tokens=128, ignore_eos=True, temperature=0)
    llm.generate([[rng.randrange(1000, 40000) for _ in range(64)]], params)  # warm-up
    out = []
    for r in range(n):
        llm.engine.add_request(f"c1-{seed}-{r}", [rng.randrange(1000, 40000) for _ in range(64)], params)
        t0, times = time.perf_counter(), []
        while llm.engine.has_unfinished():
            llm.engine.step()
            times.append(time.perf_counter())
        out.append((times[0] - t0, (times[-1] - times[0]) / (len(times) - 1)))
    return out


def medians(runs: list[tuple[float, float]]) -> dict:
    return {
        "ttft_ms": 1e3 * statistics.median(r[0] for r in runs),
        "tpot_ms": 1e3 * statistics.median(r[1] for r in runs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=5, help="per round and system")
    ap.add_argument("-q", "--quantization", default="w8a8")
    ap.add_argument("--llamacpp-python", default=None, help="python of a venv with llama-cpp-python")
    args = ap.parse_args()

    from ladle.config import EngineConfig, ModelConfig
    from ladle.engine.llm import LLM
    from ladle.model.source import resolve_model

    gguf = resolve_model(None).path
    llm = LLM(config=EngineConfig(model=ModelConfig(quantization=args.quantization)))
    rounds = []
    for r in range(args.rounds):
        row = {"ladle": medians(ladle_runs(llm, args.requests, seed=r))}
        if args.llamacpp_python:
            done = subprocess.run(
                [args.llamacpp_python, "-c", LLAMACPP, str(gguf), str(args.requests), str(r)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            row["llama.cpp"] = medians(json.loads(done.stdout.strip().splitlines()[-1]))
        print(
            f"round {r + 1}: "
            + "; ".join(f"{k} TTFT {v['ttft_ms']:.1f} ms, TPOT {v['tpot_ms']:.2f} ms" for k, v in row.items()),
            flush=True,
        )
        rounds.append(row)
    out = Path("benchmarks/results") / time.strftime("c1-peer-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"model": str(gguf), "ladle_quantization": args.quantization, "rounds": rounds}, indent=2)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
