"""The study's report relay: one Ray actor through which every trial's Train controller hands its reports to the
trial's Tune actor (trial.tune_trial), a one-slot channel per trial.

One actor for the whole study, not a queue actor per trial: on a small machine each Ray actor is a process that
imports Ray (about 1.6 s of CPU), and a study starts its trials several at once. The driver creates it before the Tune
run (`start`), named after the study's trial storage, and the trials find it by that name (`Channel`); it holds no
CPU and lives on the head node, with the trials' Tune actors, so that a lost worker node takes none of the reports.

A trial's controller offers each report for at most OFFER_S at a time and offers again until the slot takes it: a
controller that dies with its trial (ASHA stops it) leaves no call waiting in the relay, and the driver closes the
trial's channel when the trial ends (`close`), dropping what it still held.

This module imports only the standard library: the actor's process imports nothing else of the project.
"""

from __future__ import annotations

import asyncio
from typing import Any

NAME = "ercstudy-report-relay"
OFFER_S = 1.0


def actor_name(train_storage: str) -> str:
    """The relay of the study whose trials run under `train_storage` (its STORAGE/NAME/train)."""
    return f"{NAME}:{train_storage}"


def key(train_storage: str, name: str) -> str:
    """A trial's channel: its Ray Train run's storage and name."""
    return f"{train_storage}/{name}"


class ReportRelay:
    """A one-slot channel per key: `offer` puts an item once the slot is free (waiting up to `timeout` seconds),
    `get` takes one (waiting up to `timeout` seconds); `close` forgets a channel."""

    def __init__(self) -> None:
        self.slots: dict[str, asyncio.Queue] = {}

    def _slot(self, key: str) -> asyncio.Queue:
        return self.slots.setdefault(key, asyncio.Queue(maxsize=1))

    async def offer(self, key: str, item: Any, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._slot(key).put(item), timeout)
            return True
        except TimeoutError:
            return False

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


def start(train_storage: str, pin: dict[str, float]) -> Any:
    """The relay of a study (its handle keeps it alive). pin: the resource request that places it on the head node
    (capacity.head_pin)."""
    import ray

    return ray.remote(ReportRelay).options(name=actor_name(train_storage), get_if_exists=True, num_cpus=0,
                                           resources=pin).remote()


def close(train_storage: str, name: str) -> None:
    """Forget a trial's channel (the driver, when the trial ends); nothing to do once the relay is gone."""
    import ray

    try:
        ray.get_actor(actor_name(train_storage)).close.remote(key(train_storage, name))
    except ValueError:  # no such actor: the study is ending
        pass


class Channel:
    """One trial's slot of its study's relay (the trial's Train run: `name` under `train_storage`), with the put/get of
    a queue (what ReportQueueCallback and tune_trial use); picklable, so that it travels to the trial's Train
    controller."""

    def __init__(self, train_storage: str, name: str):
        import ray

        self.key, self.relay = key(train_storage, name), ray.get_actor(actor_name(train_storage))

    def put(self, item: Any) -> None:
        """Once the slot has taken `item` (Train waits until Tune has taken the previous report, as Ray's own
        callback does)."""
        import ray

        while not ray.get(self.relay.offer.remote(self.key, item, OFFER_S)):
            pass

    def get(self, timeout: float) -> tuple[bool, Any]:
        import ray

        return ray.get(self.relay.get.remote(self.key, timeout))

    def close(self) -> None:
        self.relay.close.remote(self.key)
