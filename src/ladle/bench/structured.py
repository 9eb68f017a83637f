"""`ladle bench structured`: what constrained decoding costs, and the cases it is tested on.

Measured on the engine in this process (the command's engine flags):
- grammar compile time per schema, cold (a fresh compiler) and cached, over the 50 schemas below;
- TPOT with `--concurrency` (8) requests decoding together, all constrained against none (the
  same prompts, the unconstrained ones held to the constrained ones' lengths): the median time of
  the steps in which all of them decode;
- the per-step mask cost: filling and applying one row's mask at every state the constrained
  outputs went through (per row, and per step of `--concurrency` rows).
Results in benchmarks/results/structured-*.json; `--rounds` repeats the TPOT pair, medians kept.

The cases: 50 JSON schemas built from a seeded mix of the features schemas use (nested objects,
arrays, enums, bounded numbers, required and optional fields, anyOf, formats of strings), plus
regexes and choices. Strings, arrays and decimals (multipleOf) are bounded, as strict schemas
usually are, so that every valid output fits a token budget: an unbounded decimal lets a small
greedy model write 0.000... until max_tokens.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from pathlib import Path

NAMES = ["name", "city", "title", "color", "code", "label", "kind", "owner", "status", "note", "tag", "unit"]


def _leaf(rng: random.Random) -> dict:
    pick = rng.randrange(7)
    if pick == 0:
        return {"type": "string", "maxLength": rng.randint(1, 16)}
    if pick == 1:
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 500)}
    if pick == 2:
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 100]), "multipleOf": 0.01}
    if pick == 3:
        return {"type": "boolean"}
    if pick == 4:
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no", "maybe"], rng.randint(2, 4))}
    if pick == 5:
        return {"type": "string", "pattern": rng.choice(["^[A-Z]{2}[0-9]{3}$", "^[a-z]+$", "^#[0-9a-f]{6}$"]),
                "maxLength": 8}  # fmt: skip
    return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 5}]}


def _node(rng: random.Random, depth: int) -> dict:
    roll = rng.random()
    if depth < 2 and roll < 0.25:
        return _object(rng, depth + 1)
    if depth < 2 and roll < 0.45:
        return {"type": "array", "items": _node(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}  # fmt: skip
    return _leaf(rng)


def _object(rng: random.Random, depth: int) -> dict:
    keys = rng.sample(NAMES, rng.randint(1, 4 if depth else 5))
    props = {k: _node(rng, depth) for k in keys}
    required = [k for k in keys if rng.random() < 0.6] or keys[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def json_schemas(count: int = 50) -> list[dict]:
    rng = random.Random(16)
    schemas = [_object(rng, 0) for _ in range(count - 5)]
    schemas += [  # a few by hand: the shapes applications send most
        {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number",
         "minimum": 0, "maximum": 1, "multipleOf": 0.05}}, "required": ["answer", "confidence"],
         "additionalProperties": False},
        {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 99}, "minItems": 2, "maxItems": 4},
        {"type": "object", "properties": {"person": {"type": "object", "properties": {
            "first": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["first", "age"], "additionalProperties": False}, "emails": {"type": "array", "items": {
            "type": "string", "maxLength": 20}, "maxItems": 2}}, "required": ["person"], "additionalProperties": False},
        {"anyOf": [{"type": "object", "properties": {"ok": {"const": True}}, "required": ["ok"],
                    "additionalProperties": False},
                   {"type": "object", "properties": {"error": {"type": "string", "maxLength": 10}},
                    "required": ["error"], "additionalProperties": False}]},
        {"type": "object", "properties": {"date": {"type": "string", "format": "date"},
         "count": {"type": "integer", "minimum": 0, "maximum": 5}}, "required": ["date", "count"],
         "additionalProperties": False},
    ]  # fmt: skip
    return schemas


REGEXES = [r"\d{4}-\d{2}-\d{2}", r"[A-Z][a-z]{2,8}", r"(yes|no|maybe)", r"#[0-9a-f]{6}", r"\(\d{3}\) \d{3}-\d{4}",
           r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)"]  # fmt: skip
CHOICES = [["positive", "negative", "neutral"], ["Paris", "London", "Rome", "Berlin"], ["A", "B", "C", "D"]]


# a long, bounded output: every request decodes about the same number of tokens
LONG_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 24, "maxItems": 24,
               "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
               "qty": {"type": "integer", "minimum": 1, "maximum": 99}}, "required": ["name", "qty"],
               "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False}  # fmt: skip
PROMPT = "List 24 things to buy at a market, as JSON with a name and a quantity each."


def compile_times(engine) -> dict:
    """Cold (a fresh compiler each schema, its tokenizer built once before) and cached compile times."""
    from ladle.sample.grammar import GrammarCompiler
    from ladle.sample.params import StructuredOutput

    tok = engine.tokenizer
    compiler = GrammarCompiler(tok.backend, engine.grammars.vocab_size, tok.stop_token_ids)
    started = time.perf_counter()
    compiler.ll_tokenizer  # noqa: B018 - built once per engine, at the first constraint
    tokenizer_s = time.perf_counter() - started
    cold, cached = [], []
    for schema in json_schemas():
        so = StructuredOutput("json", json.dumps(schema))
        started = time.perf_counter()
        compiler.compile(so)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.matcher(so)  # what each request pays once compiled: the cached matcher's copy
        cached.append(time.perf_counter() - started)
    return {"tokenizer_build_ms": round(tokenizer_s * 1e3, 1), "cold_ms": _stats(cold), "cached_ms": _stats(cached)}


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered) * 1e3, 3), "p95": round(ordered[int(0.95 * (len(ordered) - 1))]
            * 1e3, 3), "max": round(ordered[-1] * 1e3, 3)}  # fmt: skip


def decode_steps(llm, prompts, params) -> tuple[list[float], list]:
    """Add the requests, step the engine to the end; the durations of the steps in which every
    request decodes (none prefilling, none finished), and the results."""
    from ladle.engine.outputs import GenerationResult

    engine = llm.engine
    results = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        rid = f"bench-{time.monotonic_ns()}-{i}"
        engine.add_request(rid, p, sp)
        results[rid] = GenerationResult(rid, None, p)
    steps = []
    while engine.has_unfinished():
        started = time.perf_counter()
        deltas = engine.step()
        took = time.perf_counter() - started
        for d in deltas:
            results[d.request_id].add(d)
        decoding = [r for r in results.values() if r.samples and r.samples[0].finish_reason is None]
        if len(decoding) == len(prompts) and all(d.new_token_ids for d in deltas) and len(deltas) == len(prompts):
            steps.append(took)
    return steps[1:], list(results.values())  # the first full step carries the last prefill's sampling


def mask_costs(llm, structured, outputs: list[list[int]]) -> list[float]:
    """Seconds to fill and apply one row's mask, at every state the outputs went through."""
    import torch

    from ladle.sample.sampler import apply_masks, fill_masks

    width = llm.engine.grammars.vocab_size
    words = (width + 31) // 32
    logits = torch.zeros((1, width))
    costs = []
    for tokens in outputs:
        matcher = llm.engine.grammars.matcher(structured)
        for t in tokens:
            started = time.perf_counter()
            apply_masks(logits, [0], fill_masks([(0, matcher, [])], words))
            costs.append(time.perf_counter() - started)
            if not matcher.consume_token(t):
                break
    return costs


def main(args, config) -> int:
    from ladle.engine.llm import LLM
    from ladle.sample.params import SamplingParams, StructuredOutput

    llm = LLM(config=config)
    weights = llm.engine.info.weights_description
    compiles = compile_times(llm.engine)
    print(f"compile per schema (50): tokenizer once {compiles['tokenizer_build_ms']} ms; cold {compiles['cold_ms']} "
          f"ms; cached {compiles['cached_ms']} ms")  # fmt: skip
    structured = StructuredOutput("json", json.dumps(LONG_SCHEMA))
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    n = args.concurrency
    rounds = []
    outputs: list[list[int]] = []
    for r in range(args.rounds):
        cons = [SamplingParams(temperature=1.0, seed=100 * r + i, max_tokens=1024, structured=structured)
                for i in range(n)]  # fmt: skip
        steps_c, results = decode_steps(llm, [prompt] * n, cons)
        outputs = [res.token_ids for res in results]
        plain = [SamplingParams(temperature=1.0, seed=100 * r + i, max_tokens=len(out), ignore_eos=True)
                 for i, out in enumerate(outputs)]  # fmt: skip
        steps_p, _ = decode_steps(llm, [prompt] * n, plain)
        valid = sum(_parses(res.text) for res in results)
        rounds.append({"tpot_constrained_ms": round(statistics.median(steps_c) * 1e3, 2),
                       "tpot_plain_ms": round(statistics.median(steps_p) * 1e3, 2),
                       "steps": [len(steps_c), len(steps_p)], "output_tokens": [len(o) for o in outputs],
                       "valid_json": valid})  # fmt: skip
        print(f"round {r + 1}: TPOT at c{n}: constrained {rounds[-1]['tpot_constrained_ms']} ms, none "
              f"{rounds[-1]['tpot_plain_ms']} ms ({valid}/{n} outputs valid)")  # fmt: skip
    costs = mask_costs(llm, structured, outputs)
    per_row = statistics.median(costs)
    tpot_c = statistics.median(r["tpot_constrained_ms"] for r in rounds)
    tpot_p = statistics.median(r["tpot_plain_ms"] for r in rounds)
    summary = {
        "tpot_constrained_ms": tpot_c, "tpot_plain_ms": tpot_p, "ratio": round(tpot_c / tpot_p, 3),
        "mask_per_row_ms": _stats(costs), "mask_per_step_ms_estimate": round(per_row * n * 1e3, 3),
    }  # fmt: skip
    print(f"TPOT at c{n} (median of {args.rounds}): constrained {tpot_c} ms, none {tpot_p} ms "
          f"({summary['ratio']}x); mask per row {summary['mask_per_row_ms']} ms, per step of {n} rows about "
          f"{summary['mask_per_step_ms_estimate']} ms")  # fmt: skip
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"structured-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "command": "ladle bench structured", "args": {k: v for k, v in vars(args).items() if k != "func"},
        "weights": weights, "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "compile": compiles, "rounds": rounds, "summary": summary,
    }, indent=2))  # fmt: skip
    print(f"saved {path}")
    return 0


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
