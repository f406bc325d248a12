from __future__ import annotations

import asyncio

from forwarder.tasks import supervise


async def test_a_task_that_raises_is_reported_with_its_exception():
    crashes: list[BaseException] = []
    boom = ValueError("the loop's bookkeeping broke")

    async def crash() -> None:
        raise boom

    task = supervise(asyncio.create_task(crash()), crashes.append)
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
    assert crashes == [boom]


async def test_a_cancelled_task_is_not_a_crash():
    crashes: list[BaseException] = []
    started = asyncio.Event()

    async def wait_forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = supervise(asyncio.create_task(wait_forever()), crashes.append)
    await started.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert task.cancelled() and crashes == []


async def test_a_task_that_returns_is_not_a_crash_and_keeps_its_result():
    crashes: list[BaseException] = []

    async def finish() -> int:
        return 7

    task = supervise(asyncio.create_task(finish()), crashes.append)
    assert await task == 7
    await asyncio.sleep(0)
    assert crashes == []
