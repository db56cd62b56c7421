"""sidecar.cache.entry and sidecar.cache.memory, directly: freshness, stale window, LRU."""

from __future__ import annotations

import orjson
import pytest

from sidecar.cache.entry import NOT_FOUND_BODY, Entry
from sidecar.cache.memory import MemoryLayer
from sidecar.errors import UpstreamUnavailable

NOW = 1_700_000_000.0
DOC = {"status": "active", "modules": ["reports", "exports"], "config": {"seats": 5}}


def entry(fresh_for: float = 300.0, stale_for: float = 3600.0, **kw: object) -> Entry:
    body = orjson.dumps({**DOC, **kw})
    return Entry.from_upstream(200, body, now=NOW, fresh_for=fresh_for, stale_for=stale_for)


# -- freshness and the stale window ---------------------------------------------------


def test_fresh_until_the_end_of_the_fresh_window_then_servable_stale() -> None:
    e = entry(fresh_for=300.0, stale_for=3600.0)
    assert (e.fetched_at, e.fresh_until, e.stale_until) == (NOW, NOW + 300, NOW + 3900)
    assert e.is_fresh(NOW) and e.is_fresh(NOW + 299.999)
    assert not e.is_fresh(NOW + 300)
    assert e.is_servable_stale(NOW + 300) and e.is_servable_stale(NOW + 3899.999)
    assert not e.is_servable_stale(NOW + 3900)


def test_no_stale_window_means_no_stale_answer() -> None:
    e = entry(fresh_for=10.0, stale_for=0.0)
    assert e.is_servable_stale(NOW + 9.999)
    assert not e.is_servable_stale(NOW + 10)


@pytest.mark.parametrize(
    ("fresh_for", "refresh_ahead"),
    [(300.0, 30.0), (100.0, 10.0), (1000.0, 30.0), (0.5, 0.05)],
)
def test_refresh_ahead_starts_in_the_last_tenth_at_most_30_s(
    fresh_for: float, refresh_ahead: float
) -> None:
    e = entry(fresh_for=fresh_for)
    assert e.refresh_at == pytest.approx(NOW + fresh_for - refresh_ahead)


def test_a_stored_entry_keeps_its_times_and_document() -> None:
    e = entry(accountId="acme")
    back = Entry.loads(e.dumps())
    assert back is not None
    assert (back.doc, back.fetched_at, back.fresh_until, back.stale_until) == (
        e.doc,
        e.fetched_at,
        e.fresh_until,
        e.stale_until,
    )
    assert back.refresh_at == e.refresh_at
    assert back.account_id == "acme"


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b'{"v":1}', b'{"d":[1],"f":1,"fu":2,"su":3}', b'{"d":{},"f":"x"}'],
)
def test_an_unreadable_stored_entry_is_a_miss(raw: bytes) -> None:
    assert Entry.loads(raw) is None


@pytest.mark.parametrize(
    "changes",
    [
        # float() alone takes these strings; an entry holding one broke every answer
        # computing its age (a 500 on each read of the customer).
        {"f": "nan"},
        {"fu": "inf"},
        {"su": "1e999"},
        {"f": "-inf"},
        {"f": "1"},
        {"f": True},
        {"fu": None},
        # A "not found" body that is not the small JSON body the mirror answers with.
        {"d": None, "nf": "not json {"},
        {"d": None, "nf": ""},
        {"d": None, "nf": 404},
        {"d": None, "nf": "[" * 3000 + "]" * 3000},
    ],
)
def test_a_stored_entry_with_impossible_fields_is_a_miss(changes: dict[str, object]) -> None:
    stored = {**orjson.loads(entry().dumps()), **changes}
    assert Entry.from_stored(stored) == (None, None)
    assert Entry.loads(orjson.dumps(stored)) is None


def test_a_stored_not_found_keeps_its_json_body() -> None:
    gone = Entry.from_upstream(404, b'{"error":"gone"}', now=NOW, fresh_for=60, stale_for=600)
    back = Entry.loads(gone.dumps())
    assert back is not None and not back.found
    assert back.not_found_body == b'{"error":"gone"}'


# -- from the upstream's answer --------------------------------------------------------


def test_a_200_document_is_kept_as_sent_without_a_found_of_its_own() -> None:
    e = Entry.from_upstream(
        200, orjson.dumps({**DOC, "found": "yes", "extra": [1]}), now=NOW, fresh_for=1, stale_for=1
    )
    assert e.found and e.doc == {**DOC, "extra": [1]}
    assert orjson.loads(e.body()) == {**DOC, "extra": [1], "found": True}
    assert orjson.loads(e.upstream_body()) == {**DOC, "extra": [1]}


@pytest.mark.parametrize("body", [b"<html>", b"[1, 2]", b'"active"', b""])
def test_a_200_that_is_not_a_json_object_is_an_upstream_failure(body: bytes) -> None:
    with pytest.raises(UpstreamUnavailable, match="not JSON"):
        Entry.from_upstream(200, body, now=NOW, fresh_for=1, stale_for=1)


def test_a_404_is_not_found_and_keeps_a_small_json_body_for_the_mirror() -> None:
    sent = b'{"error":{"code":"customer_not_found","message":"no such customer"}}'
    e = Entry.from_upstream(404, sent, now=NOW, fresh_for=30, stale_for=60)
    assert not e.found and e.status is None and not e.has("reports")
    assert e.body() == NOT_FOUND_BODY
    assert orjson.loads(e.body()) == {"found": False, "status": None, "modules": [], "config": {}}
    assert e.upstream_body() == sent
    assert (e.fresh_until, e.stale_until) == (NOW + 30, NOW + 90)
    back = Entry.loads(e.dumps())
    assert back is not None and back.upstream_body() == sent


@pytest.mark.parametrize("sent", [b"", b"no such customer", b'{"x":"' + b"a" * 4096 + b'"}'])
def test_a_404_body_that_is_not_small_json_is_replaced_by_the_envelope(sent: bytes) -> None:
    e = Entry.from_upstream(404, sent, now=NOW, fresh_for=30, stale_for=60)
    assert orjson.loads(e.upstream_body()) == {
        "error": {"code": "not_found", "message": "customer has no entitlements"}
    }


def test_modules_are_the_strings_of_a_modules_list() -> None:
    assert entry().has("reports") and not entry().has("api")
    assert not entry(modules="reports").has("reports")
    odd = entry(modules=["a", 1, None, {"b": 1}, "c"])
    assert odd.has("a") and odd.has("c") and not odd.has("1")


def test_account_id_is_a_non_empty_string_or_none() -> None:
    assert entry(accountId="acme").account_id == "acme"
    assert entry(accountId="").account_id is None
    assert entry(accountId=7).account_id is None
    assert entry().account_id is None


# -- the LRU memory layer ---------------------------------------------------------------


def test_memory_evicts_the_least_recently_used_beyond_its_bound() -> None:
    memory = MemoryLayer(max_entries=2)
    a, b, c = entry(), entry(), entry()
    memory.put("a", a, NOW + 1)
    memory.put("b", b, NOW + 2)
    assert memory.get("a") == (a, NOW + 1)  # a is now the most recently used
    memory.put("c", c, NOW + 3)
    assert len(memory) == 2
    assert memory.get("b") is None
    assert memory.get("a") == (a, NOW + 1) and memory.get("c") == (c, NOW + 3)


def test_memory_put_replaces_and_refreshes_the_order() -> None:
    memory = MemoryLayer(max_entries=2)
    old, new, other = entry(), entry(), entry()
    memory.put("a", old, NOW)
    memory.put("b", other, NOW)
    memory.put("a", new, NOW + 5)
    memory.put("c", other, NOW)
    assert memory.get("a") == (new, NOW + 5)
    assert memory.get("b") is None


def test_memory_of_size_zero_holds_nothing() -> None:
    memory = MemoryLayer(max_entries=0)
    memory.put("a", entry(), NOW)
    assert len(memory) == 0 and memory.get("a") is None


def test_memory_pop_clear_and_customers_of_an_account() -> None:
    memory = MemoryLayer(max_entries=10)
    memory.put("c1", entry(accountId="acme"), NOW)
    memory.put("c2", entry(accountId="acme"), NOW)
    memory.put("c3", entry(accountId="globex"), NOW)
    memory.put("c4", entry(), NOW)
    assert memory.customers_of("acme") == {"c1", "c2"}
    memory.pop("c1")
    memory.pop("nobody")
    assert memory.customers_of("acme") == {"c2"}
    memory.clear()
    assert len(memory) == 0 and memory.customers_of("globex") == set()
