"""Where prepare-data's work runs: a Ray Data pipeline over a Ray's CPUs (a private local Ray by default, or the
cluster at --address), or this process (`workers=0`). The same functions run either way, and what they write
is a function of the data and the seed alone, so the shards are the same byte for byte whatever runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from ercstudy.trainables.shards import DataError


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

    def task(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for i in batch["item"]:
            for record in fn(items[int(i)]):
                yield {"record": np.array([record], dtype=object)}

    ds = ray.data.from_items([{"item": i} for i in range(len(items))], override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(task, batch_size=1, num_cpus=1, concurrency=workers)
    try:
        for row in ds.iter_rows():
            yield row["record"]
    except Exception as err:  # a task's DataError (a file that is not what its name says) reaches here wrapped
        cause = data_error(err)
        if cause is None:
            raise
        raise cause from None


def data_error(err: BaseException | None) -> DataError | None:
    """The DataError an exception was raised from, if one was (Ray wraps a task's error, maybe more than once)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # a RayTaskError: the task's own exception
        if isinstance(err, DataError) and not isinstance(cause, BaseException):
            return err
        err = cause if isinstance(cause, BaseException) else (err.__cause__ or err.__context__)
    return None


def describe(address: str | None, workers: int | None) -> str:
    where = f"the Ray cluster at {address}" if address else "a local Ray"
    return "this process" if workers == 0 else f"{where} ({'all its CPUs' if workers is None else f'{workers} worker(s)'})"

