"""Function calling, as SGLang serves it with `--tool-call-parser qwen25`.

Qwen 2.5 and 3 models (SGLang's `qwen25` and `qwen` parsers) write a call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; SGLang parses
that text out of the reply: the message's `content` keeps what is outside the
calls, `tool_calls` holds each call with an id `call_<24 hex>` and its
arguments as a JSON string, and a reply that stopped naturally finishes with
`tool_calls`. Streamed, nothing is sent while the call's name is incomplete;
then one delta carries the id and name with empty arguments, and later ones
the arguments piece by piece (id and name null).

What the simulated model calls is deterministic:
- `tool_choice` "none", no tools or no parser: no call (plain text);
- a named function (`{"type": "function", "function": {"name": ...}}`): that one;
- "required": the function whose name the last message mentions, else the first;
- "auto" (the default with tools): the function whose name the last message,
  if it is the user's, mentions; otherwise no call.
Arguments fill the function's `parameters` schema (`structured.object_value`),
seeded by the function's name and the last message.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .structured import object_value

# SGLang's parsers whose format the simulator writes (the same for both).
TOOL_CALL_PARSERS = ("qwen25", "qwen")
CALL_START = "<tool_call>\n"
CALL_END = "\n</tool_call>"


class ToolRequestError(ValueError):
    """The request's tools or tool_choice cannot be served (SGLang's wording)."""


class ToolSchemaError(ToolRequestError):
    """`tools` or `tool_choice` fails ChatCompletionRequest's schema: the
    (location, problem) pairs pydantic lists."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems[0][1])
        self.problems = problems


_TOOL_CHOICE_LITERAL = ("tool_choice.literal['auto','required','none']", "Input should be 'auto', 'required' or 'none'")


def _tool_choice_problems(tool_choice: Any) -> list[tuple[str, str]]:
    """What pydantic says of a tool_choice that is neither a ToolChoice
    ({"type": "function", "function": {"name": ...}}, name optional) nor one
    of the literals; none for a valid one."""
    if tool_choice in ("none", "auto", "required"):
        return []
    if not isinstance(tool_choice, dict):
        return [("tool_choice.ToolChoice", "Input should be a valid dictionary or instance of ToolChoice"),
                _TOOL_CHOICE_LITERAL]
    problems = []
    function = tool_choice.get("function")
    if function is None and "function" not in tool_choice:
        problems.append(("tool_choice.ToolChoice.function", "Field required"))
    elif not isinstance(function, dict):
        problems.append(("tool_choice.ToolChoice.function",
                         "Input should be a valid dictionary or instance of ToolChoiceFuncName"))
    elif function.get("name") is not None and not isinstance(function["name"], str):
        problems.append(("tool_choice.ToolChoice.function.name", "Input should be a valid string"))
    if "type" in tool_choice and tool_choice["type"] != "function":
        problems.append(("tool_choice.ToolChoice.type", "Input should be 'function'"))
    return problems + [_TOOL_CHOICE_LITERAL] if problems else []


@dataclass(slots=True)
class ToolCall:
    """The call the simulated model makes: its text and its parts."""

    name: str
    arguments: str  # JSON, as SGLang hands it on (json.dumps, ensure_ascii=False)
    text: str  # the model's output: CALL_START + {"name", "arguments"} + CALL_END
    ids: list[str] = field(default_factory=list)  # one call id per choice, made on demand

    def call_id(self, choice: int) -> str:
        while len(self.ids) <= choice:
            self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return self.ids[choice]

    def message_tool_calls(self, choice: int) -> list[dict]:
        return [{"id": self.call_id(choice), "index": 0, "type": "function",
                 "function": {"name": self.name, "arguments": self.arguments}}]


def call_text(name: str, arguments: Any) -> str:
    """A call as the model writes it; `arguments` an object or its JSON text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return CALL_START + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CALL_END


def render_tool_calls(tool_calls: Any) -> str:
    """An assistant message's earlier `tool_calls`, as the model wrote them, so
    that a conversation's next turn finds its previous reply cached."""
    if not isinstance(tool_calls, list):
        return ""
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            calls.append(call_text(function["name"], function.get("arguments") or {}))
    return "\n".join(calls)


def render_tools(tools: list[dict]) -> str:
    """The tools block the chat template puts before the messages."""
    return "<|tools|>\n" + json.dumps(tools, ensure_ascii=False, sort_keys=True) + "\n"


def template_tools(tools: Any, tool_choice: Any) -> list | None:
    """The tools the chat template renders, as SGLang's serving_chat passes
    them: none under tool_choice "none", only the named one under a named
    choice, else all of them."""
    if not isinstance(tools, list) or not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        name = tool_choice["function"].get("name") if isinstance(tool_choice.get("function"), dict) else None
        return [tool for tool in tools if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
                and tool["function"].get("name") == name] or None
    return tools


def functions_of(tools: Any) -> dict[str, dict]:
    """Name → parameters schema of each `{"type": "function", "function": {...}}`."""
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise ToolSchemaError([("tools", "Input should be a valid list")])
    functions: dict[str, dict] = {}
    problems = []
    for index, tool in enumerate(tools):
        where = f"tools.{index}"
        if not isinstance(tool, dict):
            problems.append((where, "Input should be a valid dictionary or instance of Tool"))
            continue
        if "type" in tool and not isinstance(tool["type"], str):
            problems.append((f"{where}.type", "Input should be a valid string"))
        function = tool.get("function")
        if function is None:
            problems.append((f"{where}.function", "Field required"))
        elif not isinstance(function, dict):
            problems.append((f"{where}.function", "Input should be a valid dictionary or instance of Function"))
        elif not isinstance(function.get("name"), str):
            problems.append((f"{where}.function.name", "Field required" if function.get("name") is None
                             else "Input should be a valid string"))
        else:
            parameters = function.get("parameters")
            functions[function["name"]] = parameters if isinstance(parameters, dict) else {}
    if problems:
        raise ToolSchemaError(problems)
    return functions


def plan_call(tools: Any, tool_choice: Any, messages: list, *, parser: str | None) -> ToolCall | None:
    """The call the model makes for this request, or None. Raises
    ToolRequestError for a tool_choice SGLang refuses."""
    if tool_choice is None:
        tool_choice = "auto" if tools is not None else "none"
    try:
        functions = functions_of(tools)
    except ToolSchemaError as error:  # pydantic lists every field's problems
        error.problems += _tool_choice_problems(tool_choice)
        raise
    if problems := _tool_choice_problems(tool_choice):
        raise ToolSchemaError(problems)
    named = None
    if isinstance(tool_choice, dict):
        named = tool_choice["function"].get("name")  # optional in SGLang's ToolChoiceFuncName
        if not functions:
            raise ToolRequestError("Tools cannot be empty if tool choice is set to a specific tool.")
        if named not in functions:
            raise ToolRequestError(f"Tool '{named}' not found in tools list.")
    elif tool_choice == "required" and not functions:
        raise ToolRequestError("Tools cannot be empty if tool choice is set to required.")
    if parser is None or not functions or tool_choice == "none":
        return None
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    said = last.get("content") if isinstance(last.get("content"), str) else ""
    mentioned = next((name for name in functions if re.search(rf"\b{re.escape(name)}\b", said, re.IGNORECASE)),
                     None)
    if named is not None:
        name = named
    elif tool_choice == "required":
        name = mentioned or next(iter(functions))
    elif last.get("role") == "user" and mentioned is not None:
        name = mentioned
    else:
        return None
    seed = int.from_bytes(hashlib.blake2b(f"{name}\0{said}".encode(), digest_size=8).digest(), "little")
    arguments = json.dumps(object_value(functions[name], seed), ensure_ascii=False)
    return ToolCall(name=name, arguments=arguments, text=call_text(name, arguments))


class CallStream:
    """One choice's streamed call: fed the reply's text so far, it gives the
    tool-call deltas SGLang would send since the last feed."""

    __slots__ = ("_call", "_choice", "_name_sent", "_arguments_sent", "_arguments_at")

    def __init__(self, call: ToolCall, choice: int) -> None:
        self._call = call
        self._choice = choice
        self._name_sent = False
        self._arguments_sent = 0
        # Where the arguments start in the call's text.
        self._arguments_at = call.text.index('"arguments": ') + len('"arguments": ')

    def feed(self, text: str) -> list[dict]:
        call = self._call
        deltas = []
        if not self._name_sent:
            if len(text) < self._arguments_at:
                return deltas
            self._name_sent = True
            deltas.append({"id": call.call_id(self._choice), "index": 0, "type": "function",
                           "function": {"name": call.name, "arguments": ""}})
        ready = min(len(text) - self._arguments_at, len(call.arguments))
        if ready > self._arguments_sent:
            deltas.append({"id": None, "index": 0, "type": "function",
                           "function": {"name": None, "arguments": call.arguments[self._arguments_sent:ready]}})
            self._arguments_sent = ready
        return deltas
