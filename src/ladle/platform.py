"""What this machine can do: CPU features, devices, and the dtype `auto` resolves to."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class CpuFeatures:
    avx2: bool  # 256-bit SIMD
    avx512f: bool  # 512-bit SIMD
    avx512_bf16: bool  # native bf16 dot products (vdpbf16ps)
    avx512_vnni: bool  # int8 dot products
    amx_bf16: bool  # tile matrix units with bf16

    @property
    def has_native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16


def _features_from_flags(flags: set[str]) -> CpuFeatures:
    return CpuFeatures(
        avx2="avx2" in flags,
        avx512f="avx512f" in flags,
        avx512_bf16="avx512_bf16" in flags,
        avx512_vnni="avx512_vnni" in flags or "avx512vnni" in flags,
        amx_bf16="amx_bf16" in flags,
    )


@cache
def cpu_model_name() -> str:
    """The CPU's model name and stepping as /proc/cpuinfo gives them ("" where it does not)."""
    fields = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model", "stepping", "flags") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip():
                break  # the first processor's block is enough
    return " | ".join(fields.get(k, "") for k in ("model name", "cpu family", "model", "stepping", "flags"))


def cpu_features() -> CpuFeatures:
    """Read once per process: the CPU's flags do not change while it runs."""
    try:  # PyTorch's own cpuinfo reading, when this build exposes it
        import torch

        caps = torch._C._cpu._get_cpu_capability()
        return CpuFeatures(
            avx2=bool(caps.get("avx2")),
            avx512f=bool(caps.get("avx512_f")),
            avx512_bf16=bool(caps.get("avx512_bf16")),
            avx512_vnni=bool(caps.get("avx512_vnni")),
            amx_bf16=bool(caps.get("amx_bf16")),
        )
    except (AttributeError, ImportError, TypeError):
        pass
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    return _features_from_flags(flags)


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def normalize_dtype_name(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        from ladle.errors import LadleError

        raise LadleError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_NAMES)}")
    return name


def resolve_device(name: str) -> str:
    """`auto` is CUDA when a GPU is visible, else the CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from ladle.errors import LadleError

        raise LadleError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU on this machine")
    return name


def resolve_dtype(name: str, device: str):
    """The torch dtype for a dtype name. `auto`: bf16 on CUDA and on CPUs with native bf16
    matmul (AVX512-BF16 or AMX), float32 elsewhere (emulated bf16 is slower than fp32)."""
    import torch

    name = normalize_dtype_name(name)
    if name == "auto":
        if device.startswith("cuda") or cpu_features().has_native_bf16:
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)
