"""Reading payments from a file (CSV with a header, or JSON lines), row by row, with line numbers.

Every row is validated before anything is recorded; a bad row is reported with its line number
and reason and never stops the others. Files are streamed, so their size does not matter to
memory beyond the valid payments kept for submission.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from worker.errors import ValidationError
from worker.store import PaymentSpec
from worker.validation import validate_payment

COLUMNS = ("account", "amount", "currency", "redirect_url", "reference_id")
REQUIRED = ("amount", "redirect_url")
MAX_LINE = 64 * 1024  # bytes; a longer line is refused (it is not a payment)
csv.field_size_limit(MAX_LINE)


MISSING_ACCOUNT = "is missing: add the column or pass --account"


@dataclass(frozen=True)
class RowError:
    """A refused row: its line number (1-based, the header is line 1 in CSV) and why.

    ``problems`` lists every (field, reason) the row has (issue 15: a row with a bad amount, a
    bad currency and a bad URL says all three); ``field`` and ``reason`` are the first.
    """

    line: int
    field: str
    reason: str
    problems: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.problems:
            object.__setattr__(self, "problems", ((self.field, self.reason),))

    @classmethod
    def of(cls, line: int, problems: Sequence[tuple[str, str]]) -> RowError:
        """The error of a row with these (field, reason) problems (at least one)."""
        return cls(line, problems[0][0], problems[0][1], tuple(problems))

    def __str__(self) -> str:
        return f"line {self.line}: " + "; ".join(f"{f}: {r}" for f, r in self.problems)


@dataclass
class ImportResult:
    """The valid payments of a file and the refused rows."""

    specs: list[PaymentSpec] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    rows: int = 0


def detect_format(path: str | Path) -> str:
    """'csv' or 'jsonl', by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    raise ValidationError("file", f"{path}: unknown format; name it .csv or .jsonl")


def _lines(raw: IO[bytes]) -> Iterator[tuple[int, str | RowError]]:
    """Decoded lines with their numbers, or the RowError of a line that cannot be read."""
    for number, line in enumerate(raw, start=1):
        if len(line) > MAX_LINE:
            yield number, RowError(number, "line", f"longer than {MAX_LINE} bytes")
            continue
        try:
            # A UTF-8 byte order mark is allowed at the start of the file only.
            yield number, line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 ({exc.reason} at byte {exc.start})"
            yield number, RowError(number, "encoding", reason)


# Blank lines are skipped; only ASCII whitespace makes a line blank, so a line holding only an
# invisible Unicode space (U+0085, U+00A0...) is reported as an error, never dropped silently.
_BLANK = " \t\r\n\f\v"


def read_rows(raw: IO[bytes], fmt: str) -> Iterator[tuple[int, Mapping[str, Any] | RowError]]:
    """(line number, row as a mapping or the RowError that line is) for every data row."""
    if fmt == "jsonl":
        for number, text in _lines(raw):
            if isinstance(text, RowError):
                yield number, text
                continue
            if not text.strip(_BLANK):
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, RowError(number, "json", f"not valid JSON ({exc.msg})")
                continue
            except ValueError as exc:  # e.g. a number too long to convert
                yield number, RowError(number, "json", f"not valid JSON ({exc})")
                continue
            if not isinstance(row, dict):
                yield number, RowError(number, "json", "each line must be one JSON object")
                continue
            yield number, row
        return
    header: list[str] | None = None
    for number, text in _lines(raw):
        if isinstance(text, RowError):
            yield number, text
            if header is None:
                return  # without a readable header no row can be read
            continue
        if not text.strip(_BLANK):
            continue
        try:
            cells = next(csv.reader(io.StringIO(text), strict=True))
        except (csv.Error, StopIteration) as exc:
            yield number, RowError(number, "csv", f"malformed CSV ({exc})")
            continue
        if header is None:
            header = [c.strip().lower() for c in cells]
            unknown = [c for c in header if c not in COLUMNS]
            missing = [c for c in REQUIRED if c not in header]
            if unknown or missing or len(set(header)) != len(header):
                reason = (
                    f"header must name columns among {', '.join(COLUMNS)} "
                    f"(required: {', '.join(REQUIRED)}); got {', '.join(header) or 'nothing'}"
                )
                yield number, RowError(number, "header", reason)
                return
            continue
        if len(cells) != len(header):
            yield (
                number,
                RowError(number, "csv", f"{len(cells)} cells where the header has {len(header)}"),
            )
            continue
        yield number, dict(zip(header, cells, strict=True))


def load_file(
    raw: IO[bytes],
    fmt: str,
    *,
    accounts: Mapping[str, object],
    default_account: str | None = None,
) -> ImportResult:
    """Validate every row of ``raw``; the valid payments and the refused rows, in file order.

    A row without ``account`` uses ``default_account``. A reference_id seen twice in the file
    for one account is refused the second time (it would silently be the same payment).
    """
    result = ImportResult()
    seen: set[tuple[str, str]] = set()
    for number, row in read_rows(raw, fmt):
        if isinstance(row, RowError):
            result.errors.append(row)
            continue
        result.rows += 1
        # Every problem of the row, not only its first: unknown columns, then each bad field.
        problems = [(column, "unknown column") for column in sorted(set(row) - set(COLUMNS))]
        account = row.get("account") or default_account
        try:
            spec = validate_payment(
                account=account,
                amount=row.get("amount"),
                currency=row.get("currency") or "USD",
                redirect_url=row.get("redirect_url"),
                reference_id=row.get("reference_id") or None,
                accounts=accounts,
            )
        except ValidationError as exc:
            for name, reason in exc.problems:
                missing = name == "account" and account is None
                problems.append((name, MISSING_ACCOUNT if missing else reason))
        if problems:
            result.errors.append(RowError.of(number, problems))
            continue
        identity = (spec.account, spec.reference_id)
        if identity in seen:
            result.errors.append(
                RowError(number, "reference_id", f"{spec.reference_id!r} appears twice in the file")
            )
            continue
        seen.add(identity)
        result.specs.append(spec)
    return result
