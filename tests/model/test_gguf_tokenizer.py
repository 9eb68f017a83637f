"""Tokenizers built from GGUF metadata against the ones transformers (and sentencepiece) build."""

from __future__ import annotations

import json

import pytest

from ladle.model.gguf_loader import GGUFFile

VARIED_TEXTS = [
    "def square(x: int) -> int:\n    return x ** 2  # comment\n\n\n\tif x != 0: pass\n",
    "Emoji 🎉🚀👩‍💻 and flags 🇫🇷; CJK 你好，世界 日本語のテキスト 한국어 문장",
    "tabs\t\tand   spaces    and trailing   ",
    "   leading spaces, then\nnew\n\nlines\r\nwith CRLF",
    "It's 2024; we'll pay $1,234.56 — naïve café Ünïcödé!",
    "<|im_start|>user\nWhat is 7*6?<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def embedded_pair(embedded_source):
    from transformers import AutoTokenizer

    ours = GGUFFile(embedded_source.path).tokenizer()
    ref = AutoTokenizer.from_pretrained(str(embedded_source.path.parent), gguf_file=embedded_source.path.name)
    return ours, ref


@pytest.mark.slow
@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_embedded_gguf_tokenizer_matches_transformers(embedded_pair, text):
    ours, ref = embedded_pair
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids) == text


@pytest.mark.slow
def test_embedded_tokenizer_specials(embedded_pair):
    ours, _ = embedded_pair
    assert ours.eos_token_id == 2 and ours.bos_token_id == 1
    assert 2 in ours.stop_token_ids
    assert ours.encode("<|im_end|>") == [2]  # control tokens match whole
    assert ours.decode([1, 4093, 198, 6004, 2]) == "user\nhi"  # specials skipped by default


def test_byte_level_pre_tokenizer_splits_digits_for_smollm():
    """`smollm` vocabularies split numbers into single digits (llama.cpp's and SmolLM's rule)."""
    from tokenizers import Tokenizer as Fast

    from ladle.model.gguf_tokenizer import tokenizer_from_gguf
    from tiny_models import train_byte_level_bpe

    trained = train_byte_level_bpe(400)
    vocab = trained.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if not isinstance(m, str) else m for m in json.loads(trained.to_str())["model"]["merges"]]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": merges,
    }
    # the corpus taught the vocabulary multi-digit pieces, which the smollm rule must not use
    assert any(t.lstrip("Ġ").isdigit() and len(t.lstrip("Ġ")) > 1 for t in vocab)
    plain = tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "gpt2"}, "test")
    smollm = tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "smollm"}, "test")
    digits = [smollm.id_to_token(i) for i in smollm.encode("year 2024")]
    assert digits[-4:] == ["2", "0", "2", "4"]
    assert len(plain.encode("year 2024")) < len(digits)
    assert isinstance(smollm.backend, Fast)


# -- SentencePiece ("llama") vocabularies -------------------------------------------------------------

SPM_CORPUS = (
    "The quick brown fox jumps over the lazy dog.\n"
    "def main():\n    return [x * 2 for x in range(10)]\n"
    "Sentences with    several spaces, tabs\tand newlines.\n"
) * 50


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A SentencePiece BPE model trained here, written to GGUF as llama.cpp's converter does."""
    import gguf
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    (root / "corpus.txt").write_text(SPM_CORPUS)
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "sp"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        add_dummy_prefix=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(root / "sp.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = 1
        if sp.is_unknown(i):
            kind = 2
        elif sp.is_control(i):
            kind = 3
        elif sp.is_unused(i):
            kind = 5
        elif sp.is_byte(i):
            kind = 6
        types.append(kind)
    path = root / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, sp


SPM_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return [x * 2 for x in range(10)]",
    "Sentences with    several spaces, tabs\tand newlines.\n\n",
    "Unseen: 🎉 你好 Ünïcödé",  # characters outside the vocabulary fall back to bytes
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_gguf_tokenizer_matches_sentencepiece_and_transformers(spm_gguf, text):
    from transformers import AutoTokenizer

    path, sp = spm_gguf
    ours = GGUFFile(path).tokenizer()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = ours.encode(text)
    assert ids[0] == 1  # llama.cpp adds BOS to SentencePiece vocabularies by default
    assert ids == ref.encode(text)
    assert ids[1:] == sp.encode(text)
    assert ours.decode(ids) == sp.decode(ids[1:]) == text
