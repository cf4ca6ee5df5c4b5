"""Logging set-up: structlog and stdlib ``logging`` through one renderer, with secrets redacted.

``configure_logging`` is called once at an entry point (calling it again replaces the previous
set-up, it does not add a second handler). Every record, from structlog (``structlog.get_logger``)
or from the stdlib (dramatiq logs that way), goes through the same chain: context variables bound
by the actors (account, reference_id, payment_id, message_id, attempt), ISO UTC timestamp, level,
logger name, exception text, redaction, then JSON lines (or a console renderer on a TTY).

Redaction (design.md, invariant 6) works at three levels, because a secret can arrive anywhere:

1. keys named like a secret (``client_secret``, ``access_token``, ``Authorization``, ``password``,
   ...) have their value replaced by ``[REDACTED]``, in nested dicts too;
2. strings are scrubbed of ``Basic ...``/``Bearer ...`` credentials and ``secret=...`` pairs;
3. values registered with ``register_secret`` (each client_secret at start-up, each access token
   when the token cache learns it) are replaced wherever they occur, including exception text,
   and again in the final rendered line (so an encoding step cannot reassemble them).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[REDACTED]"
#: Registered values shorter than this are not replaced inside strings: a 3-character "secret"
#: would shred every log line. Real client secrets and tokens are far longer.
MIN_SECRET_LENGTH = 6
#: Registered values remembered (oldest forgotten first): one token per account per hour fits.
MAX_SECRETS = 10_000

_SECRET_KEY = re.compile(
    r"secret|token|password|passwd|authorization|credential|api[_-]?key|cookie", re.IGNORECASE
)
_KEYS_NOT_REDACTED = frozenset({"event", "timestamp", "level", "logger"})
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # HTTP credentials: "Basic dXNlcjpwYXNz", "Bearer eyJ..."
    (re.compile(r"\b(Basic|Bearer)(\s+)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE), r"\1\2" + REDACTED),
    # key=value or "key": "value" pairs inside text (form bodies, reprs, JSON in messages)
    (
        re.compile(
            r"""((?:access_token|client_secret|password|secret)["']?\s*[:=]\s*["']?)"""
            r"""(?!\[REDACTED\])[^\s"'&,;}\]]+""",
            re.IGNORECASE,
        ),
        r"\1" + REDACTED,
    ),
)

_secrets_lock = threading.Lock()
_secrets: OrderedDict[str, None] = OrderedDict()


class _SecretIndex:
    """The registered secrets, with a cheap filter in front of their (costly) regex.

    With a few hundred secrets the alternation regex costs about 0.2 ms on one log line, and
    every line is scanned. The filter only decides whether that regex needs to run, so the
    redaction is the regex's own: ``grams`` holds every ``GRAM``-character substring of every
    secret, and a text is looked up at every ``stride``-th position, ``stride`` being
    ``shortest secret - GRAM + 1``. A secret occurring at position p covers the positions p to
    p + len - GRAM, at least ``stride`` consecutive ones, so one of them is looked up and its
    gram (a substring of the secret) is found: no text that holds a secret skips the regex.
    """

    __slots__ = ("grams", "pattern", "shortest", "stride")

    def __init__(self, ordered: list[str]) -> None:
        self.pattern = re.compile("|".join(re.escape(s) for s in ordered))
        self.shortest = min(len(s) for s in ordered)
        self.stride = self.shortest - GRAM + 1
        self.grams = frozenset(s[i : i + GRAM] for s in ordered for i in range(len(s) - GRAM + 1))

    def may_hold_one(self, text: str) -> bool:
        """False only when ``text`` contains no registered secret."""
        if len(text) < self.shortest:
            return False
        grams = self.grams
        for i in range(0, len(text) - GRAM + 1, self.stride):  # noqa: SIM110 (a loop is faster)
            if text[i : i + GRAM] in grams:
                return True
        return False


#: Length of the substrings the secret filter looks up (at most MIN_SECRET_LENGTH).
GRAM = 6
_index: _SecretIndex | None = None
# Set when a secret was registered since _index was built. The index is rebuilt at the next log
# line, not at each registration: a fleet of 1,000 accounts registers 2,000 secrets at start,
# and rebuilding the regex each time made start-up quadratic (minutes before the first job).
_index_stale = False


def register_secret(value: str) -> None:
    """Have ``value`` replaced by ``[REDACTED]`` in every log line from now on (idempotent)."""
    global _index_stale
    if len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value in _secrets:
            _secrets.move_to_end(value)
            return
        _secrets[value] = None
        while len(_secrets) > MAX_SECRETS:
            _secrets.popitem(last=False)
        _index_stale = True


def _current_index() -> _SecretIndex | None:
    """The index of every secret registered so far (rebuilt here when one was added)."""
    global _index, _index_stale
    if _index_stale:
        with _secrets_lock:
            if _index_stale:
                # Longest first, so a secret containing another is replaced whole.
                ordered = sorted(_secrets, key=len, reverse=True)
                _index = _SecretIndex(ordered) if ordered else None
                _index_stale = False
    return _index


def _may_match_patterns(text: str) -> bool:
    """False only when no regex of _PATTERNS can match ``text``: each needs one of the words
    below, case-insensitively. Only for ASCII text (lower() is then exactly the regexes'
    IGNORECASE); any other text goes through the regexes."""
    if len(text) < _SHORTEST_MATCH:
        return False
    if not text.isascii():
        return True
    lower = text.lower()
    for word in _PATTERN_WORDS:  # noqa: SIM110 (a loop is faster than any() on a generator)
        if word in lower:
            return True
    return False


#: Every match of _PATTERNS contains one of these (lower case): "basic" or "bearer", or one of
#: the key names (client_secret contains "secret").
_PATTERN_WORDS = ("basic", "bearer", "access_token", "password", "secret")
#: The shortest text a regex of _PATTERNS matches: a word, a separator, one character.
_SHORTEST_MATCH = min(len(w) for w in _PATTERN_WORDS) + 2


def redact_text(text: str) -> str:
    """``text`` with registered secrets and credential patterns replaced by ``[REDACTED]``."""
    index = _current_index()
    if index is not None and index.may_hold_one(text):
        text = index.pattern.sub(REDACTED, text)
    if _may_match_patterns(text):
        for regex, replacement in _PATTERNS:
            text = regex.sub(replacement, text)
    return text


#: Field values at most this long are remembered once redacted (_RedactedTexts).
SHORT_TEXT = 64
_SHORT_TEXTS_KEPT = 4096


class _RedactedTexts:
    """Short field values and what redaction made of them, valid for one set of registered
    secrets (``index``): an ``api.request`` line's fields (account, endpoint, method,
    outcome...) repeat on every call: remembered, a line costs 27 us instead of 35 (one
    thread, 200 secrets registered; benchmarks/ has no figure for it in a fleet). A new
    secret makes a new index, and with it an empty cache."""

    __slots__ = ("index", "texts")

    def __init__(self, index: _SecretIndex | None) -> None:
        self.index = index
        self.texts: dict[str, str] = {}


_redacted_texts = _RedactedTexts(None)


def _redact_field(text: str) -> str:
    """``redact_text(text)``, remembered for short texts under the current secrets."""
    global _redacted_texts
    if len(text) > SHORT_TEXT:
        return redact_text(text)
    index = _current_index()
    cache = _redacted_texts
    if cache.index is not index:
        cache = _redacted_texts = _RedactedTexts(index)
    done = cache.texts.get(text)
    if done is None:
        done = redact_text(text)
        if len(cache.texts) < _SHORT_TEXTS_KEPT:
            cache.texts[text] = done
    return done


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _redact_field(value)
    if isinstance(value, Mapping):
        return _redact_mapping(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


#: Whether a key names a secret, by key: log events use a few dozen key names, over and over.
_secret_keys: dict[str, bool] = {}
_SECRET_KEYS_KEPT = 4096


def _is_secret_key(key: str) -> bool:
    known = _secret_keys.get(key)
    if known is None:
        known = key not in _KEYS_NOT_REDACTED and _SECRET_KEY.search(key) is not None
        if len(_secret_keys) < _SECRET_KEYS_KEPT:
            _secret_keys[key] = known
    return known


#: Values that cannot hold a secret's text (bool is an int).
_PLAIN_TYPES = (int, float, type(None))


def _redact_mapping(data: Mapping[Any, Any]) -> dict[Any, Any]:
    # A loop with the common cases first: every log line's dozen fields pass through here.
    redacted: dict[Any, Any] = {}
    for key, value in data.items():
        if isinstance(key, str) and _is_secret_key(key):
            redacted[key] = REDACTED
        elif type(value) is str:
            redacted[key] = _redact_field(value)
        elif isinstance(value, _PLAIN_TYPES):
            redacted[key] = value
        else:
            redacted[key] = _redact_value(value)
    return redacted


def redact_event(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact by key name, by pattern and by registered value."""
    return _redact_mapping(event_dict)


class _RedactingRenderer:
    """Wraps the final renderer and scrubs its output line once more (values and patterns)."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        rendered = self._renderer(logger, method, event_dict)
        text = rendered if isinstance(rendered, str) else str(rendered)
        return redact_text(text)


class _PaypollHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler configure_logging installs on the root logger (found again by type)."""


class _LineLogger:
    """Where structlog's events go: the rendered line, written to the handler's stream under
    the handler's lock (so it never interleaves with a stdlib record's line).

    structlog's events used to travel through stdlib ``logging`` (a LogRecord, the logger
    hierarchy, the handler, ProcessorFormatter) only to be rendered by the same processors:
    about 25 us of CPU per event, one event per API call (issue 14). Levels are filtered by
    the bound logger (``make_filtering_bound_logger``) at the root logger's level."""

    def __init__(self, name: str, handler: logging.StreamHandler) -> None:  # type: ignore[type-arg]
        self.name = name
        self._handler = handler

    def msg(self, line: str) -> None:
        handler = self._handler
        with handler.lock:  # type: ignore[union-attr]
            handler.stream.write(line + handler.terminator)
            handler.flush()

    debug = info = warning = error = critical = exception = log = msg


class _LineLoggerFactory:
    """One _LineLogger per logger name, all writing through ``handler``."""

    def __init__(self, handler: logging.StreamHandler) -> None:  # type: ignore[type-arg]
        self._handler = handler
        self._loggers: dict[str, _LineLogger] = {}

    def __call__(self, *args: Any) -> _LineLogger:
        name = str(args[0]) if args and args[0] is not None else "root"
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = _LineLogger(name, self._handler)
        return logger


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelNamesMapping().get(level.strip().upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}: expected DEBUG, INFO, WARNING or ERROR")
    return number


def _pre_chain() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(
    *, fmt: str = "auto", level: str | int = "INFO", stream: IO[str] | None = None
) -> None:
    """Send structlog and stdlib logging to ``stream`` (default stderr) at ``level``.

    ``fmt``: ``json`` (one JSON object per line), ``console`` (human-readable), or ``auto``
    (console on a TTY, JSON otherwise). Safe to call again: the previous handler is replaced.
    """
    if fmt not in {"auto", "json", "console"}:
        raise ValueError(f"unknown log format {fmt!r}: expected auto, json or console")
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    numeric_level = _level(level)

    final: list[Processor]
    if fmt == "json":
        # Exceptions become a string before redaction, so their text is scrubbed too.
        final = [
            structlog.processors.format_exc_info,
            redact_event,
            _RedactingRenderer(structlog.processors.JSONRenderer()),
        ]
    else:
        # ConsoleRenderer formats exceptions itself; the rendered text is scrubbed afterwards.
        final = [
            redact_event,
            _RedactingRenderer(structlog.dev.ConsoleRenderer(colors=False)),
        ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_pre_chain(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = _PaypollHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _PaypollHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            *final,
        ],
        # The same processors as the stdlib records' (ProcessorFormatter above), without the
        # trip through stdlib logging.
        logger_factory=_LineLoggerFactory(handler),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # Not cached: a logger used before configure_logging must follow the later set-up.
        cache_logger_on_first_use=False,
    )
