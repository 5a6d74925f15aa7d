"""The throttle filter on trio's fake clock: it never exceeds a limit over any window, it is
not stricter than the limit, groups share one budget, and retuning applies to waiting
requests at once. No test here waits in real time."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing
from blkfs_drivers.throttle import ThrottleGroup, parse_limits
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer

KiB, MiB = 1 << 10, 1 << 20


def run_on_fake_clock(fn, *args):
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def limits(bps: int, peak: int = 0, length: float = 1.0) -> dict:
    values = {
        f"limits.{name}{suffix}": default
        for name in ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
        for suffix, default in (("", 0), ("-max", 0), ("-max-length", 1.0))
    }
    values.update(
        {
            "limits.bps-total": bps,
            "limits.bps-total-max": peak,
            "limits.bps-total-max-length": length,
        }
    )
    return values


requests = st.lists(
    st.tuples(
        st.sampled_from(("read", "write")),
        st.integers(1, 256 * KiB),  # bytes
        st.floats(0, 3, allow_nan=False),
    ),  # arrival (s)
    min_size=1,
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(
    requests,
    st.integers(64 * KiB, 8 * MiB),
    st.sampled_from((0, 2, 4)),
    st.sampled_from((1.0, 0.5, 3.0)),
)
def test_admissions_never_exceed_the_rate_over_any_window(
    batch: list[tuple[str, int, float]], rate: int, burst_factor: int, length: float
) -> None:
    peak = rate * burst_factor
    config = parse_limits(limits(rate, peak, length if peak else 1.0))
    capacity = config["bps-total"][1]
    admitted = run_on_fake_clock(admit_all, config, batch)
    assert len(admitted) == len(batch)
    allowance = max(capacity, *(cost for _, cost in admitted))
    times = sorted(admitted)
    for i, (start, _) in enumerate(times):
        total = 0
        for end, cost in times[i:]:
            total += cost
            assert total <= allowance + rate * (end - start) + 1e-6 * rate


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.integers(4 * KiB, 1 * MiB), st.integers(64 * KiB, 16 * MiB))
def test_a_backlog_drains_at_the_rate_not_slower(count: int, size: int, rate: int) -> None:
    config = parse_limits(limits(rate))
    capacity = config["bps-total"][1]
    admitted = run_on_fake_clock(admit_all, config, [("read", size, 0.0)] * count)
    finish = max(when for when, _ in admitted)
    # the last request goes once the bucket holds what it needs (a full bucket lets an
    # oversized request through, in debt)
    ideal = max(0.0, ((count - 1) * size + min(size, capacity) - capacity) / rate)
    assert ideal - 1e-6 <= finish <= ideal + 1e-6


async def admit_all(config: dict, batch: list[tuple[str, int, float]]) -> list[tuple[float, int]]:
    group = ThrottleGroup("g")
    group.configure(config)
    admitted: list[tuple[float, int]] = []

    async def one(kind: str, nbytes: int, arrival: float) -> None:
        await trio.sleep(arrival)
        await group.admit(kind, nbytes)  # type: ignore[arg-type]
        admitted.append((trio.current_time(), nbytes))

    async with trio.open_nursery() as nursery:
        for request in batch:
            nursery.start_soon(one, *request)
    return admitted


async def test_a_throttled_backend_reads_at_the_limit(autojump_clock) -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d", "driver=throttle,node-name=t,limits.bps-read=1M,file.driver=null,file.size=64M"
        )
        start = trio.current_time()
        for offset in range(0, 8 * MiB, 256 * KiB):
            await backend.read(offset, 256 * KiB)
        elapsed = trio.current_time() - start
        assert 7 * 0.99 <= elapsed <= 8.0  # 8 MiB at 1 MiB/s, less the 0.1 s burst
        info = (await backend.status())["tree"]["info"]
        assert info["throttled-requests"] > 0 and info["throttled-ns"] > 6e9
        assert info["limits"] == {"bps-read": MiB}
    finally:
        await layer.close()


async def test_a_group_shares_one_budget_between_backends(autojump_clock) -> None:
    layer = BlockLayer()
    try:
        a = await layer.create(
            "a", "driver=throttle,throttle-group=g,limits.bps-total=1M,file.driver=null"
        )
        b = await layer.create("b", "driver=throttle,throttle-group=g,file.driver=null")
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for backend in (a, b):
                nursery.start_soon(read_all, backend, 4 * MiB)
        assert trio.current_time() - start >= 8 * 0.98  # 8 MiB in all, at 1 MiB/s
        assert (await b.status())["tree"]["info"]["limits"] == {"bps-total": MiB}
    finally:
        await layer.close()


async def read_all(backend, total: int) -> None:
    for offset in range(0, total, 128 * KiB):
        await backend.read(offset, 128 * KiB)


async def test_retuning_applies_to_requests_already_waiting(autojump_clock) -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d", "driver=throttle,node-name=t,limits.bps-read=1k,file.driver=null"
        )
        await backend.read(0, 100)  # empties the 100-byte burst
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.read, 0, MiB)  # ~17 min at 1 KiB/s
            await trio.sleep(1)
            await layer.reopen("t", "limits.bps-read=10M")
        assert trio.current_time() - start < 1.2
    finally:
        await layer.close()


@pytest.mark.parametrize(
    "options, words",
    [
        ("limits.bps-write-max=2M", "needs limits.bps-write"),
        ("limits.bps-read=2M,limits.bps-read-max=1M", "lower than"),
        ("limits.bps-total=1M,limits.bps-write=1M", "cannot be combined"),
        ("limits.iops-read=10,limits.iops-read-max-length=5", "needs limits.iops-read-max"),
        ("limits.bps-read=fast", "bps-read"),
    ],
)
async def test_bad_limits_fail_and_change_nothing(options: str, words: str) -> None:
    layer = BlockLayer()
    try:
        with pytest.raises(BlockError) as failure:
            await layer.create("d", f"driver=throttle,{options},file.driver=null")
        assert failure.value.errno == errno.EINVAL and words in failure.value.message
        assert "d" not in layer and not layer.graph.nodes
        await layer.create("d", "driver=throttle,node-name=t,limits.bps-read=1M,file.driver=null")
        with pytest.raises(BlockError) as failure:
            await layer.reopen("t", options)
        assert failure.value.errno == errno.EINVAL and words in failure.value.message
        assert (await layer.find("d").status())["tree"]["info"]["limits"] == {"bps-read": MiB}
    finally:
        await layer.close()
