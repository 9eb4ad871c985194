"""``POST /api/webhooks/replicate``: Replicate tells us a prediction finished."""

from __future__ import annotations

from quart import Blueprint, request
from werkzeug.exceptions import RequestEntityTooLarge

from actors.errors import WebhookRejected
from actors.providers.base import WebhookReceiver
from web.context import state
from web.errors import APIError

blueprint = Blueprint("webhooks", __name__)

#: A prediction with inline ``data:`` outputs can be a few hundred KB.
WEBHOOK_MAX_BYTES = 1024 * 1024


@blueprint.post("/api/webhooks/replicate")
async def replicate_webhook() -> dict[str, object]:
    """Verify the Standard Webhooks signature, then complete the image at once.

    401 for a bad or stale signature (nothing changes); 404 when webhooks are not in use.
    """
    provider = state().supervisor.provider
    if not isinstance(provider, WebhookReceiver) or not provider.webhooks_enabled:
        raise APIError(404, "Webhooks are not configured")
    try:
        body = await request.get_data(as_text=False)
    except RequestEntityTooLarge:
        raise APIError(413, f"Webhook body is larger than {WEBHOOK_MAX_BYTES} bytes") from None
    try:
        raw = body if isinstance(body, bytes) else body.encode()
        provider.receive_webhook(dict(request.headers), raw)
    except WebhookRejected as exc:
        raise APIError(401, f"Invalid webhook: {exc}") from None
    return {"status": "accepted"}
