"""The blkdebug filter through the backend API: error rules hit exactly the requests they
name, with the errno they name; delays are measured on trio's fake clock; dropped writes are
acknowledged and lost; a reopen replaces the rules or heals the disk, and a bad rule changes
nothing. No test here waits in real time."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.block.registry import default_registry
from blkfs.errors import BlockError
from blkfs.layer import BlockLayer

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
SIZE = 1 * MiB
NULL = f"image.driver=null,image.size={SIZE}"


async def failure(call: Any, *args: Any) -> int:
    """The errno ``call(*args)`` failed with, or 0 if it succeeded."""
    try:
        await call(*args)
    except BlockError as exc:
        return exc.errno
    return 0


async def info(backend: Any) -> dict[str, Any]:
    return (await backend.status())["tree"]["info"]


def run(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


# -- which requests a rule hits -------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling, code",
    [
        ("EIO", errno.EIO),
        ("enospc", errno.ENOSPC),
        ("28", errno.ENOSPC),
        ("5", errno.EIO),
        ("EROFS", errno.EROFS),
        (None, errno.EIO),
    ],
)
async def test_a_sector_rule_fails_only_requests_touching_that_sector(
    spelling: str | None, code: int
) -> None:
    layer = BlockLayer()
    try:
        rule = "inject-error.0.event=read,inject-error.0.sector=10"
        if spelling is not None:
            rule += f",inject-error.0.errno={spelling}"
        backend = await layer.create("d", f"driver=blkdebug,{rule},{NULL}")
        failing = [
            sector for sector in range(32) if await failure(backend.read, sector * SECTOR, SECTOR)
        ]
        assert failing == [10]
        assert await failure(backend.read, 10 * SECTOR, SECTOR) == code
        assert await failure(backend.read, 10 * SECTOR - 1, 2) == code  # straddles in
        assert await failure(backend.read, 11 * SECTOR - 1, 1) == code  # last byte
        assert await failure(backend.read, 0, 10 * SECTOR) == 0  # ends just before
        assert await failure(backend.read, 11 * SECTOR, 64 * KiB) == 0  # starts just after
        assert await failure(backend.read, 0, 64 * KiB) == code  # covers it
        assert await failure(backend.write, 10 * SECTOR, bytes(SECTOR)) == 0  # reads only
        assert (await info(backend))["injected-errors"] == 5
    finally:
        await layer.close()


async def run_requests(options: str, requests: list[tuple[str, int, int]]) -> list[int]:
    """The errno of each (kind, offset, length) request against a fresh blkdebug node."""
    layer = BlockLayer()
    try:
        backend = await layer.create("d", f"driver=blkdebug,{options},{NULL}")
        calls = {
            "read": backend.read,
            "write": lambda o, n: backend.write(o, bytes([1]) * n),
            "zero-write": backend.write_zeroes,
            "discard": backend.discard,
        }
        return [await failure(calls[kind], offset, length) for kind, offset, length in requests]
    finally:
        await layer.close()


KINDS = ("read", "write", "zero-write", "discard")
EVENT_OF = {"read": "read", "write": "write", "zero-write": "write", "discard": "discard"}
spans = st.integers(0, SIZE - 1).flatmap(
    lambda offset: st.tuples(st.just(offset), st.integers(1, min(64 * KiB, SIZE - offset)))
)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(("read", "write", "discard")),
    spans,
    st.lists(st.tuples(st.sampled_from(KINDS), spans), min_size=1, max_size=30),
)
def test_a_byte_range_rule_hits_exactly_the_requests_that_overlap_it(
    event: str, rule: tuple[int, int], batch: list[tuple[str, tuple[int, int]]]
) -> None:
    start, length = rule
    options = (
        f"inject-error.0.event={event},inject-error.0.offset={start},"
        f"inject-error.0.length={length},inject-error.0.errno=EMEDIUMTYPE"
    )
    requests = [(kind, offset, size) for kind, (offset, size) in batch]
    got = run(run_requests, options, requests)
    expected = [
        errno.EMEDIUMTYPE
        if EVENT_OF[kind] == event and offset < start + length and start < offset + size
        else 0
        for kind, offset, size in requests
    ]
    assert got == expected


async def test_each_event_kind_fails_only_its_own_requests() -> None:
    for event, fails in [
        ("read", {"read"}),
        ("write", {"write", "zero-write"}),
        ("discard", {"discard"}),
        ("flush", {"flush"}),
    ]:
        layer = BlockLayer()
        try:
            backend = await layer.create(
                "d",
                f"driver=blkdebug,node-name=dbg,inject-error.0.event={event},"
                f"inject-error.0.errno=EPIPE,{NULL}",
            )
            got = {
                "read": await failure(backend.read, 0, 4096),
                "write": await failure(backend.write, 0, b"x" * 4096),
                "zero-write": await failure(backend.write_zeroes, 0, 4096),
                "discard": await failure(backend.discard, 0, 4096),
                "flush": await failure(backend.flush),
            }
            assert {kind for kind, code in got.items() if code} == fails, event
            assert set(got.values()) == {0, errno.EPIPE}
            await layer.reopen("dbg", "inject-error=none")  # closing flushes
        finally:
            await layer.close()


async def test_a_flush_rule_with_a_range_never_matches_a_flush() -> None:
    """A flush has no range, so (as in QEMU) only a rule without one can fail it."""
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d", f"driver=blkdebug,inject-error.0.event=flush,inject-error.0.sector=0,{NULL}"
        )
        await backend.flush()
        assert (await info(backend))["injected-errors"] == 0
    finally:
        await layer.close()


async def test_once_fails_only_the_first_matching_request() -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=blkdebug,inject-error.0.event=write,inject-error.0.sector=4,"
            f"inject-error.0.once=on,inject-error.0.errno=ENOSPC,{NULL}",
            werror="report",
        )
        for _ in range(3):  # requests the rule does not match do not use it up
            assert await failure(backend.write, 0, bytes(SECTOR)) == 0
            assert await failure(backend.read, 4 * SECTOR, SECTOR) == 0
        assert await failure(backend.write, 4 * SECTOR, bytes(SECTOR)) == errno.ENOSPC
        for _ in range(3):
            assert await failure(backend.write, 4 * SECTOR, bytes(SECTOR)) == 0
        assert (await info(backend))["rules"] == [
            {"index": 0, "event": "write", "errno": "ENOSPC", "fired": 1}
        ]
    finally:
        await layer.close()


async def test_rules_are_checked_in_order_and_each_counts_its_own_hits() -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            "driver=blkdebug,"
            "inject-error.0.event=read,inject-error.0.sector=1,inject-error.0.errno=EIO,"
            "inject-error.1.event=read,inject-error.1.offset=0,inject-error.1.length=4k,"
            "inject-error.1.errno=ENXIO,"
            f"inject-error.2.event=write,inject-error.2.errno=EDQUOT,{NULL}",
        )
        assert await failure(backend.read, 0, SECTOR) == errno.ENXIO
        assert await failure(backend.read, 0, 2 * SECTOR) == errno.EIO  # rule 0 first
        assert await failure(backend.read, 4 * KiB, SECTOR) == 0
        assert await failure(backend.write, 64 * KiB, b"x") == errno.EDQUOT
        details = await info(backend)
        assert [rule["fired"] for rule in details["rules"]] == [1, 1, 1]
        assert details["injected-errors"] == 3
    finally:
        await layer.close()


# -- probability ----------------------------------------------------------------------------


async def failing_set(seed: int | None, probability: float = 0.3) -> set[int]:
    layer = BlockLayer()
    try:
        options = f"inject-error.0.event=read,inject-error.0.probability={probability}"
        if seed is not None:
            options += f",inject-error.0.seed={seed}"
        backend = await layer.create("d", f"driver=blkdebug,{options},{NULL}")
        failed = {block for block in range(200) if await failure(backend.read, block * 4096, 4096)}
        assert (await info(backend))["injected-errors"] == len(failed)
        return failed
    finally:
        await layer.close()


async def test_probability_with_a_seed_replays_the_same_failures() -> None:
    first, again = await failing_set(42), await failing_set(42)
    assert first == again
    assert 0.15 * 200 < len(first) < 0.45 * 200  # about 30 %, and deterministic
    assert await failing_set(43) != first
    assert await failing_set(None) == await failing_set(None)  # the default seed is fixed too
    assert await failing_set(7, probability=0) == set()
    assert await failing_set(7, probability=1) == set(range(200))


# -- delays ---------------------------------------------------------------------------------


async def test_delays_add_their_latency_per_request_kind(autojump_clock) -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=blkdebug,node-name=dbg,delay.read=10ms,delay.write=0.25s,"
            f"delay.flush=2,delay.discard=500us,{NULL}",
        )

        async def took(call: Any, *args: Any) -> float:
            start = trio.current_time()
            await call(*args)
            return trio.current_time() - start

        assert await took(backend.read, 0, 4096) == pytest.approx(0.010)
        assert await took(backend.write, 0, b"x" * 4096) == pytest.approx(0.25)
        assert await took(backend.write_zeroes, 0, 4096) == pytest.approx(0.25)
        assert await took(backend.flush) == pytest.approx(2.0)
        assert await took(backend.discard, 0, 4096) == pytest.approx(0.0005)
        # a delay is latency, not a queue (as dm-delay): 20 reads at once take 10 ms
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for block in range(20):
                nursery.start_soon(backend.read, block * 4096, 4096)
        assert trio.current_time() - start == pytest.approx(0.010)
        # a retuned delay applies to the next request
        await layer.reopen("dbg", "delay.read=3s")
        assert await took(backend.read, 0, 4096) == pytest.approx(3.0)
        assert await took(backend.write, 0, b"x") == pytest.approx(0.25)  # kept
    finally:
        await layer.close()


async def test_a_delayed_request_that_matches_a_rule_fails_after_the_delay(autojump_clock) -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d", f"driver=blkdebug,delay.read=1s,inject-error.0.event=read,{NULL}"
        )
        start = trio.current_time()
        assert await failure(backend.read, 0, 512) == errno.EIO
        assert trio.current_time() - start == pytest.approx(1.0)
    finally:
        await layer.close()


# -- dropped writes -------------------------------------------------------------------------


async def test_drop_writes_acknowledges_and_loses_writes_zero_writes_and_discards(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    original = bytes(range(256)) * (SIZE // 256)
    image.write_bytes(original)
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=blkdebug,node-name=dbg,drop-writes=on,image.driver=file,"
            f"image.filename={image}",
        )
        await backend.write(4096, b"lost" * 1024)
        await backend.write_zeroes(8192, 8192)
        await backend.discard(64 * KiB, 64 * KiB)
        await backend.flush()
        assert await backend.read(0, SIZE) == original
        assert image.read_bytes() == original
        assert (await info(backend))["dropped-writes"] == 3
        assert backend.stats.write.ops == 1 and backend.stats.errors == 0

        await layer.reopen("dbg", "drop-writes=off")
        await backend.write(4096, b"kept" * 1024)
        await backend.flush()
        assert image.read_bytes()[4096:8192] == b"kept" * 1024
        assert (await info(backend))["dropped-writes"] == 3
    finally:
        await layer.close()


# -- below a format -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "between", ["driver=blkdebug,image", "driver=throttle,limits.iops-total=100000,file"]
)
async def test_a_filter_between_a_format_and_its_host_file_lets_the_image_grow(
    tmp_path: Path, between: str
) -> None:
    """qcow2 appends clusters past the end of its file; a filter in between (QEMU's
    ``blkdebug:rules:image.qcow2``) must pass that on, as its host file allows it."""
    image = tmp_path / "disk.qcow2"
    with open(image, "xb") as f:
        default_registry().get("qcow2").create(f, 4 * MiB, {}, None, None)
    filt, role = between.rsplit(",", 1)
    inner = ",".join(f"file.{pair}" for pair in filt.split(","))
    options = f"driver=qcow2,{inner},file.{role}.driver=file,file.{role}.filename={image}"
    data = bytes(range(256)) * (3 * MiB // 256)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", options)
        await backend.write(512 * KiB, data)
        await backend.flush()
        assert await backend.read(512 * KiB, len(data)) == data
    finally:
        await layer.close()
    assert image.stat().st_size > len(data)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", f"{image},read-only=on")
        assert await backend.read(512 * KiB, len(data)) == data
    finally:
        await layer.close()


# -- reopen -----------------------------------------------------------------------------------


async def test_reopen_replaces_the_whole_rule_list_and_none_heals() -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            "driver=blkdebug,node-name=dbg,"
            "inject-error.0.event=read,inject-error.0.sector=1,"
            f"inject-error.1.event=write,inject-error.1.sector=2,{NULL}",
            werror="report",
        )

        async def failures() -> tuple[int, ...]:
            return (
                await failure(backend.read, 1 * SECTOR, SECTOR),
                await failure(backend.write, 2 * SECTOR, bytes(SECTOR)),
                await failure(backend.write, 5 * SECTOR, bytes(SECTOR)),
            )

        assert await failures() == (errno.EIO, errno.EIO, 0)
        # one rule given: the list is that rule alone, not a merge by index
        await layer.reopen(
            "dbg", "inject-error.0.event=write,inject-error.0.sector=5,inject-error.0.errno=ENOSPC"
        )
        assert await failures() == (0, 0, errno.ENOSPC)
        assert [r["event"] for r in (await info(backend))["rules"]] == ["write"]
        # other options leave the list alone
        await layer.reopen("dbg", "delay.read=0")
        assert await failures() == (0, 0, errno.ENOSPC)
        await layer.reopen("dbg", "inject-error=none")
        assert await failures() == (0, 0, 0)
        assert (await info(backend))["rules"] == []
        status = await backend.status()
        assert not any(key.startswith("inject-error") for key in status["tree"]["options"])
    finally:
        await layer.close()


async def test_a_reopen_of_other_options_keeps_the_rules_state() -> None:
    """A ``once`` rule that fired stays spent, and a seeded sequence goes on, when a reopen
    does not change the rule list: options not given keep their value."""
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=blkdebug,node-name=dbg,inject-error.0.event=read,"
            f"inject-error.0.once=on,{NULL}",
        )
        assert await failure(backend.read, 0, 512) == errno.EIO
        await layer.reopen("dbg", "delay.write=1ms")
        assert await failure(backend.read, 0, 512) == 0
        assert (await info(backend))["rules"][0]["fired"] == 1
        # the same list given again is no change either; a new list starts afresh
        await layer.reopen("dbg", "inject-error.0.event=read,inject-error.0.once=on")
        assert await failure(backend.read, 0, 512) == 0
        await layer.reopen(
            "dbg", "inject-error.0.event=read,inject-error.0.once=on,inject-error.0.errno=ENOSPC"
        )
        assert await failure(backend.read, 0, 512) == errno.ENOSPC
        assert await failure(backend.read, 0, 512) == 0
    finally:
        await layer.close()


@pytest.mark.parametrize(
    "options, words",
    [
        ("inject-error.0.sector=3", "inject-error.0.event is required"),
        ("inject-error.0.event=reed", "inject-error.0.event"),
        ("inject-error.0.event=read,inject-error.0.errno=EFOO", "inject-error.0.errno"),
        ("inject-error.0.event=read,inject-error.0.errno=0", "inject-error.0.errno"),
        ("inject-error.0.event=read,inject-error.0.errno=-5", "inject-error.0.errno"),
        ("inject-error.0.event=read,inject-error.0.sector=-1", "inject-error.0.sector"),
        (
            "inject-error.0.event=read,inject-error.0.sector=1,inject-error.0.offset=0",
            "inject-error.0: give .sector or .offset/.length",
        ),
        ("inject-error.0.event=read,inject-error.0.length=0", "inject-error.0.length"),
        ("inject-error.0.event=read,inject-error.0.probability=1.5", "inject-error.0.probability"),
        ("inject-error.0.event=read,inject-error.0.probability=nan", "inject-error.0.probability"),
        (
            "inject-error.0.event=read,inject-error.0.probability=often",
            "inject-error.0.probability",
        ),
        ("inject-error.0.event=read,inject-error.0.sectr=1", "inject-error.0.sectr"),
        ("inject-error.x.event=read", "inject-error.x.event"),
        ("inject-error.0.event=read,inject-error.0.once=twice", "inject-error.0.once"),
        ("delay.read=soon", "delay.read"),
        ("align=3", "align"),
        ("drop-writes=maybe", "drop-writes"),
    ],
)
async def test_bad_rules_fail_with_einval_naming_the_option_and_change_nothing(
    options: str, words: str
) -> None:
    layer = BlockLayer()
    try:
        with pytest.raises(BlockError) as failed:
            await layer.create("d", f"driver=blkdebug,{options},{NULL}")
        assert failed.value.errno == errno.EINVAL and words in failed.value.message
        assert "d" not in layer and not layer.graph.nodes

        backend = await layer.create(
            "d",
            f"driver=blkdebug,node-name=dbg,inject-error.0.event=read,"
            f"inject-error.0.sector=7,inject-error.0.errno=ENOSPC,{NULL}",
        )
        before = (await backend.status())["tree"]
        with pytest.raises(BlockError) as failed:
            await layer.reopen("dbg", options)
        assert failed.value.errno == errno.EINVAL and words in failed.value.message
        assert (await backend.status())["tree"]["options"] == before["options"]
        assert await failure(backend.read, 7 * SECTOR, SECTOR) == errno.ENOSPC
        assert await failure(backend.read, 3 * SECTOR, SECTOR) == 0
    finally:
        await layer.close()


# -- the option parser ----------------------------------------------------------------------


async def test_indexes_spelled_differently_are_different_rules() -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            "driver=blkdebug,inject-error.1.event=read,inject-error.1.sector=1,"
            f"inject-error.01.event=write,inject-error.01.sector=2,{NULL}",
        )
        assert await failure(backend.read, 1 * SECTOR, SECTOR) == errno.EIO
        assert await failure(backend.write, 2 * SECTOR, bytes(SECTOR)) == errno.EIO
        assert await failure(backend.read, 2 * SECTOR, SECTOR) == 0
        assert len((await info(backend))["rules"]) == 2
    finally:
        await layer.close()


rule_specs = st.fixed_dictionaries(
    {"event": st.sampled_from(("read", "write", "flush", "discard"))},
    optional={
        "errno": st.sampled_from(("EIO", "ENOSPC", "enxio", "28", "61")),
        "sector": st.integers(0, 2047),
        "once": st.booleans(),
        "probability": st.sampled_from((0, 0.5, 1)),
        "seed": st.integers(0, 2**31),
    },
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(0, 99), rule_specs, max_size=6))
def test_any_valid_rule_list_is_read_back_in_index_order(rules: dict[int, dict]) -> None:
    def spell(value: Any) -> str:
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    parts = [
        f"inject-error.{index}.{field}={spell(value)}"
        for index, spec in rules.items()
        for field, value in spec.items()
    ]

    async def opened() -> list[dict[str, Any]]:
        layer = BlockLayer()
        try:
            backend = await layer.create(
                "d", ",".join(["driver=blkdebug,node-name=dbg", *parts, NULL])
            )
            rules = (await info(backend))["rules"]
            await layer.reopen("dbg", "inject-error=none")  # closing flushes
            return rules
        finally:
            await layer.close()

    names = {
        "EIO": "EIO",
        "ENOSPC": "ENOSPC",
        "enxio": "ENXIO",
        "28": "ENOSPC",
        "61": errno.errorcode[61],
    }
    assert run(opened) == [
        {
            "index": index,
            "event": rules[index]["event"],
            "errno": names[rules[index].get("errno", "EIO")],
            "fired": 0,
        }
        for index in sorted(rules)
    ]
