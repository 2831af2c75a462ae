"""`/v1/products` and `/v1/prices`.

A price's amount is kept as `unit_amount_decimal` (a string, minor units, ≤ 12 decimal
places); `unit_amount` is its integer value when it has no fraction, else null. Tiers
(`billing_scheme=tiered`) keep `up_to` null for the last, unbounded tier.
"""

from __future__ import annotations

from decimal import Decimal

from .call import Call, created_filter, list_page, metadata_apply, nested_allow, params_allow, search_page
from .errors import invalid_request, parameter_missing, resource_missing
from .events import attributes_changed, event_emit
from .wire import (decimal_str, object_id_new, param_bool, param_decimal, param_dict, param_enum, param_int,
                   param_list, param_str)

_PRODUCT_FIELDS = ("name", "active", "description", "metadata", "images", "marketing_features",
                   "package_dimensions", "shippable", "statement_descriptor", "tax_code", "unit_label", "url")
PRODUCT_SEARCH_FIELDS = ("active", "created", "description", "metadata", "name", "shippable", "url")
PRICE_SEARCH_FIELDS = ("active", "created", "currency", "lookup_key", "metadata", "product", "type")
INTERVALS = ("day", "week", "month", "year")


# --- products -------------------------------------------------------------------------------------

def product_live(call: Call, product_id: str, *, param: str | None = None) -> dict:
    product = call.state.get("products", product_id) if isinstance(product_id, str) else None
    if product is None or product.get("deleted"):
        raise resource_missing("product", str(product_id), param=param or "id", status=400 if param else 404)
    return product


def _product_fields_apply(params: dict, product: dict) -> None:
    if "name" in params:
        name = param_str(params, "name")
        if not name:
            raise invalid_request("You must provide a name for the product.", param="name")
        product["name"] = name
    active = param_bool(params, "active")
    if active is not None:
        product["active"] = active
    shippable = param_bool(params, "shippable")
    if shippable is not None:
        product["shippable"] = shippable
    for name in ("description", "statement_descriptor", "tax_code", "unit_label", "url"):
        if name in params:
            product[name] = param_str(params, name) or None
    for name in ("images", "marketing_features"):
        if name in params:
            product[name] = param_list(params, name) or []
    if "package_dimensions" in params:
        product["package_dimensions"] = param_dict(params, "package_dimensions")
    product["metadata"] = metadata_apply(product["metadata"], params.get("metadata"))


def product_new(call: Call, params: dict, *, product_id: str | None = None, label: str = "") -> dict:
    if not param_str(params, "name"):
        raise parameter_missing(f"{label}[name]" if label else "name")
    product = {
        "id": product_id or object_id_new("prod_", 14), "object": "product", "active": True, "attributes": [],
        "created": call.now, "default_price": None, "description": None, "images": [], "livemode": False,
        "marketing_features": [], "metadata": {}, "name": "", "package_dimensions": None, "shippable": None,
        "statement_descriptor": None, "tax_code": None, "type": "service", "unit_label": None,
        "updated": call.now, "url": None,
    }
    _product_fields_apply(params, product)
    call.state.put("products", product)
    event_emit(call, "product.created", product)
    return product


def product_create(call: Call) -> dict:
    params_allow(call.params, _PRODUCT_FIELDS + ("id", "default_price_data", "type", "tax_details"))
    product_id = param_str(call.params, "id")
    if product_id:
        if call.state.get("products", product_id) is not None:
            raise invalid_request("Product already exists.", param="id", code="resource_already_exists")
    product = product_new(call, call.params, product_id=product_id)
    default_price_data = param_dict(call.params, "default_price_data")
    if default_price_data:
        price = price_new(call, {**default_price_data, "product": product["id"]}, label="default_price_data")
        product["default_price"] = price["id"]
        call.state.put("products", product)
    return call.out(product)


def product_retrieve(call: Call) -> dict:
    params_allow(call.params, ())
    product = call.state.get("products", call.args["id"])
    if product is None:
        raise resource_missing("product", call.args["id"])
    return call.out(product)


def product_update(call: Call) -> dict:
    params_allow(call.params, _PRODUCT_FIELDS + ("default_price", "tax_details"))
    product = product_live(call, call.args["id"])
    before = call.out(product)
    _product_fields_apply(call.params, product)
    if "default_price" in call.params:
        price_id = param_str(call.params, "default_price")
        if price_id:
            price = call.state.get("prices", price_id)
            if price is None or price["product"] != product["id"]:
                raise resource_missing("price", price_id, param="default_price", status=400)
        product["default_price"] = price_id or None
    changed = attributes_changed(before, product)
    if changed:
        product["updated"] = call.now
        changed["updated"] = before["updated"]
        event_emit(call, "product.updated", product, changed)
    call.state.put("products", product)
    return call.out(product)


def product_delete(call: Call) -> dict:
    params_allow(call.params, ())
    product = product_live(call, call.args["id"])
    if any(p["product"] == product["id"] for p in call.state.objects["prices"].values()):
        raise invalid_request("This product cannot be deleted because it has one or more user-created prices.",
                              param="id")
    final = call.out(product)
    call.state.put("products", {"id": product["id"], "object": "product", "deleted": True,
                                "created": product["created"]})
    event_emit(call, "product.deleted", final)
    return {"id": product["id"], "object": "product", "deleted": True}


def product_list(call: Call) -> dict:
    params_allow(call.params, ("limit", "starting_after", "ending_before", "created", "active", "ids",
                               "shippable", "url"))
    items = [p for p in call.state.newest_first("products") if not p.get("deleted")]
    active = param_bool(call.params, "active")
    if active is not None:
        items = [p for p in items if p["active"] == active]
    ids = param_list(call.params, "ids")
    if ids:
        items = [p for p in items if p["id"] in ids]
    return list_page(call, created_filter(call.params, items), "/v1/products")


def product_search(call: Call) -> dict:
    params_allow(call.params, ("query", "limit", "page"))
    items = [p for p in call.state.newest_first("products") if not p.get("deleted")]
    return search_page(call, items, "/v1/products/search", PRODUCT_SEARCH_FIELDS)


# --- prices ---------------------------------------------------------------------------------------

_PRICE_PARAMS = ("currency", "product", "product_data", "unit_amount", "unit_amount_decimal", "billing_scheme",
                 "tiers", "tiers_mode", "recurring", "lookup_key", "transfer_lookup_key", "metadata", "nickname",
                 "active", "tax_behavior", "currency_options", "custom_unit_amount", "transform_quantity")


def _amount(params: dict, prefix: str, *, label: str) -> Decimal | None:
    """`<prefix>` (integer) or `<prefix>_decimal` (string), at most one of them."""
    whole = param_int(params, prefix, label=f"{label}{prefix}", minimum=0)
    fraction = param_decimal(params, f"{prefix}_decimal", label=f"{label}{prefix}_decimal")
    if whole is not None and fraction is not None:
        raise invalid_request(f"You may only specify one of these parameters: {prefix}, {prefix}_decimal.",
                              param=f"{label}{prefix}_decimal")
    if fraction is not None and fraction < 0:
        raise invalid_request(f"Invalid {prefix}_decimal: must be at least 0", param=f"{label}{prefix}_decimal")
    return Decimal(whole) if whole is not None else fraction


def _amount_fields(value: Decimal | None, prefix: str) -> dict:
    if value is None:
        return {prefix: None, f"{prefix}_decimal": None}
    whole = int(value) if value == value.to_integral_value() else None
    return {prefix: whole, f"{prefix}_decimal": decimal_str(value)}


def _tiers_parse(raw: list | None, mode: str | None) -> list[dict]:
    if not raw:
        raise parameter_missing("tiers")
    if mode is None:
        raise parameter_missing("tiers_mode")
    tiers = []
    previous = 0
    for index, tier in enumerate(raw):
        label = f"tiers[{index}]"
        if not isinstance(tier, dict):
            raise invalid_request("Invalid object", param=label)
        nested_allow({label: tier}, label, ("up_to", "unit_amount", "unit_amount_decimal", "flat_amount",
                                            "flat_amount_decimal"))
        up_to_raw = tier.get("up_to")
        if up_to_raw in (None, ""):
            raise parameter_missing(f"{label}[up_to]")
        last = index == len(raw) - 1
        if up_to_raw == "inf":
            if not last:
                raise invalid_request("Only the last tier may have up_to=inf.", param=f"{label}[up_to]")
            up_to = None
        else:
            up_to = param_int(tier, "up_to", label=f"{label}[up_to]", minimum=1)
            if last:
                raise invalid_request("The last tier must have up_to=inf.", param=f"{label}[up_to]")
            if up_to <= previous:
                raise invalid_request("Tiers must be in increasing order of up_to.", param=f"{label}[up_to]")
            previous = up_to
        unit = _amount(tier, "unit_amount", label=f"{label}[")
        flat = _amount(tier, "flat_amount", label=f"{label}[")
        if unit is None and flat is None:
            raise invalid_request("Each tier needs unit_amount or flat_amount.", param=f"{label}[unit_amount]")
        tiers.append({**_amount_fields(flat, "flat_amount"), **_amount_fields(unit, "unit_amount"), "up_to": up_to})
    return tiers


def _recurring_parse(call: Call, raw: dict | None) -> dict | None:
    if raw is None:
        return None
    nested_allow({"recurring": raw}, "recurring", ("interval", "interval_count", "usage_type", "meter",
                                                   "trial_period_days", "aggregate_usage"))
    if "aggregate_usage" in raw:
        raise invalid_request("Received unknown parameter: recurring[aggregate_usage]. Metered prices are backed "
                              "by billing meters; set recurring[meter] instead.", param="recurring[aggregate_usage]",
                              code="parameter_unknown")
    interval = param_enum(raw, "interval", INTERVALS, label="recurring[interval]")
    if interval is None:
        raise parameter_missing("recurring[interval]")
    count = param_int(raw, "interval_count", label="recurring[interval_count]", minimum=1) or 1
    usage_type = param_enum(raw, "usage_type", ("licensed", "metered"), label="recurring[usage_type]") or "licensed"
    meter_id = param_str(raw, "meter", label="recurring[meter]") or None
    if usage_type == "metered" and meter_id is None:
        raise parameter_missing("recurring[meter]")
    if usage_type == "licensed" and meter_id is not None:
        raise invalid_request("recurring[meter] can only be set when recurring[usage_type] is metered.",
                              param="recurring[meter]")
    if meter_id is not None and call.state.get("meters", meter_id) is None:
        raise resource_missing("billing meter", meter_id, param="recurring[meter]", status=400)
    return {"interval": interval, "interval_count": count, "meter": meter_id,
            "trial_period_days": param_int(raw, "trial_period_days", label="recurring[trial_period_days]"),
            "usage_type": usage_type}


def _lookup_key_claim(call: Call, lookup_key: str | None, price_id: str, transfer: bool) -> None:
    if not lookup_key:
        return
    for other in call.state.objects["prices"].values():
        if other["id"] != price_id and other.get("lookup_key") == lookup_key:
            if not transfer:
                raise invalid_request(f"A price (`{other['id']}`) already uses that lookup key.",
                                      param="lookup_key")
            other["lookup_key"] = None
            call.state.put("prices", other)


def price_new(call: Call, params: dict, *, label: str = "") -> dict:
    """Validate and create a price from `params` (v1 form values), emitting price.created."""
    currency = param_str(params, "currency")
    if not currency:
        raise parameter_missing("currency")
    if len(currency) != 3 or not currency.isalpha():
        raise invalid_request(f"Invalid currency: {currency}", param="currency")
    product_data = param_dict(params, "product_data")
    product_id = param_str(params, "product")
    if product_id and product_data:
        raise invalid_request("You may only specify one of these parameters: product, product_data.",
                              param="product_data")
    if not product_id and not product_data:
        raise parameter_missing("product")
    if product_id:
        product_live(call, product_id, param="product")
    elif not param_str(product_data, "name"):
        raise parameter_missing("product_data[name]")
    scheme = param_enum(params, "billing_scheme", ("per_unit", "tiered")) or "per_unit"
    tiers_mode = param_enum(params, "tiers_mode", ("graduated", "volume"))
    recurring = _recurring_parse(call, param_dict(params, "recurring"))
    unit = _amount(params, "unit_amount", label="")
    tiers = None
    if scheme == "tiered":
        if unit is not None:
            raise invalid_request("unit_amount cannot be set on a tiered price; set it on each tier.",
                                  param="unit_amount")
        tiers = _tiers_parse(param_list(params, "tiers"), tiers_mode)
    else:
        if "tiers" in params or tiers_mode:
            raise invalid_request("tiers and tiers_mode can only be set when billing_scheme is tiered.",
                                  param="tiers" if "tiers" in params else "tiers_mode")
        if unit is None and "custom_unit_amount" not in params:
            raise parameter_missing("unit_amount")
    lookup_key = param_str(params, "lookup_key", max_length=200) or None
    price_id = object_id_new("price_")
    _lookup_key_claim(call, lookup_key, price_id, bool(param_bool(params, "transfer_lookup_key")))
    if product_data:
        nested_allow({"product_data": product_data}, "product_data",
                     ("name", "active", "metadata", "statement_descriptor", "tax_code", "unit_label", "id"))
        product_id = product_new(call, product_data, product_id=param_str(product_data, "id") or None,
                                 label="product_data")["id"]
    active = param_bool(params, "active")
    price = {
        "id": price_id, "object": "price", "active": True if active is None else active,
        "billing_scheme": scheme, "created": call.now, "currency": currency.lower(), "custom_unit_amount": None,
        "livemode": False, "lookup_key": lookup_key, "metadata": metadata_apply({}, params.get("metadata")),
        "nickname": param_str(params, "nickname") or None, "product": product_id, "recurring": recurring,
        "tax_behavior": param_enum(params, "tax_behavior", ("exclusive", "inclusive", "unspecified"))
        or "unspecified",
        "tiers_mode": tiers_mode if scheme == "tiered" else None, "transform_quantity": None,
        "type": "recurring" if recurring else "one_time", **_amount_fields(unit, "unit_amount"),
    }
    if tiers is not None:
        price["tiers"] = tiers
    call.state.put("prices", price)
    event_emit(call, "price.created", price)
    return price


def price_live(call: Call, price_id: str, *, param: str | None = None) -> dict:
    price = call.state.get("prices", price_id) if isinstance(price_id, str) else None
    if price is None:
        raise resource_missing("price", str(price_id), param=param or "id", status=400 if param else 404)
    return price


def price_create(call: Call) -> dict:
    params_allow(call.params, _PRICE_PARAMS)
    return call.out(price_new(call, call.params))


def price_retrieve(call: Call) -> dict:
    params_allow(call.params, ())
    return call.out(price_live(call, call.args["id"]))


def price_update(call: Call) -> dict:
    """Only what Stripe lets change after creation: active, metadata, nickname, lookup_key, tax_behavior."""
    params_allow(call.params, ("active", "metadata", "nickname", "lookup_key", "transfer_lookup_key",
                               "tax_behavior", "currency_options"))
    price = price_live(call, call.args["id"])
    before = call.out(price)
    active = param_bool(call.params, "active")
    if active is not None:
        price["active"] = active
    if "nickname" in call.params:
        price["nickname"] = param_str(call.params, "nickname") or None
    if "lookup_key" in call.params:
        lookup_key = param_str(call.params, "lookup_key", max_length=200) or None
        _lookup_key_claim(call, lookup_key, price["id"], bool(param_bool(call.params, "transfer_lookup_key")))
        price["lookup_key"] = lookup_key
    tax_behavior = param_enum(call.params, "tax_behavior", ("exclusive", "inclusive", "unspecified"))
    if tax_behavior:
        price["tax_behavior"] = tax_behavior
    price["metadata"] = metadata_apply(price["metadata"], call.params.get("metadata"))
    call.state.put("prices", price)
    changed = attributes_changed(before, call.out(price))
    if changed:
        event_emit(call, "price.updated", price, changed)
    return call.out(price)


def price_list(call: Call) -> dict:
    params_allow(call.params, ("limit", "starting_after", "ending_before", "created", "active", "currency",
                               "product", "type", "lookup_keys", "recurring"))
    items = call.state.newest_first("prices")
    active = param_bool(call.params, "active")
    if active is not None:
        items = [p for p in items if p["active"] == active]
    for name in ("currency", "product", "type"):
        value = param_str(call.params, name)
        if value:
            items = [p for p in items if p[name] == value]
    lookup_keys = param_list(call.params, "lookup_keys")
    if lookup_keys:
        items = [p for p in items if p["lookup_key"] in lookup_keys]
    recurring = param_dict(call.params, "recurring")
    if recurring:
        for name in ("interval", "usage_type", "meter"):
            if recurring.get(name):
                items = [p for p in items if (p["recurring"] or {}).get(name) == recurring[name]]
    return list_page(call, created_filter(call.params, items), "/v1/prices")


def price_search(call: Call) -> dict:
    params_allow(call.params, ("query", "limit", "page"))
    return search_page(call, call.state.newest_first("prices"), "/v1/prices/search", PRICE_SEARCH_FIELDS)
