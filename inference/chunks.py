"""The backend's SSE chunks turned into the client's, by working on bytes.

Parsing and re-serialising every chunk costs more than the rest of a token's
trip through the gateway, so a stream's chunks are handled as bytes: the
backend already uses our request id (we send it as SGLang's `rid`, which SGLang
echoes as `id`), the model name is replaced only when the pool serves it under
another name, and the per-chunk usage that we ask SGLang for
(`continuous_usage_stats`) is cut off the end of the chunk and read on its own
(and, when the client asked for it too, handed on in OpenAI's usage shape).
A chunk that does not have the expected layout takes the slow path: parsed,
edited and serialised again."""
from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson

USAGE_KEY = b',"usage":'
SGLEXT_KEY = b'"sglext":'


async def sse_batches(response: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """The `data:` payloads of an SSE response, grouped by network read (one read
    holds several events when the backend is fast), up to `[DONE]`."""
    buffer = b""
    async for data in response.content.iter_any():
        buffer = buffer + data if buffer else data
        if b"\n\n" not in buffer:
            continue
        events = buffer.split(b"\n\n")
        buffer = events.pop()
        payloads = []
        for event in events:
            if event.startswith(b"data:") and b"\n" not in event:
                payload = event[5:].strip()
            else:
                payload = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
            if payload == b"[DONE]":
                if payloads:
                    yield payloads
                return
            if payload:
                payloads.append(payload)
        if payloads:
            yield payloads


def usage_object(*, prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict:
    """OpenAI's usage object, as the gateway gives it."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def usage_counts(usage: dict) -> tuple[int, int, int, int]:
    """A backend's (SGLang's) usage object read: prompt, completion, cached and reasoning tokens."""
    details = usage.get("prompt_tokens_details") or {}
    return (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
            int(details.get("cached_tokens") or 0), int(usage.get("reasoning_tokens") or 0))


def client_usage(usage: dict) -> dict:
    """A backend's usage object in the gateway's shape."""
    prompt, completion, cached, reasoning = usage_counts(usage)
    return usage_object(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                        reasoning_tokens=reasoning)


class ChunkRewriter:
    """Rewrites one stream's chunk payloads; keeps what the meter needs."""

    __slots__ = ("_request_id", "_model_from", "_model_to", "_client_model", "_tail", "_content", "_empty",
                 "_chat", "_n", "_choices", "_finished_choices", "_choice_usage",
                 "_continuous", "last_usage_raw", "usage_template", "content_chunks", "finished")

    def __init__(self, *, request_id: str, client_model: str, upstream_model: str, include_usage: bool,
                 chat: bool, n: int = 1, choices: int = 1, continuous_usage: bool = False) -> None:
        self._request_id = request_id
        self._client_model = client_model
        if client_model != upstream_model:
            self._model_from = b'"model":' + orjson.dumps(upstream_model)
            self._model_to = b'"model":' + orjson.dumps(client_model)
        else:
            self._model_from = self._model_to = None
        self._tail = b',"usage":null}' if include_usage else b"}"
        self._content = b'"content":"' if chat else b'"text":"'
        self._empty = b'"content":""' if chat else b'"text":""'
        self._chat = chat
        # The client asked for every chunk's usage (continuous_usage_stats).
        self._continuous = continuous_usage
        # The newest usage object not yet read (the backend's counts are cumulative).
        self.last_usage_raw: bytes | None = None
        # The backend's usage-only chunk (`choices: []`), for the client's final one.
        self.usage_template: bytes | None = None
        self.content_chunks = 0
        self.finished = False
        # Several choices (`n` per prompt, `choices` in all; slow path only):
        # the indexes that finished, and each one's newest usage.
        self._n = n
        self._choices = choices
        self._finished_choices: set[int] = set()
        self._choice_usage: dict[int, dict] = {}

    def fast_path_fits(self, first_payload: bytes) -> bool:
        """Whether the backend echoes our request id, so chunks need no id rewrite."""
        return (b'"id":' + orjson.dumps(self._request_id)) in first_payload

    def rewrite(self, payload: bytes) -> tuple[bytes | None, bool]:
        """(the client's payload, or None for the backend's usage-only chunk; whether
        it carries generated tokens: content, a tool call or reasoning). Raises
        ValueError for a backend error chunk."""
        if payload.startswith(b'{"error"'):
            raise ValueError(payload)
        if SGLEXT_KEY in payload:
            return self.rewrite_slow(payload)
        position = payload.rfind(USAGE_KEY)
        if position != -1:
            usage_raw = payload[position + len(USAGE_KEY):-1]
            if usage_raw != b"null":
                self.last_usage_raw = usage_raw
            body = payload[:position]
        else:
            body = payload[:-1]
        if b'"choices":[]' in body:
            self.usage_template = body + b"}"
            return None, False
        if self._model_from is not None:
            body = body.replace(self._model_from, self._model_to, 1)
        # Generated tokens handed on: text, or a chat's tool-call or reasoning deltas.
        has_content = (self._content in body and self._empty not in body) or (
            self._chat and (b'"tool_calls":[' in body or b'"reasoning_content":"' in body))
        if has_content:
            self.content_chunks += 1
        if b'"finish_reason":null' not in body and b'"finish_reason":' in body:
            self.finished = True
        if self._continuous and position != -1 and usage_raw != b"null":
            return body + USAGE_KEY + orjson.dumps(client_usage(orjson.loads(usage_raw))) + b"}", has_content
        return body + self._tail, has_content

    def rewrite_slow(self, payload: bytes) -> tuple[bytes | None, bool]:
        """The same for a backend whose chunks do not have the expected layout,
        and for several choices, whose chunks each carry their own request's id
        and, with continuous usage, that choice's usage alone (SGLang): the
        stream's usage is then their sum (`_choices_usage`) until the final
        usage chunk gives it, and it is finished once every choice is."""
        chunk = orjson.loads(payload)
        if "error" in chunk and not chunk.get("choices"):
            raise ValueError(payload)
        usage = chunk.pop("usage", None)
        choices = chunk.get("choices")
        if not choices and not usage and "sglext" in chunk:
            # SGLang's response-level extension (`return_cached_tokens_details`
            # and the like): handed on as it came, not taken for the usage chunk.
            chunk["id"], chunk["model"] = self._request_id, self._client_model
            if self._tail != b"}":
                chunk["usage"] = None
            return orjson.dumps(chunk), False
        if not choices:
            if usage:
                self.last_usage_raw = orjson.dumps(usage)
            self.usage_template = payload
            return None, False
        if usage:
            if self._choices == 1:
                self.last_usage_raw = orjson.dumps(usage)
            else:
                self._choice_usage[choices[0].get("index", 0)] = usage
                self.last_usage_raw = orjson.dumps(self._choices_usage())
        chunk["id"], chunk["model"] = self._request_id, self._client_model
        if self._continuous and usage:
            chunk["usage"] = client_usage(usage)  # with several choices, this choice's own (SGLang's)
        elif self._tail != b"}":
            chunk["usage"] = None
        has_content = False
        for choice in choices:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content") or choice.get("text"):
                has_content = True
                self.content_chunks += 1
            if choice.get("finish_reason") is not None:
                self._finished_choices.add(choice.get("index", 0))
        self.finished = len(self._finished_choices) >= self._choices
        return orjson.dumps(chunk), has_content

    def _choices_usage(self) -> dict:
        """The choices' usages added up as SGLang's final usage does: each
        prompt's tokens once (its `n` choices share it), every choice's
        completion tokens."""
        by_prompt: dict[int, dict] = {}
        for index, usage in self._choice_usage.items():
            by_prompt.setdefault(index // self._n, usage)
        every = self._choice_usage.values()
        return {
            "prompt_tokens": sum(int(usage.get("prompt_tokens") or 0) for usage in by_prompt.values()),
            "completion_tokens": sum(int(usage.get("completion_tokens") or 0) for usage in every),
            "prompt_tokens_details": {"cached_tokens": sum(
                int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                for usage in by_prompt.values())},
            "reasoning_tokens": sum(int(usage.get("reasoning_tokens") or 0) for usage in every),
        }

    def take_usage(self) -> dict | None:
        """The newest usage seen since the last call, parsed (once per batch)."""
        raw, self.last_usage_raw = self.last_usage_raw, None
        if raw is None:
            return None
        try:
            usage = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return usage if isinstance(usage, dict) else None

    def usage_chunk(self, template: bytes, usage: dict) -> bytes:
        """The final chunk (`choices: []`) with OpenAI's usage object."""
        chunk = orjson.loads(template)
        chunk["id"], chunk["model"], chunk["choices"], chunk["usage"] = (
            self._request_id, self._client_model, [], usage)
        return orjson.dumps(chunk)


_UNPARSED = object()


def _error_detail(payload: bytes) -> object:
    """The `error` member of an SGLang stream's error event, or _UNPARSED."""
    try:
        return orjson.loads(payload).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return _UNPARSED


def error_status(payload: bytes) -> int | None:
    """The HTTP status an SGLang stream's error event carries (its `code`), if any."""
    detail = _error_detail(payload)
    code = detail.get("code") if isinstance(detail, dict) else None
    return code if isinstance(code, int) else None


def error_message(payload: bytes) -> str:
    detail = _error_detail(payload)
    if detail is _UNPARSED:
        return payload[:200].decode(errors="replace")
    return detail.get("message", str(detail)) if isinstance(detail, dict) else str(detail)