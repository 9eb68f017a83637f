"""How many KV blocks fit: from the --kv-cache-memory budget, or a share of what is free."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ladle.errors import LadleError

GIB = 1 << 30
CPU_SHARE = 0.25  # of available RAM, by default
CPU_CAP_BYTES = 4 * GIB  # default ceiling on the CPU: beyond it a 2-core machine is compute-bound anyway
GPU_SHARE = 0.85  # of free GPU memory after the weights


def available_ram_bytes() -> int:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_kv_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_SHARE)
    return int(min(available_ram_bytes() * CPU_SHARE, CPU_CAP_BYTES))


def num_kv_blocks(
    bytes_per_block: int,
    block_size: int,
    device: torch.device,
    budget_gib: float | None,
    max_model_len: int,
    max_num_seqs: int,
) -> int:
    """Blocks for the budget, never more than every running request at full context could use,
    and never fewer than one request at full context needs (else that request could never run)."""
    budget = int(budget_gib * GIB) if budget_gib is not None else default_kv_cache_bytes(device)
    blocks = budget // bytes_per_block
    per_request = -(-max_model_len // block_size)
    blocks = min(blocks, per_request * max_num_seqs)
    if blocks < per_request:
        have = budget / GIB
        raise LadleError(
            f"a KV cache of {have:.2f} GiB holds {blocks * block_size} tokens, fewer than the context length "
            f"{max_model_len}: raise --kv-cache-memory (one full-length request needs "
            f"{per_request * bytes_per_block / GIB:.2f} GiB) or lower --max-model-len"
        )
    return blocks
