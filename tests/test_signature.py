"""sidecar.signature: signing, rotation, and every way a header can fail."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from sidecar.signature import (
    DEFAULT_TOLERANCE,
    MAX_HEADER_LENGTH,
    MAX_SIGNATURES,
    ParsedHeader,
    SignatureError,
    parse,
    sign,
    sign_many,
    verify,
)

SECRET = "whsec_current"
OLD = "whsec_previous"
BODY = b'{"id":"evt_1","type":"entitlements.updated","tenantId":"t1","customerId":"c1"}'
NOW = 1_700_000_000


def mac(secret: str, body: bytes, t: str) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def reason(header: str | None, body: bytes = BODY, secrets: tuple[str, ...] = (SECRET,)) -> str:
    with pytest.raises(SignatureError) as info:
        verify(header, body, secrets, now=NOW)
    return info.value.reason


# ---------------------------------------------------------------- signing


def test_sign_matches_the_documented_construction() -> None:
    header = sign(SECRET, BODY, NOW)

    assert header == f"t={NOW},v1={mac(SECRET, BODY, str(NOW))}"
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)


def test_sign_many_has_one_entry_per_secret_in_order() -> None:
    header = sign_many([SECRET, OLD], BODY, NOW)

    expected = f"t={NOW},v1={mac(SECRET, BODY, str(NOW))},v1={mac(OLD, BODY, str(NOW))}"
    assert header == expected


@pytest.mark.parametrize(
    ("secrets", "error"),
    [([], ValueError), ([""], ValueError), ([SECRET, ""], ValueError), (SECRET, TypeError)],
)
def test_sign_many_rejects_unusable_secrets(secrets: list[str] | str, error: type) -> None:
    with pytest.raises(error):
        sign_many(secrets, BODY, NOW)


def test_sign_rejects_empty_secret_and_negative_timestamp() -> None:
    with pytest.raises(ValueError, match="empty secret"):
        sign("", BODY, NOW)
    with pytest.raises(ValueError, match="negative"):
        sign(SECRET, BODY, -1)


# ---------------------------------------------------------------- valid headers


def test_round_trip_returns_the_timestamp() -> None:
    assert verify(sign(SECRET, BODY, NOW), BODY, [SECRET], now=NOW) == NOW


def test_empty_body_round_trips() -> None:
    assert verify(sign(SECRET, b"", NOW), b"", [SECRET], now=NOW) == NOW


@pytest.mark.parametrize("configured", [[SECRET], [OLD], [SECRET, OLD], [OLD, SECRET]])
def test_rotation_header_verifies_against_either_secret(configured: list[str]) -> None:
    header = sign_many([SECRET, OLD], BODY, NOW)

    assert verify(header, BODY, configured, now=NOW) == NOW


def test_any_configured_secret_may_match_a_single_entry() -> None:
    header = sign(OLD, BODY, NOW)

    assert verify(header, BODY, ["whsec_unrelated", OLD], now=NOW) == NOW


def test_parsing_tolerates_whitespace_order_and_empty_items() -> None:
    digest = mac(SECRET, BODY, str(NOW))
    header = f"  v1 = {digest} ,, t = {NOW} ,"

    assert verify(header, BODY, [SECRET], now=NOW) == NOW


def test_unknown_schemes_and_unusable_v1_entries_are_ignored() -> None:
    digest = mac(SECRET, BODY, str(NOW))
    header = f"t={NOW},v0=deadbeef,v1=not-hex,v1=abcd,v2={digest[::-1]},v1={digest}"

    assert verify(header, BODY, [SECRET], now=NOW) == NOW


def test_uppercase_hex_is_accepted() -> None:
    header = f"t={NOW},v1={mac(SECRET, BODY, str(NOW)).upper()}"

    assert verify(header, BODY, [SECRET], now=NOW) == NOW


def test_the_timestamp_is_signed_as_it_appears_in_the_header() -> None:
    # "<t>" is the literal value sent, so a sender that zero-pads still verifies.
    header = f"t=0{NOW},v1={mac(SECRET, BODY, f'0{NOW}')}"

    assert verify(header, BODY, [SECRET], now=NOW) == NOW


@pytest.mark.parametrize("skew", [-DEFAULT_TOLERANCE, 0, DEFAULT_TOLERANCE])
def test_timestamps_at_the_tolerance_bounds_are_fresh(skew: int) -> None:
    header = sign(SECRET, BODY, NOW + skew)

    assert verify(header, BODY, [SECRET], now=NOW) == NOW + skew


def test_fractional_now_is_compared_exactly() -> None:
    header = sign(SECRET, BODY, NOW)

    assert verify(header, BODY, [SECRET], now=NOW + 300.0) == NOW
    with pytest.raises(SignatureError) as info:
        verify(header, BODY, [SECRET], now=NOW + 300.5)
    assert info.value.reason == "stale"


# ---------------------------------------------------------------- failures


def test_signature_error_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError, match="no signature header") as info:
        verify(None, BODY, [SECRET], now=NOW)
    assert isinstance(info.value, SignatureError)
    assert info.value.reason == "missing"


@pytest.mark.parametrize("header", [None, "", "   ", "\t\n"])
def test_missing(header: str | None) -> None:
    assert reason(header) == "missing"


GOOD = mac(SECRET, BODY, str(NOW))


@pytest.mark.parametrize(
    "header",
    [
        f"v1={GOOD}",  # no timestamp
        f"t=,v1={GOOD}",
        f"t=abc,v1={GOOD}",
        f"t=-{NOW},v1={GOOD}",
        f"t=+{NOW},v1={GOOD}",
        f"t={NOW}.5,v1={GOOD}",
        f"t=1{'0' * 12},v1={GOOD}",  # more digits than any plausible unix time
        f"t=١٢٣,v1={GOOD}",  # non-ASCII digits
        f"t={NOW},t={NOW},v1={GOOD}",  # ambiguous
        f"t={NOW}",  # no v1
        f"t={NOW},v0={GOOD}",  # only an unknown scheme
        f"t={NOW},v1=xyz,v1={GOOD[:-2]}",  # only unusable v1 entries
        f"t={NOW},v1={GOOD}0",  # too long hex
        f"t={NOW},garbage,v1={GOOD}",  # an item that is not key=value
        f"t={NOW},=x,v1={GOOD}",
        "t",
    ],
)
def test_malformed(header: str) -> None:
    assert reason(header) == "malformed"


def test_wrong_secret_is_a_mismatch() -> None:
    assert reason(sign("whsec_attacker", BODY, NOW)) == "mismatch"


def test_tampered_body_is_a_mismatch() -> None:
    assert reason(sign(SECRET, BODY, NOW), body=BODY + b" ") == "mismatch"


def test_moved_timestamp_is_a_mismatch() -> None:
    # Re-stamping a captured header to make it look fresh breaks the signature.
    captured = sign(SECRET, BODY, NOW - 3600)
    restamped = captured.replace(f"t={NOW - 3600}", f"t={NOW}")

    assert reason(restamped) == "mismatch"


def test_no_configured_secrets_is_a_mismatch() -> None:
    assert reason(sign(SECRET, BODY, NOW), secrets=()) == "mismatch"


def test_an_empty_configured_secret_never_matches() -> None:
    forged = f"t={NOW},v1={mac('', BODY, str(NOW))}"

    assert reason(forged, secrets=("",)) == "mismatch"
    assert reason(forged, secrets=("", SECRET)) == "mismatch"


@pytest.mark.parametrize("skew", [-DEFAULT_TOLERANCE - 1, DEFAULT_TOLERANCE + 1, -86400, 86400])
def test_genuine_but_out_of_tolerance_is_stale(skew: int) -> None:
    assert reason(sign(SECRET, BODY, NOW + skew)) == "stale"


def test_custom_tolerance() -> None:
    header = sign(SECRET, BODY, NOW - 20)

    assert verify(header, BODY, [SECRET], now=NOW, tolerance=20) == NOW - 20
    with pytest.raises(SignatureError) as info:
        verify(header, BODY, [SECRET], now=NOW, tolerance=19)
    assert info.value.reason == "stale"


def test_negative_tolerance_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="tolerance") as info:
        verify(sign(SECRET, BODY, NOW), BODY, [SECRET], now=NOW, tolerance=-1)
    assert not isinstance(info.value, SignatureError)


def test_forged_and_stale_reports_mismatch_not_stale() -> None:
    # The signature is checked first: only a genuine event can be called stale.
    assert reason(sign("whsec_attacker", BODY, NOW - 86400)) == "mismatch"


# ---------------------------------------------------------------- hostile headers


def test_header_longer_than_the_cap_is_rejected_before_parsing() -> None:
    valid = sign(SECRET, BODY, NOW)
    padded = valid + "," + " " * (MAX_HEADER_LENGTH - len(valid))

    assert len(padded) == MAX_HEADER_LENGTH + 1
    assert reason(padded) == "malformed"


def test_header_exactly_at_the_cap_is_accepted() -> None:
    valid = sign(SECRET, BODY, NOW)
    padded = valid + "," + " " * (MAX_HEADER_LENGTH - len(valid) - 1)

    assert len(padded) == MAX_HEADER_LENGTH
    assert verify(padded, BODY, [SECRET], now=NOW) == NOW


def test_only_the_first_well_formed_v1_entries_are_considered() -> None:
    decoys = [f"v1={i:064x}" for i in range(MAX_SIGNATURES)]
    within = ",".join([f"t={NOW}", *decoys[:-1], f"v1={GOOD}"])
    beyond = ",".join([f"t={NOW}", *decoys, f"v1={GOOD}"])

    assert verify(within, BODY, [SECRET], now=NOW) == NOW
    assert reason(beyond) == "mismatch"


def test_unusable_entries_do_not_use_up_the_cap() -> None:
    junk = ",".join(f"v1=zz{i}" for i in range(3 * MAX_SIGNATURES))
    header = f"t={NOW},{junk},v1={GOOD}"

    assert len(header) <= MAX_HEADER_LENGTH
    assert verify(header, BODY, [SECRET], now=NOW) == NOW


def test_huge_header_of_entries_is_rejected_cheaply() -> None:
    flood = f"t={NOW}," + ",".join(f"v1={GOOD}" for _ in range(10_000))

    assert reason(flood) == "malformed"


# ---------------------------------------------------------------- parsing, directly


def test_parse_keeps_the_raw_timestamp_and_decodes_each_v1_in_order() -> None:
    first, second = "ab" * 32, "CD" * 32
    parsed = parse(f"t=001700000000,v1={first},v1={second}")
    assert parsed == ParsedHeader("001700000000", [bytes.fromhex(first), bytes.fromhex(second)])
    assert parsed.timestamp == "001700000000"  # signed as it appears, leading zeros kept


def test_parse_skips_other_schemes_bad_v1_values_and_blank_items() -> None:
    digest = "0f" * 32
    header = f" v0=zz , ,v1=short,v1={'g' * 64},x=1,t=5,v1={digest},"
    assert parse(header) == ParsedHeader("5", [bytes.fromhex(digest)])


def test_parse_keeps_only_the_first_usable_v1_entries() -> None:
    digests = [f"{i:02x}" * 32 for i in range(MAX_SIGNATURES + 3)]
    parsed = parse("t=1," + ",".join(f"v1={d}" for d in digests))
    assert parsed.digests == [bytes.fromhex(d) for d in digests[:MAX_SIGNATURES]]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("t=1,v1", "not key=value"),
        ("=1,v1=" + "a" * 64, "not key=value"),
        ("t=1,t=2,v1=" + "a" * 64, "more than one t="),
        ("t=-1,v1=" + "a" * 64, "not a unix time"),
        ("t=1.5,v1=" + "a" * 64, "not a unix time"),
        ("t=" + "9" * 13 + ",v1=" + "a" * 64, "not a unix time"),
        ("v1=" + "a" * 64, "no t="),
        ("t=1,v0=" + "a" * 64, "no usable v1="),
        ("t=1,v1=" + "a" * 64 + " " * MAX_HEADER_LENGTH, "too long"),
    ],
)
def test_parse_refuses_malformed_headers(header: str, message: str) -> None:
    with pytest.raises(SignatureError, match=re.escape(message)) as info:
        parse(header)
    assert info.value.reason == "malformed"
