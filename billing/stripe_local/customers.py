"""`/v1/customers`: create, retrieve, update, delete, list, search."""

from __future__ import annotations

import secrets

from .call import Call, created_filter, list_page, metadata_apply, params_allow, search_page
from .errors import invalid_request, resource_missing
from .events import attributes_changed, event_emit
from .wire import object_id_new, param_dict, param_enum, param_int, param_list, param_str

# Parameters Stripe takes that are accepted and stored as given (no payment methods here).
_STORED = ("address", "description", "email", "name", "phone", "shipping")
_ACCEPTED = ("cash_balance", "payment_method", "source", "tax", "tax_id_data", "test_clock", "validate",
             "invoice_settings", "next_invoice_sequence", "business_name", "individual_name", "coupon",
             "promotion_code", "default_source")
SEARCH_FIELDS = ("created", "email", "metadata", "name", "phone")


def customer_live(call: Call, customer_id: str, *, param: str | None = None) -> dict:
    """The customer, or resource_missing (404 for the URL's id, 400 for a parameter)."""
    customer = call.state.get("customers", customer_id) if isinstance(customer_id, str) else None
    if customer is None or customer.get("deleted"):
        raise resource_missing("customer", str(customer_id), param=param or "id", status=400 if param else 404)
    return customer


def _fields_apply(call: Call, customer: dict) -> None:
    params = call.params
    for name in _STORED:
        if name in params:
            value = params[name]
            customer[name] = None if value == "" else value
    if "balance" in params:
        customer["balance"] = param_int(params, "balance") or 0
    if "invoice_prefix" in params:
        prefix = param_str(params, "invoice_prefix") or ""
        if prefix and not (3 <= len(prefix) <= 12 and prefix.isalnum() and prefix.upper() == prefix):
            raise invalid_request("Invalid invoice_prefix: 3–12 uppercase letters or digits", param="invoice_prefix")
        customer["invoice_prefix"] = prefix or customer["invoice_prefix"]
    if "preferred_locales" in params:
        customer["preferred_locales"] = param_list(params, "preferred_locales") or []
    tax_exempt = param_enum(params, "tax_exempt", ("none", "exempt", "reverse"))
    if tax_exempt:
        customer["tax_exempt"] = tax_exempt
    settings = param_dict(params, "invoice_settings")
    if settings:
        for key in ("custom_fields", "default_payment_method", "footer", "rendering_options"):
            if key in settings:
                customer["invoice_settings"][key] = settings[key] or None
    if "next_invoice_sequence" in params:
        customer["next_invoice_sequence"] = param_int(params, "next_invoice_sequence", minimum=1)
    customer["metadata"] = metadata_apply(customer["metadata"], params.get("metadata"))


def customer_create(call: Call) -> dict:
    params_allow(call.params, _STORED + _ACCEPTED + ("balance", "invoice_prefix", "metadata", "preferred_locales",
                                                     "tax_exempt"))
    customer = {
        "id": object_id_new("cus_", 14), "object": "customer", "address": None, "balance": 0,
        "created": call.now, "currency": None, "default_source": None, "delinquent": False,
        "description": None, "discount": None, "email": None,
        "invoice_prefix": secrets.token_hex(4).upper(),
        "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None,
                             "rendering_options": None},
        "livemode": False, "metadata": {}, "name": None, "next_invoice_sequence": 1, "phone": None,
        "preferred_locales": [], "shipping": None, "tax_exempt": "none", "test_clock": None,
    }
    _fields_apply(call, customer)
    call.state.put("customers", customer)
    event_emit(call, "customer.created", customer)
    return call.out(customer)


def customer_retrieve(call: Call) -> dict:
    params_allow(call.params, ())
    customer = call.state.get("customers", call.args["id"])
    if customer is None:
        raise resource_missing("customer", call.args["id"])
    return call.out(customer)  # a deleted customer answers its `deleted: true` stub, as Stripe does


def customer_update(call: Call) -> dict:
    params_allow(call.params, _STORED + _ACCEPTED + ("balance", "invoice_prefix", "metadata", "preferred_locales",
                                                     "tax_exempt"))
    customer = customer_live(call, call.args["id"])
    before = call.out(customer)
    _fields_apply(call, customer)
    call.state.put("customers", customer)
    changed = attributes_changed(before, customer)
    if changed:
        event_emit(call, "customer.updated", customer, changed)
    return call.out(customer)


def customer_delete(call: Call) -> dict:
    """Deleting a customer cancels its subscriptions at once (customer.subscription.deleted)."""
    from .subscriptions import subscription_cancel  # subscriptions import customers

    params_allow(call.params, ())
    customer = customer_live(call, call.args["id"])
    for subscription in call.state.newest_first("subscriptions"):
        if subscription["customer"] == customer["id"] and subscription["status"] not in ("canceled",
                                                                                          "incomplete_expired"):
            subscription_cancel(call, subscription, reason="cancellation_requested")
    final = call.out(customer)
    call.state.put("customers", {"id": customer["id"], "object": "customer", "deleted": True,
                                 "created": customer["created"]})
    event_emit(call, "customer.deleted", final)
    return {"id": customer["id"], "object": "customer", "deleted": True}


def customer_list(call: Call) -> dict:
    params_allow(call.params, ("limit", "starting_after", "ending_before", "created", "email", "test_clock"))
    items = [c for c in call.state.newest_first("customers") if not c.get("deleted")]
    email = param_str(call.params, "email")
    if email:
        items = [c for c in items if c.get("email") == email]
    return list_page(call, created_filter(call.params, items), "/v1/customers")


def customer_search(call: Call) -> dict:
    params_allow(call.params, ("query", "limit", "page"))
    items = [c for c in call.state.newest_first("customers") if not c.get("deleted")]
    return search_page(call, items, "/v1/customers/search", SEARCH_FIELDS)
