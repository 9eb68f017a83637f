"""A small real tensor model for the tests and the KServe benchmark: a classifier trained on one of
scikit-learn's bundled data sets (no download) and exported to ONNX with skl2onnx, written as a
model-repository folder (docs/model-repository.md):

    <repo>/<name>/config.yaml
    <repo>/<name>/1/model.onnx

Needs scikit-learn and skl2onnx (the `test` extra); `scripts/make_onnx_classifier.py` runs it.
"""

from __future__ import annotations

from pathlib import Path

DATASETS = ("iris", "digits", "breast_cancer", "wine")

CONFIG_TEMPLATE = """\
# A {model} trained on scikit-learn's {dataset} data set, exported by ladle.bench.onnx_classifier.
name: {name}
platform: onnxruntime
max_batch_size: {max_batch_size}
inputs:
  - name: input
    datatype: FP32
    shape: [{num_features}]
outputs:
  - name: label
    datatype: INT64
    shape: []
  - name: probabilities
    datatype: FP32
    shape: [{num_classes}]
dynamic_batching:
  max_queue_delay_ms: {max_queue_delay_ms}
  preferred_batch_sizes: [{preferred}]
instances: 1
warmup:
  - name: one row of zeros
    batch_size: 1
  - name: a full batch
    batch_size: {max_batch_size}
"""


def build_classifier_repository(
    repo: str | Path,
    name: str = "iris",
    dataset: str = "iris",
    max_batch_size: int = 64,
    max_queue_delay_ms: float = 2.0,
    hidden: int = 0,
    preferred_batch_sizes: tuple[int, ...] | None = None,
    num_layers: int = 2,
    max_iter: int = 300,
    queue: dict | None = None,
) -> Path:
    """Train, export and write `<repo>/<name>/`; returns that folder. hidden > 0 trains a
    multi-layer perceptron with that many hidden units (more compute per row) instead of a
    logistic regression (num_layers layers, at most max_iter epochs). queue: extra dynamic_batching
    keys (max_queue_size, queue_timeout_s). preferred_batch_sizes: default a
    quarter and a half of max_batch_size."""
    import numpy as np
    from skl2onnx import to_onnx
    from sklearn import datasets

    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r} (choose {', '.join(DATASETS)})")
    x, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    x = x.astype(np.float32)
    model = _train(x, y, hidden, num_layers, max_iter)
    onx = to_onnx(
        model,
        x[:1],
        options={id(model.steps[-1][1]): {"zipmap": False}} if hasattr(model, "steps") else {"zipmap": False},
        initial_types=[("input", _float_input(x.shape[1]))],
        final_types=None,
        target_opset=17,
    )
    _rename_outputs(onx, ("label", "probabilities"))
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.onnx").write_bytes(onx.SerializeToString())
    if preferred_batch_sizes is None:
        preferred_batch_sizes = sorted({max(1, max_batch_size // 4), max(1, max_batch_size // 2)})
    preferred = ", ".join(str(n) for n in preferred_batch_sizes)
    extra = "".join(f"  {key}: {value}\n" for key, value in (queue or {}).items())
    (folder / "config.yaml").write_text(
        CONFIG_TEMPLATE.replace("instances:", extra + "instances:").format(
            name=name,
            model=type(model.steps[-1][1]).__name__,
            dataset=dataset,
            max_batch_size=max_batch_size,
            num_features=x.shape[1],
            num_classes=len(np.unique(y)),
            max_queue_delay_ms=max_queue_delay_ms,
            preferred=preferred,
        )  # fmt: skip
    )
    return folder


def _train(x, y, hidden: int, num_layers: int, max_iter: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = (
        MLPClassifier(hidden_layer_sizes=(hidden,) * num_layers, max_iter=max_iter, random_state=0)
        if hidden
        else LogisticRegression(max_iter=1000)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a few epochs are enough for a benchmark model
        return make_pipeline(StandardScaler(), head).fit(x, y)


def _float_input(num_features: int):
    from skl2onnx.common.data_types import FloatTensorType

    return FloatTensorType([None, num_features])


def _rename_outputs(onx, names: tuple[str, ...]) -> None:
    """skl2onnx calls them output_label / output_probability: give them the repository's names."""
    renames = {out.name: new for out, new in zip(onx.graph.output, names, strict=True)}
    for node in onx.graph.node:
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
    for out in onx.graph.output:
        out.name = renames[out.name]
