"""Batched sampling: one call per step picks the next token of every request that samples.

Order of operations (as in vLLM): logprobs of the raw model distribution are taken first; then
logit bias, min_tokens suppression, penalties (repetition, frequency, presence), and the grammar
mask of constrained rows (sample/grammar.py); greedy rows take the argmax; the others are scaled
by temperature, filtered by min_p, top_k and top_p, and drawn.

A draw inverts the row's cumulative distribution at one uniform number u: the first token whose
running sum (in float64) exceeds u times the total; tokens filtered out have p = 0 and are never
picked. One random number per row (the exponential race it replaced drew one per vocabulary entry:
3 ms a row on a 2-core EPYC, against ~0.4 ms). A request with a seed takes the u of its t-th
output token from a counter-based hash of (seed, t) (`position_uniform`), not from a stream: its
text depends on nothing but its logits, whatever else is batched, and whether or not the step
speculated. The others draw from the engine's generator.

Speculative decoding (`sample` with guesses): row j of a request holds the model's distribution
p_j after its j-th guess g_j. Each row draws the token plain decoding would draw there, with the
row's own u (greedy: the argmax); the guesses are kept while they equal those draws, and the
first draw that differs (or the draw after the last guess) is the next token. So every emitted
token is the token plain decoding gives, bit for bit where the request has a seed, and exactly
distributed as under plain sampling in any case. For an n-gram guess (a point mass) a guess is kept
with probability p_j(g_j), as in rejection sampling (Leviathan et al., Chen et al. 2023); a draft
model's guesses are drawn with the same u from its own distribution q_j, so they agree with the
target's draw wherever the two inverse CDFs cross u at the same token: a coupling that gives up
some of rejection sampling's acceptance (sum of min(p, q)) for the identity with plain decoding.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ladle.sample.params import SampleSpec, TokenLogprobs

_MASK64 = (1 << 64) - 1
# byte value -> its 8 bits as additive logit masks (0 where the bit is set, -inf where not)
_BIT_TABLE = torch.tensor([[0.0 if (b >> i) & 1 else float("-inf") for i in range(8)] for b in range(256)])
assert sys.byteorder == "little", "apply_masks reads the grammar masks' bytes in little-endian order"


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scrambles every bit."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def position_uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) of a seeded request's output token at `position`: the same for
    the same pair in any step, batch or process (53 random bits)."""
    return (_mix64(_mix64(seed & _MASK64) + position) >> 11) * 2.0**-53


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [R] int64
    logprobs: list[TokenLogprobs | None]  # per row, None where not asked


@dataclass
class SampleGroup:
    """One request's rows in a step: a single row, or with K guesses the K + 1 rows that check them."""

    specs: list[SampleSpec]  # one per row
    guesses: list[int] = field(default_factory=list)  # row j checks guesses[j]


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)  # rows without a seed of their own

    def __call__(
        self,
        logits: torch.Tensor,  # [R, V] float32
        specs: list[SampleSpec],
    ) -> SamplerOutput:
        """One token per row, each row on its own."""
        raw_logprobs, logits = self._prepare(logits, specs)
        greedy = [i for i, s in enumerate(specs) if s.params.is_greedy]
        if len(greedy) == len(specs):  # the common case needs no gathering
            tokens = logits.argmax(dim=-1)
            return SamplerOutput(tokens, self._logprobs(raw_logprobs, tokens, specs))
        tokens = torch.empty(len(specs), dtype=torch.int64, device=logits.device)
        drawn = [i for i, s in enumerate(specs) if not s.params.is_greedy]
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        drawn_specs = [specs[i] for i in drawn]
        tokens[drawn] = self._draw(self._probs(logits[drawn], drawn_specs), self._uniforms(drawn_specs))
        return SamplerOutput(tokens, self._logprobs(raw_logprobs, tokens, specs))

    def sample(self, logits: torch.Tensor, groups: list[SampleGroup]):
        """The tokens of each group (guesses kept, then one sampled token) and their logprobs (or None
        per group). `logits` holds the groups' rows one after the other."""
        specs = [s for g in groups for s in g.specs]
        out = self(logits, specs)  # every row's own draw (greedy: its argmax)
        tokens = out.token_ids.tolist()  # the step's one device-to-host copy
        if not any(g.guesses for g in groups):  # no speculation in this step: one row each
            return [[t] for t in tokens], [None if lp is None else [lp] for lp in out.logprobs]
        results: list[list[int]] = []
        logprobs: list[list[TokenLogprobs] | None] = []
        first = 0
        for g in groups:  # an emitted token is its row's draw: the row's logprobs are the token's
            emitted = _verify(tokens[first : first + len(g.specs)], g.guesses)
            results.append(emitted)
            rows = out.logprobs[first : first + len(emitted)]
            logprobs.append(None if rows[0] is None else rows)
            first += len(g.specs)
        return results, logprobs

    # -- logit processing ------------------------------------------------------------------------

    def _prepare(self, logits: torch.Tensor, specs: list[SampleSpec]):
        """(log_softmax of the raw logits where a row wants logprobs, else None; the logits after
        bias, min_tokens suppression and penalties). The raw logits stay untouched for logprobs."""
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in specs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        adjusted = any(s.params.logit_bias or s.suppressed_token_ids or s.params.uses_penalties for s in specs)
        if adjusted:
            logits = self._adjust(logits.clone(), specs)
        constrained = [(i, s.matcher, s.guesses) for i, s in enumerate(specs) if s.matcher is not None]
        if constrained:  # grammar masks, on those rows only (sample/grammar.py)
            logits = logits if adjusted else logits.clone()
            masks = fill_masks(constrained, (logits.shape[1] + 31) // 32)
            apply_masks(logits, [i for i, _, _ in constrained], masks)
        return raw_logprobs, logits

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

    def _probs(self, logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
        """The distribution a sampled row draws from: temperature, then min_p, top_k and top_p."""
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
        return torch.softmax(logits, dim=-1)

    def _uniforms(self, specs: list[SampleSpec]) -> torch.Tensor:
        """[N, 1] float64: each row's u: from its seed and output position, or the shared generator."""
        u = torch.rand(len(specs), 1, dtype=torch.float64, generator=self.generator)
        for i, s in enumerate(specs):
            if s.params.seed is not None:
                u[i, 0] = position_uniform(s.params.seed, len(s.output_token_ids))
        return u

    def _draw(self, probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One draw per row of (unnormalised) probabilities [N, V] at the rows' uniforms u [N, 1] → [N] ids."""
        u = u.to(probs.device)
        cumulative = probs.double().cumsum(dim=-1)  # [N, V]
        total = cumulative[:, -1:]
        # u * total can round up to total; kept below it, the search stops at the last token with
        # p > 0 rather than past the end (and a clamp there could land on a filtered-out token)
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cumulative, target, right=True)[:, 0]
        return tokens.clamp_(max=probs.shape[1] - 1)  # a row without mass (never sent) stays in range

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


def prompt_logprobs(logits: torch.Tensor, targets: list[int], ks: list[int]) -> list[TokenLogprobs]:
    """Per row of logits [R, V]: the logprob of the prompt token that follows it (targets[i]) and the
    ks[i] most likely tokens, from log_softmax in float32 (a step's prompt rows go to the host at once)."""
    if not targets:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target_ids = torch.tensor(targets, dtype=torch.int64, device=logits.device)
    chosen = logprobs.gather(1, target_ids[:, None])[:, 0].tolist()
    k_max = max(ks)
    top_ids, top_vals = [[]] * len(targets), [[]] * len(targets)
    if k_max:
        vals, ids = logprobs.topk(k_max, dim=-1)
        top_ids, top_vals = ids.tolist(), vals.tolist()
    return [TokenLogprobs(chosen[i], list(zip(top_ids[i][:k], top_vals[i][:k], strict=True))) for i, k in enumerate(ks)]


def _verify(draws: list[int], guesses: list[int]) -> list[int]:
    """Keep the guesses while they are what plain decoding draws there, then take its draw."""
    accepted = 0
    while accepted < len(guesses) and guesses[accepted] == draws[accepted]:
        accepted += 1
    return guesses[:accepted] + [draws[accepted]]


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


def fill_masks(rows: list[tuple[int, object, list[int]]], num_words: int) -> torch.Tensor:
    """Bitmasks [len(rows), num_words] int32 for (logits row, matcher, guesses before the row):
    each row's allowed next tokens in the matcher's state after those guesses. Guesses are
    consumed for the fill and rolled back; a guess the grammar refuses ends that request's
    speculation (the rows after it repeat the mask, their draws are never kept)."""
    masks = torch.empty((len(rows), num_words), dtype=torch.int32)
    nbytes = num_words * 4
    for i, (_, matcher, guesses) in enumerate(rows):
        consumed = 0
        for g in guesses:  # the state before this row: the guesses ahead of it
            if matcher.is_stopped() or not matcher.consume_token(g):
                break
            consumed += 1
        if consumed < len(guesses):
            masks[i] = masks[i - 1] if i else -1  # a refused guess: this row's draw is never kept
        else:
            matcher.unsafe_compute_mask_ptr(masks[i].data_ptr(), nbytes)
        if consumed:
            matcher.rollback(consumed)
    return masks


def apply_masks(logits: torch.Tensor, rows: list[int], masks: torch.Tensor) -> None:
    """Disallowed tokens of the given rows to -inf, in place: each mask byte picks its 8 additive
    entries (0 or -inf) from a table, one gather and one add (a bit-by-bit unpack and masked_fill
    took 1-2 ms for 8 rows of a 49k vocabulary; this takes about 0.1 ms). Bytes are read in memory
    order: bit i of word w is token 32w + i on a little-endian machine."""
    vocab = logits.shape[1]
    table = _BIT_TABLE if logits.dtype == torch.float32 else _BIT_TABLE.to(logits.dtype)
    add = table.index_select(0, masks.view(torch.uint8).reshape(-1).long()).reshape(len(rows), -1)[:, :vocab]
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        logits.add_(add.to(logits.device))
    else:
        logits.index_add_(0, torch.tensor(rows, dtype=torch.int64, device=logits.device), add.to(logits.device))
