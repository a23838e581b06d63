"""The server's per-request work off the event loop (issue 25): `Offload` keeps its worker threads (no thread
start per request, which blocked the event loop until the new thread held the GIL) and keeps its bounds:
at most `workers` at once, an overrunning worker holding its slot until it returns, errors handed back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from evotok_cli.serve.offload import Offload


def test_requests_reuse_the_workers_and_start_no_thread_each():
    offload = Offload(2)
    seen: list[threading.Thread] = []  # the thread objects themselves: an ident can be reused by the OS

    def work() -> int:
        seen.append(threading.current_thread())
        return len(seen)

    async def main() -> tuple[list[int], int]:
        first = [await offload.run(work, 5.0) for _ in range(3)]
        starts = [0]
        original = threading.Thread.start

        def counting(self: threading.Thread) -> None:
            starts[0] += 1
            original(self)

        threading.Thread.start = counting  # type: ignore[method-assign]
        try:
            rest = await asyncio.gather(*(offload.run(work, 5.0) for _ in range(20)))
        finally:
            threading.Thread.start = original  # type: ignore[method-assign]
        return first + list(rest), starts[0]

    results, starts = asyncio.run(main())
    assert sorted(results) == list(range(1, 24))
    assert starts == 0
    assert len(set(map(id, seen))) <= 2 and all(t.name == "evotok-prepare" and t.daemon for t in seen)


def test_an_error_is_raised_to_its_caller_and_the_worker_serves_on():
    offload = Offload(1)

    def bad() -> None:
        raise ValueError("no such template")

    async def main() -> str:
        with pytest.raises(ValueError, match="no such template"):
            await offload.run(bad, 5.0)
        return await offload.run(lambda: "next", 5.0)

    assert asyncio.run(main()) == "next"


def test_an_overrunning_worker_keeps_its_slot_until_it_returns():
    offload = Offload(1)
    release = threading.Event()

    async def main() -> list[str]:
        outcomes = []
        with pytest.raises(asyncio.TimeoutError):
            await offload.run(lambda: release.wait(10), 0.2)  # its caller gives up; the worker does not
        outcomes.append("first timed out")
        with pytest.raises(asyncio.TimeoutError):
            await offload.run(lambda: "never ran", 0.2)  # no free worker within its budget
        outcomes.append("second found no worker")
        release.set()
        outcomes.append(await offload.run(lambda: "third ran", 5.0))
        return outcomes

    assert asyncio.run(main()) == ["first timed out", "second found no worker", "third ran"]
