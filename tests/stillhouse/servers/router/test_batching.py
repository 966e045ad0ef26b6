"""The router's coalescer: concurrent callers share rounds, each gets its own results back in
order, an error fails only its round, and a caller that has gone is left out."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from stillhouse.servers.router.batching import Coalescer


def test_callers_that_arrive_together_share_one_inline_round() -> None:
    rounds: list[list[int]] = []

    def work(values: list[int]) -> list[int]:
        rounds.append(values)
        return [v * 10 for v in values]

    async def main() -> list[list[int]]:
        coalescer: Coalescer[int, int] = Coalescer(work, inline=True)
        return await asyncio.gather(*(coalescer([n, n + 100]) for n in range(5)))

    results = asyncio.run(main())
    assert results == [[n * 10, (n + 100) * 10] for n in range(5)]
    assert len(rounds) == 1 and sorted(rounds[0]) == sorted(
        v for n in range(5) for v in (n, n + 100)
    )


def test_a_round_is_capped_and_the_rest_go_in_the_next() -> None:
    sizes: list[int] = []

    def work(values: list[int]) -> list[int]:
        sizes.append(len(values))
        return values

    async def main() -> list[list[int]]:
        coalescer: Coalescer[int, int] = Coalescer(work, inline=True, max_values=4)
        return await asyncio.gather(*(coalescer([n] * 3) for n in range(4)), coalescer([9] * 7))

    results = asyncio.run(main())
    assert results == [[n] * 3 for n in range(4)] + [[9] * 7]
    # Callers are never split: 3 (+3 would be 6 > 4), 3, 3, 3, then the one of 7 alone.
    assert sizes == [3, 3, 3, 3, 7]


def test_threaded_rounds_overlap_up_to_max_rounds_and_batch_while_busy() -> None:
    in_flight, most, sizes = 0, 0, []
    lock = threading.Lock()

    def work(values: list[int]) -> list[int]:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
            sizes.append(len(values))
        time.sleep(0.05)
        with lock:
            in_flight -= 1
        return [-v for v in values]

    async def main() -> list[list[int]]:
        coalescer: Coalescer[int, int] = Coalescer(work, inline=False, max_values=5, max_rounds=2)

        async def one(n: int) -> list[int]:
            await asyncio.sleep(0.001 * n)  # arriving over the first rounds
            return await coalescer([n])

        return await asyncio.gather(*(one(n) for n in range(40)))

    results = asyncio.run(main())
    assert results == [[-n] for n in range(40)]
    assert most == 2 and sum(sizes) == 40 and max(sizes) == 5
    assert len(sizes) < 40  # those that arrived while two rounds were busy were batched


def test_an_error_fails_its_round_only() -> None:
    def work(values: list[int]) -> list[int]:
        if 13 in values:
            raise ValueError("unlucky")
        return values

    async def main() -> tuple[object, list[int]]:
        coalescer: Coalescer[int, int] = Coalescer(work, inline=True, max_values=1)
        bad, good = await asyncio.gather(coalescer([13]), coalescer([1]), return_exceptions=True)
        return bad, good  # type: ignore[return-value]

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and good == [1]


def test_a_caller_that_has_gone_is_left_out_of_the_round() -> None:
    seen: list[list[int]] = []

    def work(values: list[int]) -> list[int]:
        seen.append(values)
        return values

    async def main() -> list[int]:
        coalescer: Coalescer[int, int] = Coalescer(work, inline=True)
        gone = asyncio.ensure_future(coalescer([1]))
        kept = asyncio.ensure_future(coalescer([2]))
        await asyncio.sleep(0)  # both are waiting now
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    assert asyncio.run(main()) == [2]
    assert seen == [[2]]


def test_a_short_answer_from_work_is_an_error_not_a_wrong_result() -> None:
    async def main() -> None:
        coalescer: Coalescer[int, int] = Coalescer(lambda values: values[:-1], inline=True)
        with pytest.raises(RuntimeError, match="fewer results"):
            await coalescer([1, 2])

    asyncio.run(main())
