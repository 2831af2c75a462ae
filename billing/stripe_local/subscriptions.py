"""`/v1/subscriptions` and the local billing-cycle control (`/_local/subscriptions/{id}/close_period`).

A subscription is `active` from creation (no payment methods here). Its items share one
period, `[current_period_start, current_period_end)`, set from the prices' `recurring`
interval. Creation issues the first invoice (billing_reason `subscription_create`: licensed
items for the first period; a zero total is paid at once). Periods advance only through
`close_period`, which ends the current period now (or at a given time), so a test or demo
never waits a month.
"""

from __future__ import annotations

from .call import Call, created_filter, list_page, metadata_apply, nested_allow, params_allow, search_page
from .catalog import price_live
from .customers import customer_live
from .errors import invalid_request, parameter_missing, resource_missing
from .events import attributes_changed, event_emit
from .invoicing import invoice_build, invoice_create
from .wire import (add_interval, object_id_new, param_bool, param_dict, param_enum, param_int, param_list,
                   param_str)

LIVE_STATUSES = ("active", "past_due", "unpaid", "trialing", "incomplete", "paused")
ALL_STATUSES = LIVE_STATUSES + ("canceled", "incomplete_expired")
# Stripe parameters whose behaviour isn't modelled: refused rather than silently ignored.
_UNSUPPORTED = ("trial_period_days", "trial_end", "trial_from_plan", "billing_cycle_anchor",
                "billing_cycle_anchor_config", "coupon", "discounts", "promotion_code", "add_invoice_items",
                "backdate_start_date", "cancel_at", "billing_thresholds", "pause_collection")
# Accepted and ignored: they concern payment methods, taxes, prorations or Connect.
_IGNORED = ("payment_behavior", "proration_behavior", "proration_date", "default_payment_method",
            "default_source", "off_session", "automatic_tax", "payment_settings", "billing_mode",
            "default_tax_rates", "invoice_settings", "pending_invoice_item_interval", "transfer_data",
            "on_behalf_of", "application_fee_percent", "trial_settings", "currency")
SEARCH_FIELDS = ("created", "metadata", "status")


def _unsupported_check(params: dict) -> None:
    for name in _UNSUPPORTED:
        if name in params:
            raise invalid_request(f"The local Stripe server does not support `{name}`.", param=name,
                                  code="parameter_unknown")


def subscription_get(call: Call, subscription_id: str | None = None) -> dict:
    subscription_id = subscription_id or call.args["id"]
    subscription = call.state.get("subscriptions", subscription_id)
    if subscription is None:
        raise resource_missing("subscription", subscription_id)
    return subscription


def _interval(price: dict) -> tuple[str, int]:
    return price["recurring"]["interval"], price["recurring"]["interval_count"]


def subscription_next_period(call: Call, subscription: dict, start: int) -> tuple[int, int]:
    price = call.state.get("prices", subscription["items"]["data"][0]["price"])
    interval, count = _interval(price)
    return start, add_interval(start, interval, count)


def _item_new(call: Call, subscription: dict, raw: dict, label: str, period: tuple[int, int]) -> dict:
    nested_allow({label: raw}, label, ("price", "quantity", "metadata", "price_data", "tax_rates", "discounts",
                                       "billing_thresholds", "id", "deleted", "clear_usage"))
    price_id = param_str(raw, "price", label=f"{label}[price]")
    if not price_id:
        if "price_data" in raw:
            raise invalid_request("The local Stripe server does not support `price_data`; create the price "
                                  "first.", param=f"{label}[price_data]", code="parameter_unknown")
        raise parameter_missing(f"{label}[price]")
    price = _price_check(call, subscription, price_id, f"{label}[price]")
    item = {"id": object_id_new("si_", 14), "object": "subscription_item", "billing_thresholds": None,
            "created": call.now, "current_period_end": period[1], "current_period_start": period[0],
            "discounts": [], "metadata": metadata_apply({}, raw.get("metadata"), param=f"{label}[metadata]"),
            "price": price["id"], "subscription": subscription["id"], "tax_rates": []}
    _quantity_apply(item, price, raw, label)
    return item


def _price_check(call: Call, subscription: dict, price_id: str, param: str) -> dict:
    price = price_live(call, price_id, param=param)
    if price["recurring"] is None:
        raise invalid_request("The price specified is set to `type=one_time` but this field only accepts prices "
                              "with `type=recurring`.", param=param)
    if not price["active"]:
        raise invalid_request("The price specified is inactive. This field only accepts active prices.",
                              param=param)
    others = [call.state.get("prices", item["price"]) for item in subscription["items"]["data"]]
    for other in others:
        if other["currency"] != price["currency"] or _interval(other) != _interval(price):
            raise invalid_request("Currency and interval fields must match across all prices on this subscription. "
                                  f"Found mismatch with price `{other['id']}`.", param=param)
        if other["id"] == price["id"]:
            raise invalid_request("Cannot add multiple subscription items with the same price.", param=param)
    return price


def _quantity_apply(item: dict, price: dict, raw: dict, label: str) -> None:
    quantity = param_int(raw, "quantity", label=f"{label}[quantity]", minimum=0)
    if price["recurring"]["usage_type"] == "metered":
        if quantity is not None:
            raise invalid_request("Quantity should not be specified where usage_type is `metered`. Remove "
                                  f"quantity from `{label}`.", param=f"{label}[quantity]")
        item.pop("quantity", None)
    else:
        item["quantity"] = quantity if quantity is not None else item.get("quantity", 1)


def _collection_apply(subscription: dict, params: dict) -> None:
    method = param_enum(params, "collection_method", ("charge_automatically", "send_invoice"))
    if method:
        subscription["collection_method"] = method
    days = param_int(params, "days_until_due", minimum=0)
    if days is not None:
        subscription["days_until_due"] = days
    if subscription["collection_method"] == "send_invoice" and subscription["days_until_due"] is None:
        raise parameter_missing("days_until_due")
    if subscription["collection_method"] == "charge_automatically":
        if days is not None:
            raise invalid_request("Invalid days_until_due: only valid with collection_method=send_invoice.",
                                  param="days_until_due")
        subscription["days_until_due"] = None


def subscription_create(call: Call) -> dict:
    params = call.params
    _unsupported_check(params)
    params_allow(params, ("customer", "items", "collection_method", "days_until_due", "metadata", "description",
                          "cancel_at_period_end") + _IGNORED)
    customer_id = param_str(params, "customer")
    if not customer_id:
        raise parameter_missing("customer")
    customer_live(call, customer_id, param="customer")
    raw_items = param_list(params, "items")
    if not raw_items:
        raise parameter_missing("items")
    if len(raw_items) > 20:
        raise invalid_request("A subscription can have at most 20 items.", param="items")
    subscription = {
        "id": object_id_new("sub_"), "object": "subscription", "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": call.now, "billing_cycle_anchor_config": None,
        "billing_mode": {"flexible": None, "type": "classic"}, "billing_thresholds": None, "cancel_at": None,
        "cancel_at_period_end": bool(param_bool(params, "cancel_at_period_end")), "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": "charge_automatically", "created": call.now, "currency": None,
        "customer": customer_id, "customer_account": None, "days_until_due": None, "default_payment_method": None,
        "default_source": None, "default_tax_rates": [], "description": param_str(params, "description") or None,
        "discounts": [], "ended_at": None, "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": {"object": "list", "data": [], "has_more": False, "total_count": 0, "url": ""},
        "latest_invoice": None, "livemode": False, "metadata": metadata_apply({}, params.get("metadata")),
        "next_pending_invoice_item_invoice": None, "on_behalf_of": None, "pause_collection": None,
        "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                             "save_default_payment_method": "off"},
        "pending_invoice_item_interval": None, "pending_setup_intent": None, "pending_update": None,
        "schedule": None, "start_date": call.now, "status": "active", "test_clock": None, "transfer_data": None,
        "trial_end": None, "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": None,
    }
    subscription["items"]["url"] = f"/v1/subscription_items?subscription={subscription['id']}"
    _collection_apply(subscription, params)
    for index, raw in enumerate(raw_items):
        if not isinstance(raw, dict):
            raise invalid_request("Invalid object", param=f"items[{index}]")
        if index == 0:
            price = price_live(call, raw.get("price"), param="items[0][price]") if raw.get("price") else None
            interval = price["recurring"] if price and price["recurring"] else {"interval": "month",
                                                                               "interval_count": 1}
            period = (call.now, add_interval(call.now, interval["interval"], interval["interval_count"]))
        item = _item_new(call, subscription, raw, f"items[{index}]", period)
        subscription["items"]["data"].append(item)
    subscription["items"]["total_count"] = len(subscription["items"]["data"])
    subscription["currency"] = call.state.get("prices", subscription["items"]["data"][0]["price"])["currency"]
    invoice = invoice_build(call, subscription, reason="subscription_create", period=(call.now, call.now),
                            usage_period=None, advance_period=period)
    subscription["latest_invoice"] = invoice["id"]
    call.state.put("subscriptions", subscription)
    event_emit(call, "customer.subscription.created", subscription)
    invoice_create(call, invoice, finalize=True)
    return call.out(subscription)


def subscription_retrieve(call: Call) -> dict:
    params_allow(call.params, ())
    return call.out(subscription_get(call))


def subscription_update(call: Call) -> dict:
    params = call.params
    _unsupported_check(params)
    params_allow(params, ("items", "collection_method", "days_until_due", "metadata", "description",
                          "cancel_at_period_end", "cancellation_details") + _IGNORED)
    subscription = subscription_get(call)
    if subscription["status"] in ("canceled", "incomplete_expired"):
        if set(params) - {"metadata", "cancellation_details", "expand"}:
            raise invalid_request("A canceled subscription can only update its cancellation_details and metadata.")
    before = call.out(subscription)
    if "description" in params:
        subscription["description"] = param_str(params, "description") or None
    cancel_at_period_end = param_bool(params, "cancel_at_period_end")
    if cancel_at_period_end is not None:
        subscription["cancel_at_period_end"] = cancel_at_period_end
    if "collection_method" in params or "days_until_due" in params:
        _collection_apply(subscription, params)
    details = param_dict(params, "cancellation_details")
    if details:
        nested_allow(params, "cancellation_details", ("comment", "feedback"))
        subscription["cancellation_details"].update({k: details[k] or None for k in details})
    subscription["metadata"] = metadata_apply(subscription["metadata"], params.get("metadata"))
    raw_items = param_list(params, "items")
    if raw_items:
        _items_update(call, subscription, raw_items)
    call.state.put("subscriptions", subscription)
    changed = attributes_changed(before, call.out(subscription))
    if changed:
        event_emit(call, "customer.subscription.updated", subscription, changed)
    return call.out(subscription)


def _items_update(call: Call, subscription: dict, raw_items: list) -> None:
    """Update (`[id]` + fields), delete (`[id]` + `[deleted]=true`) or add (no `[id]`) items.
    Changes take effect at once, without prorations."""
    items = subscription["items"]["data"]
    first = items[0]
    period = (first["current_period_start"], first["current_period_end"])
    for index, raw in enumerate(raw_items):
        label = f"items[{index}]"
        if not isinstance(raw, dict):
            raise invalid_request("Invalid object", param=label)
        item_id = param_str(raw, "id", label=f"{label}[id]")
        if not item_id:
            items.append(_item_new(call, subscription, raw, label, period))
            continue
        item = next((i for i in items if i["id"] == item_id), None)
        if item is None:
            raise resource_missing("subscription item", item_id, param=f"{label}[id]", status=400)
        nested_allow({label: raw}, label, ("id", "price", "quantity", "metadata", "deleted", "clear_usage",
                                           "tax_rates", "discounts", "billing_thresholds"))
        if param_bool(raw, "deleted", label=f"{label}[deleted]"):
            items.remove(item)
            if not items:
                raise invalid_request("A subscription must have at least one item.", param=f"{label}[deleted]")
            continue
        price_id = param_str(raw, "price", label=f"{label}[price]")
        if price_id and price_id != item["price"]:
            subscription["items"]["data"] = [i for i in items if i is not item]
            try:
                price = _price_check(call, subscription, price_id, f"{label}[price]")
            finally:
                subscription["items"]["data"] = items
            item["price"] = price["id"]
        price = call.state.get("prices", item["price"])
        if "quantity" in raw or price_id:
            _quantity_apply(item, price, raw, label)
        item["metadata"] = metadata_apply(item["metadata"], raw.get("metadata"), param=f"{label}[metadata]")
    subscription["items"]["total_count"] = len(items)
    subscription["currency"] = call.state.get("prices", items[0]["price"])["currency"]


def subscription_cancel(call: Call, subscription: dict, *, reason: str, invoice_now: bool = False) -> None:
    """→ canceled (customer.subscription.deleted). `invoice_now` first bills the metered usage
    of the current period so far (billing_reason `subscription_cycle`)."""
    if invoice_now:
        item = subscription["items"]["data"][0]
        period = (item["current_period_start"], max(call.now + 1, item["current_period_start"] + 1))
        invoice = invoice_build(call, subscription, reason="subscription_cycle", period=period,
                                usage_period=period, advance_period=None)
        subscription["latest_invoice"] = invoice["id"]
        invoice_create(call, invoice, finalize=True)
    subscription["status"] = "canceled"
    subscription["canceled_at"] = call.now
    subscription["ended_at"] = call.now
    subscription["cancellation_details"]["reason"] = reason
    call.state.put("subscriptions", subscription)
    event_emit(call, "customer.subscription.deleted", subscription)


def subscription_cancel_api(call: Call) -> dict:
    params_allow(call.params, ("invoice_now", "prorate", "cancellation_details"))
    subscription = subscription_get(call)
    if subscription["status"] in ("canceled", "incomplete_expired"):
        raise invalid_request(f"This subscription has already been canceled: '{subscription['id']}'.")
    details = param_dict(call.params, "cancellation_details")
    if details:
        nested_allow(call.params, "cancellation_details", ("comment", "feedback"))
        subscription["cancellation_details"].update({k: details[k] or None for k in details})
    subscription_cancel(call, subscription, reason="cancellation_requested",
                        invoice_now=bool(param_bool(call.params, "invoice_now")))
    return call.out(subscription)


def subscription_list(call: Call) -> dict:
    params_allow(call.params, ("limit", "starting_after", "ending_before", "created", "customer", "price",
                               "status", "collection_method", "current_period_start", "current_period_end",
                               "test_clock", "automatic_tax"))
    items = call.state.newest_first("subscriptions")
    customer = param_str(call.params, "customer")
    if customer:
        items = [s for s in items if s["customer"] == customer]
    price = param_str(call.params, "price")
    if price:
        items = [s for s in items if any(i["price"] == price for i in s["items"]["data"])]
    status = param_enum(call.params, "status", ALL_STATUSES + ("all", "ended"))
    if status == "ended":
        items = [s for s in items if s["status"] in ("canceled", "incomplete_expired")]
    elif status and status != "all":
        items = [s for s in items if s["status"] == status]
    elif status is None:
        items = [s for s in items if s["status"] not in ("canceled", "incomplete_expired")]
    method = param_enum(call.params, "collection_method", ("charge_automatically", "send_invoice"))
    if method:
        items = [s for s in items if s["collection_method"] == method]
    return list_page(call, created_filter(call.params, items), "/v1/subscriptions")


def subscription_search(call: Call) -> dict:
    params_allow(call.params, ("query", "limit", "page"))
    return search_page(call, call.state.newest_first("subscriptions"), "/v1/subscriptions/search", SEARCH_FIELDS)


# --- /_local/ billing-cycle control ---------------------------------------------------------------

def subscription_period_close(call: Call) -> dict:
    """POST /_local/subscriptions/{id}/close_period, JSON body (all optional):
    `{"period_end": <epoch s>, "finalize": true}`.

    Ends the current period at `period_end` (default: now + 1 s, so events stamped this second
    count), issues its invoice (billing_reason `subscription_cycle`: metered usage of the
    closed period, licensed items for the next one), finalizes it unless `finalize` is false,
    and starts the next period. Events: customer.subscription.updated, invoice.created,
    invoice.finalized (and invoice.paid + invoice.payment_succeeded for a zero total). With
    `cancel_at_period_end` the subscription ends instead (customer.subscription.deleted).
    Returns the invoice."""
    subscription = subscription_get(call)
    if subscription["status"] not in ("active", "past_due", "unpaid"):
        raise invalid_request(f"Subscription {subscription['id']} is {subscription['status']}; only active, "
                              "past_due or unpaid subscriptions have periods to close.")
    end = param_int(call.params, "period_end")
    finalize = param_bool(call.params, "finalize")
    items = subscription["items"]["data"]
    start = items[0]["current_period_start"]
    end = call.now + 1 if end is None else end
    if end <= start:
        raise invalid_request(f"period_end must be after the current period's start ({start}).",
                              param="period_end")
    ending = subscription["cancel_at_period_end"]
    next_period = None if ending else subscription_next_period(call, subscription, end)
    invoice = invoice_build(call, subscription, reason="subscription_cycle", period=(start, end),
                            usage_period=(start, end), advance_period=next_period)
    before = call.out(subscription)
    subscription["latest_invoice"] = invoice["id"]
    if next_period is not None:
        for item in items:
            item["current_period_start"], item["current_period_end"] = next_period
        subscription["billing_cycle_anchor"] = next_period[0]
    call.state.put("subscriptions", subscription)
    if not ending:
        event_emit(call, "customer.subscription.updated", subscription,
                   attributes_changed(before, call.out(subscription)))
    invoice_create(call, invoice, finalize=finalize is not False)
    if ending:
        subscription_cancel(call, subscription, reason="cancellation_requested")
    return call.out(invoice)

