"""SGLang's native text-parsing endpoints, over the parsers the simulator
models (sglang 0.5.23, `srt/entrypoints/http_server.py`):

- `POST /separate_reasoning` `{text, reasoning_parser, return_blocks?}` →
  `{reasoning_text, text}`, with `return_blocks` also `reasoning_blocks`,
  `text_blocks` and the ordered `blocks` (`{"type": "reasoning"|"text", "text"}`);
- `POST /parse_function_call` `{text, tools?, tool_call_parser}` →
  `{normal_text, calls: [{tool_index, name, parameters}]}`: the calls the
  parser finds, each to a function the request lists (a call to any other
  is dropped, as SGLang drops it), `parameters` its arguments as JSON text;
  `normal_text` what precedes the first call, stripped. Without tools the
  text comes back whole.

Parsers other than the simulator's (`reasoning.REASONING_PARSERS`,
`tools.TOOL_CALL_PARSERS`) get a 400 naming them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .protocol import ApiError, native_error
from .reasoning import REASONING_PARSERS, ReasoningSplitter
from .tools import CALL_END, CALL_START, TOOL_CALL_PARSERS

_CALL_PATTERN = re.compile(re.escape(CALL_START) + r"(.*?)" + re.escape(CALL_END), re.DOTALL)


def _text(body: Any) -> str:
    if not isinstance(body, dict):
        raise native_error("The request body must be a JSON object.")
    text = body.get("text")
    if not isinstance(text, str):
        raise native_error("'text' must be a string.")
    return text


def separate_reasoning_response(body: Any) -> dict:
    text = _text(body)
    parser = body.get("reasoning_parser")
    if not isinstance(parser, str) or not parser:
        raise native_error("'reasoning_parser' must be a string.")
    if parser.lower() not in REASONING_PARSERS:
        raise ApiError(400, {"detail": f"Unsupported model type: {parser}"})
    reasoning, normal = ReasoningSplitter(parser.lower()).split(text)
    out = {"reasoning_text": reasoning, "text": normal}
    if body.get("return_blocks"):
        blocks = ([{"type": "reasoning", "text": reasoning}] if reasoning else []) + [{"type": "text", "text": normal}]
        out["reasoning_blocks"] = [block["text"] for block in blocks if block["type"] == "reasoning"]
        out["text_blocks"] = [block["text"] for block in blocks if block["type"] == "text"]
        out["blocks"] = blocks
    return out


def parse_function_call_response(body: Any) -> dict:
    text = _text(body)
    parser = body.get("tool_call_parser")
    if parser not in TOOL_CALL_PARSERS:
        raise ApiError(400, {"detail": f"Unsupported tool_call_parser: {parser}"})
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise native_error("'tools' must be a list.")
    indices = {}
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            indices[function["name"]] = index  # a name listed twice: its last place, as SGLang's dict has it
    if not indices or CALL_START not in text:
        return {"normal_text": text, "calls": []}
    calls = []
    for found in _CALL_PATTERN.findall(text):
        try:
            actions = json.loads(found.strip())
        except json.JSONDecodeError:
            continue  # SGLang logs it and goes on
        for action in actions if isinstance(actions, list) else [actions]:
            name = action.get("name") if isinstance(action, dict) else None
            if name not in indices:
                continue  # a call to a function the request does not list
            arguments = action.get("parameters") or action.get("arguments", {})
            calls.append({"tool_index": indices[name], "name": name,
                          "parameters": json.dumps(arguments, ensure_ascii=False)})
    return {"normal_text": text[:text.find(CALL_START)].strip(), "calls": calls}
