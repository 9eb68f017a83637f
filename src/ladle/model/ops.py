"""The elementwise ops of a decoder layer: RMSNorm (with the residual add fused), rotary embedding,
SwiGLU's silu(gate) * up. `TorchOps` is the portable reference; `CpuKernelOps` does each in one
pass of Ladle's C++ kernels. They register under the attention backend's name, so one name picks
both (a test asserts the two agree)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    name = "sdpa"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x, residual, weight, eps):
        """(rms_norm(x + residual), x + residual)."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def rotary(self, qkv: torch.Tensor, positions, cos_sin, num_heads: int, num_kv_heads: int, head_dim: int):
        """Rotate the q and k parts of the fused projection output [T, (Hq + 2 Hkv) D] in place."""
        num_tokens = qkv.shape[0]
        rotated = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(num_tokens, -1, head_dim)
        cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
        x1, x2 = rotated.float().chunk(2, dim=-1)
        rotated.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class CpuKernelOps(TorchOps):
    name = "cpu"

    def __init__(self, module):
        self.k = module

    def rms_norm(self, x, weight, eps):
        if x.device.type != "cpu":
            return super().rms_norm(x, weight, eps)
        return self.k.rms_norm(x.contiguous(), weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        if x.device.type != "cpu":
            return super().add_rms_norm(x, residual, weight, eps)
        residual = residual.contiguous()
        return self.k.add_rms_norm(x.contiguous(), residual, weight, eps), residual

    def rotary(self, qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim):
        if qkv.device.type != "cpu":
            return super().rotary(qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim)
        self.k.rotary_inplace(qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim)

    def silu_and_mul(self, gate_up):
        if gate_up.device.type != "cpu":
            return super().silu_and_mul(gate_up)
        return self.k.silu_and_mul(gate_up)


def get_ops(name: str) -> TorchOps:
    if name == "cpu":
        from ladle.model.attention import PagedCPUBackend

        module = PagedCPUBackend.loader().load()
        if module is not None:
            return CpuKernelOps(module)
    return TorchOps()
