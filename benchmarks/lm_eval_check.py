"""Does lm-evaluation-harness score a loglikelihood task on Ladle as it does on transformers?

    .venv/bin/python benchmarks/lm_eval_check.py --lm-eval /path/to/venv/bin/lm_eval [--model PATH]

lm-eval (0.4.13) pulls pandas, pyarrow, scipy, scikit-learn, nltk, datasets and some 40 other
packages, too heavy for the test extra: install it in a venv of its own that sees Ladle's
packages (torch stays the one on disk), e.g.

    python3.11 -m venv /tmp/lmeval-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/lmeval-venv/lib/python3.11/site-packages/ladle.pth
    /tmp/lmeval-venv/bin/pip install 'lm-eval[api]==0.4.13' -c constraints.txt   # torch==2.13.0 in it

What it does: `ladle convert` writes the model (default: the embedded SmolLM2-135M) as a
Hugging Face folder in float32; a 10-item multiple-choice task is written to a local JSONL file
with its YAML config (no hub download); `ladle serve --dtype float32` serves the folder; then
`lm_eval --model local-completions` (token-id prompts, echo + logprobs + max_tokens 1, batched
4 prompts a request) and `lm_eval --model hf` (dtype float32, CPU) run the task with
--log_samples. Per item and choice their log-likelihoods are compared: the promise is a
difference under 1e-3. The JSON result goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TOLERANCE = 1e-3
ITEMS = [  # question, choices, index of the right one
    ("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which planet is closest to the Sun?", ["Venus", "Mars", "Mercury", "Earth"], 2),
    ("What do bees make?", ["milk", "silk", "wax and honey", "paper"], 2),
    ("What is the capital of France?", ["Berlin", "Paris", "Madrid", "Rome"], 1),
    ("Water freezes at how many degrees Celsius?", ["0", "10", "50", "100"], 0),
    ("Which animal is known as the king of the jungle?", ["the lion", "the mouse", "the cow", "the fish"], 0),
    ("What is two plus three?", ["four", "five", "six", "seven"], 1),
    ("Which season comes after winter?", ["autumn", "summer", "spring", "winter"], 2),
    ("What do you use to write on a blackboard?", ["a spoon", "chalk", "a shoe", "soap"], 1),
]
TASK_YAML = """\
task: ladle_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_task(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "ladle_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (tasks / "ladle_mc.yaml").write_text(TASK_YAML.format(data=data))
    return tasks


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ladle serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("ladle serve not ready")


def run_lm_eval(lm_eval: str, model: str, model_args: str, tasks: Path, out: Path, env: dict, batch: int) -> Path:
    cmd = [lm_eval, "run", "--model", model, "--model_args", model_args, "--tasks", "ladle_mc", "--include_path",
           str(tasks), "--batch_size", str(batch), "--log_samples", "--output_path", str(out)]  # fmt: skip
    if model == "hf":
        cmd += ["--device", "cpu"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    (samples,) = out.rglob("samples_ladle_mc_*.jsonl")
    return samples


def loglikelihoods(samples: Path) -> dict[int, list[float]]:
    """doc id → the log-likelihood of each choice."""
    result = {}
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        result[row["doc_id"]] = [float(r[0][0]) for r in row["resps"]]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm-eval", required=True, help="the lm_eval executable (its own venv)")
    ap.add_argument("--model", default=None, help="GGUF file or HF folder to convert (default: the embedded model)")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="lm-eval-check-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    folder = root / "model"
    convert = [sys.executable, "-m", "ladle", "convert", "--output", str(folder), "--dtype", "float32"]
    subprocess.run(convert + (["--model", args.model] if args.model else []), check=True, env=env)
    tasks = write_task(root)
    port = free_port()
    serve = [sys.executable, "-m", "ladle", "serve", "--model", str(folder), "--served-model-name", "ladle-mc",
             "--dtype", "float32", "--port", str(port), "--max-model-len", "2048"]  # fmt: skip
    server = subprocess.Popen(serve, env=env, stdout=(root / "serve.log").open("w"), stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        t0 = time.monotonic()
        ladle_args = (f"base_url=http://127.0.0.1:{port}/v1/completions,model=ladle-mc,tokenizer_backend=huggingface,"
                      f"tokenizer={folder},num_concurrent=1,max_retries=1")  # fmt: skip
        ladle = run_lm_eval(args.lm_eval, "local-completions", ladle_args, tasks, root / "out-ladle", env, 4)
        ladle_s = time.monotonic() - t0
    finally:
        server.terminate()
        server.wait(60)
    t0 = time.monotonic()
    hf = run_lm_eval(args.lm_eval, "hf", f"pretrained={folder},dtype=float32", tasks, root / "out-hf", env, 1)
    hf_s = time.monotonic() - t0
    a, b = loglikelihoods(ladle), loglikelihoods(hf)
    assert sorted(a) == sorted(b) == list(range(len(ITEMS))), (sorted(a), sorted(b))
    per_item = [max(abs(x - y) for x, y in zip(a[i], b[i], strict=True)) for i in sorted(a)]
    result = {
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "task": "ladle_mc (10 items x 4 choices, local JSONL)",
        "lm_eval": subprocess.run([args.lm_eval, "--version"], capture_output=True, text=True).stdout.strip()
        or "0.4.13",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "max_abs_diff_per_item": per_item,
        "max_abs_diff": max(per_item),
        "tolerance": TOLERANCE,
        "ok": max(per_item) <= TOLERANCE,
        "ladle_loglikelihoods": [a[i] for i in sorted(a)],
        "hf_loglikelihoods": [b[i] for i in sorted(b)],
        "ladle_s": round(ladle_s, 1),
        "hf_s": round(hf_s, 1),
    }
    out = Path(__file__).parent / "results" / f"lm-eval-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("max_abs_diff_per_item", "max_abs_diff", "ok")}, indent=2))
    print(f"result: {out}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
