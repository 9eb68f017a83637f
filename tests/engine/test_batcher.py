"""The dynamic batcher with a real run_batch and real asyncio: an executor held by an Event queues
items deterministically, then releases them; batch sizes are counted, never timed."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import generate_latest

from ladle.config import BatchingConfig
from ladle.engine.batcher import BatchQueueTimeout, DynamicBatcher, QueueFull, compute_loop_executor
from ladle.engine.compute import ComputeLoop
from ladle.metering.prometheus import ServerMetrics


class Held:
    """An executor that runs each batch once `gate` is set; counts the batches waiting at it."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.num_waiting = 0

    async def __call__(self, fn):
        self.num_waiting += 1
        await self.gate.wait()
        self.num_waiting -= 1
        return fn()


def doubled(payloads: list) -> list:
    return [ValueError(f"negative: {p}") if p < 0 else 2 * p for p in payloads]


async def settle(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def make(executor, run_batch=doubled, **batching):
    records, batches = [], []

    def run(payloads):
        batches.append(list(payloads))
        return run_batch(payloads)

    cfg = BatchingConfig(**{"max_queue_delay_ms": 0.0, **batching})
    return DynamicBatcher("m", run, cfg, executor, on_batch=records.append), records, batches


async def hold_first(batcher, held) -> asyncio.Task:
    """One item that takes the only instance and waits at the gate: the next ones queue."""
    first = asyncio.create_task(batcher.submit(0, size=1))
    while held.num_waiting == 0:
        await asyncio.sleep(0)
    return first


def test_queued_items_run_in_batches_of_at_most_max_batch_size():
    async def main():
        held = Held()
        batcher, records, batches = make(held, max_batch_size=4)
        first = await hold_first(batcher, held)
        rest = [asyncio.create_task(batcher.submit(i, size=5)) for i in range(1, 10)]
        await settle()
        assert batcher.num_queued == 9
        held.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return results, records, batches

    results, records, batches = asyncio.run(main())
    assert results == [2 * i for i in range(10)]
    assert [r.batch_size for r in records] == [1, 4, 4, 1]
    assert batches[1:] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert all(len(r.queue_times_s) == r.batch_size and r.compute_time_s >= 0 for r in records)


def test_a_batch_takes_the_items_nearest_the_oldest_ones_size():
    async def main():
        held = Held()
        batcher, records, batches = make(held, max_batch_size=3)
        first = await hold_first(batcher, held)
        sizes = {10: 10, 100: 100, 12: 12, 98: 98, 11: 11, 101: 101}  # payload = its size
        tasks = [asyncio.create_task(batcher.submit(p, size=s)) for p, s in sizes.items()]
        await settle()
        held.gate.set()
        await asyncio.gather(first, *tasks)
        await batcher.close()
        return records, batches

    records, batches = asyncio.run(main())
    assert batches[1:] == [[10, 12, 11], [100, 98, 101]]
    assert [r.max_size for r in records[1:]] == [12, 101]


def test_preferred_batch_sizes_cut_a_batch_to_the_largest_reached():
    async def main():
        held = Held()
        batcher, records, _ = make(held, max_batch_size=8, preferred_batch_sizes=(2, 4))
        first = await hold_first(batcher, held)
        tasks = [asyncio.create_task(batcher.submit(i, size=1)) for i in range(7)]
        await settle()
        held.gate.set()
        await asyncio.gather(first, *tasks)
        await batcher.close()
        return records

    assert [r.batch_size for r in asyncio.run(main())] == [1, 4, 2, 1]


def test_items_arriving_within_the_delay_join_the_first_ones_batch():
    """A long delay (60 s) ends as soon as max_batch_size items are queued."""

    async def main():
        held = Held()
        held.gate.set()
        batcher, records, _ = make(held, max_batch_size=4, max_queue_delay_ms=60_000)
        first = asyncio.create_task(batcher.submit(1, size=3))
        await settle()
        later = [asyncio.create_task(batcher.submit(i, size=3)) for i in (2, 3, 4)]
        results = await asyncio.wait_for(asyncio.gather(first, *later), 30)
        await batcher.close()
        return results, records

    results, records = asyncio.run(main())
    assert results == [2, 4, 6, 8] and [r.batch_size for r in records] == [4]


def test_one_items_failure_fails_only_that_item():
    async def main():
        held = Held()
        batcher, records, _ = make(held, max_batch_size=8)
        first = await hold_first(batcher, held)
        tasks = [asyncio.create_task(batcher.submit(p, size=1)) for p in (1, -1, 3)]
        await settle()
        held.gate.set()
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
        await batcher.close()
        return results, records

    results, records = asyncio.run(main())
    assert results[0] == 0 and results[1] == 2 and results[3] == 6
    assert isinstance(results[2], ValueError) and "negative: -1" in str(results[2])
    assert [r.batch_size for r in records] == [1, 3]


def test_a_run_batch_that_raises_fails_its_batch_and_the_next_batch_runs():
    def broken(payloads):
        if 13 in payloads:
            raise RuntimeError("kernel exploded")
        return doubled(payloads)

    async def main():
        held = Held()
        held.gate.set()
        batcher, _, _ = make(held, run_batch=broken, max_batch_size=8)
        bad = await asyncio.gather(batcher.submit(13, 1), batcher.submit(1, 1), return_exceptions=True)
        good = await batcher.submit(5, 1)
        await batcher.close()
        return bad, good

    bad, good = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "kernel exploded" in str(e) for e in bad)
    assert good == 10


def test_a_full_queue_refuses_with_queue_full_and_the_queued_items_still_run():
    async def main():
        held = Held()
        batcher, _, _ = make(held, max_batch_size=8, max_queue_size=2)
        first = await hold_first(batcher, held)
        queued = [asyncio.create_task(batcher.submit(i, size=1)) for i in (1, 2)]
        await settle()
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(3, size=1)
        held.gate.set()
        results = await asyncio.gather(first, *queued)
        await batcher.close()
        return refused.value, results

    refused, results = asyncio.run(main())
    assert results == [0, 2, 4]
    assert refused.retry_after_s >= 1 and "has 2 requests queued (its batching.max_queue_size)" in str(refused)


def test_an_item_queued_past_its_timeout_fails_and_the_others_are_served():
    async def main():
        held = Held()
        batcher, _, batches = make(held, max_batch_size=8)
        first = await hold_first(batcher, held)
        patient = asyncio.create_task(batcher.submit(1, size=1))
        with pytest.raises(BatchQueueTimeout) as timed_out:
            await batcher.submit(2, size=1, timeout_s=0.05)
        assert batcher.num_queued == 1
        held.gate.set()
        results = await asyncio.gather(first, patient)
        await batcher.close()
        return timed_out.value, results, batches

    timed_out, results, batches = asyncio.run(main())
    assert "waited 0.05 s in the queue of model `m`" in str(timed_out)
    assert results == [0, 2] and batches == [[0], [1]]


def test_a_cancelled_item_leaves_the_queue_and_its_batch_forms_without_it():
    async def main():
        held = Held()
        batcher, _, batches = make(held, max_batch_size=8)
        first = await hold_first(batcher, held)
        tasks = [asyncio.create_task(batcher.submit(i, size=1)) for i in (1, 2, 3)]
        await settle()
        tasks[1].cancel()  # its client disconnected
        await settle()
        queued = batcher.num_queued
        held.gate.set()
        results = await asyncio.gather(first, tasks[0], tasks[2])
        await batcher.close()
        return queued, results, batches, tasks[1].cancelled()

    queued, results, batches, cancelled = asyncio.run(main())
    assert cancelled and queued == 2
    assert results == [0, 2, 6] and batches == [[0], [1, 3]]


def test_instances_run_that_many_batches_at_once():
    async def main():
        held = Held()
        batcher, records, _ = make(held, max_batch_size=2, instances=2)
        tasks = [asyncio.create_task(batcher.submit(i, size=1)) for i in range(6)]
        while held.num_waiting < 2:
            await asyncio.sleep(0)
        await settle()
        running_at_once = held.num_waiting
        held.gate.set()
        await asyncio.gather(*tasks)
        await batcher.close()
        return running_at_once, records

    running_at_once, records = asyncio.run(main())
    assert running_at_once == 2
    assert [r.batch_size for r in records] == [2, 2, 2]


def test_batches_run_on_the_compute_thread_and_land_in_the_metrics():
    compute = ComputeLoop().start()
    threads = []
    metrics = ServerMetrics()

    def run(payloads):
        threads.append(threading.current_thread())
        return [p * 3 for p in payloads]

    async def main():
        batcher = DynamicBatcher(
            "minilm",
            run,
            BatchingConfig(max_batch_size=4, max_queue_delay_ms=1.0),
            compute_loop_executor(compute),
            on_batch=lambda record: metrics.observe_batch("minilm", record),
        )
        results = await asyncio.gather(*(batcher.submit(i, size=1) for i in range(4)))
        await batcher.close()
        return results

    try:
        assert asyncio.run(main()) == [0, 3, 6, 9]
    finally:
        compute.stop()
    assert threads and all(t.name == "ladle-compute" for t in threads)
    text = generate_latest(metrics.registry).decode()
    assert 'ladle_batch_size_count{model_name="minilm"}' in text
    assert 'ladle_batch_queue_time_seconds_count{model_name="minilm"} 4.0' in text
    assert 'ladle_batch_compute_time_seconds_count{model_name="minilm"}' in text


def test_close_fails_the_queued_items():
    async def main():
        held = Held()
        batcher, _, _ = make(held, max_batch_size=8)
        first = await hold_first(batcher, held)
        queued = asyncio.create_task(batcher.submit(1, size=1))
        await settle()
        closing = asyncio.create_task(batcher.close())
        await settle()
        held.gate.set()
        await closing
        return await asyncio.gather(first, queued, return_exceptions=True)

    first, queued = asyncio.run(main())
    assert first == 0 and "was unloaded" in str(queued)


def test_a_thread_pool_executor_runs_batches_on_its_workers():
    import concurrent.futures

    from ladle.engine.batcher import thread_pool_executor

    threads = []

    def run(payloads):
        threads.append(threading.current_thread().name)
        return [p + 1 for p in payloads]

    async def main(pool):
        batcher = DynamicBatcher("onnx", run, BatchingConfig(max_batch_size=2, instances=2), thread_pool_executor(pool))
        results = await asyncio.gather(*(batcher.submit(i, size=1) for i in range(6)))
        await batcher.close()
        return results

    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="instance") as pool:
        assert asyncio.run(main(pool)) == [1, 2, 3, 4, 5, 6]
    assert len(threads) == 3 and all(name.startswith("instance") for name in threads)
