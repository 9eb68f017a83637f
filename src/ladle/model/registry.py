"""Architecture family → model class. New families plug in here."""

from __future__ import annotations

from ladle.model.llama import LlamaForCausalLM
from ladle.model.qwen2 import Qwen2ForCausalLM

MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}
