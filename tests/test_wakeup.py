import asyncio

from forwarder.wakeup import Wakeup


async def test_wait_returns_true_when_set_and_false_on_timeout():
    w = Wakeup()
    assert await w.wait(0.01) is False
    waiter = asyncio.ensure_future(w.wait(5.0))
    await asyncio.sleep(0)
    w.set()
    assert await waiter is True
    assert await w.wait(0.0) is True  # stays set until cleared
    w.clear()
    assert await w.wait(0.0) is False  # cleared: a wait times out again


async def test_a_cancelled_waiter_leaves_nothing_behind():
    w = Wakeup()
    waiter = asyncio.ensure_future(w.wait(None))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert w._waiters == []  # its future is not kept (nor resolved by the next set)
    w.set()
