"""Request bodies are decoded strictly: money is an integer and nothing else, unknown
fields and text PostgreSQL cannot store are refused before any I/O."""

from __future__ import annotations

import msgspec
import pytest

from ledger.errors import InvalidCursor
from ledger.http.schemas import AccountCreate, TransferCreate, format_timestamp, parse_timestamp
from ledger.service.pagination import decode_cursor, encode_cursor

VALID = b'{"id":"t-1","debit_account_id":"a","credit_account_id":"b","amount":1}'


def decode(raw: bytes) -> TransferCreate:
    return msgspec.json.decode(raw, type=TransferCreate, strict=True)


def test_a_valid_transfer_decodes() -> None:
    assert decode(VALID).amount == 1


@pytest.mark.parametrize(
    "amount",
    [b"0", b"-1", b"1.0", b"1.5", b'"100"', b"true", b"null", b"9223372036854775808", b"1e3", b"[]"],
)
def test_amounts_other_than_positive_bigint_integers_are_refused(amount: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(VALID.replace(b'"amount":1', b'"amount":' + amount))


def test_the_largest_bigint_is_a_valid_amount() -> None:
    assert decode(VALID.replace(b'"amount":1', b'"amount":9223372036854775807')).amount == 2**63 - 1


@pytest.mark.parametrize(
    "raw",
    [
        VALID[:-1] + b',"ammount":5}',
        VALID[:-1] + b',"balance":5}',
        VALID.replace(b'"t-1"', b'"t 1"'),
        VALID.replace(b'"t-1"', b'"t-1\\n"'),
        VALID.replace(b'"t-1"', b'""'),
        VALID.replace(b'"t-1"', b'"' + b"x" * 65 + b'"'),
        VALID[:-1] + b',"currency":"eur"}',
        VALID[:-1] + b',"currency":"EURO"}',
        VALID[:-1] + b',"currency":"EUR\\n"}',
        VALID[:-1] + b',"description":"' + b"d" * 513 + b'"}',
        VALID[:-1] + b',"description":"nul\\u0000byte"}',
        VALID[:-1] + b',"metadata":{"k":1}}',
        VALID[:-1] + b',"metadata":{"k":{"nested":"x"}}}',
        VALID[:-1] + b',"metadata":{"":"empty key"}}',
        VALID[:-1] + b',"metadata":{"' + b"k" * 65 + b'":"v"}}',
        VALID[:-1] + b',"metadata":{"k":"' + b"v" * 513 + b'"}}',
        VALID[:-1] + b',"metadata":{' + b",".join(b'"k%d":"v"' % i for i in range(17)) + b"}}",
        VALID[:-1] + b',"timeout_seconds":5}',
        b'{"debit_account_id":"a","credit_account_id":"b","amount":1}',
    ],
)
def test_malformed_transfers_are_refused(raw: bytes) -> None:
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        decode(raw)


def test_accounts_need_a_currency_and_refuse_unknown_fields() -> None:
    assert msgspec.json.decode(b'{"currency":"EUR"}', type=AccountCreate, strict=True).id is None
    for raw in (b"{}", b'{"currency":"EUR","balance":100}', b'{"currency":"EUR","allow_negative_balance":"yes"}'):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(raw, type=AccountCreate, strict=True)


def test_timestamps_render_in_utc_with_microseconds_and_parse_only_with_a_zone() -> None:
    moment = parse_timestamp("as_of", "2026-11-24T23:59:03+02:00")
    assert format_timestamp(moment) == "2026-11-24T21:59:03.000000Z"
    assert format_timestamp(parse_timestamp("as_of", "2026-11-24T21:59:03.123456Z")) == "2026-11-24T21:59:03.123456Z"
    for bad in ("2026-11-24T21:59:03", "yesterday", ""):
        with pytest.raises(ValueError):
            parse_timestamp("as_of", bad)


def test_cursors_round_trip_and_forged_ones_are_refused() -> None:
    assert decode_cursor(encode_cursor([5, "x"]), (int, str)) == [5, "x"]
    for forged in ("not-base64!", encode_cursor(["x"]), encode_cursor([True]), encode_cursor({"a": 1}), "A" * 600):  # type: ignore[arg-type]
        with pytest.raises(InvalidCursor):
            decode_cursor(forged, (int,))
