"""The payment provider the API asks for checkout sessions.

This environment reaches no payment provider, so the one adapter here is local: it
names the provider session after the platform's session id (so asking twice for the
same session gives the same answer, as Stripe does under an idempotency key) and
points the payer at ``LEDGERCORE_CHECKOUT_BASE_URL``. Completion arrives, as it would
from Stripe, as a signed ``checkout.session.completed`` webhook; ``ledgercore webhook``
signs one for operators and demos.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from domain.money import Money


@dataclass(frozen=True)
class Checkout:
    provider_session_id: str
    url: str


class LocalCheckoutProvider:
    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def create_checkout(self, payment_session_id: UUID, amount: Money) -> Checkout:
        provider_session_id = f"cs_local_{payment_session_id.hex}"
        return Checkout(provider_session_id, f"{self.base_url}/{provider_session_id}")
