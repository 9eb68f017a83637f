"""Ladle's C++ kernels for CPUs, compiled on first use and cached.

Built with PyTorch's extension builder (a C++ compiler and ninja are needed), for this machine's
instruction set: the build name carries a fingerprint of the source, the torch version and the CPU
features, so a cache shared between machines never hands one a binary built for another. Where
the build fails, callers fall back to their pure-PyTorch twin.
"""

from __future__ import annotations

import hashlib
import logging
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

    @property
    def failure(self) -> str | None:
        return self._failed

    def _build(self):
        from torch.utils import cpp_extension

        log.info("loading the CPU kernels (built once per machine, about half a minute, then cached)")
        return cpp_extension.load(
            name=self.build_name(),
            sources=[str(self.source)],
            # ATen's parallel_for is OpenMP inline code: without -fopenmp it runs on one thread. The
            # process already holds torch's libgomp, which serves this module too (same soname).
            # fast-math lets the exp loop vectorize (the kernel never sees NaNs by construction).
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
