"""Constrained replies: `response_format` as SGLang's grammar backend serves it."""

from __future__ import annotations

import datetime
import json
import re
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


def test_native_and_extra_constraints_json_schema_and_regex(sim):
    """SGLang's sampling params constraints: /generate's `json_schema` (a
    schema as a string, `$$ANY$$` any JSON) and `regex`; the OpenAI routes'
    `regex` extra and completions' `json_schema` string."""
    schema = json.dumps(Address.model_json_schema())
    with sim.client() as client:
        native_json = client.post("/generate", json={"text": "Where do you live?", "sampling_params": {
            "json_schema": schema, "max_new_tokens": 200}}).json()
        any_json = client.post("/generate", json={"text": "Anything", "sampling_params": {
            "json_schema": "$$ANY$$", "max_new_tokens": 200}}).json()
        choice = client.post("/generate", json={"text": ["Yes or no?", "Say yes or no"], "sampling_params": {
            "regex": "(yes|no)", "max_new_tokens": 20}}).json()
        phone = client.post("/generate", json={"text": "Your number?", "sampling_params": {
            "regex": r"\+1 \d{3}-\d{4}", "max_new_tokens": 20}}).json()
        completion = client.post("/v1/completions", json={"model": "m", "prompt": "An address:", "max_tokens": 200,
                                                          "json_schema": schema}).json()
    assert Address.model_validate_json(native_json["text"]) and native_json["meta_info"]["finish_reason"]["type"] == "stop"
    assert isinstance(json.loads(any_json["text"]), dict)
    assert {output["text"] for output in choice} <= {"yes", "no"}
    assert re.fullmatch(r"\+1 \d{3}-\d{4}", phone["text"])
    assert Address.model_validate_json(completion["choices"][0]["text"])

    client = openai_client(sim)
    chat = client.chat.completions.create(model="m", messages=CHAT, extra_body={"regex": "[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", chat.choices[0].message.content)
    assert chat.choices[0].finish_reason == "stop"
    again = client.chat.completions.create(model="m", messages=CHAT, extra_body={"regex": "[A-Z]{3}-[0-9]{2}"})
    assert again.choices[0].message.content == chat.choices[0].message.content


def test_constraint_refusals_are_sglangs(sim):
    """More than one constraint, or one that does not compile: 400 with
    SGLang's message (an error event once a stream is open); ebnf is not
    modelled and says so."""
    with sim.client() as client:
        both = client.post("/generate", json={"text": "x", "sampling_params": {
            "json_schema": "{}", "regex": "a"}})
        bad_json = client.post("/generate", json={"text": "x", "sampling_params": {"json_schema": "{not json"}})
        ebnf = client.post("/generate", json={"text": "x", "sampling_params": {"ebnf": 'root ::= "a"'}})
        chat_both = client.post("/v1/chat/completions", json={
            "model": "m", "messages": CHAT, "regex": "a+", "response_format": {"type": "json_object"}})
        with client.stream("POST", "/generate", json={"text": "x", "stream": True,
                                                      "sampling_params": {"regex": "(unclosed"}}) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert both.status_code == 400 and both.json() == {"error": {"message": (
        "Only one of json_schema, regex, ebnf, or structural_tag can be set.")}}
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["message"].startswith("Failed to compile json grammar: Expecting property name")
    assert ebnf.status_code == 400 and "does not model ebnf" in ebnf.json()["error"]["message"]
    assert chat_both.status_code == 400 and chat_both.json()["message"].startswith("Only one of json_schema")
    assert response.status_code == 200 and events[-1] == "data: [DONE]"
    error = json.loads(events[0][6:])["error"]
    assert error["code"] == 400 and error["message"].startswith("Failed to compile regex grammar: missing )")
