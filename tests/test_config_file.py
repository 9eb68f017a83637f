"""The config file: YAML into the same frozen dataclasses as the flags, with errors that name the
file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ladle.config import EngineConfig, LadleConfig, ModelEntry
from ladle.config_file import ConfigFileError, load_config_file, parse_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ladle.yaml"


def test_the_shipped_example_parses_into_two_models_and_a_router():
    cfg = load_config_file(EXAMPLE)
    assert [m.name for m in cfg.models] == ["smol", "smol-fast"]
    smol, fast = cfg.models
    assert smol.aliases == ("smollm2",) and smol.degrade_to == "smol-fast" and smol.pinned
    assert smol.targets.ttft_ms == 2000.0 and smol.targets.tpot_ms == 150.0
    assert smol.engine.cache.kv_cache_memory_gib == 1.0 and smol.engine.scheduler.max_num_seqs == 32
    assert fast.engine.model.quantization == "w8a8" and fast.engine.speculative.method == "ngram"
    assert cfg.routers[0].small == "smol-fast" and cfg.routers[0].large == "smol"
    assert cfg.registry.max_loaded_models == 2
    assert cfg.model("smollm2") is smol


def test_a_model_names_its_tool_call_parser():
    cfg = parse_config({"models": [{"name": "a", "tool_call_parser": "llama3_json"}, {"name": "b"}]})
    assert [m.tool_call_parser for m in cfg.models] == ["llama3_json", "auto"]


def test_keys_not_given_take_the_dataclass_defaults():
    cfg = parse_config({"models": [{"name": "a"}]})
    assert cfg.models == (ModelEntry(name="a"),)
    assert cfg.models[0].engine == EngineConfig()
    assert cfg.server == LadleConfig().server


@pytest.mark.parametrize(
    "data, message",
    [
        ({"models": [{"name": "a"}, {"name": "b", "max_num_seq": 4}]},
         "f.yaml: models[1].max_num_seq: unknown key (did you mean max_num_seqs?)"),
        ({"models": [{"name": "a", "max_num_seqs": "many"}]},
         "f.yaml: models[0].max_num_seqs: expected an integer, got str 'many'"),
        ({"models": [{"name": "a", "max_num_seqs": 0}]}, "f.yaml: models[0]: --max-num-seqs must be at least 1"),
        ({"models": [{"name": "a", "quantization": "fp4"}]}, "f.yaml: models[0]: unknown quantization 'fp4'"),
        ({"models": [{"name": "a", "tool_call_parser": "mistral"}]},
         "f.yaml: models[0]: unknown tool call parser 'mistral' (choose auto, hermes, llama3_json)"),
        ({"models": [{"dtype": "auto"}]}, "f.yaml: models[0].name: required key is missing"),
        ({"models": {"name": "a"}}, "f.yaml: models: expected a list, got a mapping"),
        ({"models": [{"name": "a", "degrade_to": "b"}]}, "degrade_to 'b' is not a model of this config"),
        ({"models": [{"name": "a"}, {"name": "b", "aliases": ["a"]}]}, "the name 'a' is used twice"),
        ({"models": [{"name": "a", "targets": {"ttft_ms": -1}}]},
         "f.yaml: models[0].targets: ttft_ms must be positive"),
        ({"models": [{"name": "a", "speculative": {"method": "draft"}}]},
         "f.yaml: models[0].speculative: --speculative draft needs --draft-model"),
        ({"server": {"port": 70000}}, "f.yaml: server: --port must be in 0..65535"),
        ({"sevrer": {}}, "f.yaml: sevrer: unknown key (did you mean server?)"),
        ({"routers": [{"name": "auto", "small": "a", "large": "b"}]}, "router 'auto': 'a' is not a model"),
    ],
)  # fmt: skip
def test_errors_name_the_file_the_key_and_what_is_wrong(data, message):
    with pytest.raises(ConfigFileError) as e:
        parse_config(data, "f.yaml")
    assert message in str(e.value)


def test_file_errors_say_which_file(tmp_path):
    with pytest.raises(ConfigFileError, match="cannot read the config file .*missing.yaml"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [name: a\n")
    with pytest.raises(ConfigFileError, match="bad.yaml: not valid YAML"):
        load_config_file(bad)
    one = tmp_path / "one.yaml"
    one.write_text("models:\n  - name: a\n    aliases: b\n")
    assert load_config_file(one).models[0].aliases == ("b",)


def test_a_model_declares_its_kind_and_batching():
    cfg = parse_config(
        {
            "models": [
                {"name": "llm"},
                {
                    "name": "minilm",
                    "kind": "embedding",
                    "batching": {"max_batch_size": 64, "max_queue_delay_ms": 5, "preferred_batch_sizes": [16, 32]},
                },
            ]
        }
    )
    llm, minilm = cfg.models
    assert llm.kind == "llm" and llm.batching.max_batch_size == 32
    assert minilm.kind == "embedding"
    assert minilm.batching.max_batch_size == 64 and minilm.batching.max_queue_delay_ms == 5.0
    assert minilm.batching.preferred_batch_sizes == (16, 32) and minilm.batching.instances == 1


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ({"name": "m", "kind": "vision"}, "models[0]: model 'm': unknown kind 'vision' (choose llm, embedding, onnx)"),
        ({"name": "m", "batching": {"max_batch_size": 0}}, "models[0].batching: batching.max_batch_size must be"),
        ({"name": "m", "batching": {"preferred_batch_sizes": [64]}}, "preferred_batch_sizes: 64 is not in 1..max"),
        ({"name": "m", "batching": {"instances": 0}}, "batching.instances must be at least 1"),
        ({"name": "m", "batching": {"max_queue_size": 0}}, "batching.max_queue_size must be at least 1"),
        ({"name": "m", "batching": {"queue_timeout_s": -1}}, "batching.queue_timeout_s must be positive"),
        ({"name": "m", "batching": {"max_batch_sise": 4}}, "unknown key (did you mean max_batch_size?)"),
    ],
)
def test_bad_kind_or_batching_names_the_key(model, says):
    with pytest.raises(ConfigFileError) as e:
        parse_config({"models": [model]}, "ladle.yaml")
    assert says in str(e.value) and str(e.value).startswith("ladle.yaml: ")
