"""/v1/completions with echo and logprobs: the prompt's tokens with their logprobs (the first null),
then the generated ones, as OpenAI's legacy completions and vLLM return them; what
lm-evaluation-harness's local-completions model reads for loglikelihood tasks."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ServerProcess, open_stream, read_events

ATOL = 2e-4


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def server(tiny):
    server = ServerProcess(
        "--model", str(tiny.hf_dir), "--served-model-name", "tiny", "--dtype", "float32",
        "--kv-cache-memory", "0.05", "--block-size", "4", "--max-num-batched-tokens", "16",
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.hf_dir, dtype=torch.float32).eval()


def reference(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row p is transformers' log_softmax predicting token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)[:-1]


def complete(server, body: dict) -> dict:
    status, _, result = server.request("POST", "/v1/completions", {"model": "tiny", "temperature": 0, **body})
    assert status == 200, result
    return result


def ids_of(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def assert_prompt_entries(lp: dict, ids: list[int], ref: torch.Tensor, k: int) -> None:
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = torch.tensor(lp["token_logprobs"][1:n])
    torch.testing.assert_close(got, ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=ATOL, rtol=0)
    for p in range(1, n):
        assert len(lp["top_logprobs"][p]) <= k  # a dict by token text: two ids may share a text (the best stays)
        assert max(lp["top_logprobs"][p].values()) == pytest.approx(ref[p - 1].max().item(), abs=ATOL)


def test_echo_with_logprobs_returns_the_prompt_then_the_output(server, tiny, reference_model):
    ids = ids_of(1, 30, tiny.config.vocab_size)  # longer than a step's 16 tokens: chunked prefill
    result = complete(server, {"prompt": ids, "max_tokens": 3, "logprobs": 2, "echo": True, "ignore_eos": True})
    choice = result["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 33
    assert_prompt_entries(lp, ids, reference(reference_model, ids), k=2)
    assert all(v is not None for v in lp["token_logprobs"][30:])  # the generated entries follow
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert result["usage"]["prompt_tokens"] == 30 and result["usage"]["completion_tokens"] == 3
    generated = complete(server, {"prompt": ids, "max_tokens": 3, "ignore_eos": True})["choices"][0]["text"]
    assert choice["text"].endswith(generated)  # the same completion as without logprobs
    assert lp["text_offset"][30] == len(choice["text"]) - len(generated)  # where the output starts in the text


def test_max_tokens_0_and_1_and_a_text_prompt(server):
    zero = complete(server, {"prompt": "the river city", "max_tokens": 0, "logprobs": 1, "echo": True})
    choice = zero["choices"][0]
    assert choice["text"] == "the river city" and choice["finish_reason"] == "length"
    n = zero["usage"]["prompt_tokens"]
    assert zero["usage"]["completion_tokens"] == 0 and len(choice["logprobs"]["tokens"]) == n
    one = complete(server, {"prompt": "the river city", "max_tokens": 1, "logprobs": 1, "echo": True})
    lp = one["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == n + 1
    assert "".join(lp["tokens"]) == one["choices"][0]["text"]  # whole characters here: the texts add up
    assert lp["token_logprobs"][:n] == pytest.approx(choice["logprobs"]["token_logprobs"][:n], abs=1e-6)
    text_only = complete(server, {"prompt": "the river city", "max_tokens": 0, "echo": True})
    assert text_only["choices"][0]["text"] == "the river city" and text_only["choices"][0]["logprobs"] is None


def test_batched_token_id_prompts_each_get_their_own(server, tiny, reference_model):
    vocab = tiny.config.vocab_size
    a, b = ids_of(2, 9, vocab), ids_of(3, 14, vocab)
    result = complete(server, {"prompt": [a, b], "max_tokens": 1, "logprobs": 1, "echo": True})
    by_index = sorted(result["choices"], key=lambda c: c["index"])
    for choice, ids in zip(by_index, [a, b], strict=True):
        assert len(choice["logprobs"]["tokens"]) == len(ids) + 1
        assert_prompt_entries(choice["logprobs"], ids, reference(reference_model, ids), k=1)


def test_vllm_prompt_logprobs_field(server, tiny, reference_model):
    ids = ids_of(4, 8, tiny.config.vocab_size)
    choice = complete(server, {"prompt": ids, "max_tokens": 2, "prompt_logprobs": 2})["choices"][0]
    assert choice["logprobs"] is None
    entries = choice["prompt_logprobs"]
    ref = reference(reference_model, ids)
    assert len(entries) == len(ids) and entries[0] is None
    for p, entry in enumerate(entries[1:]):
        assert str(ids[p + 1]) in entry and 2 <= len(entry) <= 3  # the token and the 2 best
        assert entry[str(ids[p + 1])]["logprob"] == pytest.approx(ref[p, ids[p + 1]].item(), abs=ATOL)


def test_streaming_sends_the_prompt_part_in_the_first_chunk(server, tiny):
    ids = ids_of(5, 12, tiny.config.vocab_size)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 4, "logprobs": 1, "echo": True, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    whole = complete(server, body)["choices"][0]
    conn, resp = open_stream(server, "/v1/completions", body)
    try:
        events = read_events(resp, 100)
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    first = chunks[0]["logprobs"]
    assert len(first["tokens"]) == 13 and first["token_logprobs"][0] is None  # the prompt and the first token
    merged = {k: [v for c in chunks if c["logprobs"] for v in c["logprobs"][k]] for k in first}
    assert merged["tokens"] == whole["logprobs"]["tokens"]
    assert merged["text_offset"] == whole["logprobs"]["text_offset"]
    assert merged["token_logprobs"][1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-6)
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_scoring_requests_leave_the_prefix_cache_to_others(server, tiny):
    prompt = ids_of(6, 24, tiny.config.vocab_size)
    complete(server, {"prompt": prompt, "max_tokens": 2})  # files its blocks
    cached = complete(server, {"prompt": prompt, "max_tokens": 2})
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] == 20  # all full blocks but the last token's
    scored = complete(server, {"prompt": prompt, "max_tokens": 0, "logprobs": 0, "echo": True})
    assert scored["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # it computes its own prompt
    again = complete(server, {"prompt": prompt, "max_tokens": 2})
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 20
    assert again["choices"][0]["text"] == cached["choices"][0]["text"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0, "prompt_logprobs": 1}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "hi", "prompt_logprobs": "all"}, "prompt_logprobs"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, path, body, param):
    status, _, result = server.request("POST", path, {"model": "tiny", **body})
    assert status == 400, result
    assert result["error"]["param"] == param, result
    assert complete(server, {"prompt": "hi", "max_tokens": 1})["choices"][0]["finish_reason"]  # still serving
