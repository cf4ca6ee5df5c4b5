"""What the sub-commands share: settings loading with one-line errors, and output helpers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from worker.errors import ConfigError, PaypollError
from worker.settings import Settings, load_settings

T = TypeVar("T")


def settings_or_exit() -> Settings:
    """Settings from the environment, or exit 2 with one line naming what is wrong."""
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"paypoll: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_or_report(action: Callable[[], T]) -> T:
    """Run ``action``; a PaypollError becomes one line on stderr and exit status 1."""
    try:
        return action()
    except ConfigError as exc:
        print(f"paypoll: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except PaypollError as exc:
        print(f"paypoll: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except redis.RedisError as exc:
        # A wrong password or an unreachable Redis is an operator's problem, not a crash.
        # redis-py's messages name host and port, never the password of the URL.
        print(f"paypoll: Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def print_json(data: Any) -> None:
    """One JSON object on one line."""
    print(json.dumps(data, sort_keys=True, default=str))
