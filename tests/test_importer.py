"""File import: every row validated, bad rows reported with line numbers, good rows kept."""

from __future__ import annotations

import io

from worker.importer import load_file

ACCOUNTS = {"acme": object(), "globex": object()}


def load(text: bytes, fmt: str, default_account: str | None = None):  # type: ignore[no-untyped-def]
    return load_file(io.BytesIO(text), fmt, accounts=ACCOUNTS, default_account=default_account)


def test_csv_rows_with_line_numbers() -> None:
    data = (
        b"\xef\xbb\xbfaccount,amount,currency,redirect_url,reference_id\n"
        b"acme,10,USD,https://s.test/a,r1\n"
        b"acme,-1,USD,https://s.test/a,r2\n"
        b"\n"
        b"globex,5.5,,https://s.test/b,\n"
        b"nobody,5,USD,https://s.test/b,r4\n"
        b"acme,10,USD,https://s.test/a,r1\n"
        b"acme,10,USD\n"
        b"acme,1,USD,https://s.test/\xff,r9\n"
    )
    result = load(data, "csv")
    assert [(s.account, s.reference_id) for s in result.specs][0] == ("acme", "r1")
    assert len(result.specs) == 2 and result.specs[1].currency == "USD"
    errors = [(e.line, e.field) for e in result.errors]
    assert errors == [
        (3, "amount"),
        (6, "account"),
        (7, "reference_id"),
        (8, "csv"),
        (9, "encoding"),
    ]
    assert "appears twice" in str(result.errors[2])


def test_csv_header_must_be_known() -> None:
    result = load(b"amount,url\n10,https://x.test\n", "csv")
    assert result.specs == [] and result.errors[0].field == "header"


def test_jsonl_uses_the_default_account_and_reports_bad_lines() -> None:
    data = (
        b'{"amount": "10", "redirect_url": "https://s.test/a", "reference_id": "j1"}\n'
        b"not json\n"
        b"[1, 2]\n"
        b'{"amount": "10", "redirect_url": "https://s.test/a", "colour": "red"}\n'
        b'{"account": "globex", "amount": 3, "redirect_url": "https://s.test/a"}\n'
    )
    result = load(data, "jsonl", default_account="acme")
    assert [(s.account, s.amount) for s in result.specs] == [("acme", "10"), ("globex", "3")]
    assert [(e.line, e.field) for e in result.errors] == [(2, "json"), (3, "json"), (4, "colour")]


def test_missing_account_says_how_to_fix() -> None:
    result = load(b'{"amount": "1", "redirect_url": "https://s.test/a"}\n', "jsonl")
    assert result.errors[0].field == "account" and "--account" in result.errors[0].reason


def test_a_nul_byte_is_a_bad_row_not_a_crash() -> None:
    # Found by hypothesis: a NUL byte once collided with an in-band error marker.
    result = load(b"\x00\n\x00abc\n", "jsonl", default_account="acme")
    assert [(e.line, e.field) for e in result.errors] == [(1, "json"), (2, "json")]
    csv_result = load(b"amount,redirect_url\n\x00,https://s.test/a\n", "csv", "acme")
    assert [(e.line, e.field) for e in csv_result.errors] == [(2, "amount")]


def test_a_refused_row_lists_every_problem() -> None:
    result = load(b"account,amount,currency,redirect_url\nacme,-1,EUR,ftp://x\n", "csv")
    assert result.specs == [] and len(result.errors) == 1
    error = result.errors[0]
    assert [field for field, _ in error.problems] == ["amount", "currency", "redirect_url"]
    assert (error.line, error.field) == (2, "amount")
    assert str(error).startswith("line 2: amount: ") and "; currency: " in str(error)
    assert "; redirect_url: 'ftp://x' is not an absolute https:// URL" in str(error)


def test_unknown_columns_and_bad_fields_are_listed_together() -> None:
    result = load(b'{"amount": 1.5, "colour": "red", "size": 2}\n', "jsonl")
    fields = [field for field, _ in result.errors[0].problems]
    assert fields == ["colour", "size", "account", "amount", "redirect_url"]
    assert "--account" in dict(result.errors[0].problems)["account"]
