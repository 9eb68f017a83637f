"""Model specs from configs, rope scaling, chat templates, dtype choice: fast unit tests."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ladle.errors import LadleError, ModelLoadError
from ladle.model.chat_template import ChatTemplate, ChatTemplateError
from ladle.model.layers import rope_inverse_frequencies
from ladle.model.spec import RopeScaling, spec_from_hf_config
from ladle.platform import _features_from_flags, normalize_dtype_name

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def test_spec_from_hf_config_defaults():
    spec = spec_from_hf_config(LLAMA_CONFIG, "config.json")
    assert (spec.architecture, spec.head_dim, spec.q_size, spec.kv_size) == ("llama", 16, 64, 32)
    assert spec.kv_bytes_per_token(4) == 2 * 2 * 32 * 4


def test_spec_reads_both_rope_config_styles():
    old = {**LLAMA_CONFIG, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    new = {**LLAMA_CONFIG, "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert spec_from_hf_config(old, "c").rope_scaling == spec_from_hf_config(new, "c").rope_scaling
    assert spec_from_hf_config(new, "c").rope_theta == 5e5


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"architectures": ["BertModel"]}, "unsupported architecture BertModel"),
    ],
)
def test_spec_rejects_what_it_cannot_serve(change, fragment):
    with pytest.raises(ModelLoadError, match=fragment):
        spec_from_hf_config({**LLAMA_CONFIG, **change}, "config.json")


def test_spec_names_a_missing_field():
    cfg = dict(LLAMA_CONFIG)
    del cfg["intermediate_size"]
    with pytest.raises(ModelLoadError, match="intermediate_size"):
        spec_from_hf_config(cfg, "config.json")


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=params)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inverse_frequencies(128, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


def test_chat_template_renders_with_generation_prompt():
    t = ChatTemplate(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == "[user]hi[assistant]"


def test_chat_template_is_sandboxed():
    t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="failed to render"):
        t.render([])


def test_chat_template_raise_exception_reaches_the_user():
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render([{"role": "assistant", "content": "x"}])


def test_auto_dtype_needs_native_bf16():
    assert not _features_from_flags({"avx2", "avx512f"}).has_native_bf16
    assert _features_from_flags({"avx512f", "avx512_bf16"}).has_native_bf16
    assert _features_from_flags({"amx_bf16"}).has_native_bf16
    assert normalize_dtype_name("bf16") == "bfloat16"
    with pytest.raises(LadleError, match="unknown dtype"):
        normalize_dtype_name("int3")


def test_tokenizer_modules_do_not_load_torch():
    """The engine and server use the tokenizer and spec without paying for torch."""
    code = (
        "import sys, ladle.model.tokenizer, ladle.model.gguf_tokenizer, ladle.model.spec, ladle.model.source;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
