"""Every series the dashboard and the alert rules query exists from a fleet's start (issue 15).

A panel over a series that is not exposed yet says "No data", and an alert on ``increase()`` of a
counter that appears with its first event never sees that event: ``paypoll_token_failures_total``
was both. So a fresh fleet (no payment submitted, no API call made) is scraped once, and every
selector of every query (the dashboard's targets and variables, config/alerts.yml's rules) must
match at least one sample, label matchers included. The queries are parsed, not listed: a new
panel or rule is checked as soon as it is added.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fleet_harness import paypoll_env, running_fleet, wait_started, write_accounts
from tests.prometheus_server import samples, scrape
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from tests.test_prometheus import ALERTS, DASHBOARD, GRAFANA_VARIABLES
from tests.waiting import wait_until
from tests.webhook_receiver import new_secret

CLIENTS = {"acme": "s3cret-acme-Hq2", "globex": "s3cret-globex-Lp7"}

# A metric name and, optionally, its label matchers: `paypoll_x{a="b", c=~"d|e"}`.
SELECTOR = re.compile(r"\b(paypoll_[a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True)
class Selector:
    """One series selector of a query: a metric name and its label matchers."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)

    def __str__(self) -> str:
        inner = ", ".join(f'{label}{op}"{value}"' for label, op, value in self.matchers)
        return f"{self.name}{{{inner}}}" if inner else self.name

    def matches(self, name: str, labels: dict[str, str]) -> bool:
        """Whether the sample ``name{labels}`` is one this selector selects (PromQL's rules:
        regexes fully anchored, an absent label is the empty string)."""
        if name != self.name:
            return False
        for label, op, value in self.matchers:
            have = labels.get(label, "")
            if op == "=" and have != value:
                return False
            if op == "!=" and have == value:
                return False
            if op == "=~" and not re.fullmatch(value, have):
                return False
            if op == "!~" and re.fullmatch(value, have):
                return False
        return True


def selectors(query: str) -> list[Selector]:
    """The series selectors of a PromQL query (Grafana's variables expanded as for "All")."""
    for variable, expansion in GRAFANA_VARIABLES.items():
        query = query.replace(variable, expansion)
    found = []
    for name, braces in SELECTOR.findall(query):
        matchers = tuple(MATCHER.findall(braces)) if braces else ()
        found.append(Selector(name, matchers))
    return found


def _dashboard_queries(node: Any) -> Iterator[str]:
    """Every query of the dashboard: panels' targets and the templating variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_queries(item)


def _alert_queries(text: str) -> Iterator[str]:
    """The ``expr`` of every rule of a rules file (one-line, or a ``>-``/``|`` block)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not found:
            continue
        indent, rest = len(found.group(1)), found.group(2).strip()
        if rest and rest[0] not in ">|":
            yield rest
            continue
        block = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        yield " ".join(block)


def queried_selectors() -> dict[str, list[Selector]]:
    """Query text -> its selectors, for the dashboard and the alert rules."""
    queries = [
        *_dashboard_queries(json.loads(DASHBOARD.read_text())),
        *_alert_queries(ALERTS.read_text()),
    ]
    return {query: selectors(query) for query in queries if "paypoll_" in query}


def unmatched(found: Samples) -> list[str]:
    """``query: selector`` for every selector no sample of ``found`` matches."""
    missing = []
    for query, wanted in queried_selectors().items():
        for selector in wanted:
            if not any(selector.matches(n, dict(lbls)) for n, lbls in found):
                missing.append(f"{selector}  (in: {' '.join(query.split())[:120]})")
    return sorted(set(missing))


def test_the_queries_are_parsed_into_their_selectors() -> None:
    by_query = queried_selectors()
    every = {str(s) for wanted in by_query.values() for s in wanted}
    assert len(by_query) >= 40  # the dashboard's targets and the alert rules, not a few of them
    assert 'paypoll_token_failures_total{reason="403"}' in every  # an alert's, with its matcher
    assert 'paypoll_payments{account=~".*", state=~"create_unknown|failed"}' in every
    assert "paypoll_queue_depth" in every  # from the multi-line rule
    assert "paypoll_account_rate_limit" in every  # the dashboard's account variable
    # The matcher follows PromQL: anchored regexes, a missing label is "".
    selector = selectors('paypoll_x{state=~"a|b", outcome!="error"}')[0]
    assert selector.matches("paypoll_x", {"state": "a"})
    assert not selector.matches("paypoll_x", {"state": "ab"})
    assert not selector.matches("paypoll_x", {"state": "b", "outcome": "error"})
    assert unmatched({("paypoll_x", frozenset({("state", "a")})): 0.0}) != []


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox(client=[f"{cid}:{secret}" for cid, secret in CLIENTS.items()]) as sb:
        yield sb


def test_a_fresh_fleet_exposes_every_queried_series(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str
) -> None:
    env = paypoll_env(
        redis_url=redis_url,
        api_url=sandbox.url,
        accounts_file=write_accounts(tmp_path, CLIENTS, 5),
        key_prefix=key_prefix,
        # The outbox's consumer group exists from the start: its lag series too.
        callback_actor="shop-events:payment_done",
        # A webhook endpoint (nothing is sent: no payment): its series exist from the start.
        webhook_url="http://127.0.0.1:9/hooks",
        webhook_secret=new_secret(),
    )
    url = f"http://127.0.0.1:{env['PAYPOLL_METRICS_PORT']}/metrics"
    with running_fleet(env, processes=1, threads=2) as fleet:
        wait_started(fleet, 1)
        last: list[str] = []

        def every_series_there() -> bool:
            found = samples(scrape(url))
            last[:] = unmatched(found)
            return not last

        try:
            wait_until(every_series_there, timeout=20, interval=0.25, what="every queried series")
        except AssertionError:
            pytest.fail("queried but not exposed by a fresh fleet:\n" + "\n".join(last))
        text = scrape(url)
    # Nothing happened: the primed series are zeros, for the configured accounts only.
    assert sum(client["total"] for client in sandbox.stats()["clients"].values()) == 0
    assert 'paypoll_token_failures_total{account="acme",reason="403"} 0.0' in text
    assert 'paypoll_payments{account="globex",state="queued"} 0.0' in text
    for secret in CLIENTS.values():
        assert secret not in text
