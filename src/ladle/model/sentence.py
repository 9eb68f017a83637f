"""What a sentence-transformers folder says around its encoder, read without torch: the pooling
mode (1_Pooling/config.json), whether vectors are normalised (modules.json lists Normalize), the
longest input (sentence_bert_config.json `max_seq_length`), and its tokenizer (tokenizer.json,
with the file's own truncation and padding turned off: Ladle decides both)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers

from ladle.errors import ModelLoadError

POOLING_MODES = {  # sentence-transformers' Pooling flags -> Ladle's names
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


@dataclass(frozen=True)
class SentenceSpec:
    folder: Path  # the sentence-transformers folder (its Transformer module at the top)
    pooling_mode: str  # mean, cls, max or mean_sqrt_len
    normalize: bool  # vectors scaled to unit length (a Normalize module)
    max_seq_length: int  # the longest input in tokens, [CLS] and [SEP] included
    dimensions: int  # the vector's length
    matryoshka_dims: tuple[int, ...] = ()  # shorter lengths the model was trained for (none: refuse `dimensions`)

    @classmethod
    def from_folder(cls, folder: Path) -> SentenceSpec:
        folder = Path(folder)
        config = _read_json(folder / "config.json")
        modules = _read_json(folder / "modules.json") if (folder / "modules.json").exists() else []
        pooling_path = next((m["path"] for m in modules if m.get("type", "").endswith(".Pooling")), "1_Pooling")
        pooling = _read_json(folder / pooling_path / "config.json") if (folder / pooling_path).exists() else {}
        modes = [name for flag, name in POOLING_MODES.items() if pooling.get(flag)]
        if len(modes) > 1:
            raise ModelLoadError(folder / pooling_path, f"several pooling modes ({', '.join(modes)}): Ladle uses one")
        bert = folder / "sentence_bert_config.json"
        st_max = _read_json(bert).get("max_seq_length") if bert.exists() else None
        max_len = min(st_max or config["max_position_embeddings"], config["max_position_embeddings"])
        st_config = folder / "config_sentence_transformers.json"
        dims = tuple(_read_json(st_config).get("matryoshka_dims", ())) if st_config.exists() else ()
        return cls(
            folder=folder,
            pooling_mode=modes[0] if modes else "mean",
            normalize=any(m.get("type", "").endswith(".Normalize") for m in modules),
            max_seq_length=int(max_len),
            dimensions=int(pooling.get("word_embedding_dimension", config["hidden_size"])),
            matryoshka_dims=dims,
        )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(path, f"cannot read it: {e}") from None


class SentenceTokenizer:
    """Texts to token ids with [CLS] ... [SEP], never truncated here."""

    def __init__(self, folder: Path):
        path = Path(folder) / "tokenizer.json"
        try:
            self.backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ModelLoadError(path, f"not a tokenizers file: {e}") from None
        self.backend.no_truncation()
        self.backend.no_padding()
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.pad_token_id = self.backend.token_to_id("[PAD]") or 0
        self.cls_token_id = self.backend.token_to_id("[CLS]")
        self.sep_token_id = self.backend.token_to_id("[SEP]")

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one at a time: encode_batch's thread pool would spin beside the compute thread's OpenMP team
        return [self.backend.encode(t).ids for t in texts]

    def truncate(self, ids: list[int], limit: int) -> list[int]:
        """ids cut to `limit` tokens keeping the closing [SEP], as sentence-transformers truncates."""
        if len(ids) <= limit:
            return ids
        if self.sep_token_id is not None and ids[-1] == self.sep_token_id and limit >= 2:
            return [*ids[: limit - 1], self.sep_token_id]
        return ids[:limit]


def pad_batch(batch: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Id lists padded to the longest: ids and attention mask (1 for tokens), int64 [B, T]."""
    longest = max(len(ids) for ids in batch)
    ids = np.full((len(batch), longest), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    for row, item in enumerate(batch):
        ids[row, : len(item)] = item
        mask[row, : len(item)] = 1
    return ids, mask
