"""`ladle generate` as a user runs it."""

from __future__ import annotations

import pytest

from helpers import run_ladle


def test_generate_prints_a_completion(tiny_models):
    result = run_ladle("generate", "The quick brown", "--model", str(tiny_models["qwen2"].hf_dir), "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # random weights: some text, whatever it says


def test_sampling_with_a_seed_is_repeatable(tiny_models):
    args = (
        "generate",
        "Paris is",
        "--model",
        str(tiny_models["llama"].gguf_path),
        "--max-tokens",
        "12",
        "--temperature",
        "1.0",
        "--seed",
        "7",
    )
    first, second = run_ladle(*args), run_ladle(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_prompts_from_stdin(tiny_models):
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "ladle", "generate", "--model", str(tiny_models["llama"].hf_dir), "--max-tokens", "3"],
        input="first prompt\n\nsecond prompt\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2  # one completion per non-empty line


def test_help_lists_the_flags():
    result = run_ladle("generate", "--help")
    assert result.returncode == 0
    for flag in ("--model", "--chat", "--max-tokens", "--temperature", "--seed", "--dtype"):
        assert flag in result.stdout


@pytest.mark.slow
def test_generate_on_the_embedded_model():
    result = run_ladle("generate", "--chat", "What is the capital of France?", "--max-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
