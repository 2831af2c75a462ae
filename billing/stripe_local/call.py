"""One API call as the resource modules see it, plus the helpers every endpoint shares:
unknown-parameter checks, metadata updates, list pages with cursors, search, `expand`."""

from __future__ import annotations

import base64
import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import invalid_request, parameter_unknown, resource_missing
from .render import render
from .state import State
from .wire import param_int, param_str

KIND_BY_PREFIX = (("cus_", "customer"), ("prod_", "product"), ("price_", "price"), ("sub_", "subscription"),
                  ("mtr_", "billing meter"), ("in_", "invoice"), ("we_", "webhook endpoint"),
                  ("evt_", "event"), ("si_", "subscription item"), ("mtrusg_", "meter event summary"))


@dataclass
class Call:
    state: State
    method: str
    path: str
    params: dict[str, Any]
    args: dict[str, str] = field(default_factory=dict)  # from the URL pattern
    request_id: str = ""
    idempotency_key: str | None = None
    bearer: str | None = None
    now: int = field(default_factory=lambda: int(time.time()))
    response_headers: dict[str, str] = field(default_factory=dict)
    # True for /_local/ control calls: their events look like Stripe's own automatic ones
    # (`request.id` null), not like the answer to an API request.
    automatic: bool = False

    @property
    def expand(self) -> list[str]:
        raw = self.params.get("expand")
        if raw is None or raw == "":
            return []
        if isinstance(raw, str):
            return [raw]
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise invalid_request("Invalid array", param="expand")
        return raw

    def out(self, obj: dict, *, expand_prefix: str = "") -> dict:
        """The object as returned to the client: rendered, then expanded. List items take the
        `data.`-prefixed paths (`expand[]=data.customer`), without the prefix."""
        paths = [p[len(expand_prefix):] for p in self.expand if p.startswith(expand_prefix)]
        return expand_apply(self.state, render(self.state, obj, expand=paths), paths)


def kind_of(object_id: str) -> str:
    for prefix, kind in sorted(KIND_BY_PREFIX, key=lambda pair: -len(pair[0])):
        if object_id.startswith(prefix):
            return kind
    return "object"


def params_allow(params: dict, allowed: Iterable[str]) -> None:
    """400 parameter_unknown for a top-level parameter the endpoint doesn't take."""
    allowed = set(allowed) | {"expand"}
    for name in params:
        if name not in allowed:
            raise parameter_unknown(name)


def nested_allow(params: dict, name: str, allowed: Iterable[str]) -> None:
    value = params.get(name)
    if isinstance(value, dict):
        allowed = set(allowed)
        for key in value:
            if key not in allowed:
                raise parameter_unknown(f"{name}[{key}]")


def metadata_apply(current: dict[str, str], raw: Any, *, param: str = "metadata") -> dict[str, str]:
    """Stripe's metadata update: keys merge, `metadata[k]=` deletes k, `metadata=` clears all.
    Limits: 50 keys, keys ≤ 40 characters without brackets, values ≤ 500 characters."""
    if raw is None:
        return current
    if raw == "":
        return {}
    if not isinstance(raw, dict):
        raise invalid_request("Invalid object", param=param)
    merged = dict(current)
    for key, value in raw.items():
        if not isinstance(value, str):
            value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            if value is None:
                raise invalid_request(f"Invalid value for metadata key {key}: must be a string", param=param)
        if len(key) > 40 or "[" in key or "]" in key or not key:
            raise invalid_request(f"Invalid metadata key: {key[:50]}; keys are at most 40 characters and "
                                  "cannot contain square brackets", param=f"{param}[{key[:40]}]")
        if len(value) > 500:
            raise invalid_request(f"Invalid metadata value for key {key}: at most 500 characters",
                                  param=f"{param}[{key}]")
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    if len(merged) > 50:
        raise invalid_request("Metadata can have at most 50 keys", param=param)
    return merged


# --- lists ------------------------------------------------------------------------------------

LIST_PARAMS = ("limit", "starting_after", "ending_before", "created")


def created_filter(params: dict, items: list[dict]) -> list[dict]:
    raw = params.get("created")
    if raw is None or raw == "":
        return items
    if isinstance(raw, str):
        exact = param_int(params, "created")
        return [item for item in items if item.get("created") == exact]
    if not isinstance(raw, dict):
        raise invalid_request("Invalid created", param="created")
    tests: list[Callable[[int], bool]] = []
    for op in raw:
        bound = param_int(raw, op, label=f"created[{op}]")
        if bound is None:
            continue
        tests.append({"gt": lambda v, b=bound: v > b, "gte": lambda v, b=bound: v >= b,
                      "lt": lambda v, b=bound: v < b, "lte": lambda v, b=bound: v <= b}.get(op) or _unknown(op))
    return [item for item in items if all(test(item.get("created", 0)) for test in tests)]


def _unknown(op: str):
    raise parameter_unknown(f"created[{op}]")


def list_page(call: Call, items: list[dict], url: str, *, has_total: bool = False) -> dict:
    """A list object over `items` (already filtered, in list order: newest first).
    `starting_after` pages towards the end of `items`, `ending_before` towards the start."""
    limit = param_int(call.params, "limit", minimum=1, maximum=100)
    limit = 10 if limit is None else limit
    after = param_str(call.params, "starting_after")
    before = param_str(call.params, "ending_before")
    if after and before:
        raise invalid_request("You may only specify one of these parameters: ending_before, starting_after.",
                              param="ending_before")
    ids = [item["id"] for item in items]
    if after:
        start = _cursor_index(ids, after, "starting_after") + 1
        page, has_more = items[start:start + limit], start + limit < len(items)
    elif before:
        end = _cursor_index(ids, before, "ending_before")
        begin = max(0, end - limit)
        page, has_more = items[begin:end], begin > 0
    else:
        page, has_more = items[:limit], limit < len(items)
    body = {"object": "list", "data": [call.out(item, expand_prefix="data.") for item in page],
            "has_more": has_more, "url": url}
    if has_total:
        body["total_count"] = len(items)
    return body


def _cursor_index(ids: list[str], cursor: str, param: str) -> int:
    try:
        return ids.index(cursor)
    except ValueError:
        raise resource_missing(kind_of(cursor), cursor, param=param, status=400) from None


# --- search (`metadata['k']:'v' AND email:'x'`) ----------------------------------------------------

_CLAUSE = re.compile(r"""\s*(-?)([a-z_]+(?:\[['"][^'"]+['"]\])?)\s*(:|~)\s*(?:'([^']*)'|"([^"]*)"|([^\s'"]+))\s*""")
_FIELD = re.compile(r"""([a-z_]+)(?:\[['"]([^'"]+)['"]\])?""")


def search_page(call: Call, items: list[dict], url: str, fields: Iterable[str]) -> dict:
    """Search over `items` with Stripe's query language, the subset of it that matters here:
    `field:'value'` (exact; case-insensitive for strings), `field~'sub'` (substring, ≥ 3 chars),
    `metadata['key']:'value'`, `-` to negate, clauses joined by all-AND or all-OR."""
    query = param_str(call.params, "query")
    if not query:
        raise invalid_request("Missing required param: query.", param="query", code="parameter_missing")
    matcher = _search_compile(query, set(fields))
    limit = param_int(call.params, "limit", minimum=1, maximum=100) or 10
    page = param_str(call.params, "page")
    start = 0
    if page:
        try:
            start = int(base64.urlsafe_b64decode(page.encode()).decode())
        except ValueError:
            raise invalid_request("Invalid page", param="page") from None
    matched = [item for item in items if matcher(item)]
    chunk = matched[start:start + limit]
    has_more = start + limit < len(matched)
    next_page = base64.urlsafe_b64encode(str(start + limit).encode()).decode() if has_more else None
    return {"object": "search_result", "data": [call.out(item, expand_prefix="data.") for item in chunk],
            "has_more": has_more, "next_page": next_page, "url": url}


def _search_compile(query: str, fields: set[str]) -> Callable[[dict], bool]:
    joiner = None
    clauses = []
    position = 0
    rest = query.strip()
    while rest:
        match = _CLAUSE.match(rest)
        if not match:
            raise invalid_request(f"Invalid search query at position {position}: {rest[:40]}", param="query")
        negate, field_text, op, v1, v2, v3 = match.groups()
        value = v1 if v1 is not None else v2 if v2 is not None else v3
        name, subkey = _FIELD.fullmatch(field_text).groups()
        if name not in fields or (subkey is not None) != (name == "metadata"):
            raise invalid_request(f"Field '{field_text}' is an unsupported search field for this resource.",
                                  param="query")
        if op == "~" and len(value) < 3:
            raise invalid_request("Substring search values must be at least 3 characters long.", param="query")
        clauses.append((bool(negate), name, subkey, op, value))
        position += match.end()
        rest = rest[match.end():]
        if rest:
            word = re.match(r"(AND|OR)\s+", rest)
            if not word:
                raise invalid_request(f"Invalid search query at position {position}: {rest[:40]}", param="query")
            if joiner and joiner != word.group(1):
                raise invalid_request("Queries cannot combine AND and OR.", param="query")
            joiner = word.group(1)
            position += word.end()
            rest = rest[word.end():]

    def clause_true(item: dict, clause) -> bool:
        negate, name, subkey, op, value = clause
        actual = (item.get("metadata") or {}).get(subkey) if subkey else item.get(name)
        if isinstance(actual, bool):
            actual = "true" if actual else "false"
        if actual is None:
            hit = False
        elif op == ":":
            hit = str(actual).lower() == value.lower() if name != "metadata" else str(actual) == value
        else:
            hit = value.lower() in str(actual).lower()
        return hit != negate

    combine = any if joiner == "OR" else all
    return lambda item: combine(clause_true(item, clause) for clause in clauses)


# --- expand ---------------------------------------------------------------------------------------

def expand_apply(state: State, body: dict, paths: list[str]) -> dict:
    """Replace id strings at the dotted `paths` with their objects (lists: `data.` prefix).
    Unknown paths are ignored rather than rejected."""
    if not paths:
        return body
    body = copy.deepcopy(body)
    for path in paths:
        parts = path.split(".")
        if len(parts) > 4:
            raise invalid_request(f"You cannot expand more than 4 levels of a property. Property: {path}",
                                  param="expand")
        _expand_walk(state, body, parts)
    return body


def _expand_walk(state: State, node: Any, parts: list[str]) -> None:
    if isinstance(node, list):
        for element in node:
            _expand_walk(state, element, parts)
        return
    if not isinstance(node, dict) or not parts:
        return
    head, rest = parts[0], parts[1:]
    value = node.get(head)
    if isinstance(value, str):
        target = state.lookup_any(value)
        if target is None:
            return
        node[head] = value = render(state, target)
    if rest:
        _expand_walk(state, value, rest)
