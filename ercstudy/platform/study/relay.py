"""The study's report relay: one Ray actor through which every trial's Train controller hands its reports to the
trial's Tune actor (trial.tune_trial), a one-slot channel per trial.

One actor for the whole study, not a queue actor per trial: on a small machine each Ray actor is a process that
imports Ray (about 1.6 s of CPU), and a study starts its trials several at once. The actor is named in the driver's
Ray namespace, created by the driver before the Tune run (`start`) and found by the trials (`channel`); it holds no
CPU and lives on the head node, with the trials' Tune actors, so that a lost worker node takes none of the reports.

This module imports only the standard library: the actor's process imports nothing else of the project.
"""

from __future__ import annotations

import asyncio
from typing import Any

NAME = "ercstudy-report-relay"


class ReportRelay:
    """A one-slot channel per key: `put` returns once the slot has taken the item (so Train waits until Tune has
    taken the previous report, as Ray's own callback does), `get` waits up to `timeout` seconds for one."""

    def __init__(self) -> None:
        self.slots: dict[str, asyncio.Queue] = {}

    def _slot(self, key: str) -> asyncio.Queue:
        return self.slots.setdefault(key, asyncio.Queue(maxsize=1))

    async def put(self, key: str, item: Any) -> None:
        await self._slot(key).put(item)

    async def get(self, key: str, timeout: float) -> tuple[bool, Any]:
        slot = self._slot(key)
        if timeout <= 0:  # wait_for(..., 0) cancels the get before it runs, even with an item waiting
            return (True, slot.get_nowait()) if not slot.empty() else (False, None)
        try:
            return True, await asyncio.wait_for(slot.get(), timeout)
        except TimeoutError:
            return False, None

    async def close(self, key: str) -> None:
        self.slots.pop(key, None)


def start(pin: dict[str, float]) -> Any:
    """The study's relay (created once per driver; a second study in the same driver shares it). pin: the resource
    request that places it on the head node (capacity.head_pin)."""
    import ray

    return ray.remote(ReportRelay).options(name=NAME, get_if_exists=True, num_cpus=0, resources=pin).remote()


class Channel:
    """One trial's slot of the relay, with the put/get/empty of a queue (what ReportQueueCallback and tune_trial use);
    picklable, so that it travels to the trial's Train controller."""

    def __init__(self, key: str, relay: Any = None):
        import ray

        self.key, self.relay = key, relay or ray.get_actor(NAME)

    def put(self, item: Any) -> None:
        import ray

        ray.get(self.relay.put.remote(self.key, item))

    def get(self, timeout: float) -> tuple[bool, Any]:
        import ray

        return ray.get(self.relay.get.remote(self.key, timeout))

    def close(self) -> None:
        self.relay.close.remote(self.key)
