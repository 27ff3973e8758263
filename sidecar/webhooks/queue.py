"""The webhook delivery queue: what a delivery is, the interface the worker uses, and the in-process queue.

A delivery is one event for one webhook. Its record (status `pending` → `delivered` | `failed`, attempts,
last error, next attempt) is what the admin API shows. The worker takes a `Ticket` (`read`), counts an
attempt (`begin`), and ends it one of three ways: `settle` (delivered, or failed for good), or `schedule`
(a retry later; `promote` hands it out again when due). `release` gives unfinished tickets back at shutdown.

`MemoryQueue` serves a sidecar without Redis: the same behaviour, but in this process only — pending
deliveries are lost when it exits, and each worker process has its own. `webhook_redis.RedisQueue` is the
durable one, shared by every worker and replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

STATUSES = ("pending", "delivered", "failed")


@dataclass(frozen=True, slots=True)
class Ticket:
    """A claim on one delivery: the queue entry handed out (a stream entry id in Redis) and the delivery id."""

    entry: str
    delivery: str


@dataclass(slots=True)
class Delivery:
    id: str  # also the `webhook-id` header: the same on every attempt, so receivers can drop duplicates
    event: str
    webhook: str
    body: str  # the signed JSON, fixed when the event is queued
    created: float
    status: str = "pending"
    attempts: int = 0
    last_error: str = ""
    next_attempt_at: float | None = None

    @classmethod
    def new(cls, event: str, webhook: str, body: str, now: float) -> Delivery:
        return cls(id=new_id(now), event=event, webhook=webhook, body=body, created=now)

    def fields(self) -> dict[str, str]:
        return {"id": self.id, "event": self.event, "webhook": self.webhook, "body": self.body,
                "created": repr(self.created), "status": self.status, "attempts": str(self.attempts),
                "last_error": self.last_error,
                "next_attempt_at": "" if self.next_attempt_at is None else repr(self.next_attempt_at)}

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> Delivery:
        return cls(id=f["id"], event=f["event"], webhook=f["webhook"], body=f["body"], created=float(f["created"]),
                   status=f["status"], attempts=int(f.get("attempts") or 0), last_error=f.get("last_error", ""),
                   next_attempt_at=float(f["next_attempt_at"]) if f.get("next_attempt_at") else None)

    def summary(self) -> dict[str, Any]:
        """The admin API's view (SPEC §7)."""
        return {"id": self.id, "event": self.event, "webhook": self.webhook, "status": self.status,
                "attempts": self.attempts, "last_error": self.last_error or None,
                "next_attempt_at": iso8601(self.next_attempt_at) if self.next_attempt_at else None,
                "created": iso8601(self.created)}


_ids = itertools.count()
_id_origin = (0, "")


def new_id(now: float) -> str:
    """`msg_` + milliseconds + a random per-process part + a counter: unique across processes and sortable by
    time, without a system call per id (ids name deliveries; they are not secrets)."""
    global _id_origin
    if _id_origin[0] != os.getpid():  # a forked child must not repeat its parent's ids
        _id_origin = (os.getpid(), secrets.token_hex(6))
    return f"msg_{int(now * 1000):x}{_id_origin[1]}{next(_ids):x}"


def iso8601(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


class DeliveryQueue(Protocol):
    durable: bool

    async def start(self) -> None: ...
    async def add(self, deliveries: list[Delivery]) -> None: ...
    async def read(self, count: int, block: float) -> list[Ticket]: ...
    async def begin(self, ticket: Ticket) -> Delivery | None: ...
    async def settle(self, ticket: Ticket, delivery: Delivery, status: str, error: str) -> None: ...
    async def schedule(self, ticket: Ticket, delivery: Delivery, due: float, error: str,
                       uncount: bool = False) -> None: ...
    async def promote(self) -> float | None: ...
    async def heartbeat(self, tickets: list[Ticket]) -> None: ...
    async def release(self, tickets: list[Ticket]) -> None: ...
    async def listing(self, status: str | None, limit: int) -> list[Delivery]: ...
    async def get(self, delivery_id: str) -> Delivery | None: ...
    async def requeue(self, delivery_id: str) -> str: ...


class MemoryQueue:
    """The queue of a sidecar without Redis: this process only, not durable."""

    durable = False

    def __init__(self, keep: int = 10_000) -> None:
        self._records: dict[str, Delivery] = {}
        self._ready: deque[str] = deque()
        self._due: list[tuple[float, str]] = []
        self._arrived = asyncio.Event()
        self._keep = keep  # finished records kept for the admin API; the oldest go first

    async def start(self) -> None:
        return None

    def _push(self, delivery_id: str) -> None:
        self._ready.append(delivery_id)
        self._arrived.set()

    async def add(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self._records[delivery.id] = delivery
            self._push(delivery.id)
        if len(self._records) > self._keep:
            finished = sorted((d for d in self._records.values() if d.status != "pending"), key=lambda d: d.created)
            for delivery in finished[: len(self._records) - self._keep]:
                del self._records[delivery.id]

    async def read(self, count: int, block: float) -> list[Ticket]:
        if not self._ready:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), block)
        tickets: list[Ticket] = []
        while self._ready and len(tickets) < count:
            delivery_id = self._ready.popleft()
            tickets.append(Ticket(delivery_id, delivery_id))
        return tickets

    async def begin(self, ticket: Ticket) -> Delivery | None:
        delivery = self._records.get(ticket.delivery)
        if delivery is None or delivery.status != "pending":
            return None
        delivery.attempts += 1
        delivery.next_attempt_at = None
        return delivery

    async def settle(self, ticket: Ticket, delivery: Delivery, status: str, error: str) -> None:
        delivery.status, delivery.last_error, delivery.next_attempt_at = status, error, None

    async def schedule(self, ticket: Ticket, delivery: Delivery, due: float, error: str,
                       uncount: bool = False) -> None:
        """Later, at `due`; `uncount`: the attempt `begin` counted was not made (deferred)."""
        delivery.last_error, delivery.next_attempt_at = error, due
        if uncount:
            delivery.attempts -= 1
        heapq.heappush(self._due, (due, delivery.id))

    async def promote(self) -> float | None:
        now = time.time()
        while self._due and self._due[0][0] <= now:
            _, delivery_id = heapq.heappop(self._due)
            if delivery_id in self._records and self._records[delivery_id].status == "pending":
                self._push(delivery_id)
        return self._due[0][0] if self._due else None

    async def heartbeat(self, tickets: list[Ticket]) -> None:
        return None

    async def release(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self._ready.appendleft(ticket.delivery)

    async def listing(self, status: str | None, limit: int) -> list[Delivery]:
        records = [d for d in self._records.values() if status is None or d.status == status]
        return sorted(records, key=lambda d: d.created, reverse=True)[:limit]

    async def get(self, delivery_id: str) -> Delivery | None:
        return self._records.get(delivery_id)

    async def requeue(self, delivery_id: str) -> str:
        delivery = self._records.get(delivery_id)
        if delivery is None:
            return "missing"
        if delivery.status != "failed":
            return delivery.status
        delivery.status, delivery.attempts, delivery.next_attempt_at = "pending", 0, None
        self._push(delivery_id)
        return "ok"
