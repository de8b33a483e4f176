"""`ledger.importer` without a service: reading CSV and JSON lines with the positions a
resume starts from, the checks of each row (with the line named), batches cut by count
and by bytes, the state file, the progress output, and the run's control flow (a refusal
stops at its line and keeps the position before it, a too-large batch is halved, a 503
is retried) against a scripted stand-in for the HTTP client. The real service is in
tests/e2e/test_import.py."""

from __future__ import annotations

import io
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ledger import importer
from ledger.client import _core
from ledger.client.errors import TooLarge, Unavailable
from ledger.client.models import BatchItemResult, BatchResult, Transfer

NOW = datetime(2026, 1, 1, tzinfo=UTC)
HEADER = "id,debit_account_id,credit_account_id,amount,currency,imported_at,description,metadata\n"


def write(tmp_path: Path, name: str, text: str, *, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def csv_row(n: int, *, amount: str = "100", when: str | None = None, description: str = "") -> str:
    when = when or f"2024-01-01T00:00:{n:02d}Z"
    return f"t{n},a,b,{amount},EUR,{when},{description},\n"


# -- reading --------------------------------------------------------------------------------


def test_csv_positions_resume_exactly_after_any_record(tmp_path: Path) -> None:
    """Every record's end position, given back as a start, yields exactly the records
    after it: with a byte order mark, CRLF line ends, a quoted field spanning lines and a
    blank line, so a resumed run neither skips nor repeats a row."""
    text = (
        "\ufeff" + HEADER.replace("\n", "\r\n")
        + 't1,a,b,1,EUR,2024-01-01T00:00:01Z,"two\r\nlines",\r\n'
        + "\r\n"
        + 't2,a,b,2,EUR,2024-01-01T00:00:02Z,"say ""hi""","{""k"": ""v""}"\r\n'
        + "t3,a,b,3,EUR,2024-01-01T00:00:03Z,,\r\n"
    )  # fmt: skip
    path = write(tmp_path, "h.csv", text)
    records = list(importer.read_records(path, "csv"))
    assert [record.values["id"] for record in records] == ["t1", "t2", "t3"]
    assert [record.line for record in records] == [2, 5, 6]
    assert records[0].values["description"] == "two\r\nlines"
    assert records[1].values["description"] == 'say "hi"'
    assert records[-1].end_offset == len(text.encode())
    for index, record in enumerate(records):
        rest = list(importer.read_records(path, "csv", record.end_offset, record.end_line))
        assert rest == records[index + 1 :]


def test_jsonl_positions_resume_exactly_after_any_record(tmp_path: Path) -> None:
    """The same for JSON lines, blank lines and a missing final newline included."""
    lines = [
        json.dumps({"id": "t1", "amount": 1}),
        "",
        json.dumps({"id": "t2", "description": "caf\u00e9 \u2603"}, ensure_ascii=False),
        json.dumps({"id": "t3"}),
    ]
    text = "\n".join(lines)
    path = write(tmp_path, "h.jsonl", text)
    records = list(importer.read_records(path, "jsonl"))
    assert [(record.line, record.values["id"]) for record in records] == [(1, "t1"), (3, "t2"), (4, "t3")]
    assert records[-1].end_offset == len(text.encode())
    for index, record in enumerate(records):
        assert list(importer.read_records(path, "jsonl", record.end_offset, record.end_line)) == records[index + 1 :]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{"id": "t1"}\n[1, 2]\n', 2, "one JSON object"),
        ('{"id": "t1"}\n{"id": "t2",\n', 2, "not valid JSON"),
        ('{"id": "t1", "id": "t2"}\n', 1, "appears twice"),
        ('{"amount": NaN}\n', 1, "not valid JSON"),
    ],
)
def test_jsonl_syntax_errors_name_their_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    """Malformed JSON lines fail with the line number and what is wrong."""
    path = write(tmp_path, "bad.jsonl", text)
    with pytest.raises(importer.InputError) as caught:
        list(importer.read_records(path, "jsonl"))
    assert caught.value.line == line
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_csv_shape_errors_name_their_line(tmp_path: Path) -> None:
    """A row with the wrong number of cells, an unterminated quote, text that is not
    UTF-8 and a header naming a column twice: each names its line."""
    short = write(tmp_path, "short.csv", HEADER + csv_row(1) + "t2,a,b,5\n")
    with pytest.raises(importer.InputError, match=r"short.csv:3: 4 values for the 8 columns"):
        list(importer.read_records(short, "csv"))
    unterminated = write(tmp_path, "quote.csv", HEADER + csv_row(1) + 't2,a,b,5,EUR,2024-01-01T00:00:00Z,"open\n')
    with pytest.raises(importer.InputError, match=r"quote.csv:3: not valid CSV"):
        list(importer.read_records(unterminated, "csv"))
    latin = write(tmp_path, "latin.csv", HEADER + csv_row(1, description="caf\u00e9"), encoding="latin-1")
    with pytest.raises(importer.InputError, match=r"latin.csv:2: not UTF-8"):
        list(importer.read_records(latin, "csv"))
    twice = write(tmp_path, "twice.csv", "id,id,amount\n")
    with pytest.raises(importer.InputError, match=r"twice.csv:1: a column is named twice"):
        list(importer.read_records(twice, "csv"))


def test_format_comes_from_the_extension_or_the_option(tmp_path: Path) -> None:
    """.csv, .jsonl and .ndjson are recognised; anything else needs --format."""
    assert importer.detect_format(Path("x.CSV"), None) == "csv"
    assert importer.detect_format(Path("x.ndjson"), None) == "jsonl"
    assert importer.detect_format(Path("x.txt"), "jsonl") == "jsonl"
    with pytest.raises(importer.ImportFailed, match="--format"):
        importer.detect_format(Path("x.txt"), None)


# -- checking rows --------------------------------------------------------------------------


def row(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": "t1",
        "debit_account_id": "a",
        "credit_account_id": "b",
        "amount": 100,
        "imported_at": "2024-03-01T09:30:00.123456Z",
    }
    values.update(changes)
    return {key: value for key, value in values.items() if value is not None}


def test_a_good_json_row_becomes_the_batch_item() -> None:
    """Types, optional fields and the time in UTC: the item is what the client sends."""
    item = importer.transfer_from_record(
        row(imported_at="2024-03-01T10:30:00.123456+01:00", currency="EUR", description="", metadata={"k": "v"}),
        False,
        NOW,
    )
    assert item == {
        "id": "t1",
        "debit_account_id": "a",
        "credit_account_id": "b",
        "amount": 100,
        "imported_at": datetime(2024, 3, 1, 9, 30, 0, 123456, tzinfo=UTC),
        "currency": "EUR",
        "description": "",
        "metadata": {"k": "v"},
    }


def test_csv_cells_are_text_and_empty_cells_are_absent() -> None:
    """In CSV, amounts are digits, metadata is JSON text, and an empty cell is a field
    not given (no empty description, no currency)."""
    item = importer.transfer_from_record(
        {**row(amount="9223372036854775807", metadata='{"k": "v"}'), "currency": "", "description": " "},
        True,
        NOW,
    )
    assert item["amount"] == 2**63 - 1
    assert item["metadata"] == {"k": "v"}
    assert "currency" not in item and "description" not in item


@pytest.mark.parametrize(
    ("changes", "text_form", "message"),
    [
        ({"amount": "12.50"}, True, "whole number of minor units"),
        ({"amount": "1e3"}, True, "whole number of minor units"),
        ({"amount": "-5"}, True, "whole number of minor units"),
        ({"amount": "0"}, True, "between 1 and"),
        ({"amount": "9223372036854775808"}, True, "between 1 and"),
        ({"amount": 12.5}, False, "JSON integer"),
        ({"amount": "100"}, False, "JSON integer"),
        ({"amount": True}, False, "JSON integer"),
        ({"amount": None}, False, "missing `amount`"),
        ({"id": None, "imported_at": None}, False, "missing `id`, `imported_at`"),
        ({"imported_at": "yesterday"}, False, "not an RFC 3339 timestamp"),
        ({"imported_at": "2024-03-01T09:30:00"}, False, "an offset"),
        ({"imported_at": "2024-03-01"}, False, "an offset"),
        ({"imported_at": 1709285400}, False, "timestamp string"),
        ({"imported_at": "0001-01-01T00:00:00+14:00"}, False, "no UTC form"),
        ({"imported_at": "2027-01-01T00:00:00Z"}, False, "in the past"),
        ({"credit_account_id": "a"}, False, "both 'a'"),
        ({"id": "a/b"}, False, "`id` must be 1 to 64 characters"),
        ({"id": "..."}, False, "`id` must be 1 to 64 characters"),
        ({"currency": "eur"}, False, "three upper-case letters"),
        ({"ammount": 5}, False, "unknown field `ammount`"),
        ({"pending": True}, False, "cannot be imported"),
        ({"pending": "true"}, True, "cannot be imported"),
        ({"timeout_seconds": 60}, False, "pending transfers"),
        ({"linked": True}, False, "not supported"),
        ({"metadata": "{not json"}, True, "JSON object of strings"),
        ({"metadata": {"k": 1}}, False, "must be a string"),
        ({"metadata": {f"k{n}": "v" for n in range(17)}}, False, "at most 16"),
        ({"metadata": {"k": "v" * 513}}, False, "0 to 512"),
        ({"description": "d" * 513}, False, "0 to 512"),
        ({"description": "nul\x00"}, False, "NUL"),
        ({"description": "\ud800"}, False, "not valid Unicode"),
    ],
)
def test_bad_rows_are_refused_with_the_reason(changes: dict[str, Any], text_form: bool, message: str) -> None:
    """Each kind of bad row is refused locally, with a message that says what is wrong
    (the caller adds the line)."""
    values = row(**changes)
    for name, value in changes.items():
        if value is None:
            values.pop(name, None)
    if text_form and "amount" not in changes:
        values["amount"] = str(values["amount"])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("`", "`")):
        importer.transfer_from_record(values, text_form, NOW)


def test_timestamps_keep_microseconds_and_order() -> None:
    """Digits past the microsecond are dropped (the ledger's precision): two times in
    order stay in order, at worst equal, which the service accepts."""
    parse = importer.parse_timestamp
    assert parse("2024-03-01T09:30:00.1234567Z", "t", False) == datetime(2024, 3, 1, 9, 30, 0, 123456, tzinfo=UTC)
    assert parse("2024-03-01 09:30:00-05:00", "t", True) == datetime(2024, 3, 1, 14, 30, tzinfo=UTC)
    assert parse("2024-03-01T09:30:00z", "t", True).tzinfo is UTC


def test_check_transfers_names_the_first_bad_line_and_repeated_ids(tmp_path: Path) -> None:
    """The whole file is checked before anything is sent: a bad amount deep in the file
    and an id used twice are reported with their lines (a multi-line record counts from
    its first line); a good file gives its row count and digest."""
    good = [csv_row(n) for n in range(1, 6)]
    path = write(tmp_path, "good.csv", HEADER + "".join(good))
    scan = importer.check_transfers(path, "csv", NOW)
    assert scan.rows == 5 and scan.size == path.stat().st_size and len(scan.sha256) == 64
    multi = 't3,a,b,5,EUR,2024-01-01T00:00:03Z,"a\nb",\n'
    bad = write(tmp_path, "bad.csv", HEADER + good[0] + good[1] + multi + csv_row(4, amount="12.50"))
    with pytest.raises(importer.InputError) as caught:
        importer.check_transfers(bad, "csv", NOW)
    assert caught.value.line == 6 and "12.50" in str(caught.value)
    repeated = write(tmp_path, "repeat.csv", HEADER + good[0] + good[1] + good[0])
    with pytest.raises(importer.InputError, match=r"repeat.csv:4: the transfer id 't1' is already used on line 2"):
        importer.check_transfers(repeated, "csv", NOW)
    empty = write(tmp_path, "empty.csv", HEADER)
    with pytest.raises(importer.ImportFailed, match="no transfers"):
        importer.check_transfers(empty, "csv", NOW)


def test_accounts_rows(tmp_path: Path) -> None:
    """Accounts from CSV and JSON lines: the id is required (opening them again must find
    the same ones), flags and limits are typed, ids are not repeated."""
    csv_path = write(
        tmp_path,
        "accounts.csv",
        "id,currency,name,allow_negative_balance,metadata,overdraft_limit,max_balance\n"
        'bank,EUR,The bank,true,"{""kind"": ""house""}",,\n'
        "alice,EUR,,false,,500,100000\n",
    )
    assert importer.load_accounts(csv_path) == [
        (2, {"id": "bank", "currency": "EUR", "name": "The bank", "allow_negative_balance": True,
             "metadata": {"kind": "house"}}),
        (3, {"id": "alice", "currency": "EUR", "allow_negative_balance": False, "overdraft_limit": 500,
             "max_balance": 100000}),
    ]  # fmt: skip
    jsonl_path = write(tmp_path, "accounts.jsonl", '{"id": "bob", "currency": "USD"}\n{"currency": "USD"}\n')
    with pytest.raises(importer.InputError, match=r"accounts.jsonl:2: missing `id`"):
        importer.load_accounts(jsonl_path)
    repeated = write(tmp_path, "again.jsonl", '{"id": "bob", "currency": "USD"}\n{"id": "bob", "currency": "EUR"}\n')
    with pytest.raises(importer.InputError, match=r"again.jsonl:2: the account id 'bob' is already used on line 1"):
        importer.load_accounts(repeated)
    for bad, message in [
        ({"id": "x", "currency": "USD", "allow_negative_balance": "yes"}, "true or false"),
        ({"id": "x", "currency": "USD", "overdraft_limit": -1}, "between 0 and"),
        ({"id": "x", "currency": "USD", "balance": 5}, "unknown field `balance`"),
    ]:
        with pytest.raises(ValueError, match=message):
            importer.account_from_record(bad, False)


# -- batches --------------------------------------------------------------------------------


def test_batches_are_cut_by_count_and_by_bytes_and_resume_from_the_state(tmp_path: Path) -> None:
    """Batches follow the file order, hold at most `batch_size` items and stay under the
    body limit (long descriptions make smaller batches); each ends where the next starts,
    and starting from a state's position skips exactly what it acknowledged."""
    rows = [csv_row(n, description="x" * (400 if n % 3 == 0 else 1)) for n in range(1, 41)]
    path = write(tmp_path, "h.csv", HEADER + "".join(rows))
    state = importer.State("digest", path.stat().st_size, "csv")
    by_count = list(importer.batches(path, "csv", state, 7, 1_000_000, NOW))
    assert [len(batch.items) for batch in by_count] == [7, 7, 7, 7, 7, 5]
    assert [item["id"] for batch in by_count for item in batch.items] == [f"t{n}" for n in range(1, 41)]
    for before, after in itertools.pairwise(by_count):
        assert (before.end_offset, before.end_line) == (after.start_offset, after.start_line)
    by_bytes = list(importer.batches(path, "csv", state, 1000, 2048, NOW))
    assert len(by_bytes) > 1
    for batch in by_bytes:
        body = _core.create_batch(batch.items).body
        assert body is not None and len(body) <= 2048
    assert sum(len(batch.items) for batch in by_bytes) == 40
    state.offset, state.line = by_count[2].end_offset, by_count[2].end_line
    resumed = list(importer.batches(path, "csv", state, 7, 1_000_000, NOW))
    assert [item["id"] for item in resumed[0].items] == [f"t{n}" for n in range(22, 29)]


def test_the_client_sends_imported_at_in_the_contract_form() -> None:
    """The client's batch body carries `imported_at` as RFC 3339 UTC with microseconds,
    and new accounts their limits (ledger.client additions for the import)."""
    moment = datetime(2024, 3, 1, 10, 30, tzinfo=UTC) + timedelta(hours=1, microseconds=5)
    call = _core.create_batch([{"id": "t1", "debit_account_id": "a", "credit_account_id": "b", "amount": 1,
                                "imported_at": moment}])  # fmt: skip
    assert call.body is not None
    assert json.loads(call.body)["transfers"][0]["imported_at"] == "2024-03-01T11:30:00.000005Z"
    account = _core.create_account(
        "EUR", id="x", name=None, allow_negative_balance=False, metadata=None, overdraft_limit=0, max_balance=7
    )
    assert account.body is not None
    assert json.loads(account.body) == {"id": "x", "currency": "EUR", "overdraft_limit": 0, "max_balance": 7}


# -- the state file -------------------------------------------------------------------------


def test_state_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    """The state file is rewritten whole through a temporary file (no stray temporary
    left), and a state of another version is refused with what to do."""
    path = tmp_path / "h.csv.import-state"
    state = importer.State("d" * 64, 123, "csv", offset=50, line=4, rows=3, created=2, replayed=1)
    importer.write_state(path, state)
    importer.write_state(path, state)
    assert importer.read_state(path) == state
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["h.csv.import-state"]
    assert importer.read_state(tmp_path / "absent") is None
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(importer.ImportFailed, match="remove it to start over"):
        importer.read_state(path)


# -- progress -------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    """On a terminal the bar is redrawn in place (carriage return), at most every
    TTY_REFRESH_SECONDS; elsewhere a full line every PLAIN_PROGRESS_SECONDS; --quiet
    prints nothing."""
    clock = [0.0]
    terminal = Terminal(True)
    bar = importer.Progress(100, terminal, quiet=False, clock=lambda: clock[0])
    bar.update(0, force=True)
    clock[0] = 1.0
    bar.update(50)
    bar.update(51)  # too soon: not drawn
    bar.finish(100)
    drawn = terminal.getvalue()
    assert drawn.count("\r") == 3 and drawn.endswith("\n")
    assert "[###############...............]  50% 50/100 transfers, 50/s, 0:01 left" in drawn
    log = Terminal(False)
    clock[0] = 0.0
    plain = importer.Progress(100, log, quiet=False, clock=lambda: clock[0])
    plain.update(10)  # the first count: the rate counts from here
    clock[0] = 5.0
    plain.update(15)  # too soon for a line
    clock[0] = 10.0
    plain.update(20)
    plain.finish(100)
    assert log.getvalue() == "ledger import: 20/100 transfers (20%), 1/s, 1:20 left\n"
    silent = Terminal(True)
    quiet = importer.Progress(100, silent, quiet=True)
    quiet.update(10, force=True)
    quiet.finish(100)
    assert silent.getvalue() == ""


# -- the run's control flow -----------------------------------------------------------------


class ScriptedClient:
    """Stands in for LedgerClient: answers each batch as a ledger would for new ids,
    except for the ids in `refuse` (rejected with their code), and raises the errors
    queued in `failures` first."""

    def __init__(self, refuse: dict[str, str] | None = None, max_items: int | None = None) -> None:
        self.refuse = refuse or {}
        self.max_items = max_items
        self.failures: list[Exception] = []
        self.batches: list[list[str]] = []
        self.seen: set[str] = set()

    def create_batch(self, items: list[dict[str, Any]]) -> BatchResult:
        if self.failures:
            raise self.failures.pop(0)
        if self.max_items is not None and len(items) > self.max_items:
            raise TooLarge(status=413, code="batch_too_large")
        self.batches.append([item["id"] for item in items])
        results = []
        for index, item in enumerate(items):
            code = self.refuse.get(item["id"])
            status = "replayed" if item["id"] in self.seen else "rejected" if code else "created"
            self.seen.add(item["id"])
            transfer = Transfer(
                id=item["id"],
                debit_account_id=item["debit_account_id"],
                credit_account_id=item["credit_account_id"],
                amount=item["amount"],
                status="rejected" if code else "posted",
                code=code,
                created_at=NOW,
                updated_at=NOW,
                imported_at=item["imported_at"],
            )
            results.append(BatchItemResult(index=index, id=item["id"], status=status, code=code, transfer=transfer))
        return BatchResult(results=results)


def options_for(path: Path, **changes: Any) -> importer.Options:
    return importer.Options(
        path=path, format="csv", state_path=path.with_name(path.name + ".import-state"), quiet=True, **changes
    )


def test_a_refusal_stops_at_its_line_and_a_rerun_stops_there_again(tmp_path: Path) -> None:
    """A rejected item stops the run (exit status 1) naming line, id and code and saying
    that refusals are permanent and which later items of its batch were applied; the
    state keeps the position before the refused row, so the next run starts with it and
    stops on its replayed refusal."""
    path = write(tmp_path, "h.csv", HEADER + "".join(csv_row(n) for n in range(1, 11)))
    client = ScriptedClient(refuse={"t6": "insufficient_funds"})
    out = io.StringIO()
    with pytest.raises(importer.ImportFailed) as caught:
        importer.run_import(client, options_for(path, batch_size=4), stdout=out, stderr=io.StringIO())
    message = str(caught.value)
    assert caught.value.status == 1
    assert "h.csv:7: the transfer 't6' was refused: insufficient_funds" in message
    assert "records refusals permanently" in message
    assert "2 later transfer(s) of the same batch (lines up to 9) were applied" in message
    state = importer.read_state(options_for(path).state_path)
    assert state is not None and (state.line, state.rows, state.created) == (6, 5, 5)
    with pytest.raises(importer.ImportFailed) as again:
        importer.run_import(client, options_for(path, batch_size=4), stdout=out, stderr=io.StringIO())
    assert "'t6' was refused by an earlier run" in str(again.value)
    assert client.batches[-1][0] == "t6"


def test_a_batch_too_large_for_the_service_is_sent_in_halves(tmp_path: Path) -> None:
    """A 413 means nothing of the batch was applied: it is split until the service takes
    it, every row is sent once, in order, and the state file is gone at the end."""
    path = write(tmp_path, "h.csv", HEADER + "".join(csv_row(n) for n in range(1, 11)))
    client = ScriptedClient(max_items=3)
    out = io.StringIO()
    assert importer.run_import(client, options_for(path, batch_size=10), stdout=out, stderr=io.StringIO()) == 0
    assert [transfer for batch in client.batches for transfer in batch] == [f"t{n}" for n in range(1, 11)]
    assert max(len(batch) for batch in client.batches) <= 3
    assert "imported 10 transfers from" in out.getvalue() and "10 created, 0 replayed" in out.getvalue()
    assert not options_for(path).state_path.exists()


def test_an_unavailable_service_is_waited_for_then_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """503s are retried with growing waits (the same batch again is safe); once
    `retry_seconds` would pass, the run stops with exit status 2 and its state kept."""
    sleeps: list[float] = []
    monkeypatch.setattr(importer.time, "sleep", sleeps.append)
    path = write(tmp_path, "h.csv", HEADER + "".join(csv_row(n) for n in range(1, 5)))
    client = ScriptedClient()
    client.failures = [Unavailable(status=503, code="overloaded")] * 3
    stderr = io.StringIO()
    assert importer.run_import(client, options_for(path, batch_size=2), stdout=io.StringIO(), stderr=stderr) == 0
    assert sleeps == [1.0, 2.0, 4.0]
    assert "service unavailable (503 overloaded), trying again in 1 s" in stderr.getvalue()
    client.failures = [Unavailable(status=503, code="unavailable")] * 100
    with pytest.raises(importer.ImportFailed) as caught:
        importer.run_import(
            client, options_for(path, batch_size=2, retry_seconds=0.5), stdout=io.StringIO(), stderr=io.StringIO()
        )
    assert caught.value.status == 2 and "run the same command again to resume" in str(caught.value)


def test_a_changed_input_is_not_resumed(tmp_path: Path) -> None:
    """A state file written for other content is refused, with how to start over."""
    path = write(tmp_path, "h.csv", HEADER + csv_row(1))
    options = options_for(path)
    importer.write_state(options.state_path, importer.State("0" * 64, 1, "csv", offset=1, line=1))
    with pytest.raises(importer.ImportFailed, match=r"remove .* what was already imported replays") as caught:
        importer.run_import(ScriptedClient(), options, stdout=io.StringIO(), stderr=io.StringIO())
    assert caught.value.status == 2


def test_a_service_that_ignores_imported_at_is_detected(tmp_path: Path) -> None:
    """A created transfer that does not carry its imported_at back (a server without
    history import) stops the run at once rather than loading a history at the wrong
    times."""
    path = write(tmp_path, "h.csv", HEADER + csv_row(1))

    class Clock(ScriptedClient):
        def create_batch(self, items: list[dict[str, Any]]) -> BatchResult:
            result = super().create_batch(items)
            for item in result.results:
                assert item.transfer is not None
                item.transfer = msgspec.structs.replace(item.transfer, imported_at=None)
            return result

    with pytest.raises(importer.ImportFailed, match="does it support history import") as caught:
        importer.run_import(Clock(), options_for(path), stdout=io.StringIO(), stderr=io.StringIO())
    assert caught.value.status == 2


def test_accounts_stop_at_the_first_that_cannot_be_opened(tmp_path: Path) -> None:
    """When the service is gone for good, opening accounts stops at once (exit status 2)
    instead of waiting out the retries of every account: no account is tried after one
    has failed, so at most one per concurrent opener is."""
    calls: list[str] = []

    class Gone(ScriptedClient):
        def create_account(self, currency: str, **fields: Any) -> Any:
            calls.append(fields["id"])
            raise Unavailable(status=503, code="unavailable")

    accounts = write(tmp_path, "accounts.jsonl", "".join(f'{{"id": "a{n}", "currency": "EUR"}}\n' for n in range(50)))
    path = write(tmp_path, "h.csv", HEADER + csv_row(1))
    with pytest.raises(importer.ImportFailed) as caught:
        importer.run_import(
            Gone(),
            options_for(path, accounts_path=accounts, retry_seconds=0),
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )
    assert caught.value.status == 2 and "stayed unavailable" in str(caught.value)
    assert 1 <= len(calls) <= importer.ACCOUNT_CONCURRENCY
