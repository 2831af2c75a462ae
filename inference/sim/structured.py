"""JSON values that satisfy a JSON schema: what the simulated model writes
when its output is constrained (tool-call arguments, `response_format`).

Deterministic for a seed: every required property (all of them when the schema
marks none required) gets a value of its type; an enum or const its first
value; `anyOf` / `oneOf` their first alternative that is not null; `$ref`
resolves within the root schema (`#/$defs/...`, `#/definitions/...`, as
pydantic writes nested models); strings are words picked by the seed, or
values of their `format` (date-time, date, time, email, uri, uuid), within
`minLength` / `maxLength`.
"""
from __future__ import annotations

import uuid
from typing import Any

_WORDS = ("alpha", "river", "paris", "blue", "seven", "north", "garden", "signal")
# References followed at most this deep (a recursive schema ends in null).
MAX_DEPTH = 16


def schema_value(schema: Any, seed: int, *, root: Any = None, depth: int = 0) -> Any:
    """A value valid under `schema` (a JSON schema object; anything else: a word)."""
    if not isinstance(schema, dict):
        return _WORDS[seed % len(_WORDS)]
    root = schema if root is None else root
    if depth > MAX_DEPTH:
        return None
    reference = schema.get("$ref")
    if isinstance(reference, str):
        return schema_value(_resolve(root, reference), seed, root=root, depth=depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for combinator in ("anyOf", "oneOf", "allOf"):
        choices = schema.get(combinator)
        if isinstance(choices, list) and choices:
            chosen = next((c for c in choices if not (isinstance(c, dict) and c.get("type") == "null")), choices[0])
            return schema_value(chosen, seed, root=root, depth=depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and isinstance(schema.get("properties"), dict):
        kind = "object"
    if kind == "object":
        return object_value(schema, seed, root=root, depth=depth)
    if kind == "array":
        minimum = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
        return [schema_value(schema.get("items"), seed + index, root=root, depth=depth + 1) for index in range(minimum)]
    if kind == "integer":
        return _in_range(schema, seed % 10 + 1)
    if kind == "number":
        return _in_range(schema, (seed % 100) / 4)
    if kind == "boolean":
        return bool(seed & 1)
    if kind == "null":
        return None
    return _string(schema, seed)


def object_value(schema: dict, seed: int, *, root: Any = None, depth: int = 0) -> dict:
    root = schema if root is None else root
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else list(properties)
    return {name: schema_value(properties.get(name) or {}, seed + index, root=root, depth=depth + 1)
            for index, name in enumerate(required) if isinstance(name, str)}


def _string(schema: dict, seed: int) -> str:
    """A word, or a value of the string's `format`, within its length bounds."""
    word = _WORDS[seed % len(_WORDS)]
    formatted = _FORMATS.get(schema.get("format"))
    if formatted is not None:
        return formatted(word, seed)
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) and len(word) < low:
        word = (word * (low // len(word) + 1))[:low]
    if isinstance(high, int) and len(word) > high:
        word = word[:high]
    return word


_FORMATS = {
    "date-time": lambda word, seed: f"2026-{seed % 12 + 1:02d}-{seed % 28 + 1:02d}T12:00:00Z",
    "date": lambda word, seed: f"2026-{seed % 12 + 1:02d}-{seed % 28 + 1:02d}",
    "time": lambda word, seed: f"{seed % 24:02d}:00:00",
    "email": lambda word, seed: f"{word}@example.com",
    "uri": lambda word, seed: f"https://example.com/{word}",
    "uuid": lambda word, seed: str(uuid.UUID(int=seed % (1 << 128), version=4)),
}


def _resolve(root: Any, reference: str) -> Any:
    if not reference.startswith("#/"):
        return {}
    node = root
    for part in reference[2:].split("/"):
        if not isinstance(node, dict):
            return {}
        node = node.get(part.replace("~1", "/").replace("~0", "~"))
    return node if isinstance(node, dict) else {}


def _in_range(schema: dict, value: float) -> float:
    low, high = schema.get("minimum"), schema.get("maximum")
    if isinstance(low, (int, float)) and value < low:
        value = low
    if isinstance(high, (int, float)) and value > high:
        value = high
    return value
