"""The pure pieces of metered usage: what an upstream answer means for a record, where a
record queues, ``Retry-After``, ``Prefer``, the backoff and the pacer."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from sidecar.http.usage import prefers_async
from sidecar.usage.delivery import BASE_DELAY, Pacer, backoff
from sidecar.usage.records import (
    MAX_RETRY_AFTER,
    PARTITIONS,
    Record,
    outcome_body,
    partition_of,
    retry_after_seconds,
    verdict,
)


@pytest.mark.parametrize(
    ("status", "state", "wide"),
    [
        (200, "delivered", False),
        (201, "delivered", False),
        (409, "insufficient", False),
        (400, "rejected", False),
        (404, "rejected", False),
        (422, "rejected", False),
        (401, "queued", True),
        (403, "queued", True),
        (408, "queued", False),
        (425, "queued", False),
        (429, "queued", True),
        (500, "queued", False),
        (502, "queued", True),
        (503, "queued", True),
        (504, "queued", True),
        (302, "queued", False),
        (None, "queued", True),
    ],
)
def test_verdict(status: int | None, state: str, wide: bool) -> None:
    judged = verdict(status)
    assert judged.state == state
    assert judged.final == (state != "queued")
    assert judged.upstream_wide == wide
    assert bool(judged.reason) == (state == "queued")


def test_a_partition_is_stable_and_shared_by_one_customer_and_credit_type() -> None:
    # BLAKE2b, not Python's salted hash: the same in every process and release (a
    # record queued by one release is found in the same partition by the next).
    assert partition_of("cus_active", "api-calls") == 16640747585627778056 % PARTITIONS == 8
    assert Record("k", "cus_active", "api-calls", 1).partition == partition_of(
        "cus_active", "api-calls"
    )
    spread = {partition_of(f"cus_{i}", "api-calls") for i in range(100)}
    assert len(spread) == PARTITIONS


def test_a_record_is_sent_as_the_sdk_sends_it() -> None:
    assert Record("k1", "c", "t", 5).body() == b'{"amount":5,"idempotencyKey":"k1"}'


def test_retry_after_in_seconds_or_as_a_date_and_capped() -> None:
    now = time.time()
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds(" 0 ", now) == 0.0
    in_ten = retry_after_seconds(formatdate(now + 10, usegmt=True), now)
    assert in_ten is not None and 8.5 <= in_ten <= 10.5
    assert retry_after_seconds(formatdate(now - 60, usegmt=True), now) == 0.0
    assert retry_after_seconds("999999", now) == MAX_RETRY_AFTER
    for junk in (None, "", "soon", "-3", "1.5"):
        assert retry_after_seconds(junk, now) is None


@pytest.mark.parametrize(
    ("headers", "wanted"),
    [
        ([("Prefer", "respond-async")], True),
        ([("Prefer", "RESPOND-ASYNC")], True),
        ([("Prefer", "respond-async, wait=10")], True),
        ([("Prefer", "wait=10, respond-async; x=1")], True),
        ([("Prefer", "return=minimal"), ("Prefer", "respond-async")], True),
        ([("Prefer", "return=minimal")], False),
        ([("Prefer", "respond-asynchronously")], False),
        ([], False),
    ],
)
def test_prefer_is_read_as_rfc_7240_writes_it(headers: list[tuple[str, str]], wanted: bool) -> None:
    request = make_mocked_request("POST", "/", headers=CIMultiDict(headers))
    assert prefers_async(request) is wanted


def test_backoff_doubles_with_jitter_up_to_its_cap_and_honours_retry_after() -> None:
    for attempt in range(1, 12):
        ceiling = min(4.0, BASE_DELAY * 2 ** (attempt - 1))
        for _ in range(20):
            assert ceiling / 2 <= backoff(attempt, 4.0) <= ceiling
    assert backoff(1, 4.0, retry_after=30.0) == 30.0


def test_an_outcome_body_from_stored_fields() -> None:
    queued = outcome_body({b"k": b"k1", b"s": b"queued", b"c": b"c", b"t": b"t", b"a": b"5",
                           b"at": b"1700000000123", b"n": b"2", b"la": b"1700000001000",
                           b"le": b"503"})  # fmt: skip
    assert queued == {
        "idempotencyKey": "k1", "state": "queued", "customerId": "c", "creditTypeId": "t",
        "amount": 5, "acceptedAt": "2023-11-14T22:13:20.123Z", "attempts": 2,
        "lastAttempt": {"at": "2023-11-14T22:13:21.000Z", "error": "503"},
    }  # fmt: skip
    done = outcome_body({b"k": b"k1", b"s": b"insufficient", b"a": b"5", b"at": b"0",
                         b"ft": b"1000", b"st": b"409", b"b": b'{"error":{"code":"x"}}',
                         b"rp": b"0", b"n": b"1"})  # fmt: skip
    assert done["status"] == 409 and done["answer"] == {"error": {"code": "x"}}
    assert done["finishedAt"] == "1970-01-01T00:00:01.000Z" and done["replayed"] is False
    assert "lastAttempt" not in done
    assert outcome_body({b"s": b"rejected", b"b": b"not json"})["answer"] is None


async def test_the_pacer_pauses_everyone_then_lets_one_probe_alone() -> None:
    pacer = Pacer(cap=0.2)
    await asyncio.wait_for(pacer.turn(), 1)  # closed: no wait
    pause = pacer.failed(None)
    assert 0 < pause <= 0.2 and pacer.paused
    started = time.monotonic()
    turns = {asyncio.ensure_future(pacer.turn()) for _ in range(3)}
    done, waiting = await asyncio.wait(turns, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1, "one probe after the pause"
    assert time.monotonic() - started >= pause * 0.9
    # The probe is out: the others wait for its answer, however long it takes.
    done, waiting = await asyncio.wait(waiting, timeout=0.05)
    assert not done
    pacer.answered()
    done, waiting = await asyncio.wait(waiting, timeout=1)
    assert len(done) == 2 and not waiting
    assert not pacer.paused


async def test_the_pacer_honours_retry_after_and_a_cancelled_probe_frees_the_turn() -> None:
    pacer = Pacer(cap=0.1)
    pause = pacer.failed(0.3)
    assert pause == 0.3
    started = time.monotonic()
    await asyncio.wait_for(pacer.turn(), 2)  # this caller is the probe
    assert time.monotonic() - started >= 0.27
    waiting = asyncio.ensure_future(pacer.turn())
    await asyncio.sleep(0.02)
    assert not waiting.done()
    pacer.abandoned()  # the probe was cancelled: the next one goes
    await asyncio.wait_for(waiting, 1)
