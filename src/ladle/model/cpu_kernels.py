"""Ladle's C++ kernels for CPUs, compiled on first use and cached.

Built with PyTorch's extension builder (a C++ compiler and ninja are needed), for this machine's
instruction set: the build name carries a fingerprint of the source, the torch version and the CPU
features, so a cache shared between machines never hands one a binary built for another. Where
the build fails, callers fall back to their pure-PyTorch twin.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"


class KernelLoader:
    """Compiles the kernels at most once per process (thread-safe); remembers a failure."""

    def __init__(self, source: Path = SOURCE):
        self.source = source
        self._lock = threading.Lock()
        self._module = None
        self._failed: str | None = None

    def build_name(self) -> str:
        import torch

        from ladle.platform import cpu_features

        fingerprint = hashlib.sha256(
            self.source.read_bytes() + torch.__version__.encode() + repr(cpu_features()).encode()
        ).hexdigest()[:12]
        return f"ladle_cpu_{fingerprint}"

    def load(self):
        """The compiled module, or None when it cannot be built here (see `failure`)."""
        with self._lock:
            if self._module is None and self._failed is None:
                try:
                    self._module = self._build()
                except Exception as e:  # no compiler, no ninja, a compile error: fall back, say why once
                    self._failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                    log.warning("CPU kernels unavailable, using the PyTorch attention path (%s)", self._failed)
            return self._module

    def _stage(self, name: str) -> tuple[Path, Path]:
        """The build folder of `name` and the source copied into it. Built from a path of its own,
        not the checkout's: the build file names its source's path, so two checkouts (a second
        venv, `bench compare ladle@DIR`) building the same source from their own paths would
        rebuild over each other on every start; from the copy they share one build."""
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
        build_dir = root / "ladle" / name
        build_dir.mkdir(parents=True, exist_ok=True)
        staged = build_dir / self.source.name
        text = self.source.read_bytes()
        if not staged.exists() or staged.read_bytes() != text:
            partial = staged.with_name(f"{staged.name}.{os.getpid()}.tmp")
            partial.write_bytes(text)
            os.replace(partial, staged)  # a concurrent build never reads half a file
        return build_dir, staged

    @property
    def failure(self) -> str | None:
        return self._failed

    def _build(self):
        from torch.utils import cpp_extension

        log.info("loading the CPU kernels (built once per machine, about half a minute, then cached)")
        name = self.build_name()
        build_dir, source = self._stage(name)
        return cpp_extension.load(
            name=name,
            sources=[str(source)],
            build_directory=str(build_dir),
            # ATen's parallel_for is OpenMP inline code: without -fopenmp it runs on one thread. The
            # process already holds torch's libgomp, which serves this module too (same soname).
            # fast-math lets the exp loop vectorize (the kernel never sees NaNs by construction).
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
