"""The study's report relay (study/relay.py): a one-slot channel per trial, as the trials use it."""

import asyncio

from ercstudy.platform.study.relay import ReportRelay


def test_an_offer_lands_once_the_slot_is_free_and_channels_do_not_mix():
    async def scenario():
        relay = ReportRelay()
        assert await relay.offer("a", 1, 1.0)
        assert not await relay.offer("a", 2, 0.05)  # the slot is full: the offer times out, nothing waits in the relay
        second = asyncio.create_task(relay.offer("a", 2, 1.0))
        await asyncio.sleep(0.05)
        assert not second.done()
        assert await relay.get("b", 0.01) == (False, None)  # another trial's channel is empty
        assert await relay.get("a", 1.0) == (True, 1)
        assert await asyncio.wait_for(second, 1.0)  # taken: the waiting offer lands
        assert await relay.get("a", 1.0) == (True, 2)
        assert await relay.get("a", 0.05) == (False, None)

    asyncio.run(scenario())


def test_a_get_without_waiting_still_takes_a_waiting_item_and_close_drops_a_channel():
    """What the trial does once its Train run has ended: what is left is taken, even with no time to wait. What the
    driver does when a trial ends: its channel goes, with what it still held (a trial that ASHA stopped)."""

    async def scenario():
        relay = ReportRelay()
        assert await relay.get("a", 0.0) == (False, None)
        await relay.offer("a", "last", 1.0)
        assert await relay.get("a", 0.0) == (True, "last")
        await relay.offer("a", "never read", 1.0)
        await relay.close("a")
        assert "a" not in relay.slots

    asyncio.run(scenario())
