"""Batched sampling: one call per step picks the next token of every request that samples.

Order of operations (as in vLLM): logprobs of the raw model distribution are taken first; then
logit bias, min_tokens suppression, penalties (repetition, frequency, presence); greedy rows take
the argmax; the others are scaled by temperature, filtered by min_p, top_k and top_p, and drawn.

A draw is argmax(p / q) with q ~ Exp(1) per token (the exponential race, equivalent to drawing
from p). A request with a seed draws its q from its own generator, so its text does not depend on
what else is in the batch; the others share the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladle.sample.params import SampleSpec, TokenLogprobs


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [R] int64
    logprobs: list[TokenLogprobs | None]  # per row, None where not asked


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)  # rows without a seed of their own

    def __call__(
        self,
        logits: torch.Tensor,  # [R, V] float32
        specs: list[SampleSpec],
        generators: list[torch.Generator | None],  # per row: its own (seeded) generator or None
    ) -> SamplerOutput:
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in specs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(s.params.logit_bias or s.suppressed_token_ids or s.params.uses_penalties for s in specs):
            logits = self._adjust(logits.clone(), specs)  # the raw logits stay untouched for logprobs
        greedy = [i for i, s in enumerate(specs) if s.params.is_greedy]
        if len(greedy) == len(specs):  # the common case needs no gathering
            tokens = logits.argmax(dim=-1)
            return SamplerOutput(tokens, self._logprobs(raw_logprobs, tokens, specs))
        tokens = torch.empty(len(specs), dtype=torch.int64, device=logits.device)
        drawn = [i for i, s in enumerate(specs) if not s.params.is_greedy]
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        if drawn:
            tokens[drawn] = self._draw(logits[drawn], [specs[i] for i in drawn], [generators[i] for i in drawn])
        return SamplerOutput(tokens, self._logprobs(raw_logprobs, tokens, specs))

    # -- logit processing ------------------------------------------------------------------------

    def _adjust(self, logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
        for i, s in enumerate(specs):
            if s.params.logit_bias:
                ids = torch.tensor(list(s.params.logit_bias), device=logits.device)
                bias = torch.tensor(list(s.params.logit_bias.values()), device=logits.device)
                logits[i].index_add_(0, ids, bias)
            if s.suppressed_token_ids:
                logits[i, list(s.suppressed_token_ids)] = float("-inf")
        rows = [i for i, s in enumerate(specs) if s.params.uses_penalties]
        if rows:
            logits[rows] = self._penalize(logits[rows], [specs[i] for i in rows])
        return logits

    @staticmethod
    def _penalize(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
        vocab = logits.shape[-1]
        device = logits.device
        counts = torch.stack(
            [
                torch.bincount(torch.tensor(s.output_token_ids, dtype=torch.int64), minlength=vocab)[:vocab]
                for s in specs
            ]
        ).to(device=device, dtype=logits.dtype)  # [R, V] occurrences in the output
        freq = torch.tensor([s.params.frequency_penalty for s in specs], device=device)[:, None]
        pres = torch.tensor([s.params.presence_penalty for s in specs], device=device)[:, None]
        logits = logits - freq * counts - pres * (counts > 0).to(logits.dtype)
        rep = torch.tensor([s.params.repetition_penalty for s in specs], device=device)[:, None]
        seen = counts > 0
        for row, s in enumerate(specs):
            if s.params.repetition_penalty != 1 and s.prompt_token_ids:
                seen[row, torch.tensor(s.prompt_token_ids, dtype=torch.int64, device=device)] = True
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        return torch.where(seen & (rep != 1), penalized, logits)

    # -- drawing ------------------------------------------------------------------------------

    def _draw(self, logits: torch.Tensor, specs: list[SampleSpec], generators) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([s.params.temperature for s in specs], device=device)[:, None]
        logits = logits / temperature
        min_p = [s.params.min_p for s in specs]
        if any(min_p):
            probs = torch.softmax(logits, dim=-1)
            floor = torch.tensor(min_p, device=device)[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < floor, float("-inf"))
        top_k = [s.params.top_k for s in specs]
        top_p = [s.params.top_p for s in specs]
        if any(top_k) or any(p < 1 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        q = torch.empty_like(probs)
        shared = [i for i, g in enumerate(generators) if g is None]
        if shared:
            q[shared] = torch.empty(len(shared), probs.shape[1], device=device).exponential_(generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None:
                q[i].exponential_(generator=g)
        return (probs / q).argmax(dim=-1)

    @staticmethod
    def _logprobs(raw: torch.Tensor | None, tokens: torch.Tensor, specs: list[SampleSpec]):
        if raw is None:
            return [None] * len(specs)
        chosen = raw.gather(1, tokens[:, None])[:, 0].tolist()
        k_max = max(s.params.logprobs or 0 for s in specs)
        top_vals, top_ids = raw.topk(k_max, dim=-1) if k_max else (None, None)
        out: list[TokenLogprobs | None] = []
        for i, s in enumerate(specs):
            if s.params.logprobs is None:
                out.append(None)
                continue
            k = s.params.logprobs
            top = list(zip(top_ids[i, :k].tolist(), top_vals[i, :k].tolist(), strict=True)) if k else []
            out.append(TokenLogprobs(chosen[i], top))
        return out


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask all but the k best (0 = all) and then the smallest set whose mass reaches p (per row)."""
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    p = torch.tensor(top_p, device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill((mass_before >= p) & (ranks > 0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
