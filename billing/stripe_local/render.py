"""Stored object → wire object. Most objects are stored as they are returned; the exceptions:

- a price's `tiers` are returned only when expanded (`expand[]=tiers`), as Stripe does;
- a webhook endpoint's `secret` is returned only by the create call;
- a subscription item stores its price's id and is returned with the whole `price` (and the
  legacy `plan` Stripe still derives from it), so price changes show through.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .state import State


def render(state: "State", obj: dict, expand: Iterable[str] = ()) -> dict:
    kind = obj.get("object")
    if kind == "price":
        return price_render(obj, with_tiers="tiers" in set(expand))
    if kind == "subscription":
        return subscription_render(state, obj)
    if kind == "webhook_endpoint":
        body = copy.deepcopy(obj)
        body.pop("secret", None)  # returned once, by the create call
        return body
    return copy.deepcopy(obj)


def price_render(price: dict, *, with_tiers: bool = False) -> dict:
    body = copy.deepcopy(price)
    if not with_tiers:
        body.pop("tiers", None)
    return body


def plan_from_price(price: dict) -> dict:
    recurring = price.get("recurring") or {}
    return {
        "id": price["id"], "object": "plan", "active": price["active"], "amount": price["unit_amount"],
        "amount_decimal": price["unit_amount_decimal"], "billing_scheme": price["billing_scheme"],
        "created": price["created"], "currency": price["currency"], "interval": recurring.get("interval"),
        "interval_count": recurring.get("interval_count"), "livemode": False,
        "metadata": dict(price["metadata"]), "meter": recurring.get("meter"), "nickname": price["nickname"],
        "product": price["product"], "tiers_mode": price["tiers_mode"], "transform_usage": None,
        "trial_period_days": None, "usage_type": recurring.get("usage_type"),
    }


def subscription_render(state: "State", subscription: dict) -> dict:
    body = copy.deepcopy(subscription)
    for item in body["items"]["data"]:
        price = state.get("prices", item["price"])
        if price is not None:
            item["price"] = price_render(price)
            item["plan"] = plan_from_price(price)
    return body
