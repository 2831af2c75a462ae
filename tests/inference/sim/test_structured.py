"""Constrained replies: `response_format` as SGLang's grammar backend serves it."""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Literal

import pydantic

from .test_http_api import CHAT, openai_client


class Address(pydantic.BaseModel):
    city: str
    postcode: int


class Person(pydantic.BaseModel):
    name: str
    age: int
    tier: Literal["gold", "silver"]
    home: Address
    nickname: str | None
    tags: list[str]
    born: datetime.date
    seen: datetime.datetime
    id: uuid.UUID
    code: str = pydantic.Field(min_length=12, max_length=12)


def test_json_schema_reply_parses_into_the_model(sim):
    """The SDK's parse helper sends a strict json_schema (nested models as
    $defs, optional fields as anyOf); the reply is JSON valid under it."""
    completion = openai_client(sim).chat.completions.parse(model="m", messages=CHAT, response_format=Person)
    choice = completion.choices[0]
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.home, Address)
    assert person.tier == "gold" and person.tags == [] and isinstance(person.nickname, str)
    assert isinstance(person.seen, datetime.datetime) and len(person.code) == 12
    assert choice.finish_reason == "stop"
    # Deterministic for the prompt.
    again = openai_client(sim).chat.completions.parse(model="m", messages=CHAT, response_format=Person)
    assert again.choices[0].message.content == choice.message.content


def test_json_object_and_streamed_schema_replies(sim):
    client = openai_client(sim)
    reply = client.chat.completions.create(model="m", messages=CHAT, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 50}},
              "required": ["ok", "count"]}
    chunks = list(client.chat.completions.create(model="m", messages=CHAT, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "Result", "schema": schema}}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    value = json.loads(text)
    assert set(value) == {"ok", "count"} and isinstance(value["ok"], bool) and value["count"] >= 50
    # SGLang also takes the schema at the top level of response_format.
    top = client.chat.completions.create(model="m", messages=CHAT, response_format={
        "type": "json_schema", "schema": schema})
    assert json.loads(top.choices[0].message.content) == value

    # A reply cut by max_tokens is cut JSON, finish length (as a constrained model's would be).
    cut = client.chat.completions.create(model="m", messages=CHAT, max_tokens=3, response_format={
        "type": "json_schema", "json_schema": {"name": "Result", "schema": schema}})
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3


def test_invalid_response_format_is_400(sim):
    with sim.client() as client:
        unknown = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT,
                                                            "response_format": {"type": "yaml"}})
        nameless = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "response_format": {
            "type": "json_schema", "json_schema": {"schema": {"type": "object"}}}})
        text = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 4,
                                                         "response_format": {"type": "text"}})
    assert unknown.status_code == 400 and "response_format" in unknown.json()["message"]
    assert nameless.status_code == 400 and "json_schema.name" in nameless.json()["message"]
    assert text.status_code == 200 and text.json()["choices"][0]["finish_reason"] == "length"
