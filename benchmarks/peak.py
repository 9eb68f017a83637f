"""This machine's measured matmul peaks, the denominators of the roofline in the Performance notes.

    .venv/bin/python benchmarks/peak.py [--reps 7]

- float32 and (where the CPU has it) bf16 GEMM in PyTorch, 2048 x 2048 x 2048, all threads;
- Ladle's int8 panel kernel (`int8_gemm`, the w8a8 path on CPUs without VNNI) on the embedded
  model's largest projection (gate_up: K 576, N 3072) at 64 and 256 rows, and PyTorch's `_int_mm`
  where oneDNN has a fast int8 path (VNNI / AMX);
- the weight stream of one decode row: the int8 kernel at M=1 against a plain read of the same
  bytes, in GB/s.

Medians of --reps timed calls after a warm-up; prints one line per measurement and writes
benchmarks/results/peak-*.json. GOP/s counts a multiply-add as two operations, as GFLOP/s does.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ladle.model.cpu_kernels import KernelLoader
from ladle.model.quant import int_mm_is_fast, pack_int8_panels
from ladle.platform import cpu_features


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--results-dir", default="benchmarks/results")
    args = parser.parse_args()
    features = cpu_features()
    out: dict[str, object] = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "features": repr(features),
        "torch": torch.__version__,
    }

    def report(key: str, value: float, unit: str) -> None:
        out[key] = round(value, 2)
        print(f"{key:<34} {value:9.1f} {unit}")

    n = 2048
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16 and not features.has_native_bf16:
            continue
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        s = median_seconds(lambda a=a, b=b: torch.mm(a, b), args.reps)
        report(f"gemm_{str(dtype).split('.')[-1]}_gflops", 2 * n**3 / s / 1e9, "GFLOP/s")

    kernels = KernelLoader().load()
    k, nout = 576, 3072
    w = torch.randint(-127, 128, (nout, k), dtype=torch.int8)
    if kernels is not None:
        panels = pack_int8_panels(w)
        for m in (64, 256):
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            s = median_seconds(lambda x=x: kernels.int8_gemm(x, panels, nout), args.reps * 5)
            report(f"int8_panels_m{m}_gops", 2 * m * k * nout / s / 1e9, "GOP/s")
        # one decode row streams weights from memory, not cache: cycle through copies twice the L3
        copies = [pack_int8_panels(torch.randint(-127, 128, (nout, k), dtype=torch.int8)) for _ in range(40)]
        x1 = torch.randint(-127, 128, (1, k), dtype=torch.int8)
        s = median_seconds(lambda: [kernels.int8_gemm(x1, c, nout) for c in copies], args.reps)
        report("int8_panels_m1_weight_gbs", len(copies) * w.numel() / s / 1e9, "GB/s")
    if int_mm_is_fast():
        wt = w.t().contiguous().t()
        for m in (64, 256):
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            s = median_seconds(lambda x=x: torch._int_mm(x, wt), args.reps * 5)
            report(f"int_mm_m{m}_gops", 2 * m * k * nout / s / 1e9, "GOP/s")

    big = torch.randn(32 << 20)  # 128 MB, four times the largest L3 seen here
    s = median_seconds(lambda: big.sum(), args.reps)
    report("read_gbs", big.numel() * 4 / s / 1e9, "GB/s")

    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"peak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
