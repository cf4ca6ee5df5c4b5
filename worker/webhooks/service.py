"""The webhooks of one worker process: the router and one driver per configured endpoint."""

from __future__ import annotations

import structlog

from worker.settings import Settings
from worker.store import PaymentStore
from worker.webhooks.driver import EndpointDriver
from worker.webhooks.endpoints import Endpoints
from worker.webhooks.router import Router

log = structlog.get_logger("paypoll.webhooks")


class WebhookService:
    """Starts and stops the router and the drivers (threads) for ``settings``' endpoints.

    ``owner`` names this process in the drivers' leases and the router's consumer group: keep
    it stable across restarts of the same process (worker/outbox.py's ``consumer_name``)."""

    def __init__(self, *, settings: Settings, store: PaymentStore, owner: str) -> None:
        self.endpoints = Endpoints.from_settings(settings)
        self.drivers = {
            name: EndpointDriver(
                client=store.redis,
                keys=store.keys,
                endpoint=endpoint,
                owner=owner,
                concurrency=settings.webhook_concurrency,
                retry_for=settings.webhook_retry_for,
                connect_timeout=settings.webhook_connect_timeout,
                read_timeout=settings.webhook_read_timeout,
            )
            for name, endpoint in self.endpoints.by_name.items()
        }
        self.router = Router(
            store=store,
            endpoints=self.endpoints,
            consumer=owner,
            notify=self._nudge,
            events_cap=settings.events_maxlen,
        )

    def _nudge(self, endpoint: str) -> None:
        driver = self.drivers.get(endpoint)
        if driver is not None:
            driver.nudge.set()

    def start(self) -> None:
        for driver in self.drivers.values():
            driver.start()
        self.router.start()
        log.info("webhooks.started", endpoints=sorted(self.drivers))

    def stop(self, timeout: float = 15.0) -> None:
        """Stop routing and delivering; what is not delivered stays queued in Redis."""
        self.router.stop()
        for driver in self.drivers.values():
            driver.stop()
        self.router.join(timeout)
        for driver in self.drivers.values():
            driver.join(timeout)
