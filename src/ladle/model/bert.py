"""A BERT encoder (the Transformer module of a sentence-transformers model such as all-MiniLM-L6-v2):
token, position and segment embeddings, then post-LayerNorm transformer layers with GELU, an
attention mask over padding. Float32 by default (MiniLM is 22M parameters). Pooling and
normalisation as the folder's sentence-transformers modules say (`pool`).

A padded batch computes its dense layers (Q/K/V, output, MLP: nearly all the FLOPs) on its real
tokens only, packed into one [N, H] matrix (`Packing`); attention alone runs padded, per
sequence. A batch of mixed lengths wastes no compute on padding, as vLLM and TEI serve encoders
unpadded; `BertModel(packed=False)` is the padded twin the tests compare against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ladle.errors import ModelLoadError
from ladle.model.sentence import pad_batch

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int  # H
    num_layers: int
    num_heads: int
    intermediate_size: int  # the MLP's width
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_folder(cls, folder: Path) -> BertConfig:
        path = folder / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(path, f"cannot read it: {e}") from None
        if raw.get("model_type") != "bert":
            raise ModelLoadError(path, f"model_type {raw.get('model_type')!r} is not a BERT encoder ('bert')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(path, "only absolute position embeddings are supported")
        act = raw.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ModelLoadError(path, f"hidden_act {act!r} is not supported (choose {', '.join(ACTIVATIONS)})")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw.get("type_vocab_size", 2),
            layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
            hidden_act=act,
        )


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [B, T] -> [B, T, H]
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded [B, T] batch lie, to compute dense layers on them only."""

    index: torch.Tensor  # [N] positions, in the flattened [B * T], of the tokens that are not padding
    batch: int  # B
    length: int  # T

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing | None:
        """None where nothing is padding (packing would only copy)."""
        if bool(attention_mask.all()):
            return None
        b, t = attention_mask.shape
        return cls(attention_mask.reshape(-1).nonzero().squeeze(1), b, t)

    def pack(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [N, D]
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [B, T, D], zeros at padding
        out = x.new_zeros(self.batch * self.length, x.shape[-1])
        return out.index_copy_(0, self.index, x).view(self.batch, self.length, -1)


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, packing: Packing | None) -> torch.Tensor:
        # x [B, T, H] (or [N, H] packed), mask [B, 1, 1, T] -> the same shape as x

        def heads(proj):  # -> [B, heads, T, H/heads]
            y = proj(x) if packing is None else packing.pad(proj(x))
            b, t, h = y.shape
            return y.view(b, t, self.num_heads, h // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value), attn_mask=mask)
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, -1)
        return out if packing is None else packing.pack(out)


class DenseNorm(nn.Module):
    """dense, then LayerNorm over the residual: BERT's post-LN."""

    def __init__(self, c: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, packing: Packing | None) -> torch.Tensor:
        return self.output(self.self(x, mask, packing), x)


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, I]
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, packing: Packing | None) -> torch.Tensor:
        x = self.attention(x, mask, packing)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_layers))


class BertModel(nn.Module):
    """Token ids and their attention mask in, the last hidden states out."""

    def __init__(self, c: BertConfig, packed: bool = True):
        super().__init__()
        self.config = c
        self.packed = packed  # dense layers on the real tokens only (False: on the padded batch)
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # ids, attention_mask [B, T] (1 for tokens, 0 for padding) -> [B, T, H] (zeros at padding when packed)
        mask = attention_mask.bool()[:, None, None, :]  # keys a query may attend to
        packing = Packing.of(attention_mask) if self.packed else None
        x = self.embeddings(ids)
        if packing is not None:
            x = packing.pack(x)  # [N, H]
        for layer in self.encoder.layer:
            x = layer(x, mask, packing)
        return x if packing is None else packing.pad(x)


def load_bert(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", packed: bool = True) -> BertModel:
    """The encoder of a Hugging Face BERT folder (model.safetensors or pytorch_model.bin)."""
    config = BertConfig.from_folder(folder)
    state = _read_weights(folder)
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    model = BertModel(config, packed)
    wanted = model.state_dict()
    missing = [k for k in wanted if prefix + k not in state]
    if missing:
        raise ModelLoadError(folder, f"the weights lack {len(missing)} tensors of a BERT encoder, e.g. {missing[0]}")
    loaded = {}
    for name, param in wanted.items():
        tensor = state[prefix + name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelLoadError(folder, f"{prefix + name} has shape {tuple(tensor.shape)}, expected {param.shape}")
        loaded[name] = tensor
    model.load_state_dict(loaded)
    return model.to(device=device, dtype=dtype).eval()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelLoadError(folder, "no model.safetensors or pytorch_model.bin")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence vectors from hidden [B, T, H] and mask [B, T]: `mean`, `cls`, `max` or
    `mean_sqrt_len` (sentence-transformers' Pooling modes) -> [B, H]."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    if mode == "max":
        return hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    if mode == "mean_sqrt_len":
        return summed / counts.sqrt()
    return summed / counts


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_size(model: nn.Module) -> str:
    n = num_params(model)
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.1f}B"


class SentenceEncoder:
    """A BERT encoder with its pooling and normalisation: padded batches of token ids to vectors."""

    def __init__(self, model: BertModel, pooling_mode: str, normalize: bool, pad_token_id: int = 0):
        self.model = model
        self.pooling_mode = pooling_mode
        self.normalize = normalize
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device

    @property
    def dimensions(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """One vector per id list, padded to the longest of the batch: float32 [B, H]."""
        ids, mask = (torch.from_numpy(a).to(self.device) for a in pad_batch(batch, self.pad_token_id))
        vectors = pool(self.model(ids, mask), mask, self.pooling_mode).float()
        if self.normalize:
            vectors = F.normalize(vectors, p=2.0, dim=1)
        return vectors.cpu().numpy()  # the one transfer of the batch


class SentenceModule(nn.Module):
    """The whole sentence encoder as one graph (encoder, pooling, normalisation): what ONNX export
    takes. ids, attention_mask [B, T] -> vectors float32 [B, H]."""

    def __init__(self, model: BertModel, pooling_mode: str, normalize: bool):
        super().__init__()
        self.model, self.pooling_mode, self.normalize = model, pooling_mode, normalize

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vectors = pool(self.model(ids, attention_mask), attention_mask, self.pooling_mode).float()
        return F.normalize(vectors, p=2.0, dim=1) if self.normalize else vectors


def export_onnx(model: BertModel, pooling_mode: str, normalize: bool, path: Path) -> None:
    """The sentence encoder as an ONNX graph at `path` (inputs input_ids, attention_mask int64 [B, T];
    output sentence_embedding float32 [B, H]; B and T dynamic), for ONNX Runtime. The padded twin
    is exported: ONNX Runtime runs the graph as it is, with no Python between its layers."""
    import warnings

    padded = BertModel(model.config, packed=False)
    padded.load_state_dict(model.state_dict())
    module = SentenceModule(padded.float().eval(), pooling_mode, normalize)
    ids = torch.tensor([[101, 2023, 102, 0]] * 2)
    mask = (ids != 0).long()
    axes = {"b": 0, "t": 1}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {v: k for k, v in axes.items()},
                "attention_mask": {v: k for k, v in axes.items()},
                "sentence_embedding": {0: "b"},
            },
            opset_version=17,
            dynamo=False,
        )
