"""The BERT encoder against sentence-transformers: every pooling mode, weights from .bin as from
.safetensors, a padded batch against each input alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ladle.errors import ModelLoadError
from ladle.model.bert import SentenceEncoder, load_bert
from ladle.model.sentence import SentenceSpec, SentenceTokenizer
from ladle.model.source import embedded_embedding_model_path

pytestmark = pytest.mark.slow

TEXTS = ["A short one.", "A somewhat longer sentence, with commas, numbers (42) and ünïcødé.", "x"]


@pytest.fixture(scope="module")
def folder():
    return embedded_embedding_model_path()


@pytest.fixture(scope="module")
def bert(folder):
    return load_bert(folder)


def test_the_spec_reads_the_sentence_transformers_config(folder):
    spec = SentenceSpec.from_folder(folder)
    assert (spec.pooling_mode, spec.normalize, spec.max_seq_length, spec.dimensions) == ("mean", True, 256, 384)
    assert spec.matryoshka_dims == ()


@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len"])
def test_each_pooling_mode_equals_sentence_transformers(folder, bert, mode):
    from sentence_transformers import SentenceTransformer, models

    st_mode = {"mean_sqrt_len": "mean_sqrt_len_tokens"}.get(mode, mode)
    reference = SentenceTransformer(
        modules=[models.Transformer(str(folder)), models.Pooling(384, pooling_mode=st_mode)], device="cpu"
    )
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    tok = SentenceTokenizer(folder)
    ours = SentenceEncoder(bert, mode, normalize=False).embed(tok.encode_batch(TEXTS))
    assert np.abs(ours - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_a_padded_batch_equals_each_input_alone(folder, bert):
    tok = SentenceTokenizer(folder)
    encoder = SentenceEncoder(bert, "mean", normalize=True)
    ids = tok.encode_batch(TEXTS)
    together = encoder.embed(ids)
    alone = np.stack([encoder.embed([one])[0] for one in ids])
    assert np.abs(together - alone).max() < 1e-5


def test_the_packed_encoder_equals_its_padded_twin(folder, bert):
    """Dense layers on the real tokens only give the padded computation's vectors (each pooling)."""
    padded = load_bert(folder, packed=False)
    ids = SentenceTokenizer(folder).encode_batch(TEXTS)
    assert len({len(i) for i in ids}) > 1  # the batch pads
    for mode in ("mean", "cls", "max", "mean_sqrt_len"):
        ours = SentenceEncoder(bert, mode, normalize=True).embed(ids)
        twin = SentenceEncoder(padded, mode, normalize=True).embed(ids)
        assert np.abs(ours - twin).max() < 1e-5


def test_weights_from_pytorch_model_bin_equal_safetensors(folder, bert, tmp_path):
    copy = tmp_path / "bin"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    from safetensors.torch import load_file

    torch.save(
        {f"bert.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}, copy / "pytorch_model.bin"
    )
    from_bin = load_bert(copy)
    ids = torch.tensor([[101, 2023, 2003, 102]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        assert torch.equal(from_bin(ids, mask), bert(ids, mask))


def test_a_folder_that_is_not_bert_names_the_file(folder, tmp_path):
    copy = tmp_path / "not-bert"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="config.json: model_type 'llama' is not a BERT encoder"):
        load_bert(copy)
    (copy / "model.safetensors").unlink()
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no model.safetensors or pytorch_model.bin"):
        load_bert(copy)


def test_truncation_keeps_the_closing_sep(folder):
    tok = SentenceTokenizer(folder)
    ids = tok.encode("one two three four five six")
    cut = tok.truncate(ids, 4)
    assert cut == [ids[0], ids[1], ids[2], tok.sep_token_id] and len(tok.truncate(ids, 100)) == len(ids)
