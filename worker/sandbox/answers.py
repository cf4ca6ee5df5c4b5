"""HTTP answers of the sandbox, independent of the server: JSON bodies and the error shape.

Errors carry BOTH shapes the API documents, in one body (api-contract.md, "Errors"):
``{"error": {"message", "code"}, "code", "message", "validation_errors": {field: reason}}``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

JSON = "application/json"


@dataclasses.dataclass
class Answer:
    """What to send back: status, headers and body; or, when ``drop``, nothing at all."""

    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    latency: float = 0.0  # seconds the server sleeps before answering (fault injection)
    drop: bool = False  # close the connection abruptly instead of answering


def json_answer(status: int, data: Any, headers: list[tuple[str, str]] | None = None) -> Answer:
    """A JSON answer (compact encoding)."""
    body = json.dumps(data, separators=(",", ":")).encode()
    return Answer(status=status, body=body, headers=headers or [])


def error_body(
    code: str, message: str, validation_errors: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The error body in both documented shapes at once."""
    return {
        "error": {"message": message, "code": code},
        "code": code,
        "message": message,
        "validation_errors": dict(validation_errors or {}),
    }


class ApiError(Exception):
    """Raised while handling a request to answer with an error (status, code, message)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        validation_errors: Mapping[str, str] | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.validation_errors = dict(validation_errors or {})
        self.headers = headers or []

    def answer(self) -> Answer:
        return json_answer(
            self.status, error_body(self.code, self.message, self.validation_errors), self.headers
        )


def malformed_body(kind: str, good: bytes) -> bytes:
    """A broken version of the 200 body ``good``: ``html`` (not JSON at all), ``truncated``
    (JSON cut in the middle) or ``missing_fields`` (valid JSON without the fields a client
    needs: ``id``, ``status``, ``access_token``)."""
    if kind == "html":
        return b"<html><body><h1>200 OK</h1><p>upstream says hello</p></body></html>"
    if kind == "truncated":
        return good[: max(1, len(good) // 2)]
    data = json.loads(good)
    for field in ("id", "status", "access_token"):
        data.pop(field, None)
    return json.dumps(data, separators=(",", ":")).encode()
