"""A server that speculates: same text as without, per-request opt-out, and the metrics it exports."""

from __future__ import annotations

import pytest

from helpers import ServerProcess


@pytest.fixture(scope="module")
def ngram_server(tiny_models):
    server = ServerProcess(
        "--model",
        str(tiny_models["llama"].hf_dir),
        "--served-model-name",
        "tiny",
        "--kv-cache-memory",
        "0.05",
        "--speculative",
        "ngram",
        "--num-speculative-tokens",
        "3",
    )
    yield server
    server.stop()


def test_speculation_changes_nothing_but_speed_and_counts_its_guesses(ngram_server):
    prompt = "x = [1, 2, 3] x = [1, 2, 3] x = [1, 2, 3] x ="
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    before = ngram_server.metrics()
    status, _, fast = ngram_server.request("POST", "/v1/completions", body)
    assert status == 200
    after = ngram_server.metrics()
    status, _, plain = ngram_server.request("POST", "/v1/completions", {**body, "speculative": False})
    assert status == 200
    assert fast["choices"][0]["text"] == plain["choices"][0]["text"]
    assert fast["usage"]["completion_tokens"] == 30

    def grew(name):
        return sum(v for (n, _), v in after.items() if n == name) - sum(v for (n, _), v in before.items() if n == name)

    proposed, accepted = (
        grew("ladle_spec_decode_num_draft_tokens_total"),
        grew("ladle_spec_decode_num_accepted_tokens_total"),
    )
    assert proposed > 0 and 0 <= accepted <= proposed
    assert grew("ladle_spec_decode_num_drafts_total") > 0
    final = ngram_server.metrics()
    assert sum(v for (n, _), v in final.items() if n == "ladle_spec_decode_num_draft_tokens_total") == sum(
        v for (n, _), v in after.items() if n == "ladle_spec_decode_num_draft_tokens_total"
    )  # the opted-out request guessed nothing
    rate = ngram_server.metric("ladle_spec_decode_acceptance_rate")
    assert 0 <= rate <= 1
    assert ngram_server.metric("ladle_spec_decode_mean_accepted_length") >= 1
