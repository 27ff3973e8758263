"""The webhook deliveries in the admin API (SPEC §7): list them, and retry a failed one. The admin port
(sidecar/ops/admin_api.py) mounts these routes behind the admin token, each route's `name` being the action
it audits; the webhooks do not know the admin API, nor it them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.errors import BadRequest, Conflict, NotFound
from sidecar.state.store import failing_closed
from sidecar.webhooks.queue import STATUSES

if TYPE_CHECKING:
    from sidecar.webhooks.worker import Webhooks


def admin_routes(webhooks: Webhooks) -> list[Route]:
    async def deliveries(request: Request) -> Response:
        return await list_deliveries(webhooks, request)

    async def retry(request: Request) -> Response:
        return await retry_delivery(webhooks, request)

    return [
        Route("/admin/webhooks/deliveries", deliveries, methods=["GET"], name="webhooks.deliveries"),
        Route("/admin/webhooks/deliveries/{delivery_id}/retry", retry, methods=["POST"], name="webhooks.retry"),
    ]


async def list_deliveries(webhooks: Webhooks, request: Request) -> Response:
    status = request.query_params.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    try:
        limit = int(request.query_params.get("limit", "100"))
    except ValueError:
        raise BadRequest("limit must be a number from 1 to 1000") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be a number from 1 to 1000")
    async with failing_closed():
        found = await webhooks.queue.listing(status, limit)
    receivers = webhooks.guards.report([w.id for w in webhooks.context.config.webhooks])
    return JSONResponse({"deliveries": [d.summary() for d in found], "receivers": receivers})


async def retry_delivery(webhooks: Webhooks, request: Request) -> Response:
    """Queue a failed delivery again, its attempts counted from zero."""
    delivery_id = request.path_params["delivery_id"]
    async with failing_closed():
        delivery = await webhooks.queue.get(delivery_id)
        result = await webhooks.queue.requeue(delivery_id)
    if result == "missing" or delivery is None:
        raise NotFound("no such delivery (finished ones are kept 7 days, failed ones 30)")
    if result != "ok":
        raise Conflict(f"the delivery is {result}; only failed deliveries can be retried")
    webhooks.enable(delivery.webhook)
    await webhooks.start()
    # The delivery as queued again (a worker may already be on it by the time anything is read back).
    queued = {**delivery.summary(), "status": "pending", "attempts": 0, "last_error": None, "next_attempt_at": None}
    return JSONResponse(queued, status_code=202)
