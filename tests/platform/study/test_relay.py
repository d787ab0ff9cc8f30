"""The study's report relay (study/relay.py): a one-slot channel per trial, as the trials use it."""

import asyncio

from ercstudy.platform.study.relay import ReportRelay


def test_a_put_waits_until_the_slot_is_taken_and_channels_do_not_mix():
    async def scenario():
        relay = ReportRelay()
        await relay.put("a", 1)
        second = asyncio.create_task(relay.put("a", 2))  # the slot is full: this put waits
        await asyncio.sleep(0.05)
        assert not second.done()
        assert await relay.get("b", 0.01) == (False, None)  # another trial's channel is empty
        assert await relay.get("a", 1.0) == (True, 1)
        await asyncio.wait_for(second, 1.0)  # taken: the waiting put lands
        assert await relay.get("a", 1.0) == (True, 2)
        assert await relay.get("a", 0.05) == (False, None)

    asyncio.run(scenario())


def test_a_get_without_waiting_still_takes_a_waiting_item():
    """What the trial does once its Train run has ended: what is left is taken, even with no time to wait."""

    async def scenario():
        relay = ReportRelay()
        assert await relay.get("a", 0.0) == (False, None)
        await relay.put("a", "last")
        assert await relay.get("a", 0.0) == (True, "last")
        await relay.close("a")
        assert "a" not in relay.slots

    asyncio.run(scenario())
