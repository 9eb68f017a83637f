"""Write the demo tensor model: a classifier trained on scikit-learn's iris data, exported to ONNX,
as a model-repository folder `ladle serve --model-repository DIR` serves.

    python scripts/make_onnx_classifier.py models/            # models/iris/{config.yaml,1/model.onnx}
    python scripts/make_onnx_classifier.py models/ --dataset digits --name digits --hidden 256
"""

import argparse

from ladle.bench.onnx_classifier import DATASETS, build_classifier_repository

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("repository", help="the model-repository folder to write into")
p.add_argument("--name", default="iris")
p.add_argument("--dataset", default="iris", choices=DATASETS)
p.add_argument("--max-batch-size", type=int, default=64)
p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
p.add_argument("--hidden", type=int, default=0, help="hidden units of an MLP (0: logistic regression)")
a = p.parse_args()
print(build_classifier_repository(a.repository, a.name, a.dataset, a.max_batch_size, a.max_queue_delay_ms, a.hidden))
