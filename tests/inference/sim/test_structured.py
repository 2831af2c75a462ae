"""Constrained replies: `response_format` as SGLang's grammar backend serves it."""

from __future__ import annotations

import datetime
import json
import re
import uuid
from typing import Literal

import pydantic
import pytest

from inference.sim import ebnf, structural_tag

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


def test_a_json_schema_format_without_a_schema_is_400_as_each_route_says(sim):
    """SGLang's json_schema and its schema are optional in the schema; the
    routes refuse a format without one: chat as BadRequestError, completions
    as BadRequest (a ValueError). Only chat takes a top-level `schema`."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    with sim.client() as client:
        def refusal(route: str, response_format: dict) -> tuple[int, str, str]:
            body = {"model": "m", "response_format": response_format, "max_tokens": 40,
                    **({"messages": CHAT} if route == "chat/completions" else {"prompt": "Answer:"})}
            reply = client.post(f"/v1/{route}", json=body)
            return reply.status_code, reply.json().get("type"), reply.json().get("message")

        message = "schema_ is required for json_schema response format request."
        assert refusal("chat/completions", {"type": "json_schema", "json_schema": {"name": "p"}}) == \
            (400, "BadRequestError", message)
        assert refusal("chat/completions", {"type": "json_schema"}) == (400, "BadRequestError", message)
        assert refusal("completions", {"type": "json_schema", "json_schema": {"name": "p"}}) == \
            (400, "BadRequest", message)
        assert refusal("completions", {"type": "json_schema", "schema": schema}) == (400, "BadRequest", message)
        top = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "response_format": {
            "type": "json_schema", "schema": schema}})
        assert top.status_code == 200 and set(json.loads(top.json()["choices"][0]["message"]["content"])) == {"ok"}
        completed = client.post("/v1/completions", json={"model": "m", "prompt": "Answer:", "response_format": {
            "type": "json_schema", "json_schema": {"name": "p", "schema": schema}}})
        assert set(json.loads(completed.json()["choices"][0]["text"])) == {"ok"}


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
    SGLang's message (an error event once a stream is open)."""
    with sim.client() as client:
        both = client.post("/generate", json={"text": "x", "sampling_params": {
            "json_schema": "{}", "regex": "a"}})
        bad_json = client.post("/generate", json={"text": "x", "sampling_params": {"json_schema": "{not json"}})
        ebnf = client.post("/generate", json={"text": "x", "sampling_params": {"ebnf": 'root ::= greeting'}})
        tag = client.post("/generate", json={"text": "x", "sampling_params": {"structural_tag": '{"type": "x"}'}})
        chat_both = client.post("/v1/chat/completions", json={
            "model": "m", "messages": CHAT, "regex": "a+", "response_format": {"type": "json_object"}})
        with client.stream("POST", "/generate", json={"text": "x", "stream": True,
                                                      "sampling_params": {"regex": "(unclosed"}}) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert both.status_code == 400 and both.json() == {"error": {"message": (
        "Only one of json_schema, regex, ebnf, or structural_tag can be set.")}}
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["message"].startswith("Failed to compile json grammar: Expecting property name")
    assert ebnf.status_code == 400
    assert ebnf.json()["error"]["message"] == "Failed to compile ebnf grammar: rule 'greeting' is not defined"
    assert tag.status_code == 400 and tag.json()["error"]["message"].startswith(
        "Failed to compile structural_tag grammar: a structural tag needs 'format'")
    assert chat_both.status_code == 400 and chat_both.json()["message"].startswith("Only one of json_schema")
    assert response.status_code == 200 and events[-1] == "data: [DONE]"
    error = json.loads(events[0][6:])["error"]
    assert error["code"] == 400 and error["message"].startswith("Failed to compile regex grammar: missing )")


CITIES = """root ::= city | description
city ::= "London" | "Paris" | "Berlin" | "Rome"
description ::= city " is " status   # a rule may name an earlier one
status ::= "the capital of " country
country ::= "England" | "France" | "Germany" | "Italy"
"""
CITY_TEXT = r"(London|Paris|Berlin|Rome)( is the capital of (England|France|Germany|Italy))?"


def test_an_ebnf_grammar_constrains_the_reply(sim):
    """SGLang's `ebnf` (GBNF, as xgrammar reads it): the reply is a string the
    grammar accepts, the same for the same prompt, in every route."""
    with sim.client() as client:
        native = [client.post("/generate", json={"text": f"city {index}", "sampling_params": {"ebnf": CITIES}}).json()
                  for index in range(12)]
        json_like = client.post("/generate", json={"text": "x", "sampling_params": {"ebnf": r"""
            root ::= "{" ws "\"id\": " [1-9] [0-9]{0,3} "," ws "\"tags\": [" (tag ("," ws tag)*)? "]" ws "}"
            tag ::= "\"" [^"\\\n]+ "\""
            ws ::= [ \t\n]?
        """}}).json()
        completion = client.post("/v1/completions", json={"model": "m", "prompt": "Where?", "ebnf": CITIES}).json()
    texts = [body["text"] for body in native]
    assert all(re.fullmatch(CITY_TEXT, text) for text in texts)
    assert len(set(texts)) > 3  # each prompt draws its own derivation
    assert all(body["meta_info"]["finish_reason"]["type"] == "stop" for body in native)
    parsed = json.loads(json_like["text"])
    assert set(parsed) == {"id", "tags"} and 1 <= parsed["id"] <= 9999
    assert re.fullmatch(CITY_TEXT, completion["choices"][0]["text"])
    client = openai_client(sim)
    chat = client.chat.completions.create(model="m", messages=CHAT, extra_body={"ebnf": CITIES})
    again = client.chat.completions.create(model="m", messages=CHAT, extra_body={"ebnf": CITIES})
    assert re.fullmatch(CITY_TEXT, chat.choices[0].message.content)
    assert chat.choices[0].message.content == again.choices[0].message.content


def test_ebnf_recursion_ends_and_bad_grammars_are_named():
    arithmetic = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9]+ | "(" expr ")"'
    for seed in range(50):
        text = ebnf.sample(arithmetic, seed)
        assert re.fullmatch(r"[0-9+()]+", text) and text.count("(") == text.count(")")
        assert re.fullmatch(r"[a-z]{2,4}-[A-Z]{3}\xe9?", ebnf.sample('root ::= [a-z]{2,4} "-" [A-Z]{3} "\\xe9"?', seed))
    for grammar, problem in (('start ::= "a"', 'the root rule with name "root" is not found'),
                             ('root ::= "a" |', "an empty alternative"),
                             ('root ::= ("a"', "a group is not closed"),
                             ('root ::= root "a"', "the root rule derives no finite string"),
                             ('root ::= [z-a]', "range z-a is reversed"),
                             ('root ::= "a"{3,1}', "repetition {3,1} has its upper bound below its lower")):
        with pytest.raises(ebnf.EbnfError) as raised:
            ebnf.sample(grammar, 1)
        assert str(raised.value).startswith(problem)


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city", "days"]}
TAG_TEXT = re.compile(r"<function=(get_weather|get_time)>(.*?)</function>")


def test_a_legacy_structural_tag_makes_tool_call_tags(sim):
    """The shape tool calling sends (`structures` opened by `triggers`), as a
    chat response_format through the openai SDK and on /generate: each tag
    holds JSON valid under its structure's schema; with at_least_one the reply
    starts with a tag."""
    response_format = {"type": "structural_tag", "triggers": ["<function="], "at_least_one": True, "structures": [
        {"begin": "<function=get_weather>", "schema": WEATHER, "end": "</function>"},
        {"begin": "<function=get_time>", "schema": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                     "required": ["zone"]}, "end": "</function>"}]}
    client = openai_client(sim)
    replies = [client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"Weather in city {index}?"}],
        response_format=response_format).choices[0].message.content for index in range(8)]
    for reply in replies:
        assert reply.startswith("<function=")
        calls = TAG_TEXT.findall(reply)
        assert calls and reply.count("<function=") == len(calls)
        for name, arguments in calls:
            values = json.loads(arguments)
            assert ({"city", "days"} if name == "get_weather" else {"zone"}) <= set(values)
            if name == "get_weather":
                assert isinstance(values["city"], str) and isinstance(values["days"], int)
    assert len(set(replies)) > 1
    with sim.client() as native:
        body = native.post("/generate", json={"text": "Weather?", "sampling_params": {
            "structural_tag": json.dumps({k: v for k, v in response_format.items() if k != "type"})}}).json()
    assert TAG_TEXT.match(body["text"]) and body["meta_info"]["finish_reason"]["type"] == "stop"


def test_xgrammar_structural_tag_formats_are_followed():
    """xgrammar's `format` tree: sequences, choices, tags, tags with separators,
    repetition, regex, EBNF and Qwen's XML parameters, each sample accepted."""
    spec = json.dumps({"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "Verdict: "},
        {"type": "or", "elements": [{"type": "const_string", "value": "yes"}, {"type": "const_string", "value": "no"}]},
        {"type": "const_string", "value": "\n"},
        {"type": "tags_with_separator", "separator": ",", "at_least_one": True, "tags": [
            {"begin": "<call>", "content": {"type": "json_schema", "json_schema": WEATHER}, "end": ["</call>", "</c>"]},
        ]},
        {"type": "repeat", "min": 2, "max": 3, "content": {"type": "regex", "pattern": "[0-9]{2}"}},
        {"type": "tag", "begin": "<tool_call>", "end": "</tool_call>",
         "content": {"type": "json_schema", "json_schema": WEATHER, "style": "qwen_xml"}},
        {"type": "grammar", "grammar": 'root ::= "[" ("a" | "b")+ "]"'},
        {"type": "triggered_tags", "triggers": ["<x"], "stop_after_first": True, "at_least_one": True,
         "tags": [{"begin": "<x>", "content": {"type": "any_text", "max_chars": 10}, "end": "</x>"}]},
    ]}})
    pattern = re.compile(
        r"Verdict: (yes|no)\n(<call>(\{.*?\})</(call|c)>)(,<call>\{.*?\}</(call|c)>)*([0-9]{2}){2,3}"
        r"<tool_call><parameter=city>[^<]*</parameter><parameter=days>-?[0-9]+</parameter></tool_call>"
        r"\[[ab]+\]<x>[^<]{0,10}</x>", re.DOTALL)
    samples = [structural_tag.sample(spec, seed) for seed in range(30)]
    for text in samples:
        match = pattern.fullmatch(text)
        assert match, text
        assert set(json.loads(match.group(3))) >= {"city", "days"}
    assert len(set(samples)) > 20


def test_structural_tags_that_do_not_compile_are_named(sim):
    for spec, problem in (
            ({"format": {"type": "colour"}}, "unknown format type 'colour'"),
            ({"format": {"type": "token", "token": 5}}, "format 'token' works on token ids"),
            ({"format": {"type": "triggered_tags", "triggers": ["<a"], "tags": [
                {"begin": "<b>", "content": {"type": "any_text"}, "end": "</b>"}]}},
             "tag begin '<b>' must start with exactly one trigger"),
            ({"format": {"type": "repeat", "min": 3, "max": 1, "content": {"type": "any_text"}}},
             "format 'repeat' needs 0 <= min <= max"),
            ({"structures": [{"begin": "<f>", "end": 7}], "triggers": ["<f"]}, "each structure needs string")):
        with pytest.raises(structural_tag.StructuralTagError) as raised:
            structural_tag.sample(json.dumps(spec), 1)
        assert str(raised.value).startswith(problem)
    with sim.client() as client:
        refused = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "response_format": {
            "type": "structural_tag", "format": {"type": "colour"}}})
    assert refused.status_code == 400
    assert refused.json()["message"] == "Failed to compile structural_tag grammar: unknown format type 'colour'"
