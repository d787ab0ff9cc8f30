"""Where prepare-data's work runs: a Ray Data pipeline over a Ray's CPUs (a private local Ray by default, or the
cluster at --address), or this process (`workers=0`). The same functions run either way, and what they write
is a function of the data and the seed alone, so the shards are the same byte for byte whatever runs them.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from typing import Any

from ercstudy.trainables.shards import DataError

ERROR = "error"  # a record that carries a task's DataError


def run(fn: Callable[[Any], Iterator[dict[str, Any]]], items: list[Any], *, workers: int | None) -> Iterator[dict[str, Any]]:
    """Every record that fn(item) yields, for every item, as they come: items in order in this process
    (workers 0); otherwise one Ray Data task per item, at most `workers` at once (None: as many as the CPUs)."""
    if workers == 0:
        for item in items:
            yield from fn(item)
        return
    yield from ray_data(fn, items, workers)


def ray_data(fn: Callable[[Any], Iterator[dict[str, Any]]], items: list[Any], workers: int | None) -> Iterator[dict[str, Any]]:
    import numpy as np
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # prepare-data's own bar counts documents and tokens
    context.print_on_execution_start = False
    # Ray Data reserves half the CPUs of each operator for the ones downstream; this pipeline's one map has none, and
    # the reservation kept its second task waiting a second at the start (8.9 -> 8.0 s on 2 CPUs, 32 MB)
    context.op_resource_reservation_enabled = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    # items and records travel pickled, as bytes: Ray Data would otherwise make Arrow structs of the dicts (filling
    # the keys a record lacks with None) or warn as it falls back to pickling them itself
    def task(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for item in batch["item"]:  # each task gets its own item, not the list of them all
            try:
                for record in fn(pickle.loads(item)):
                    yield {"record": np.array([pickle.dumps(record)], dtype=object)}
            except DataError as err:  # an input that is not what it seemed: a line for the driver to say
                yield {"record": np.array([pickle.dumps({ERROR: str(err)})], dtype=object)}
                return

    ds = ray.data.from_items([{"item": pickle.dumps(item)} for item in items], override_num_blocks=max(1, len(items)))
    for row in ds.map_batches(task, batch_size=1, num_cpus=1, concurrency=workers).iter_rows():
        record = pickle.loads(row["record"])
        if ERROR in record:
            raise DataError(record[ERROR])
        yield record


def describe(address: str | None, workers: int | None) -> str:
    where = f"the Ray cluster at {address}" if address else "a local Ray"
    return "this process" if workers == 0 else f"{where} ({'all its CPUs' if workers is None else f'{workers} worker(s)'})"

