"""A tensor model of a model repository as an Endpoint (kind "onnx", task "infer"): ONNX Runtime
sessions behind the shared DynamicBatcher, on a thread pool of `instances` workers. A request's
rows join a batch (concatenated along the batch dimension, split back); requests whose non-batch
shapes differ are run apart. Warm-up runs the configured inputs before it turns ready."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import time
from pathlib import Path

from ladle.config import BatchingConfig, LadleConfig, ModelEntry
from ladle.engine.batcher import DynamicBatcher, thread_pool_executor
from ladle.errors import LadleError
from ladle.model.tensor_repository import TensorModel, read_model_folder, scan_repository
from ladle.router.endpoint import INFER, BatchedEndpoint, Phase

log = logging.getLogger(__name__)


def tensor_model_entry(folder: str | Path, base: ModelEntry | None = None) -> ModelEntry:
    """The registry entry of a model-repository folder: kind onnx, its path as the model, and the
    batching its config.yaml gives (the queue bounds of `base`, a config file's entry, where the
    folder's config gives none)."""
    model = read_model_folder(folder)
    cfg = model.config
    base = base or ModelEntry(name=cfg.name, kind="onnx")
    engine = dataclasses.replace(base.engine, model=dataclasses.replace(base.engine.model, model=str(model.folder)))
    batching = dataclasses.replace(
        base.batching,
        max_batch_size=max(cfg.max_batch_size, 1),
        max_queue_delay_ms=cfg.dynamic_batching.max_queue_delay_ms if cfg.max_batch_size else 0.0,
        preferred_batch_sizes=cfg.dynamic_batching.preferred_batch_sizes if cfg.max_batch_size else (),
        instances=cfg.instances,
    )
    queue = cfg.dynamic_batching
    if queue.max_queue_size is not None:
        batching = dataclasses.replace(batching, max_queue_size=queue.max_queue_size)
    if queue.queue_timeout_s is not None:
        batching = dataclasses.replace(batching, queue_timeout_s=queue.queue_timeout_s)
    return dataclasses.replace(base, kind="onnx", engine=engine, batching=batching)


def with_tensor_models(cfg: LadleConfig, base_dir: str | Path = ".") -> LadleConfig:
    """cfg with every folder of its model_repository added as a kind onnx entry, and its own kind
    onnx entries' batching read from their folders (relative paths from base_dir, the config
    file's folder)."""
    base_dir = Path(base_dir)
    models = []
    for entry in cfg.models:
        if entry.kind == "onnx":
            if not entry.engine.model.model:
                raise LadleError(f"model {entry.name!r}: kind onnx needs `model: <model-repository folder>`")
            entry = tensor_model_entry(base_dir / Path(entry.engine.model.model).expanduser(), entry)
        models.append(entry)
    if cfg.model_repository:
        declared = {m.engine.model.model for m in models if m.kind == "onnx"}
        for folder in scan_repository(base_dir / Path(cfg.model_repository).expanduser()):
            if str(folder) not in declared:
                models.append(tensor_model_entry(folder))
    return dataclasses.replace(cfg, models=tuple(models))


class OnnxEndpoint(BatchedEndpoint):
    kind = "onnx"
    tasks = frozenset({INFER})

    def __init__(self, entry: ModelEntry, observe_batch, warmup: bool = True):
        if not entry.engine.model.model:
            raise LadleError(f"model {entry.name!r}: kind onnx needs `model: <model-repository folder>`")
        entry = tensor_model_entry(entry.engine.model.model, entry)  # batching from the folder (an admin API entry too)
        super().__init__(entry)
        self.model: TensorModel = read_model_folder(entry.engine.model.model)
        self.warmup = warmup
        self.observe_batch = observe_batch
        self.sessions = None  # OnnxSessions while loaded
        self.batcher: DynamicBatcher | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.info = None  # no LLM engine info

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        from ladle.runner.onnx_session import OnnxSessions

        self.sessions = await self._loading(asyncio.to_thread(OnnxSessions, self.model))
        if self.sessions is None:
            return
        self.memory_bytes = self.sessions.info.model_bytes * self.model.config.instances
        batching: BatchingConfig = self.entry.batching
        self._pool = concurrent.futures.ThreadPoolExecutor(batching.instances, thread_name_prefix=f"onnx-{self.name}")
        self.batcher = DynamicBatcher(
            self.name,
            self.sessions.run_batch,
            batching,
            thread_pool_executor(self._pool),
            on_batch=lambda record: self.observe_batch(self.name, record),
        )
        self.phase = Phase.WARMING
        if self.warmup and not await self._warm_up():
            return
        self.phase, self.ready_since_s = Phase.READY, time.time()

    async def _warm_up(self) -> bool:
        started = time.monotonic()
        for label, tensors in self.sessions.warmup_inputs():
            (result,) = await asyncio.get_running_loop().run_in_executor(self._pool, self.sessions.run_batch, [tensors])
            if isinstance(result, Exception):
                await self.close()
                self._failed(f"{self.model.config_path}: warmup {label!r}: {result}")
                return False
        log.info("%s: warm-up done in %.2f s", self.name, time.monotonic() - started)
        return True

    async def close(self) -> None:
        await self._close_batcher()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self.sessions = None
        self._unloaded()

    # -- state -------------------------------------------------------------------------------------

    def summary(self) -> str:
        info = self.sessions.info
        cfg = self.model.config
        return (
            f"{self.name} (ONNX {self.model.model_path.name} version {self.model.version} on "
            f"{', '.join(info.providers)}, {cfg.instances} instance(s) x {info.num_threads} threads, "
            f"batches up to {self.entry.batching.max_batch_size})"
        )

    def details(self) -> dict:
        """The admin API's view beside the batching it shows for every batched kind: the
        repository config and the sessions."""
        cfg = self.model.config
        tensor = {
            "folder": str(self.model.folder), "version": self.model.version, "platform": cfg.platform,
            "max_batch_size": cfg.max_batch_size,
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in cfg.inputs],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in cfg.outputs],
        }  # fmt: skip
        if self.sessions is not None:
            tensor["providers"] = list(self.sessions.info.providers)
            tensor["threads_per_instance"] = self.sessions.info.num_threads
        return {"tensor_model": tensor}

    # -- requests ----------------------------------------------------------------------------------

    async def infer(self, inputs: dict, num_rows: int) -> dict:
        """The model's outputs for these inputs (checked against its config by the caller), run in a
        batch with other requests'; raises the batcher's QueueFull / BatchQueueTimeout, or
        OnnxRunError where ONNX Runtime refuses the inputs."""
        batcher = self.batcher
        if batcher is None:
            raise LadleError(f"the model `{self.name}` is not loaded")
        size = sum(math.prod(a.shape[1:]) for a in inputs.values()) if self.model.config.max_batch_size else 0
        (outputs,) = await self._submit_all(batcher, [(inputs, size)])
        return outputs
