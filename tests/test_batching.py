"""Group commit (esp.batching): what arrives during a batch goes in the next one, and every item
gets its own outcome."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from esp.batching import Batcher


class Gate:
    """A process function whose batches finish when the test says so."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.pending: list[Deferred[None]] = []

    async def process(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        gate: Deferred[None] = Deferred()
        self.pending.append(gate)
        await gate
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    def release(self) -> None:
        self.pending.pop(0).callback(None)


@pytest_twisted.ensureDeferred
async def test_items_arriving_during_a_batch_share_the_next_one() -> None:
    gate = Gate()
    batcher: Batcher[int, int] = Batcher(gate.process, limit=3)
    first = batcher.submit(0)
    assert gate.batches == [[0]]  # idle: a lone item starts at once
    later = [batcher.submit(i) for i in (2, 4, 6, 8)]
    assert gate.batches == [[0]]  # waiting for the batch in progress
    gate.release()
    assert await first == 0
    assert gate.batches == [[0], [2, 4, 6]]  # the limit holds
    gate.release()
    gate.release()
    assert gate.batches == [[0], [2, 4, 6], [8]]
    assert [await d for d in later] == [20, 40, 60, 80]
    assert batcher.pending == 0


@pytest_twisted.ensureDeferred
async def test_each_item_fails_or_succeeds_on_its_own() -> None:
    gate = Gate()
    batcher: Batcher[int, int] = Batcher(gate.process)
    gate_first = batcher.submit(0)
    waiting = [batcher.submit(i) for i in (1, 2, 3)]
    gate.release()
    await gate_first
    gate.release()
    results = await DeferredList(waiting, consumeErrors=True)
    assert [ok for ok, _ in results] == [False, True, False]
    assert results[1][1] == 20
    assert str(results[0][1].value) == "odd 1"


@pytest_twisted.ensureDeferred
async def test_a_failing_batch_fails_its_items_and_the_next_batch_still_runs() -> None:
    calls: list[list[str]] = []

    async def process(items: list[str]) -> list[str | BaseException]:
        calls.append(items)
        if "boom" in items:
            raise RuntimeError("storage is down")
        return [s.upper() for s in items]

    batcher: Batcher[str, str] = Batcher(process)
    with pytest.raises(RuntimeError, match="storage is down"):
        await batcher.submit("boom")
    assert await batcher.submit("fine") == "FINE"
    assert calls == [["boom"], ["fine"]]


@pytest_twisted.ensureDeferred
async def test_a_waiter_that_submits_again_is_served() -> None:
    # An SMTP session answers 250 and, pipelined, delivers its next message from inside the
    # callback: the batcher must not lose that item.
    seen: list[list[int]] = []

    async def process(items: list[int]) -> list[int | BaseException]:
        seen.append(items)
        return list(items)

    batcher: Batcher[int, int] = Batcher(process)
    again: list[Deferred[int]] = []

    def resubmit(value: int) -> int:
        if value < 3:
            again.append(batcher.submit(value + 1).addCallback(resubmit))
        return value

    assert await batcher.submit(0).addCallback(resubmit) == 0
    assert sorted([await d for d in again]) == [1, 2, 3]
    assert seen == [[0], [1], [2], [3]]
