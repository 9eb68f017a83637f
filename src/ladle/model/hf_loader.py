"""Hugging Face model folders: config.json, *.safetensors (sharded too), tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ladle.errors import ModelLoadError
from ladle.model.spec import TransformerSpec, spec_from_hf_config

# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFFolder:
    def __init__(self, path: Path):
        self.path = path
        config_path = path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(config_path, f"not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise ModelLoadError(config_path, "must hold a JSON object")

    def spec(self) -> TransformerSpec:
        return spec_from_hf_config(self.config, self.path / "config.json")

    def tokenizer(self, model_eos_ids=()):
        from ladle.model.tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(self.path, model_eos_ids)

    def weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelLoadError(index, f"malformed shard index ({e})") from None
            files = [self.path / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ModelLoadError(index, f"lists shard files that are not in the folder: {', '.join(missing)}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            hint = " (found PyTorch .bin weights: convert them to safetensors)" if any(self.path.glob("*.bin")) else ""
            raise ModelLoadError(self.path, f"no *.safetensors weight files in the model folder{hint}")
        return files

    def weights(self, spec: TransformerSpec) -> Iterator[tuple[str, Any]]:
        """(name, torch tensor) for every tensor of every shard."""
        from safetensors import SafetensorError, safe_open

        for file in self.weight_files():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        if name.endswith(_IGNORED_SUFFIXES):
                            continue
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(file, f"corrupt or truncated safetensors file ({e})") from None
