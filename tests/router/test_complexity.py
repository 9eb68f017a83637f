"""`model: "auto"`: the score's signs and the default thresholds."""

from __future__ import annotations

from ladle.config import RouterConfig
from ladle.router.complexity import Features, decide

ROUTER = RouterConfig(small="fast", large="smart")
FUNCTION = "def load(path):\n    with open(path) as f:\n        data = f.read()\n    return data.splitlines()\n"
CODE_TASK = (
    "Refactor this function so it streams the file instead of reading it whole:\n```python\n" + FUNCTION * 80 + "```"
)


def test_short_chit_chat_goes_to_the_small_model():
    for text in ("Hi! How are you today?", "What's a good name for a cat?", "Thanks, that helps a lot."):
        d = decide(Features(text, num_messages=2, max_tokens=100), ROUTER)
        assert d.model == "fast" and d.score == 0 and d.reason == "auto: score 0.0 < 1"


def test_a_long_code_task_goes_to_the_large_model_and_says_why():
    d = decide(Features(CODE_TASK, num_messages=1, max_tokens=2048), ROUTER)
    assert d.model == "smart" and d.score == 2.5
    assert d.reason.startswith("auto: score 2.5 >= 1 (prompt ~")
    assert d.reason.endswith("tokens, max_tokens 2048, code)")


def test_each_sign_counts_its_weight():
    assert decide(Features("Prove that the integral of x^2 is x^3/3."), ROUTER).reason == "auto: score 1.0 >= 1 (math)"
    asks = decide(Features("Think it through step by step: should I move?"), ROUTER)
    assert asks.model == "smart" and "asks to reason" in asks.reason
    deep = decide(Features("ok", num_messages=9), ROUTER)
    assert deep.model == "fast" and deep.score == 0.5 and "9 messages" in deep.reason
    strict = RouterConfig(small="fast", large="smart", threshold=3.0)
    assert decide(Features(CODE_TASK, max_tokens=2048), strict).model == "fast"
