"""The job queues on RabbitMQ (issue 14, deliverable 2): ``PAYPOLL_BROKER_URL=amqp://...``.

Against a real RabbitMQ (tests/rabbitmq_server.py: a private vhost per test on the local server,
or a private server): real `paypoll worker` fleets drive payments from submit to final through
RabbitMQ with every create made once and no 429; the queues are durable quorum queues; a
SIGKILLed worker loses nothing; the backlog gauges read RabbitMQ; bad URLs and refused logins
are one clear line without the password.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pika
import pika.exceptions
import pytest
import redis
import requests
from prometheus_client import CollectorRegistry, generate_latest

from tests.chaos_harness import base_env, run_cli
from tests.fleet_harness import paypoll_env, running_fleet, wait_started, write_accounts
from tests.prometheus_server import value
from tests.rabbitmq_server import RabbitMQ
from tests.redis_server import free_port
from tests.sandbox_fixture import RunningSandbox, running_sandbox
from tests.waiting import wait_until
from worker.actors import QUEUES, build_broker, declare_actors
from worker.collectors import StoreCollector
from worker.errors import ConfigError
from worker.keys import Keys
from worker.producer import Producer
from worker.settings import load_settings
from worker.store import API_TERMINAL, FINAL

CLIENTS = {"acme": "s3cret-acme", "globex": "s3cret-globex"}
RATE = 10  # per key, for the sandbox and the accounts alike
PASSWORD = "amqp-pw-Hq27xLm"  # a password that must never be echoed


@pytest.fixture
def vhost(rabbitmq: RabbitMQ) -> Iterator[str]:
    with rabbitmq.vhost() as name:
        yield name


@pytest.fixture
def amqp_url(rabbitmq: RabbitMQ, vhost: str) -> str:
    return rabbitmq.url(vhost)


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox(
        client=[f"{cid}:{secret}" for cid, secret in CLIENTS.items()],
        rate=RATE,
        limit_mode="sliding",
        pay_after="0.5:3",
        outcomes="paid=0.7,expired=0.15,cancelled=0.15",
        seed=14,
        max_amount=500,
    ) as sb:
        yield sb


def make_env(
    tmp_path: Path,
    redis_url: str,
    sandbox: RunningSandbox,
    key_prefix: str,
    amqp_url: str,
    **settings: object,
) -> dict[str, str]:
    return paypoll_env(
        redis_url=redis_url,
        api_url=sandbox.url,
        accounts_file=write_accounts(tmp_path, CLIENTS, RATE),
        key_prefix=key_prefix,
        broker_url=amqp_url,
        poll_first_delay=0.5,
        poll_max_delay=2.0,
        **settings,
    )


def submit(producer: Producer, count: int) -> None:
    names = sorted(CLIENTS)
    for i in range(count):
        producer.submit_payment(
            account=names[i % len(names)],
            amount="10",
            redirect_url="https://shop.test/thanks",
            reference_id=f"order-{i}",
        )


def wait_all_final(producer: Producer, count: int, timeout: float) -> dict[str, int]:
    def done() -> dict[str, int] | None:
        counts = dict(producer.counts())
        return counts if sum(counts[s.value] for s in FINAL) == count else None

    return wait_until(done, timeout=timeout, interval=0.25, what=f"{count} payments final")


def check_once_each_within_rate(stats: dict[str, object], count: int, unknown: int = 0) -> None:
    assert stats["duplicates"] == []
    clients = stats["clients"]
    assert isinstance(clients, dict)
    for client_id in CLIENTS:
        assert clients[client_id]["rate_limited"] == 0, clients[client_id]
        assert clients[client_id]["max_accepted_in_1s"] <= RATE
    creates = stats["creates_by_reference"]
    assert isinstance(creates, dict)
    made = [n for refs in creates.values() for n in refs.values()]
    assert all(n == 1 for n in made)
    assert count - unknown <= len(made) <= count


def drain(
    url: str, queue: str, found: dict[str, dict[str, object]]
) -> dict[str, dict[str, object]]:
    """Take every message of ``queue`` (dramatiq's JSON): the callbacks by event id."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        while True:
            try:
                method, _, body = channel.basic_get(queue, auto_ack=True)
            except pika.exceptions.ChannelClosedByBroker:
                return found  # not declared yet
            if method is None:
                return found
            payload = json.loads(body)["args"][0]
            found[payload["event_id"]] = payload
    finally:
        if connection.is_open:
            connection.close()


def no_job_keys_in_redis(redis_url: str, namespace: str) -> bool:
    client = redis.Redis.from_url(redis_url)
    try:
        return not list(client.scan_iter(match=f"{namespace}:*", count=1000))
    finally:
        client.close()


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"kafka://user:{PASSWORD}@127.0.0.1:9092",
        f"amqp://user:{PASSWORD}@",
        f"amqp://user:{PASSWORD}@127.0.0.1:notaport/x",
        f"amqp://user:{PASSWORD}@127.0.0.1:5672/a/b",
        f"redis+cluster://:{PASSWORD}@127.0.0.1:7000",
    ],
)
def test_a_bad_broker_url_is_one_line_naming_the_field_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^PAYPOLL_BROKER_URL: expected") as caught:
        load_settings({"PAYPOLL_BROKER_URL": url})
    assert PASSWORD not in str(caught.value)
    code, output = run_cli(
        base_env({"PAYPOLL_BROKER_URL": url, "PAYPOLL_REDIS_URL": "redis://127.0.0.1:1"}),
        "worker",
    )
    assert code == 2, output
    assert "PAYPOLL_BROKER_URL" in output and PASSWORD not in output
    assert "Traceback" not in output


def test_broker_url_picks_the_broker_and_is_required_by_redis_cluster() -> None:
    assert not load_settings({}).uses_rabbitmq()
    assert load_settings({}).jobs_url() == load_settings({}).redis_url
    amqp = load_settings({"PAYPOLL_BROKER_URL": "amqps://u:p@mq.example:5671/prod"})
    assert amqp.uses_rabbitmq() and amqp.jobs_url().startswith("amqps://")
    other = load_settings({"PAYPOLL_BROKER_URL": "redis://jobs.example:6379/3"})
    assert not other.uses_rabbitmq() and other.jobs_url() == "redis://jobs.example:6379/3"
    # Redis Cluster: producers and the CLI need no broker, what runs jobs needs RabbitMQ.
    cluster = load_settings({"PAYPOLL_REDIS_URL": "redis+cluster://h:7000"})
    with pytest.raises(ConfigError, match=r"^PAYPOLL_BROKER_URL: required with Redis Cluster"):
        build_broker(cluster)
    code, output = run_cli(
        base_env(
            {
                "PAYPOLL_REDIS_URL": "redis+cluster://:pw-Zk2@127.0.0.1:1",
                "PAYPOLL_CLIENT_ID": "acme",
                "PAYPOLL_CLIENT_SECRET": "s3cret-acme",
            }
        ),
        "worker",
    )
    assert code == 2 and "PAYPOLL_BROKER_URL: required with Redis Cluster" in output, output
    assert "pw-Zk2" not in output
    with_rabbitmq = load_settings(
        {"PAYPOLL_REDIS_URL": "redis+cluster://h:7000", "PAYPOLL_BROKER_URL": "amqp://u:p@h/v"}
    )
    assert with_rabbitmq.jobs_broker_problem() == ""
    # The Redis broker then runs there (connecting lazily), not on PAYPOLL_REDIS_URL.
    jobs = build_broker(other)
    assert jobs.client.connection_pool.connection_kwargs["host"] == "jobs.example"
    assert jobs.client.connection_pool.connection_kwargs["db"] == 3
    rabbit = build_broker(amqp)
    assert type(rabbit).__name__ == "DurableRabbitmqBroker" and rabbit.confirm_delivery


# --- queues -------------------------------------------------------------------------------------


def test_queues_are_durable_quorum_queues_and_messages_persist(
    rabbitmq: RabbitMQ, vhost: str, amqp_url: str
) -> None:
    settings = load_settings({"PAYPOLL_BROKER_URL": amqp_url})
    broker = build_broker(settings)
    actors = declare_actors(broker, settings)
    try:
        for queue in QUEUES:
            broker.declare_queue(queue, ensure=True)
        actors.send("create", "acme", "r-1")
        actors.send("track", "acme", "r-2")
        version = broker.server_version
    finally:
        broker.close()
    listed = rabbitmq.queues(vhost)
    names = {q + suffix for q in QUEUES for suffix in ("", ".DQ", ".XQ")}
    assert set(listed) == names, listed
    assert all(durable == "true" for durable, _ in listed.values()), listed
    if version >= (3, 10):
        assert {kind for _, kind in listed.values()} == {"quorum"}, listed
    # Published persistent with confirms: the messages are there, for any consumer to take.
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        method, properties, _ = channel.basic_get("paypoll-create", auto_ack=True)
        assert method is not None and properties.delivery_mode == 2
    finally:
        connection.close()


def test_an_existing_classic_queue_is_kept_and_still_carries_the_jobs(
    rabbitmq: RabbitMQ, vhost: str, amqp_url: str
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(
        "paypoll-track",
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "paypoll-track.XQ"},
    )
    connection.close()
    settings = load_settings({"PAYPOLL_BROKER_URL": amqp_url})
    broker = build_broker(settings)
    actors = declare_actors(broker, settings)
    try:
        actors.send("track", "acme", "r-1")
        actors.send("track", "acme", "r-2")
        assert broker.queue_type("paypoll-track") == "classic"
        counts = broker.get_queue_message_counts("paypoll-track")
    finally:
        broker.close()
    assert counts[0] == 2
    listed = rabbitmq.queues(vhost)
    assert listed["paypoll-track"] == ("true", "classic")
    assert listed["paypoll-track.DQ"][1] == "quorum"


def test_backlog_gauges_read_rabbitmq(
    redis_url: str, keys: Keys, key_prefix: str, amqp_url: str
) -> None:
    broker = build_broker(load_settings({"PAYPOLL_BROKER_URL": amqp_url}))
    try:
        for i in range(7):
            broker.enqueue(
                dramatiq.Message(
                    queue_name="paypoll-create",
                    actor_name="paypoll_create",
                    args=("acme", f"r-{i}"),
                    kwargs={},
                    options={},
                )
            )
    finally:
        broker.close()
    registry = CollectorRegistry()
    registry.register(
        StoreCollector.from_url(
            redis_url,
            keys=keys,
            namespace=f"{key_prefix}-q",
            queues=QUEUES,
            broker_url=amqp_url,
        )
    )
    text = generate_latest(registry).decode()
    assert value(text, "paypoll_redis_up") == 1
    assert value(text, "paypoll_broker_up") == 1
    assert value(text, "paypoll_queue_depth", queue="paypoll-create") == 7
    assert value(text, "paypoll_queue_depth", queue="paypoll-track") == 0
    assert value(text, "paypoll_queue_dead_messages", queue="paypoll-create") == 0
    # RabbitMQ tells unacknowledged counts only through its management plugin: not shown.
    assert value(text, "paypoll_queue_messages", queue="paypoll-create") is None

    # A broker that refuses: paypoll_broker_up 0, the store's gauges still served.
    wrong = re.sub(r":guest@", f":{PASSWORD}@", amqp_url)
    registry = CollectorRegistry()
    registry.register(
        StoreCollector.from_url(
            redis_url, keys=keys, namespace="x", queues=QUEUES, broker_url=wrong
        )
    )
    text = generate_latest(registry).decode()
    assert value(text, "paypoll_redis_up") == 1 and value(text, "paypoll_broker_up") == 0
    assert value(text, "paypoll_queue_depth", queue="paypoll-create") is None
    assert PASSWORD not in text


# --- fleets -------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_fleet_on_rabbitmq_makes_each_create_once_and_reaches_every_outcome(
    tmp_path: Path,
    redis_url: str,
    sandbox: RunningSandbox,
    key_prefix: str,
    rabbitmq: RabbitMQ,
    vhost: str,
    amqp_url: str,
) -> None:
    env = make_env(
        tmp_path, redis_url, sandbox, key_prefix, amqp_url, callback_actor="shop:payment_done"
    )
    producer = Producer.from_settings(load_settings(env))
    submit(producer, 80)
    with running_fleet(env, processes=2, threads=8) as fleet:
        counts = wait_all_final(producer, 80, timeout=120)
        text = requests.get(fleet.metrics_url, timeout=5).text
        assert fleet.process.poll() is None
        # The callback outbox sends each final state to the user's actor, through RabbitMQ too.
        callbacks: dict[str, dict[str, object]] = {}
        wait_until(
            lambda: len(drain(amqp_url, "shop", callbacks)) >= 80,
            timeout=30,
            what="80 callbacks on RabbitMQ",
        )
        # SIGTERM: the workers finish their steps, close their RabbitMQ connections and exit.
        assert fleet.stop() == 0
        assert '"worker.kill"' not in fleet.output() and '"worker.stopped"' in fleet.output()
    assert {(c["account"], c["reference_id"]) for c in callbacks.values()} == {
        (r.account, r.reference_id) for r in producer.list_payments()
    }
    check_once_each_within_rate(sandbox.stats(), 80)
    assert counts["paid"] > 0 and counts["expired"] + counts["cancelled"] > 0
    for record in producer.list_payments():
        assert record.attempts == 1 and record.polls >= 1, record
    # The jobs went through RabbitMQ: nothing of dramatiq's in Redis, and the queues are there.
    assert no_job_keys_in_redis(redis_url, env["PAYPOLL_NAMESPACE"])
    listed = rabbitmq.queues(vhost)
    assert {listed[q][0] for q in QUEUES} == {"true"}
    assert {listed[q][1] for q in QUEUES} == {"quorum"}
    assert value(text, "paypoll_broker_up") == 1
    assert value(text, "paypoll_queue_depth", queue="paypoll-create") is not None


@pytest.mark.timeout(240)
def test_a_sigkilled_worker_on_rabbitmq_loses_nothing_and_creates_nothing_twice(
    tmp_path: Path,
    redis_url: str,
    sandbox: RunningSandbox,
    key_prefix: str,
    amqp_url: str,
) -> None:
    env = make_env(tmp_path, redis_url, sandbox, key_prefix, amqp_url, sweep_grace=3)
    producer = Producer.from_settings(load_settings(env))
    submit(producer, 100)
    with running_fleet(env, processes=2, threads=8) as fleet:
        wait_started(fleet, 2)
        wait_until(lambda: producer.counts()["pending"] >= 15, timeout=60, what="tracking")
        assert fleet.kill_worker() is not None
        other_host = dict(env, PAYPOLL_METRICS_PORT=str(free_port()))
        with running_fleet(other_host, processes=1, threads=8) as second:
            wait_started(second, 1)
            wait_all_final_or_unknown(producer, 100, timeout=150)
        assert '"worker.died"' in fleet.output()
    unknown = list(producer.list_payments(state="create_unknown"))
    # A create cut off on the wire by the SIGKILL is create_unknown (invariant 3), never re-sent.
    assert len(unknown) <= 2, unknown
    check_once_each_within_rate(sandbox.stats(), 100, unknown=len(unknown))
    final = producer.counts()
    assert sum(final[s.value] for s in FINAL) == 100
    assert sum(final[s.value] for s in API_TERMINAL) == 100 - len(unknown), final


def wait_all_final_or_unknown(producer: Producer, count: int, timeout: float) -> None:
    # FINAL holds create_unknown already: a create cut off on the wire is settled, not lost.
    def done() -> bool:
        counts = producer.counts()
        return sum(counts[s.value] for s in FINAL) == count

    try:
        wait_until(done, timeout=timeout, interval=0.25, what=f"{count} payments settled")
    except AssertionError as timed_out:
        # Say which payments did not settle and where they stand, so a failure under load can
        # be read from the CI log alone.
        unsettled = [
            record
            for record in producer.list_payments()
            if record.state not in {s.value for s in FINAL}
        ]
        raise AssertionError(
            f"{timed_out}; counts {dict(producer.counts())}; unsettled {unsettled[:10]}"
        ) from None


def test_a_refused_broker_login_stops_the_worker_with_one_line(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str, amqp_url: str
) -> None:
    wrong = amqp_url.replace(":guest@", f":{PASSWORD}@")
    env = make_env(tmp_path, redis_url, sandbox, key_prefix, wrong)
    code, output = run_cli(env, "worker", "--processes", "1")
    assert code == 2, output
    assert "PAYPOLL_BROKER_URL" in output and "login refused" in output
    assert PASSWORD not in output
    assert "Traceback" not in output
    missing = make_env(tmp_path, redis_url, sandbox, key_prefix, amqp_url + "-missing")
    code, output = run_cli(missing, "worker", "--processes", "1")
    assert code == 2 and "vhost refused" in output, output

    # doctor says the same, and says what the good URL's server offers.
    code, output = run_cli(env, "doctor")
    assert PASSWORD not in output
    assert any(line.startswith("FAIL  broker:") for line in output.splitlines()), output
    code, output = run_cli(make_env(tmp_path, redis_url, sandbox, key_prefix, amqp_url), "doctor")
    broker = [line for line in output.splitlines() if " broker:" in line]
    assert broker and broker[0].startswith("OK") and "RabbitMQ" in broker[0], output
    assert "guest:***@" in broker[0] and "quorum" in broker[0]


@pytest.mark.timeout(90)
def test_a_fleet_started_before_its_broker_runs_and_says_so(
    tmp_path: Path, redis_url: str, sandbox: RunningSandbox, key_prefix: str
) -> None:
    """RabbitMQ not answering yet is no reason to stop (it may be starting with the fleet, as
    Redis may): the fleet runs, its consumers retry, the exporter says paypoll_broker_up 0,
    and the log names the broker with its password masked."""
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:{free_port()}/paypoll"
    env = make_env(tmp_path, redis_url, sandbox, key_prefix, url)
    with running_fleet(env, processes=1, threads=2) as fleet:
        fleet.wait_ready(timeout=30)

        def broker_down() -> str | None:
            text = requests.get(fleet.metrics_url, timeout=5).text
            return text if value(text, "paypoll_broker_up") == 0 else None

        text = wait_until(broker_down, timeout=20, what="paypoll_broker_up 0")
        assert value(text, "paypoll_redis_up") == 1
        wait_until(
            lambda: "connection error" in fleet.output(), timeout=20, what="the consumers' retry"
        )
        assert fleet.process.poll() is None
        output = fleet.output()
    assert '"broker.unreachable"' in output and "guest:***@127.0.0.1" in output
    assert PASSWORD not in output
    assert output.count("\n") < 200, "pika's connection chatter is back"
