"""Stripe's wire conventions: bracket-nested form parameters, ids, timestamps, amounts.

Everything here is pure (no state, no I/O) so the resource modules can share it.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import string
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from .errors import invalid_request, parameter_invalid

# The API version stripe-python 16.1.0 pins; events carry it as `api_version`.
API_VERSION = "2026-10-28.endive"

_ALPHANUMERIC = string.ascii_letters + string.digits
_KEY_PART = re.compile(r"\[([^\[\]]*)\]")
# Parameters whose children are free-form string maps: digit keys stay keys, never list indexes.
_STRING_MAPS = frozenset({"metadata", "payload"})


def object_id_new(prefix: str, length: int = 24) -> str:
    """`cus_` + 24 random alphanumerics: the shape Stripe's ids have."""
    return prefix + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def request_id_new() -> str:
    return object_id_new("req_", 14)


def form_decode(raw: str) -> dict[str, Any]:
    """Decode `a[b][0][c]=1&expand[]=x` (urlencoded, brackets literal or %5B/%5D) into
    nested dicts and lists. `expand[]` and `expand[0]` both become lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        head, _, rest = key.partition("[")
        parts = [head] + (_KEY_PART.findall("[" + rest) if rest else [])
        if not head or (rest and "[" + rest != "".join(f"[{p}]" for p in parts[1:])):
            raise invalid_request(f"Invalid parameter name: {key}", param=key)
        _assign(root, parts, value, key)
    return _listify(root, ())


def _assign(node: dict, parts: list[str], value: str, key: str) -> None:
    for depth, part in enumerate(parts[:-1]):
        if part == "":  # `a[][b]`: a new element per occurrence is ambiguous; Stripe wants indexes.
            raise invalid_request(f"Invalid array parameter: {key}; use indexes such as [0]", param=key)
        child = node.get(part)
        if child is None or child == "":  # `metadata=` followed by `metadata[k]=v`
            child = node[part] = {}
        if not isinstance(child, dict):
            raise invalid_request(f"Invalid hash for parameter {'['.join(parts[:depth + 1])}", param=key)
        node = child
    last = parts[-1]
    if last == "":
        bucket = node.setdefault("\0appended", [])
        bucket.append(value)
    else:
        node[last] = value


def _listify(node: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(node, dict):
        return node
    appended = node.pop("\0appended", None)
    if appended is not None and not node:
        return appended
    if path and path[-1] in _STRING_MAPS:
        return node
    out = {k: _listify(v, path + (k,)) for k, v in node.items()}
    if out and all(k.isdigit() for k in out):
        return [out[k] for k in sorted(out, key=int)]
    return out


# --- typed parameter readers (Stripe sends everything as strings on v1) -----------------------

def param_int(params: dict, name: str, *, label: str | None = None, minimum: int | None = None,
              maximum: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    label = label or name
    if isinstance(raw, bool):
        raise parameter_invalid("integer", raw, label)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise parameter_invalid("integer", raw, label) from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise invalid_request(f"Invalid {label}: must be {bounds}", param=label)
    return value


def param_bool(params: dict, name: str, *, label: str | None = None) -> bool | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if raw in (True, "true"):
        return True
    if raw in (False, "false"):
        return False
    raise invalid_request(f"Invalid boolean: {raw}", param=label or name, code="parameter_invalid_boolean")


def param_str(params: dict, name: str, *, label: str | None = None, max_length: int = 5000) -> str | None:
    raw = params.get(name)
    if raw is None:
        return None
    label = label or name
    if not isinstance(raw, str):
        raise invalid_request(f"Invalid string: {_short(raw)}", param=label, code="parameter_invalid_string")
    if len(raw) > max_length:
        raise invalid_request(f"Invalid string: {raw[:20]}...; must be at most {max_length} characters",
                              param=label, code="parameter_invalid_string")
    return raw


def param_enum(params: dict, name: str, choices: tuple[str, ...], *, label: str | None = None) -> str | None:
    raw = param_str(params, name, label=label)
    if raw is None or raw == "":
        return None
    if raw not in choices:
        raise invalid_request(f"Invalid {label or name}: must be one of {', '.join(choices)}", param=label or name)
    return raw


def param_dict(params: dict, name: str, *, label: str | None = None) -> dict | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, dict):
        raise invalid_request("Invalid object", param=label or name)
    return raw


def param_list(params: dict, name: str, *, label: str | None = None) -> list | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if isinstance(raw, dict) and not raw:
        return []
    if not isinstance(raw, list):
        raise invalid_request("Invalid array", param=label or name)
    return raw


def param_decimal(params: dict, name: str, *, label: str | None = None, places: int = 12) -> Decimal | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    label = label or name
    value = decimal_parse(raw)
    if value is None:
        raise invalid_request(f"Invalid decimal: {_short(raw)}", param=label, code="parameter_invalid_decimal")
    exponent = value.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -places:
        raise invalid_request(f"Invalid decimal: {raw}; at most {places} decimal places are allowed",
                              param=label, code="parameter_invalid_decimal")
    return value


def decimal_parse(raw: Any) -> Decimal | None:
    """A finite Decimal from a string or number, or None when it is not one."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        return None
    try:
        value = Decimal(str(raw).strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def decimal_str(value: Decimal) -> str:
    """`Decimal('1.500')` → `"1.5"`, `Decimal('1E+3')` → `"1000"`: how Stripe prints `*_decimal`."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def minor_units_round(value: Decimal) -> int:
    """Line amounts are whole minor units; halves round away from zero."""
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def iso_from_epoch(epoch: float) -> str:
    """v2 timestamps: `2026-01-31T12:00:00.000Z`."""
    moment = dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def epoch_from_iso(raw: Any, *, param: str) -> int:
    """v2 accepts ISO-8601; epoch seconds are tolerated because stripe-python JSON-encodes
    `datetime` values as integers."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        if text.isdigit():
            return int(text)
        try:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.timezone.utc)
            return int(moment.timestamp())
    raise invalid_request(f"Invalid timestamp: {_short(raw)}; expected an ISO-8601 date-time", param=param)


def add_interval(epoch: int, interval: str, count: int, times: int = 1) -> int:
    """`epoch` + `times`×(`count` `interval`s) in UTC; month ends clamp (Jan 31 → Feb 28)."""
    moment = dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc)
    steps = count * times
    if interval == "day":
        return int((moment + dt.timedelta(days=steps)).timestamp())
    if interval == "week":
        return int((moment + dt.timedelta(weeks=steps)).timestamp())
    months = steps * (12 if interval == "year" else 1)
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    next_month_first = dt.date(year + month // 12, month % 12 + 1, 1)
    day = min(moment.day, (next_month_first - dt.timedelta(days=1)).day)
    return int(moment.replace(year=year, month=month, day=day).timestamp())


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."

