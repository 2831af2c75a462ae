"""Invoices (`in_…`) and their lines (`il_…`): building them from a subscription's items,
the status machine (draft → open → paid | void | uncollectible), and the API around it.

Amounts (minor units of the subscription's currency):
- metered item: usage = the meter's aggregate (sum | count | last) of the customer's events
  with `period_start <= timestamp < period_end`; a negative total bills as 0;
- licensed item: usage = its quantity, billed for the period ahead (in advance);
- per_unit price: usage × unit_amount_decimal; tiered price: graduated (each tier's units at
  its unit amount, plus its flat amount when the tier has units) or volume (all units at the
  tier the total falls in, plus that tier's flat amount);
- each line's exact amount is rounded half away from zero to whole minor units; the invoice
  total is the sum of its lines (no tax, discounts or balance).
"""

from __future__ import annotations

from decimal import Decimal

from .call import Call, created_filter, list_page, params_allow
from .errors import invalid_request, parameter_missing, resource_missing
from .events import attributes_changed, event_emit
from .metering import usage_aggregate
from .wire import decimal_str, minor_units_round, object_id_new, param_bool, param_enum, param_str

PAYMENT_RETRY_DELAY_S = 3 * 24 * 3600  # next_payment_attempt after a failure (Smart Retries would choose)
STATUSES = ("draft", "open", "paid", "uncollectible", "void")


# --- amounts --------------------------------------------------------------------------------------

def price_amount(price: dict, quantity: Decimal) -> Decimal:
    """The exact amount, in minor units, of `quantity` units of `price` (see the module docstring)."""
    quantity = max(quantity, Decimal(0))
    if price["billing_scheme"] != "tiered":
        return quantity * Decimal(price["unit_amount_decimal"])
    tiers = price["tiers"]

    def tier_cost(tier: dict, units: Decimal) -> Decimal:
        unit = Decimal(tier["unit_amount_decimal"] or 0)
        flat = Decimal(tier["flat_amount_decimal"] or 0)
        return units * unit + flat

    if price["tiers_mode"] == "volume":
        for tier in tiers:
            if tier["up_to"] is None or quantity <= tier["up_to"]:
                return tier_cost(tier, quantity)
    total = Decimal(0)
    lower = Decimal(0)
    for tier in tiers:
        upper = None if tier["up_to"] is None else Decimal(tier["up_to"])
        units = (quantity if upper is None else min(quantity, upper)) - lower
        if units > 0:
            total += tier_cost(tier, units)
        if upper is None or quantity <= upper:
            break
        lower = upper
    return total


# --- building ------------------------------------------------------------------------------------

def _line_new(call: Call, invoice_id: str, subscription: dict, item: dict, price: dict, usage: Decimal,
              period: tuple[int, int]) -> dict:
    amount = minor_units_round(price_amount(price, usage))
    product = call.state.get("products", price["product"]) or {}
    quantity_text = decimal_str(usage)
    return {
        "id": object_id_new("il_"), "object": "line_item", "amount": amount, "currency": price["currency"],
        "description": f"{quantity_text} × {product.get('name') or price['product']}",
        "discount_amounts": [], "discountable": True, "discounts": [], "invoice": invoice_id, "livemode": False,
        "metadata": {},
        "parent": {"invoice_item_details": None, "type": "subscription_item_details",
                   "subscription_item_details": {"invoice_item": None, "proration": False,
                                                 "proration_details": {"credited_items": None},
                                                 "subscription": subscription["id"],
                                                 "subscription_item": item["id"]}},
        "period": {"end": period[1], "start": period[0]}, "pretax_credit_amounts": [],
        "pricing": {"price_details": {"price": price["id"], "product": price["product"]}, "type": "price_details",
                    "unit_amount_decimal": price["unit_amount_decimal"]},
        "quantity": minor_units_round(usage), "quantity_decimal": quantity_text, "subtotal": amount, "taxes": [],
    }


def invoice_lines_build(call: Call, invoice_id: str, subscription: dict, *, usage_period: tuple[int, int] | None,
                        advance_period: tuple[int, int] | None) -> list[dict]:
    """Metered items over `usage_period` (in arrears), licensed items over `advance_period`."""
    lines = []
    for item in subscription["items"]["data"]:
        price = call.state.get("prices", item["price"])
        recurring = price["recurring"] or {}
        if recurring.get("usage_type") == "metered":
            if usage_period is None:
                continue
            meter = call.state.get("meters", recurring["meter"])
            events = call.state.meter_events_for(meter["event_name"], subscription["customer"])
            usage = usage_aggregate(events, meter["default_aggregation"]["formula"], *usage_period)
            lines.append(_line_new(call, invoice_id, subscription, item, price, usage, usage_period))
        elif advance_period is not None:
            lines.append(_line_new(call, invoice_id, subscription, item, price, Decimal(item.get("quantity") or 1),
                                   advance_period))
    return lines


def invoice_build(call: Call, subscription: dict, *, reason: str, period: tuple[int, int],
                  usage_period: tuple[int, int] | None, advance_period: tuple[int, int] | None,
                  invoice_id: str | None = None) -> dict:
    """A draft invoice for `subscription` (not stored, no events)."""
    customer = call.state.get("customers", subscription["customer"]) or {}
    invoice_id = invoice_id or object_id_new("in_")
    lines = invoice_lines_build(call, invoice_id, subscription, usage_period=usage_period,
                                advance_period=advance_period)
    total = sum(line["amount"] for line in lines)
    return {
        "id": invoice_id, "object": "invoice", "account_country": "US", "account_name": "Local Stripe",
        "account_tax_ids": None, "amount_due": total, "amount_overpaid": 0, "amount_paid": 0,
        "amount_remaining": total, "amount_shipping": 0, "application": None, "attempt_count": 0,
        "attempted": False, "auto_advance": True,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None, "provider": None,
                          "status": None},
        "automatically_finalizes_at": None, "billing_reason": reason,
        "collection_method": subscription["collection_method"], "confirmation_secret": None,
        "created": call.now, "currency": subscription["currency"], "custom_fields": None,
        "customer": subscription["customer"], "customer_account": None,
        "customer_address": customer.get("address"), "customer_email": customer.get("email"),
        "customer_name": customer.get("name"), "customer_phone": customer.get("phone"),
        "customer_shipping": customer.get("shipping"), "customer_tax_exempt": customer.get("tax_exempt", "none"),
        "customer_tax_ids": [], "default_payment_method": None, "default_source": None, "default_tax_rates": [],
        "description": None, "discounts": [], "due_date": None, "effective_at": None, "ending_balance": None,
        "footer": None, "from_invoice": None, "hosted_invoice_url": None, "invoice_pdf": None,
        "issuer": {"type": "self"}, "last_finalization_error": None, "latest_revision": None,
        "lines": {"object": "list", "data": lines, "has_more": False, "total_count": len(lines),
                  "url": f"/v1/invoices/{invoice_id}/lines"},
        "livemode": False, "metadata": {}, "next_payment_attempt": None, "number": None, "on_behalf_of": None,
        "parent": {"quote_details": None, "type": "subscription_details",
                   "subscription_details": {"metadata": dict(subscription["metadata"]),
                                            "subscription": subscription["id"]}},
        "payment_settings": {"default_mandate": None, "payment_method_options": None,
                             "payment_method_types": None},
        "period_end": period[1], "period_start": period[0], "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0, "receipt_number": None, "rendering": None, "shipping_cost": None,
        "shipping_details": None, "starting_balance": 0, "statement_descriptor": None, "status": "draft",
        "status_transitions": {"finalized_at": None, "marked_uncollectible_at": None, "paid_at": None,
                               "voided_at": None},
        "subtotal": total, "subtotal_excluding_tax": total, "test_clock": None, "total": total,
        "total_discount_amounts": [], "total_excluding_tax": total, "total_pretax_credit_amounts": [],
        "total_taxes": [], "webhooks_delivered_at": None,
    }


def invoice_subscription_id(invoice: dict) -> str | None:
    parent = invoice.get("parent") or {}
    return (parent.get("subscription_details") or {}).get("subscription")


# --- status machine -----------------------------------------------------------------------------------

def invoice_create(call: Call, invoice: dict, *, finalize: bool) -> dict:
    """Store a built invoice: invoice.created, then (if `finalize`) invoice_finalize."""
    call.state.put("invoices", invoice)
    event_emit(call, "invoice.created", invoice)
    if finalize:
        invoice_finalize(call, invoice)
    return invoice


def invoice_finalize(call: Call, invoice: dict) -> None:
    """draft → open (invoice.finalized); a zero amount is paid at once, as Stripe does."""
    customer = call.state.get("customers", invoice["customer"])
    if customer is not None and not customer.get("deleted"):
        sequence = customer.get("next_invoice_sequence") or 1
        invoice["number"] = f"{customer['invoice_prefix']}-{sequence:04d}"
        customer["next_invoice_sequence"] = sequence + 1
        call.state.put("customers", customer)
    invoice["status"] = "open"
    invoice["status_transitions"]["finalized_at"] = call.now
    invoice["effective_at"] = call.now
    invoice["ending_balance"] = 0
    invoice["hosted_invoice_url"] = f"https://invoice.stripe.com/i/local/{invoice['id']}"
    invoice["invoice_pdf"] = f"https://pay.stripe.com/invoice/local/{invoice['id']}/pdf"
    if invoice["collection_method"] == "send_invoice":
        subscription = call.state.get("subscriptions", invoice_subscription_id(invoice) or "")
        days = (subscription or {}).get("days_until_due") or 30
        invoice["due_date"] = call.now + days * 86400
    elif invoice["amount_due"] > 0:
        invoice["next_payment_attempt"] = call.now + 3600  # Stripe charges about an hour after finalizing
    call.state.put("invoices", invoice)
    event_emit(call, "invoice.finalized", invoice)
    if invoice["amount_due"] == 0:
        invoice_paid(call, invoice)


def invoice_paid(call: Call, invoice: dict, *, out_of_band: bool = False) -> None:
    """open | uncollectible → paid: invoice.paid (+ invoice.payment_succeeded unless paid out of band)."""
    charged = invoice["amount_due"] > 0 and not out_of_band
    invoice["status"] = "paid"
    invoice["amount_paid"] = invoice["amount_due"]
    invoice["amount_remaining"] = 0
    if charged:
        invoice["attempt_count"] += 1
        invoice["attempted"] = True
    invoice["next_payment_attempt"] = None
    invoice["status_transitions"]["paid_at"] = call.now
    call.state.put("invoices", invoice)
    event_emit(call, "invoice.paid", invoice)
    if not out_of_band:
        event_emit(call, "invoice.payment_succeeded", invoice)
    subscription_status_sync(call, invoice)


def invoice_payment_failed(call: Call, invoice: dict) -> None:
    """A failed charge: the invoice stays open (invoice.payment_failed); its subscription goes past_due."""
    invoice["attempt_count"] += 1
    invoice["attempted"] = True
    invoice["next_payment_attempt"] = call.now + PAYMENT_RETRY_DELAY_S
    call.state.put("invoices", invoice)
    event_emit(call, "invoice.payment_failed", invoice)
    subscription_status_sync(call, invoice)


def subscription_status_sync(call: Call, invoice: dict) -> None:
    """An active subscription with an open invoice whose payment failed is past_due; once no
    such invoice is left (paid, voided, marked uncollectible) it is active again."""
    subscription = call.state.get("subscriptions", invoice_subscription_id(invoice) or "")
    if subscription is None or subscription["status"] not in ("active", "past_due"):
        return
    failing = any(i["status"] == "open" and i["attempted"] and invoice_subscription_id(i) == subscription["id"]
                  for i in call.state.objects["invoices"].values())
    status = "past_due" if failing else "active"
    if status != subscription["status"]:
        before = call.out(subscription)
        subscription["status"] = status
        call.state.put("subscriptions", subscription)
        event_emit(call, "customer.subscription.updated", subscription,
                   attributes_changed(before, call.out(subscription)))


# --- /v1/invoices --------------------------------------------------------------------------------------

def invoice_get(call: Call) -> dict:
    invoice = call.state.get("invoices", call.args["id"])
    if invoice is None:
        raise resource_missing("invoice", call.args["id"])
    return invoice


def invoice_retrieve(call: Call) -> dict:
    params_allow(call.params, ())
    return call.out(invoice_get(call))


def invoice_list(call: Call) -> dict:
    params_allow(call.params, ("limit", "starting_after", "ending_before", "created", "customer", "subscription",
                               "status", "collection_method", "due_date"))
    items = call.state.newest_first("invoices")
    customer = param_str(call.params, "customer")
    if customer:
        items = [i for i in items if i["customer"] == customer]
    subscription = param_str(call.params, "subscription")
    if subscription:
        items = [i for i in items if invoice_subscription_id(i) == subscription]
    status = param_enum(call.params, "status", STATUSES)
    if status:
        items = [i for i in items if i["status"] == status]
    method = param_enum(call.params, "collection_method", ("charge_automatically", "send_invoice"))
    if method:
        items = [i for i in items if i["collection_method"] == method]
    return list_page(call, created_filter(call.params, items), "/v1/invoices")


def invoice_lines(call: Call) -> dict:
    params_allow(call.params, ("limit", "starting_after", "ending_before"))
    invoice = invoice_get(call)
    return list_page(call, invoice["lines"]["data"], f"/v1/invoices/{invoice['id']}/lines")


def invoice_finalize_api(call: Call) -> dict:
    params_allow(call.params, ("auto_advance",))
    invoice = invoice_get(call)
    if invoice["status"] != "draft":
        raise invalid_request("This invoice is already finalized, you can't re-finalize a non-draft invoice.",
                              code="invoice_not_editable")
    auto_advance = param_bool(call.params, "auto_advance")
    if auto_advance is not None:
        invoice["auto_advance"] = auto_advance
    invoice_finalize(call, invoice)
    return call.out(invoice)


def invoice_pay_api(call: Call) -> dict:
    """Pays in full at once (there are no payment methods to fail here; use
    `POST /_local/invoices/{id}/payment` for a failure). A draft is finalized first."""
    params_allow(call.params, ("paid_out_of_band", "forgive", "mandate", "off_session", "payment_method",
                               "source"))
    invoice = invoice_get(call)
    _payable_check(invoice)
    out_of_band = bool(param_bool(call.params, "paid_out_of_band"))
    if invoice["status"] == "draft":
        invoice_finalize(call, invoice)
    if invoice["status"] != "paid":
        invoice_paid(call, invoice, out_of_band=out_of_band)
    return call.out(invoice)


def _payable_check(invoice: dict) -> None:
    if invoice["status"] == "paid":
        raise invalid_request("Invoice is already paid")
    if invoice["status"] == "void":
        raise invalid_request("This invoice has been voided and can no longer be paid.")


def invoice_void_api(call: Call) -> dict:
    params_allow(call.params, ())
    invoice = invoice_get(call)
    if invoice["status"] not in ("open", "uncollectible"):
        raise invalid_request(f"You can only void open or uncollectible invoices; this invoice is "
                              f"{invoice['status']}.", code="invoice_not_editable" if invoice["status"] == "draft"
                              else None)
    invoice["status"] = "void"
    invoice["amount_remaining"] = 0
    invoice["next_payment_attempt"] = None
    invoice["status_transitions"]["voided_at"] = call.now
    call.state.put("invoices", invoice)
    event_emit(call, "invoice.voided", invoice)
    subscription_status_sync(call, invoice)
    return call.out(invoice)


def invoice_mark_uncollectible_api(call: Call) -> dict:
    params_allow(call.params, ())
    invoice = invoice_get(call)
    if invoice["status"] != "open":
        raise invalid_request(f"You can only mark open invoices as uncollectible; this invoice is "
                              f"{invoice['status']}.")
    invoice["status"] = "uncollectible"
    invoice["next_payment_attempt"] = None
    invoice["status_transitions"]["marked_uncollectible_at"] = call.now
    call.state.put("invoices", invoice)
    event_emit(call, "invoice.marked_uncollectible", invoice)
    subscription_status_sync(call, invoice)
    return call.out(invoice)


def invoice_create_preview(call: Call) -> dict:
    """POST /v1/invoices/create_preview: the invoice that closing the current period now would
    produce (usage so far; licensed items for the next period). Never stored or listed."""
    from .subscriptions import subscription_next_period  # subscriptions import this module

    params_allow(call.params, ("customer", "subscription", "subscription_details", "automatic_tax", "currency",
                               "customer_details", "preview_mode", "discounts", "invoice_items", "issuer",
                               "on_behalf_of", "schedule", "schedule_details"))
    subscription_id = param_str(call.params, "subscription")
    customer_id = param_str(call.params, "customer")
    if not subscription_id and not customer_id:
        raise parameter_missing("customer")
    if subscription_id:
        subscription = call.state.get("subscriptions", subscription_id)
        if subscription is None:
            raise resource_missing("subscription", subscription_id, param="subscription", status=400)
        if customer_id and subscription["customer"] != customer_id:
            raise invalid_request("The subscription does not belong to this customer.", param="subscription")
    else:
        live = [s for s in call.state.newest_first("subscriptions")
                if s["customer"] == customer_id and s["status"] not in ("canceled", "incomplete_expired")]
        if call.state.get("customers", customer_id) is None:
            raise resource_missing("customer", customer_id, param="customer", status=400)
        if len(live) != 1:
            raise invalid_request("Pass `subscription` to preview an invoice for a customer with "
                                  f"{len(live)} live subscriptions.", code="invoice_upcoming_none")
        subscription = live[0]
    if subscription["status"] in ("canceled", "incomplete_expired"):
        raise invalid_request("No upcoming invoices for a canceled subscription.", code="invoice_upcoming_none")
    item = subscription["items"]["data"][0]
    start, end = item["current_period_start"], item["current_period_end"]
    advance = None if subscription["cancel_at_period_end"] else subscription_next_period(call, subscription, end)
    preview = invoice_build(call, subscription, reason="upcoming", period=(start, end),
                            usage_period=(start, end), advance_period=advance,
                            invoice_id=object_id_new("upcoming_in_"))
    return call.out(preview)


def invoice_payment_local(call: Call) -> dict:
    """POST /_local/invoices/{id}/payment, JSON `{"outcome": "succeeded" | "failed"}`: the
    result of a charge attempt. succeeded → paid (invoice.paid, invoice.payment_succeeded);
    failed → stays open (invoice.payment_failed) and its subscription goes past_due.
    A draft is finalized first. Returns the invoice."""
    outcome = param_enum(call.params, "outcome", ("succeeded", "failed"))
    if outcome is None:
        raise parameter_missing("outcome")
    invoice = invoice_get(call)
    _payable_check(invoice)
    if invoice["status"] == "draft":
        invoice_finalize(call, invoice)
    if invoice["status"] == "paid":  # a zero total is paid on finalization
        return call.out(invoice)
    if outcome == "succeeded":
        invoice_paid(call, invoice)
    elif invoice["status"] == "open":
        invoice_payment_failed(call, invoice)
    else:
        raise invalid_request(f"Only open invoices can fail a payment; this invoice is {invoice['status']}.")
    return call.out(invoice)
