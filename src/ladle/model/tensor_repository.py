"""A model repository of tensor models (docs/model-repository.md): one folder per model,

    <repo>/<name>/config.yaml           what the model takes and gives, how it is batched
    <repo>/<name>/<version>/model.onnx  the newest numbered version is served

`config.yaml` is read into the frozen dataclasses below with the config-file loader, so a bad key
or value fails naming the file and the key (`iris/config.yaml: inputs[0].datatype: ...`). The
runner checks it against the ONNX model's own inputs and outputs when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ladle.config_file import ConfigFileError, from_options
from ladle.errors import LadleError

CONFIG_NAME = "config.yaml"
PLATFORMS = ("onnxruntime",)
# KServe v2 datatypes -> numpy dtype names (BYTES: variable-length strings, numpy object arrays)
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}  # fmt: skip
WARMUP_FILLS = ("zeros", "ones", "random")


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the tensor's name in requests and in the ONNX graph
    datatype: str  # a KServe v2 datatype: FP32, INT64, BYTES, ...
    shape: tuple[int, ...] = ()  # without the batch dimension when max_batch_size > 0; -1: variable

    def __post_init__(self):
        if self.datatype not in DATATYPES:
            raise LadleError(f"datatype {self.datatype!r} is not a KServe datatype (choose {', '.join(DATATYPES)})")
        if any(d < -1 or d == 0 for d in self.shape):
            raise LadleError(f"shape {list(self.shape)}: each dimension is positive, or -1 for a variable one")


@dataclass(frozen=True)
class DynamicBatching:
    max_queue_delay_ms: float = 0.0  # how long a batch may wait for more requests
    preferred_batch_sizes: tuple[int, ...] = ()  # sizes a batch is cut at once reached
    max_queue_size: int | None = None  # requests queued beyond this are refused (503); None: the entry's (1024)
    queue_timeout_s: float | None = None  # a request still queued this long fails (503); None: the entry's

    def __post_init__(self):
        if self.max_queue_size is not None and self.max_queue_size < 1:
            raise LadleError(f"max_queue_size must be at least 1, got {self.max_queue_size}")
        if self.queue_timeout_s is not None and self.queue_timeout_s <= 0:
            raise LadleError(f"queue_timeout_s must be positive, got {self.queue_timeout_s}")
        if self.max_queue_delay_ms < 0:
            raise LadleError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if any(n < 1 for n in self.preferred_batch_sizes):
            raise LadleError(f"preferred_batch_sizes must be positive, got {list(self.preferred_batch_sizes)}")


@dataclass(frozen=True)
class WarmupInput:
    """A request run before the model turns ready: every input filled with `fill`."""

    name: str  # what the log calls it
    batch_size: int = 1  # rows (ignored when max_batch_size is 0)
    fill: str = "zeros"  # zeros, ones or random (seeded); variable dimensions get 1

    def __post_init__(self):
        if self.batch_size < 1:
            raise LadleError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.fill not in WARMUP_FILLS:
            raise LadleError(f"fill {self.fill!r} is not one of {', '.join(WARMUP_FILLS)}")


@dataclass(frozen=True)
class TensorModelConfig:
    """A model folder's config.yaml."""

    name: str  # the name requests address it by (the folder's name)
    inputs: tuple[TensorSpec, ...]  # in the order binary request bodies carry them
    outputs: tuple[TensorSpec, ...]
    platform: str = "onnxruntime"  # what runs it: PLATFORMS
    max_batch_size: int = 0  # > 0: the first dimension is the batch, requests are batched up to this; 0: not
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    instances: int = 1  # ONNX Runtime sessions serving batches side by side
    warmup: tuple[WarmupInput, ...] = ()
    model_filename: str = "model.onnx"  # the file in the version folder

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise LadleError(f"platform {self.platform!r} is not supported (choose {', '.join(PLATFORMS)})")
        if self.max_batch_size < 0:
            raise LadleError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.instances < 1:
            raise LadleError(f"instances must be at least 1, got {self.instances}")
        if not self.inputs or not self.outputs:
            raise LadleError("a tensor model needs at least one input and one output")
        too_big = [n for n in self.dynamic_batching.preferred_batch_sizes if n > max(self.max_batch_size, 1)]
        if too_big:
            raise LadleError(f"preferred_batch_sizes {too_big} exceed max_batch_size {self.max_batch_size}")
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise LadleError(f"{kind}: a name is given twice ({', '.join(names)})")

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)


@dataclass(frozen=True)
class TensorModel:
    """A model folder, read and validated (the ONNX file itself is opened by the runner)."""

    config: TensorModelConfig
    folder: Path  # <repo>/<name>
    version: str  # the version folder served
    config_path: Path  # for errors that name the file

    @property
    def model_path(self) -> Path:
        return self.folder / self.version / self.config.model_filename


def read_model_folder(folder: str | Path) -> TensorModel:
    """The model in one repository folder; a LadleError naming the file (and key) if it is wrong."""
    import yaml

    folder = Path(folder).expanduser()
    path = folder / CONFIG_NAME
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read the model's config: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, dict):
        data.setdefault("name", folder.name)
    config = from_options(TensorModelConfig, data if data is not None else {}, str(path))
    versions = sorted((p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int)
    if not versions:
        raise LadleError(f"{folder}: no version folder (expected {folder}/1/{config.model_filename})")
    model = TensorModel(config, folder, versions[-1], path)
    if not model.model_path.is_file():
        raise LadleError(f"{path}: model_filename: {model.model_path} does not exist")
    return model


def scan_repository(repo: str | Path) -> list[Path]:
    """The model folders of a repository (those holding a config.yaml), by name."""
    repo = Path(repo).expanduser()
    if not repo.is_dir():
        raise LadleError(f"--model-repository {repo}: not a folder")
    return sorted(p for p in repo.iterdir() if (p / CONFIG_NAME).is_file())
