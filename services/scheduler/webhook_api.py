"""The webhook routes of the job API: a tenant registers, lists, removes and tests
the endpoints its jobs' events are sent to (webhooks.py, deliveries.py).

Every route is scoped to the caller's tenant: another tenant's webhook is
indistinguishable from one that does not exist (404).
"""

from __future__ import annotations

from aiohttp import web

from services.scheduler.deliveries import DELIVERIES
from services.scheduler.egress import TargetRefused
from services.scheduler.views import (
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookTestQueued,
    WebhookView,
)
from services.scheduler.webhooks import WEBHOOKS, TooManyWebhooks, public_webhook
from shared.auth import Role
from shared.http import PRINCIPAL, ApiError, read_model, roles
from shared.mongo import Document
from shared.openapi import endpoint


@roles(Role.user, Role.operator)
@endpoint(
    summary="Register a webhook for the caller's tenant; the answer has its signing secret, "
    "the only time it is shown.",
    body=WebhookCreate,
    response=WebhookCreated,
    status=201,
    errors=(409,),
)
async def add_webhook(request: web.Request) -> web.Response:
    asked = await read_model(request, WebhookCreate)
    principal = request[PRINCIPAL]
    try:
        webhook, secret = await request.app[WEBHOOKS].add(
            principal.tenant, principal.name, asked.url, asked.events
        )
    except TargetRefused as exc:
        # Worded as every other refused field is (a validator's "Value error, ..."):
        # the rule needs DNS, so no model validator can state it.
        problem = {"field": "url", "problem": f"Value error, {exc.reason}"}
        raise ApiError(422, "the request body is not valid", problems=[problem]) from None
    except TooManyWebhooks as exc:
        raise ApiError(409, str(exc)) from None
    return web.json_response({**public_webhook(webhook), "secret": secret}, status=201)


@roles(Role.user, Role.operator)
@endpoint(summary="The caller's tenant's webhooks (without their secrets).", response=WebhookList)
async def list_webhooks(request: web.Request) -> web.Response:
    found = await request.app[WEBHOOKS].of_tenant(request[PRINCIPAL].tenant)
    return web.json_response({"webhooks": [public_webhook(doc) for doc in found]})


@roles(Role.user, Role.operator)
@endpoint(
    summary="Remove a webhook; what was still to be sent to it is dropped.",
    response=WebhookView,
    errors=(404,),
)
async def remove_webhook(request: web.Request) -> web.Response:
    webhook_id = request.match_info["webhook_id"]
    removed = await request.app[WEBHOOKS].remove(webhook_id, request[PRINCIPAL].tenant)
    if removed is None:
        raise ApiError(404, f"no webhook {webhook_id}")
    await request.app[DELIVERIES].store.forget_webhook(webhook_id)
    return web.json_response(public_webhook(removed))


@roles(Role.user, Role.operator)
@endpoint(
    summary="Send a `webhook.test` message to a webhook (delivered and retried as any other).",
    response=WebhookTestQueued,
    status=202,
    errors=(404,),
)
async def send_test_webhook(request: web.Request) -> web.Response:
    webhook = await _tenant_webhook(request)
    delivery = await request.app[DELIVERIES].test(webhook)
    return web.json_response({"webhook_id": webhook["_id"], "delivery_id": delivery}, status=202)


async def _tenant_webhook(request: web.Request) -> Document:
    webhook_id = request.match_info["webhook_id"]
    webhook = await request.app[WEBHOOKS].get(webhook_id, request[PRINCIPAL].tenant)
    if webhook is None:
        raise ApiError(404, f"no webhook {webhook_id}")
    return webhook


def add_webhook_routes(routes: web.RouteTableDef) -> None:
    """Put the webhook routes on the job API's table (api.py): one API, one document."""
    routes.post("/v1/webhooks")(add_webhook)
    routes.get("/v1/webhooks")(list_webhooks)
    routes.delete("/v1/webhooks/{webhook_id}")(remove_webhook)
    routes.post("/v1/webhooks/{webhook_id}/test")(send_test_webhook)
