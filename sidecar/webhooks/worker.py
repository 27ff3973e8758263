"""Webhooks (SPEC §8): every event goes, signed, to each webhook subscribed to it — at least once, retried,
dead-lettered after the last try, and visible in the admin API.

    event ──enqueue──▶ queue (Redis Stream, or in-process) ──worker──▶ POST to the receiver
                         ▲                                        │ 2xx: delivered
                         └──── due set ◀── retry later ◀─────────┤ other, timeout, no connection: retry
                                                                   │ 410 Gone: webhook disabled
                                                                   └ last attempt failed: failed (dead letter)

Queuing an event is one XADD (concurrent ones share a round trip) and never waits for a receiver;
deliveries run in a background worker with at most `WORKERS` attempts in flight per process, each bounded
by the webhook's `timeout`, at most `max_concurrent` of them to one receiver, and none to a receiver whose
circuit breaker is open (sidecar/webhooks/isolation.py).
Signing follows Standard Webhooks (the `standardwebhooks` package): `webhook-id` (the delivery id, the same
on every attempt), `webhook-timestamp`, and one `v1,` signature per configured secret (rotation).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from standardwebhooks import Webhook as StandardWebhook

from sidecar.config.limits import SpoolConfig
from sidecar.ops import tracing
from sidecar.outbound.guard import UnsafeDestination, delivery_client
from sidecar.webhooks.isolation import ReceiverGuards
from sidecar.webhooks.queue import Delivery, DeliveryQueue, MemoryQueue, Ticket, iso8601
from sidecar.webhooks.redis_queue import LEASE, RedisQueue
from sidecar.webhooks.spool import Spool

if TYPE_CHECKING:
    from sidecar.config.model import RetryConfig, WebhookConfig
    from sidecar.webhooks.context import WebhookContext

log = logging.getLogger("sidecar.webhooks.worker")

WORKERS = 16  # attempts in flight per process: a stalled receiver can hold these, never a proxied request
SHUTDOWN_GRACE = 1.0  # seconds attempts in flight may finish at shutdown before going back to the queue
IDLE_POLL = 1.0  # how often the retry set is looked at when nothing is due here (another process may die)
OPT_IN_EVENTS = frozenset({"auth.refused"})  # never covered by "*": only sent when named
USER_AGENT = "sidecar-webhooks/1"


try:  # orjson: ~1 µs for a payload instead of ~15, on the request's event loop
    import orjson

    def _dumps(value: Any) -> str:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
except ImportError:  # pragma: no cover
    def _dumps(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def subscribed(webhook: WebhookConfig, event: str) -> bool:
    return event in webhook.events or ("*" in webhook.events and event not in OPT_IN_EVENTS)


def signature(secrets: list[str], msg_id: str, timestamp: int, body: str) -> str:
    """`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per secret, space-separated."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    return " ".join(StandardWebhook(secret).sign(msg_id, when, body) for secret in secrets)


def backoff(retry: RetryConfig, attempts: int) -> float:
    """Exponential backoff with full jitter: a uniform wait up to min(max_delay, initial * 2^(attempts-1)),
    so receivers coming back from an outage are not hit by every sender at the same instant."""
    return random.uniform(0, min(retry.max_delay, retry.initial * 2 ** min(attempts - 1, 60)))


class Webhooks:
    def __init__(self, context: WebhookContext) -> None:
        self.context = context
        redis = getattr(context.store, "redis", None)
        self.queue: DeliveryQueue = RedisQueue(redis) if redis is not None else MemoryQueue()
        self._running = False
        self._closed = False  # after aclose, a late event is queued but no worker starts here
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[Ticket, asyncio.Task[None]] = {}
        self._room = asyncio.Event()
        self._due_changed = asyncio.Event()
        self._disabled: dict[str, object] = {}  # webhook id -> the configuration in force when it answered 410
        self._routing: tuple[object, dict[str, list[WebhookConfig]]] = (None, {})  # configuration, event -> webhooks
        self._clients: dict[bool, httpx.AsyncClient] = {}
        self.spool = Spool(SpoolConfig(), context.audit)  # events Redis could not take
        self.guards = ReceiverGuards()  # per receiver: concurrency and circuit breaker (webhooks/isolation.py)

    # -- events in --------------------------------------------------------------------------------------------

    def targets(self, event: str) -> list[WebhookConfig]:
        config = self.context.config
        if self._routing[0] is not config:  # a reload: subscriptions (and 410s) start afresh
            self._routing = (config, {})
        found = self._routing[1].get(event)
        if found is None:
            found = self._routing[1][event] = [w for w in config.webhooks
                                               if subscribed(w, event) and not self.disabled(w.id)]
        return found

    async def enqueue(self, event: str, data: dict[str, Any]) -> None:
        targets = self.targets(event)
        if not targets:
            return
        now = time.time()
        body = _dumps({"type": event, "timestamp": iso8601(now), "data": data})
        deliveries = [Delivery.new(event, webhook.id, body, now) for webhook in targets]
        try:
            await self.queue.add(deliveries)
        except Exception as exc:  # the request that raised the event has been answered: keep it for later
            self.spool.config = self.context.config.webhook_spool
            self.spool.put(deliveries, f"{type(exc).__name__}: {exc}")
        await self.start()

    def disabled(self, webhook_id: str) -> bool:
        """A 410 Gone stops deliveries to that webhook until the configuration is reloaded."""
        return self._disabled.get(webhook_id) is self.context.config

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker — at start-up when webhooks are configured, else with the first event queued."""
        if self._running or self._closed or not self.context.config.webhooks:
            return
        self._running = True
        self._clients = {private: delivery_client(private, WORKERS) for private in (False, True)}
        self._tasks = [asyncio.ensure_future(job()) for job in (self._read, self._promote, self._heartbeat,
                                                                self._drain_spool)]

    async def aclose(self) -> None:
        """Stop reading; give attempts in flight a moment, then hand what is unfinished back to the queue."""
        self._closed = True
        if not self._running:
            return
        self._running = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        unfinished = list(self._inflight)
        if self._inflight:
            _, pending = await asyncio.wait(list(self._inflight.values()), timeout=SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            await self.queue.release(unfinished)
        except Exception as exc:  # left pending in Redis: another process takes them over after the lease
            log.warning("could not hand webhook deliveries back to the queue: %s", exc)
        for client in self._clients.values():
            await client.aclose()

    # -- the worker -------------------------------------------------------------------------------------------

    async def _read(self) -> None:
        started = False
        while True:
            try:
                if not started:
                    await self.queue.start()
                    started = True
                room = WORKERS - len(self._inflight)
                if room <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                for ticket in await self.queue.read(room, block=1.0):
                    if ticket not in self._inflight:
                        task = self._inflight[ticket] = asyncio.ensure_future(self._deliver(ticket))
                        task.add_done_callback(functools.partial(self._finished_task, ticket))
            except Exception as exc:
                log.warning("webhook queue unavailable (%s); trying again in 1 s", exc)
                await asyncio.sleep(1.0)

    def _finished(self, ticket: Ticket) -> None:
        self._inflight.pop(ticket, None)
        self._room.set()

    def _finished_task(self, ticket: Ticket, _task: asyncio.Future[None]) -> None:
        self._finished(ticket)

    async def _promote(self) -> None:
        """Move retries that are due back to the queue; sleep until the next one (or IDLE_POLL)."""
        while True:
            try:
                next_due = await self.queue.promote()
            except Exception as exc:
                log.warning("webhook retry set unavailable: %s", exc)
                next_due = None
            wait = IDLE_POLL if next_due is None else min(max(next_due - time.time(), 0.005), IDLE_POLL)
            self._due_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due_changed.wait(), wait)

    async def _drain_spool(self) -> None:
        """Queue what was spooled while Redis could not take it, once it can (looked at every second)."""
        while True:
            self.spool.config = self.context.config.webhook_spool
            if self.spool.pending():
                try:
                    queued = await self.spool.drain(self.queue)
                except Exception as exc:
                    log.debug("webhook spool not drained yet: %s", exc)
                else:
                    if queued:
                        log.warning("queued %d webhook deliveries kept in the spool while Redis was away", queued)
            await asyncio.sleep(1.0)

    async def _heartbeat(self) -> None:
        """Keep the claim on deliveries in flight fresh, so a slow receiver is not mistaken for a dead worker."""
        while True:
            await asyncio.sleep(LEASE / 5)
            with contextlib.suppress(Exception):
                await self.queue.heartbeat(list(self._inflight))

    async def _deliver(self, ticket: Ticket) -> None:
        try:
            delivery = await self.queue.begin(ticket)
            if delivery is None:  # already finished (a duplicate entry), or its record is gone
                return
            webhook = {w.id: w for w in self.context.config.webhooks}.get(delivery.webhook)
            if webhook is None:
                await self._settle(ticket, delivery, "failed", f"webhook {delivery.webhook!r} is no longer configured")
            elif self.disabled(webhook.id):
                await self._settle(ticket, delivery, "failed", _gone(webhook.id), outcome="disabled")
            else:
                await self._guarded_attempt(ticket, delivery, webhook)
        except Exception:  # in Redis the entry stays pending and is taken over after the lease
            log.exception("webhook delivery %s failed inside the sidecar", ticket.delivery)

    async def _guarded_attempt(self, ticket: Ticket, delivery: Delivery, webhook: WebhookConfig) -> None:
        """Attempt it unless its receiver is at `max_concurrent` or its breaker is open: then defer it (the attempt
        not counted) instead of holding one of the worker's slots."""
        guard = self.guards.guard(webhook.id)
        deferred = guard.admit(webhook, time.time())
        if deferred is not None:
            wait, why = deferred
            await self.queue.schedule(ticket, delivery, time.time() + wait, why, uncount=True)
            self.context.metrics.webhooks.labels("deferred").inc()
            self._due_changed.set()
            return
        verdict, error = "retry", "the attempt did not finish"
        try:
            with tracing.root_span("webhook.delivery", **{"sidecar.webhook": webhook.id,
                                                          "sidecar.event": delivery.event,
                                                          "sidecar.attempt": delivery.attempts + 1}):
                verdict, error = await self._attempt(webhook, delivery)
        finally:
            guard.done(webhook, verdict == "retry", time.time())
        await self._attempted(ticket, delivery, webhook, verdict, error)

    async def _attempted(self, ticket: Ticket, delivery: Delivery, webhook: WebhookConfig, verdict: str,
                         error: str) -> None:
        if verdict == "delivered":
            await self._settle(ticket, delivery, "delivered", "", outcome="delivered")
        elif verdict == "gone":
            self._disabled[webhook.id] = self.context.config
            self._routing = (None, {})
            log.warning("webhook %s answered 410 Gone: no more deliveries to it until the configuration is "
                        "reloaded", webhook.id)
            await self._settle(ticket, delivery, "failed", _gone(webhook.id), outcome="disabled")
        elif verdict == "refused":
            await self._settle(ticket, delivery, "failed", error, outcome="failed")
        else:
            retry = webhook.retry or self.context.config.webhook_retry
            if delivery.attempts >= retry.max_attempts:
                await self._settle(ticket, delivery, "failed", f"{error} (gave up after {delivery.attempts} attempts)",
                                   outcome="failed")
            else:
                await self.queue.schedule(ticket, delivery, time.time() + backoff(retry, delivery.attempts), error)
                self.context.metrics.webhooks.labels("retry").inc()
                self._due_changed.set()

    async def _settle(self, ticket: Ticket, delivery: Delivery, status: str, error: str,
                      outcome: str = "failed") -> None:
        await self.queue.settle(ticket, delivery, status, error)
        self.context.metrics.webhooks.labels(outcome).inc()

    async def _attempt(self, webhook: WebhookConfig, delivery: Delivery) -> tuple[str, str]:
        """One POST: ("delivered" | "gone" | "refused" | "retry", what went wrong)."""
        secrets = [webhook.secret] if isinstance(webhook.secret, str) else list(webhook.secret)
        now = int(time.time())
        headers = {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": delivery.id,
                   "webhook-timestamp": str(now),
                   "webhook-signature": signature(secrets, delivery.id, now, delivery.body)}
        client = self._clients[webhook.allow_private]
        try:
            async with asyncio.timeout(webhook.timeout):  # the whole attempt, not each read
                async with client.stream("POST", webhook.url, content=delivery.body.encode(), headers=headers,
                                         timeout=webhook.timeout) as response:
                    status = response.status_code
                    await _drain(response)
        except UnsafeDestination as exc:
            return "refused", str(exc)
        except httpx.InvalidURL as exc:
            return "refused", f"invalid URL: {exc}"
        except (TimeoutError, httpx.TimeoutException):
            return "retry", f"no answer within {webhook.timeout:g} s"
        except httpx.HTTPError as exc:
            return "retry", f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return "delivered", ""
        if status == 410:
            return "gone", ""
        if 300 <= status < 400:
            return "retry", f"HTTP {status} (redirects are not followed)"
        return "retry", f"HTTP {status}"

    # -- what the admin API (sidecar/webhooks/admin_routes.py) asks -----------------------------------------

    def enable(self, webhook_id: str) -> None:
        """The operator says the receiver is back (a failed delivery retried): a 410 no longer stops deliveries."""
        if self._disabled.pop(webhook_id, None) is not None:
            self._routing = (None, {})


def _gone(webhook_id: str) -> str:
    return (f"HTTP 410 Gone: the receiver ended the subscription; webhook {webhook_id!r} gets no deliveries "
            "until the configuration is reloaded")


async def _drain(response: httpx.Response, limit: int = 64 * 1024) -> None:
    """Read a little of the reply so the connection can be reused; a huge one is cut off instead."""
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read > limit:
            break
