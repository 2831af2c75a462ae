"""Structural tags as SGLang's default grammar backend (xgrammar) reads them, and
a seeded string each one accepts: what a model constrained by `structural_tag`
writes.

Two shapes reach `sampling_params.structural_tag` (a JSON string; the OpenAI
routes put `response_format` there when its type is "structural_tag"):

- the legacy one, `{"structures": [{"begin", "schema", "end"}], "triggers": [...],
  "at_least_one": false}`: free text in which each trigger opens one of the
  tags `begin` + JSON under `schema` + `end` (what tool calling asks of models
  whose calls look like `<function=name>{...}</function>`);
- xgrammar's, `{"format": {...}}`, a tree of formats: `const_string`,
  `json_schema` (styles "json" and "qwen_xml"), `any_text`, `regex`,
  `grammar` (EBNF), `sequence`, `or`, `tag`, `triggered_tags`,
  `tags_with_separator`, `optional`, `plus`, `star`, `repeat`, `dispatch`,
  and the deprecated `qwen_xml_parameter`. Formats over token ids (`token`,
  `exclude_token`, `any_tokens`, `token_triggered_tags`, `token_dispatch`) and
  the other XML styles are refused as not modelled.

A sample keeps repetitions short (a few items) and free text to a few words,
and honours `at_least_one`, `stop_after_first`, `excludes` and `max_chars`.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import rstr

from . import ebnf
from .structured import schema_value
from .tokenizer import OUTPUT_WORDS

# Repetitions without an upper bound take at most this many items beyond their minimum.
EXTRA_REPEATS = 2
# Words of a stretch of free text (any_text, or the text around triggered tags).
FREE_WORDS = (0, 6)
TOKEN_FORMATS = ("token", "exclude_token", "any_tokens", "token_triggered_tags", "token_dispatch")


class StructuralTagError(ValueError):
    """A structural tag that xgrammar would not compile."""


def sample(spec: str, seed: int) -> str:
    """A string the structural tag accepts, the same for the same seed; raises
    StructuralTagError for one that does not compile."""
    try:
        tag = json.loads(spec)
    except ValueError as error:
        raise StructuralTagError(f"invalid JSON: {error}") from None
    if not isinstance(tag, dict):
        raise StructuralTagError("a structural tag must be a JSON object")
    rng = random.Random(seed)
    if tag.get("structures") is not None:
        return _Sampler(rng).emit(_legacy_format(tag))
    if not isinstance(tag.get("format"), dict):
        raise StructuralTagError("a structural tag needs 'format' (or the legacy 'structures' and 'triggers')")
    return _Sampler(rng).emit(tag["format"])


def _legacy_format(tag: dict) -> dict:
    """The legacy shape as xgrammar converts it: triggered tags whose content is
    each structure's JSON schema (none: any JSON)."""
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list):
        raise StructuralTagError("'structures' and 'triggers' must be lists")
    tags = []
    for structure in structures:
        if not isinstance(structure, dict) or not all(isinstance(structure.get(k), str) for k in ("begin", "end")):
            raise StructuralTagError("each structure needs string 'begin' and 'end'")
        schema = structure.get("schema")
        tags.append({"type": "tag", "begin": structure["begin"], "end": structure["end"],
                     "content": {"type": "json_schema", "json_schema": schema if schema is not None else {}}})
    return {"type": "triggered_tags", "triggers": triggers, "tags": tags,
            "at_least_one": bool(tag.get("at_least_one", False))}


def _field(node: dict, name: str, kind: type) -> Any:
    """`node[name]`, which must be a `kind` (a boolean is no int here)."""
    value = node.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise StructuralTagError(f"format '{node.get('type')}' needs '{name}' of type {kind.__name__}")
    return value


class _Sampler:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def emit(self, node: object) -> str:
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise StructuralTagError("every format is an object with a 'type'")
        kind = node["type"]
        if kind in TOKEN_FORMATS:
            raise StructuralTagError(f"format '{kind}' works on token ids, which the simulator does not model")
        method = getattr(self, "_" + kind, None)
        if method is None:
            raise StructuralTagError(f"unknown format type '{kind}'")
        return method(node)

    def _count(self, low: int, high: int | None) -> int:
        return self.rng.randint(low, low + EXTRA_REPEATS if high is None or high < 0 else high)

    def _free_text(self, excludes: list[str], max_chars: int | None = None) -> str:
        words = [self.rng.choice(OUTPUT_WORDS) for _ in range(self.rng.randint(*FREE_WORDS))]
        text = "".join(" " + word for word in words)
        if any(excluded and excluded in text for excluded in excludes):
            text = ""
        return text if max_chars is None else text[:max_chars]

    def _const_string(self, node: dict) -> str:
        return _field(node, "value", str)

    def _json_schema(self, node: dict) -> str:
        schema = node.get("json_schema")
        if not isinstance(schema, (dict, bool)):
            raise StructuralTagError("format 'json_schema' needs 'json_schema', an object or a boolean")
        schema = schema if isinstance(schema, dict) else {}
        value = schema_value(schema, self.rng.getrandbits(32))
        style = node.get("style", "json")
        if style == "json":
            return json.dumps(value, ensure_ascii=False)
        if style == "qwen_xml":
            return _qwen_xml(value)
        raise StructuralTagError(f"json_schema style '{style}' is not modelled by the simulator")

    def _qwen_xml_parameter(self, node: dict) -> str:
        return self._json_schema({**node, "style": "qwen_xml"})

    def _any_text(self, node: dict) -> str:
        max_chars = node.get("max_chars")
        return self._free_text(list(node.get("excludes") or []), max_chars if isinstance(max_chars, int) else None)

    def _regex(self, node: dict) -> str:
        pattern = _field(node, "pattern", str)
        try:
            re.compile(pattern)
        except re.error as error:
            raise StructuralTagError(f"regex {pattern!r}: {error}") from None
        return rstr.Rstr(self.rng).xeger(pattern)

    def _grammar(self, node: dict) -> str:
        grammar = _field(node, "grammar", str)
        if node.get("syntax", "ebnf") != "ebnf":
            raise StructuralTagError(f"grammar syntax '{node.get('syntax')}' is not modelled by the simulator")
        try:
            return ebnf.sample(grammar, self.rng.getrandbits(32))
        except ebnf.EbnfError as error:
            raise StructuralTagError(f"grammar: {error}") from None

    def _sequence(self, node: dict) -> str:
        return "".join(self.emit(element) for element in _field(node, "elements", list))

    def _or(self, node: dict) -> str:
        elements = _field(node, "elements", list)
        if not elements:
            raise StructuralTagError("format 'or' needs at least one element")
        return self.emit(self.rng.choice(elements))

    def _tag(self, node: dict) -> str:
        begin, end = node.get("begin"), node.get("end")
        if isinstance(begin, dict) or isinstance(end, dict):
            raise StructuralTagError("token begin and end tags are not modelled by the simulator")
        if not isinstance(begin, str):
            raise StructuralTagError("format 'tag' needs a string 'begin'")
        if isinstance(end, list) and end and all(isinstance(item, str) for item in end):
            end = self.rng.choice(end)
        if not isinstance(end, str):
            raise StructuralTagError("format 'tag' needs 'end', a string or a list of strings")
        if "content" not in node:
            raise StructuralTagError("format 'tag' needs 'content'")
        return begin + self.emit(node["content"]) + end

    def _tags(self, node: dict) -> list[dict]:
        tags = _field(node, "tags", list)
        if not tags:
            raise StructuralTagError(f"format '{node['type']}' needs at least one tag")
        for tag in tags:
            if not isinstance(tag, dict) or tag.get("type", "tag") != "tag":
                raise StructuralTagError(f"the tags of '{node['type']}' must be 'tag' formats")
        return tags

    def _tag_count(self, node: dict) -> int:
        low = 1 if node.get("at_least_one") else 0
        return self._count(low, 1 if node.get("stop_after_first") else None)

    def _triggered_tags(self, node: dict) -> str:
        triggers = _field(node, "triggers", list)
        tags = self._tags(node)
        if not triggers or not all(isinstance(trigger, str) and trigger for trigger in triggers):
            raise StructuralTagError("format 'triggered_tags' needs non-empty string triggers")
        for tag in tags:
            begin = tag.get("begin")
            if not isinstance(begin, str):
                raise StructuralTagError("the tags of 'triggered_tags' need string 'begin' fields")
            if sum(begin.startswith(trigger) for trigger in triggers) != 1:
                raise StructuralTagError(f"tag begin {begin!r} must start with exactly one trigger")
        excludes = [*triggers, *(node.get("excludes") or [])]
        count = self._tag_count(node)
        # With at_least_one, the output starts with a tag; free text may follow
        # each tag unless the first one ends it.
        parts = [] if node.get("at_least_one") else [self._free_text(excludes)]
        for index in range(count):
            parts.append(self._tag({"type": "tag", **self.rng.choice(tags)}))
            if not node.get("stop_after_first"):
                parts.append(self._free_text(excludes))
        return "".join(parts)

    def _tags_with_separator(self, node: dict) -> str:
        tags = self._tags(node)
        separator = _field(node, "separator", str)
        return separator.join(self._tag({"type": "tag", **self.rng.choice(tags)}) for _ in range(self._tag_count(node)))

    def _optional(self, node: dict) -> str:
        return self.emit(node.get("content")) if self.rng.random() < 0.5 else ""

    def _plus(self, node: dict) -> str:
        return "".join(self.emit(node.get("content")) for _ in range(self._count(1, None)))

    def _star(self, node: dict) -> str:
        return "".join(self.emit(node.get("content")) for _ in range(self._count(0, None)))

    def _repeat(self, node: dict) -> str:
        low, high = _field(node, "min", int), _field(node, "max", int)
        if low < 0 or 0 <= high < low:
            raise StructuralTagError(f"format 'repeat' needs 0 <= min <= max (or max -1), got {low} and {high}")
        return "".join(self.emit(node.get("content")) for _ in range(self._count(low, high)))

    def _dispatch(self, node: dict) -> str:
        rules = _field(node, "rules", list)
        if not rules or not all(isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)
                                for rule in rules):
            raise StructuralTagError("format 'dispatch' needs 'rules', a list of [pattern, format] pairs")
        excludes = [rule[0] for rule in rules] + list(node.get("excludes") or [])
        parts = [self._free_text(excludes)]
        for _ in range(self._count(0, None if node.get("loop", True) else 1)):
            pattern, content = self.rng.choice(rules)
            parts += [pattern, self.emit(content), self._free_text(excludes)]
        return "".join(parts)


def _qwen_xml(value: object) -> str:
    """A function's arguments as Qwen's XML tool-call style writes them:
    `<parameter=key>value</parameter>`, strings bare, the rest as JSON."""
    if not isinstance(value, dict):
        raise StructuralTagError("json_schema style 'qwen_xml' needs an object schema")
    return "".join(f"<parameter={key}>{item if isinstance(item, str) else json.dumps(item)}</parameter>"
                   for key, item in value.items())
