"""GroupQueue: what one thread takes from many, in groups."""

from __future__ import annotations

import threading

from esp.storage.groupqueue import GroupQueue


def test_a_group_is_everything_waiting_in_order_up_to_the_limit() -> None:
    queue: GroupQueue[int] = GroupQueue(32, lambda n: n)
    for size in (20, 10, 5, 40):
        assert queue.put(size)
    assert queue.take() == [20, 10]  # 35 would pass the limit
    assert queue.take() == [5]  # 45 would too
    assert queue.take() == [40]  # alone, over the limit: still taken


def test_closing_hands_out_what_waits_then_ends_and_refuses_more() -> None:
    queue: GroupQueue[int] = GroupQueue(32, lambda n: 1)
    queue.put(1)
    queue.put(2)
    queue.close()
    assert not queue.put(3)
    assert queue.take() == [1, 2]
    assert queue.take() is None


def test_a_taker_waiting_for_work_is_woken_by_close() -> None:
    queue: GroupQueue[int] = GroupQueue(32, lambda n: 1)
    taken: list[list[int] | None] = []
    taker = threading.Thread(target=lambda: taken.append(queue.take()))
    taker.start()
    queue.close()
    taker.join(30)
    assert not taker.is_alive() and taken == [None]
