"""The routing key: the text a request's backend KV cache is keyed by, as far as
the gateway can tell without the model's chat template or tokenizer.

Properties the cache-aware policy relies on (tested):
- deterministic across processes (no `hash()`, which is salted per process);
- identical conversation prefixes give identical key prefixes, and appending a
  message to a conversation extends the previous key (each message is rendered
  with its own terminator and no trailing generation header);
- every message counts, not only the first (sgl-project/sglang#26263);
- requests the backend keeps apart (another `namespace`, `cache_salt`,
  `extra_key`, LoRA adapter) start with different text.

Cost: one pass over the body's text, `str.join` of the parts; media and token
payloads are reduced to a 16-hex-digit BLAKE2b digest so a 1 MB base64 image
adds 30 characters, not 1 MB, to the key.
"""
from __future__ import annotations

import hashlib

import orjson

# Separators are control characters that do not occur in ordinary text, so a
# message boundary can never be imitated by content.
NAMESPACE_END = "\x1d"
MESSAGE_START = "\x1e"
FIELD_SEP = "\x1f"
# Largest code point `chr` accepts; token ids beyond it are digested instead.
_MAX_CODE_POINT = 0x10FFFF


def _rendered_tools(tools: object, tool_choice: object) -> object:
    """The tools SGLang's chat route hands the template: none under
    tool_choice "none", only the named one under a named choice."""
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict) and isinstance(tools, list):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        return [tool for tool in tools
                if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
                and tool["function"].get("name") == name]
    return tools


def routing_key_build(*, endpoint: str, body: dict, namespace: str = "") -> str:
    """The prefix-matching text of an OpenAI request `body`.

    `endpoint` is "chat.completions" (rendered `messages`, preceded by `tools`)
    or anything else for a completion (`prompt`). `namespace` isolates
    prefixes: pass the tenant id when tenants' caches are isolated with
    `cache_salt`, else "" so identical system prompts of different tenants
    share. The caller must have validated the body's shape
    (`completion_request_build`); unexpected values are stringified, never
    raised on.
    """
    parts: list[str] = [namespace]
    # What the backend uses to separate caches beyond the prompt text.
    model = body.get("model")
    if isinstance(model, str) and ":" in model:
        parts.append(FIELD_SEP + "adapter=" + model.partition(":")[2])
    for name in ("cache_salt", "extra_key"):
        value = body.get(name)
        if value is not None:
            parts.append(f"{FIELD_SEP}{name}={value}")
    parts.append(NAMESPACE_END)
    if endpoint == "chat.completions":
        tools = _rendered_tools(body.get("tools"), body.get("tool_choice"))
        # Chat templates render tool definitions into the system prompt, first.
        if tools:
            parts.append(MESSAGE_START + "tools" + FIELD_SEP + orjson.dumps(tools).decode())
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                _message_render(message, parts)
    else:
        parts.append(_prompt_render(body.get("prompt")))
    return "".join(parts)


def _message_render(message: object, parts: list[str]) -> None:
    if not isinstance(message, dict):
        parts.append(MESSAGE_START + str(message))
        return
    parts.append(MESSAGE_START)
    parts.append(str(message.get("role")))
    name = message.get("name")
    if name:
        parts.append(FIELD_SEP + "name=" + str(name))
    tool_call_id = message.get("tool_call_id")
    if tool_call_id:
        parts.append(FIELD_SEP + "tool_call_id=" + str(tool_call_id))
    parts.append("\n")
    parts.append(_content_render(message.get("content")))
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                parts.append(f"{FIELD_SEP}call={function.get('name')}({function.get('arguments')})")
            else:
                parts.append(FIELD_SEP + "call=" + _json(call))


def _content_render(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and isinstance(part.get("image_url"), dict):
                texts.append("<image:" + _digest(str(part["image_url"].get("url"))) + ">")
            else:
                # Audio, files, unknown part types: identity by content.
                texts.append("<part:" + _digest(_json(part)) + ">")
        return "\n".join(texts)
    return _json(content)


def _prompt_render(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return _token_ids_render(prompt)
        # A batch: the backend caches each prompt; route by the first.
        return _prompt_render(first)
    return _json(prompt)


def _token_ids_render(ids: list) -> str:
    """One character per token, so blocks of the key are blocks of tokens."""
    try:
        return "".join(map(chr, ids))
    except (TypeError, ValueError, OverflowError):
        return _json(ids)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _json(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)
