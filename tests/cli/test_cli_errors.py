"""Bad input on the command line: one clear line naming the file and the problem, exit code 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import assert_one_line_error, run_ladle


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    assert_one_line_error(run_ladle("generate", "hi", "--model", str(missing)), str(missing), "no such file")


def test_folder_without_config(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    assert_one_line_error(run_ladle("generate", "hi", "--model", str(tmp_path)), str(tmp_path), "no config.json")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert_one_line_error(
        run_ladle("generate", "hi", "--model", str(tmp_path)), "config.json", "unsupported architecture GPT2LMHeadModel"
    )


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{ nope")
    assert_one_line_error(run_ladle("generate", "hi", "--model", str(tmp_path)), "config.json", "not valid JSON")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip file, not a model")
    assert_one_line_error(run_ladle("generate", "hi", "--model", str(bad)), str(bad), "GGUF magic")


def test_unsupported_gguf_tensor_type(tmp_path, tiny_models):
    import gguf

    path = tmp_path / "q5.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    # a 64x64 tensor in Q5_0: 2 blocks of 32 weights per row, 22 bytes a block
    raw = np.zeros((64, 44), dtype=np.uint8)
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_ladle("generate", "hi", "--model", str(path)), str(path), "blk.0.attn_q.weight", "Q5_0")


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_ladle("generate", "hi", "--model", str(path)), "unsupported GGUF architecture 'gpt2'")


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_truncated_gguf(tmp_path, tiny_models, cut):
    data = tiny_models["llama"].gguf_path.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * cut)])
    assert_one_line_error(run_ladle("generate", "hi", "--model", str(path)), str(path), "corrupt or truncated")


def test_corrupt_gguf_header(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 20)
    assert_one_line_error(run_ladle("generate", "hi", "--model", str(path)), str(path), "corrupt")


def test_truncated_safetensors(tmp_path, tiny_models):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"].hf_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert_one_line_error(
        run_ladle("generate", "hi", "--model", str(folder)), "model.safetensors", "corrupt or truncated"
    )


def test_missing_tensor_is_named(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"].hf_dir, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    assert_one_line_error(
        run_ladle("generate", "hi", "--model", str(folder)), "lacks tensors", "model.layers.1.mlp.down_proj.weight"
    )


def test_debug_shows_the_traceback(tmp_path):
    result = run_ladle("--debug", "generate", "hi", "--model", str(tmp_path / "missing"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "no such file" in result.stderr


def test_bad_flag_values(tiny_models):
    model = str(tiny_models["llama"].gguf_path)
    assert_one_line_error(run_ladle("generate", "hi", "--model", model, "--max-tokens", "0"), "--max-tokens")
    assert_one_line_error(run_ladle("generate", "hi", "--model", model, "--temperature", "-1"), "--temperature")


def test_serve_with_a_missing_model_fails_before_binding(tmp_path):
    assert_one_line_error(run_ladle("serve", "--model", str(tmp_path / "none.gguf")), "no such file")


def test_serve_with_a_corrupt_model_exits_2_with_one_error_line(tmp_path, tiny_models):
    from helpers import free_port

    data = tiny_models["llama"].gguf_path.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    result = run_ladle("serve", "--model", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("ladle: error:")]
    assert len(errors) == 1 and "corrupt or truncated" in errors[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--speculative", "ngram", "--num-speculative-tokens", "0"], ["--num-speculative-tokens must be at least 1"]),
        (["--speculative", "draft"], ["--speculative draft needs --draft-model"]),
        (["--speculative", "eagle"], ["invalid choice: 'eagle'"]),
        (["--quantization", "int3"], ["invalid choice: 'int3'"]),
    ],
)
def test_bad_speculation_and_quantization_flags_fail_at_startup(flags, fragments):
    result = run_ladle("serve", "--no-warmup", *flags)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last


def test_a_draft_model_of_another_family_fails_at_startup(tiny_models):
    # the tiny models' tokenizer is not the embedded model's
    path = str(tiny_models["llama"].gguf_path)
    result = run_ladle("serve", "--no-warmup", "--port", "0", "--speculative", "draft", "--draft-model", path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ladle: error: ")]
    assert len(errors) == 1 and "different tokenizer" in errors[0] and path in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_an_embedding_model_that_is_not_a_folder_fails_before_binding(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_ladle("serve", "--embedding-model", str(missing), timeout=60)
    assert_one_line_error(result, str(missing), "an embedding model is a sentence-transformers folder")
    (tmp_path / "empty").mkdir()
    result = run_ladle("serve", "--embedding-model", str(tmp_path / "empty"), timeout=60)
    assert_one_line_error(result, "folder has no config.json (not a sentence-transformers model folder)")


def test_serve_flags_declare_the_embedding_model_beside_the_llm():
    from ladle.cli import _config_from_flags, _serve_defaults, build_parser

    both = _config_from_flags(
        build_parser().parse_args(["serve", "--embedding-max-batch-size", "8"]), _serve_defaults()
    )
    llm, emb = both.models
    assert (llm.kind, emb.kind, emb.name) == ("llm", "embedding", "all-MiniLM-L6-v2")
    assert emb.batching.max_batch_size == 8 and "minilm" in emb.aliases
    alone = _config_from_flags(build_parser().parse_args(["serve", "--no-embedding-model"]), _serve_defaults())
    assert [m.kind for m in alone.models] == ["llm"]
