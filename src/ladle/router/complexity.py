"""`model: "auto"`: a cheap, explainable score of how hard a request looks, against a router's
thresholds, picks its small or its large model.

Each sign adds its weight: a long prompt, a deep conversation, a large max_tokens, code, math, an
explicit ask to reason. The reason names the signs, so `X-Ladle-Route-Reason` says why:
`auto: score 2.0 >= 1.0 (code, prompt ~1,840 tokens)`. Prompt length is estimated from the text
(4 characters a token): the score must not need a tokenizer, since the model is not chosen yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ladle.config import RouterConfig

CHARS_PER_TOKEN = 4  # a rough English average, good enough for a threshold

CODE = re.compile(
    r"```|^\s*(def|class|import|from|#include|public|private|func|fn|let|const|var)\b|;\s*$|\bfunction\s*\(|=>|"
    r"\b(SELECT|INSERT|UPDATE)\b.+\b(FROM|INTO|SET)\b|\b(refactor|debug|compile|stack trace|traceback|regex)\b",
    re.MULTILINE | re.IGNORECASE,
)
MATH = re.compile(
    r"\\(frac|int|sum|sqrt)|\b(prove|proof|theorem|lemma|integral|derivative|equation|matrix|eigen\w*)\b|"
    r"\d\s*[\^*/]\s*\d|\b\d+\s*[+-]\s*\d+\s*=",
    re.IGNORECASE,
)
REASONING = re.compile(
    r"step[- ]by[- ]step|think (carefully|hard|it through|through)|reason (about|through)|show your (work|reasoning)|"
    r"chain[- ]of[- ]thought|explain (why|in detail)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Features:
    """What the score reads from a request, before any model is chosen."""

    text: str  # the prompt, or the conversation's contents
    num_messages: int = 1  # messages of a chat conversation (1 for a completion)
    max_tokens: int | None = None  # the output limit asked for

    @property
    def approx_prompt_tokens(self) -> int:
        return len(self.text) // CHARS_PER_TOKEN


@dataclass(frozen=True)
class Decision:
    model: str  # the small or the large model's name
    score: float
    reason: str  # for X-Ladle-Route-Reason


def decide(features: Features, router: RouterConfig) -> Decision:
    score, signs = 0.0, []
    tokens = features.approx_prompt_tokens
    for weight, present, sign in (
        (1.0, tokens >= router.long_prompt_tokens, f"prompt ~{tokens:,} tokens"),
        (0.5, features.num_messages >= router.deep_conversation_turns, f"{features.num_messages} messages"),
        (0.5, (features.max_tokens or 0) >= router.long_output_tokens, f"max_tokens {features.max_tokens}"),
        (router.code_weight, bool(CODE.search(features.text)), "code"),
        (router.math_weight, bool(MATH.search(features.text)), "math"),
        (router.reasoning_weight, bool(REASONING.search(features.text)), "asks to reason"),
    ):
        if present and weight:
            score += weight
            signs.append(sign)
    large = score >= router.threshold
    cmp = ">=" if large else "<"
    why = f" ({', '.join(signs)})" if signs else ""
    return Decision(router.large if large else router.small, score,
                    f"{router.name}: score {score:.1f} {cmp} {router.threshold:g}{why}")  # fmt: skip
