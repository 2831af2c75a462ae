"""SGLang's wire formats: request parsing and response/chunk shaping.

Parsing turns the three generation APIs (native `/generate`, OpenAI chat and
completions) into one `engine.GenerationRequest`; shaping builds the exact
JSON objects SGLang 0.5.23 sends (field names, order, nulls). No I/O here.

Error bodies, as SGLang sends them:
- OpenAI routes, flat: {"object":"error","message","type","param":null,"code"};
  schema violations use type "Bad Request", checks in the serving layer
  (empty messages, context length, sampling params) "BadRequestError";
- native `/generate`: 400 {"error": "<text>"} for schema violations, otherwise
  {"error": {"message"}}.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any

import orjson
import rstr

from . import ebnf, structural_tag
from .engine import GenerationRequest, RunningRequest, Step
from .tokenizer import (
    VOCAB_SIZE,
    detokenize,
    piece_of,
    piece_to_id,
    queried_logprob,
    render_chat_prompt,
    split_pieces,
    token_logprobs,
    tokenize,
)
from .reasoning import ReasoningSplitter, thinking_for
from .structured import schema_value
from .tools import ToolCall, ToolRequestError, ToolSchemaError, plan_call, template_tools

WEIGHT_VERSION = "default"  # SGLang's default --weight-version
# SGLang's limits on a request's stop_regex patterns (srt/sampling/sampling_params.py).
MAX_STOP_REGEX_COUNT = 32
MAX_STOP_REGEX_LEN = 256
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "structural_tag")
SSE_DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An error answer: HTTP status plus the JSON body to send."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


def openai_error_body(message: str, *, error_type: str = "BadRequestError", code: int = 400,
                      param: str | None = None) -> dict:
    return {"object": "error", "message": message, "type": error_type, "param": param, "code": code}


def openai_error(message: str, *, error_type: str = "BadRequestError", status: int = 400) -> ApiError:
    return ApiError(status, openai_error_body(message, error_type=error_type, code=status))


def openai_schema_error(location: str, problem: str, model_name: str) -> ApiError:
    """What FastAPI's RequestValidationError becomes on SGLang's OpenAI routes."""
    message = f"1 validation error for {model_name}\n{location}\n  {problem}"
    return ApiError(400, openai_error_body(message, error_type="Bad Request"))


def unsupported_media_type_error() -> ApiError:
    detail = {"loc": ("header", "content-type"),
              "msg": "Unsupported Media Type: Only 'application/json' is allowed", "type": "value_error"}
    return ApiError(400, openai_error_body(f"1 validation error:\n  {detail}", error_type="Bad Request"))


def invalid_json_error(error: Exception) -> ApiError:
    detail = {"loc": ("body", 0), "msg": "JSON decode error", "type": "json_invalid",
              "ctx": {"error": str(error)}}
    return ApiError(400, openai_error_body(f"1 validation error:\n  {detail}", error_type="Bad Request"))


def new_rid() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------ field readers

class _Fields:
    """Typed access to a JSON object, raising the route's schema error."""

    def __init__(self, body: Any, schema_name: str, make_error) -> None:
        if not isinstance(body, dict):
            raise make_error("body", "Input should be a valid dictionary or object", schema_name)
        self.body = body
        self.schema_name = schema_name
        self.make_error = make_error

    def fail(self, name: str, problem: str):
        raise self.make_error(name, problem, self.schema_name)

    def optional_int(self, name: str, source: dict | None = None) -> int | None:
        value = (source if source is not None else self.body).get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            self.fail(name, "Input should be a valid integer")
        return value

    def optional_float(self, name: str, source: dict | None = None) -> float | None:
        value = (source if source is not None else self.body).get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, "Input should be a valid number")
        return float(value)

    def boolean(self, name: str, default: bool = False, source: dict | None = None) -> bool:
        value = (source if source is not None else self.body).get(name, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(name, "Input should be a valid boolean")
        return value

    def optional_str(self, name: str, source: dict | None = None) -> str | None:
        value = (source if source is not None else self.body).get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(name, "Input should be a valid string")
        return value

    def stop_strings(self, name: str = "stop", source: dict | None = None) -> tuple[str, ...]:
        value = (source if source is not None else self.body).get(name)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,) if value else ()
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(item for item in value if item)
        self.fail(name, "Input should be a valid string or list of strings")

    def stop_regexes(self, make_error, source: dict | None = None) -> tuple[re.Pattern, ...]:
        """`stop_regex`: a pattern or a list, compiled, within SGLang's limits
        (at most MAX_STOP_REGEX_COUNT patterns of MAX_STOP_REGEX_LEN bytes)."""
        patterns = self.stop_strings("stop_regex", source=source)
        if len(patterns) > MAX_STOP_REGEX_COUNT:
            raise make_error(f"at most {MAX_STOP_REGEX_COUNT} stop_regex patterns are allowed, got {len(patterns)}")
        compiled = []
        for pattern in patterns:
            size = len(pattern.encode("utf-8"))
            if size > MAX_STOP_REGEX_LEN:
                raise make_error(f"stop_regex is {size} bytes, over the {MAX_STOP_REGEX_LEN}-byte limit")
            try:
                compiled.append(re.compile(pattern))
            except re.error as error:
                raise make_error(f"invalid stop_regex {pattern!r}: {error}") from None
        return tuple(compiled)

    def token_ids(self, name: str, source: dict | None = None) -> tuple[int, ...]:
        value = (source if source is not None else self.body).get(name)
        if value is None:
            return ()
        if isinstance(value, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return tuple(value)
        self.fail(name, "Input should be a valid list of integers")


def _cache_namespace(cache_salt: str | None, extra_key: str | None):
    if cache_salt is None and extra_key is None:
        return None
    return (cache_salt, extra_key)


_PRIORITY_RANGE_ERROR = ("priority must be a signed 64-bit integer "
                         "between -9223372036854775808 and 9223372036854775807")


def _priority(fields: _Fields) -> int | None:
    """The request's `priority` (an integer or null); ValueError outside a
    signed 64-bit integer, as SGLang's tokenizer manager refuses it."""
    priority = fields.optional_int("priority")
    if priority is not None and not -(1 << 63) <= priority < (1 << 63):
        raise ValueError(_PRIORITY_RANGE_ERROR)
    return priority


def _logit_bias(source: dict) -> dict[int, float] | None:
    """A checked `logit_bias` (see `_verify_sampling`) by token id; None when unset."""
    logit_bias = source.get("logit_bias")
    if not logit_bias:
        return None
    return {int(token_id): float(bias) for token_id, bias in logit_bias.items()
            if isinstance(bias, (int, float)) and not isinstance(bias, bool)}


def _verify_sampling(fields: _Fields, source: dict, *, max_new_tokens: int | None, min_name: str,
                     seed_name: str) -> tuple[int, bool]:
    """SGLang's SamplingParams.verify, in its order and wording (a ValueError):
    the params the simulator only checks (the penalties, top_k, min_p,
    logit_bias) and those it honours. Returns (min_new_tokens, no_stop_trim)."""
    def number(name: str, default: float) -> float:
        value = fields.optional_float(name, source=source)
        return default if value is None else value

    temperature = number("temperature", 1.0)
    top_p = number("top_p", 1.0)
    min_p = number("min_p", 0.0)
    top_k = fields.optional_int("top_k", source=source)
    top_k = -1 if top_k is None else top_k
    if 0 <= temperature < 1e-6:
        top_k = 1  # greedy
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}.")
    if top_k < 1 and top_k != -1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    for name in ("frequency_penalty", "presence_penalty"):
        value = number(name, 0.0)
        if not -2.0 <= value <= 2.0:
            raise ValueError(f"{name} must be in [-2, 2], got {value}.")
    repetition_penalty = number("repetition_penalty", 1.0)
    if not 0.0 < repetition_penalty <= 2.0:
        raise ValueError(f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {repetition_penalty}.")
    min_new_tokens = fields.optional_int(min_name, source=source) or 0
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}.")
    if max_new_tokens is not None:
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}.")
        if min_new_tokens > max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens({max_new_tokens})], got "
                             f"{min_new_tokens}.")
    logit_bias = source.get("logit_bias")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            fields.fail("logit_bias", "Input should be a valid dictionary")
        for token_id in logit_bias:
            if not 0 <= int(token_id) < VOCAB_SIZE:  # int() raises SGLang's ValueError for a non-number
                raise ValueError(f"logit_bias must has keys in [0, {VOCAB_SIZE - 1}], got {token_id}.")
    seed = fields.optional_int(seed_name, source=source)
    if seed is not None and not -(2 ** 63) <= seed <= 2 ** 63 - 1:
        raise ValueError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")
    return min_new_tokens, fields.boolean("no_stop_trim", source=source)


# ------------------------------------------------------------------ OpenAI requests

@dataclass(slots=True)
class OpenAIRequest:
    """A parsed chat or completions request plus what shaping needs."""

    generation: GenerationRequest
    model: str
    include_usage: bool
    continuous_usage_stats: bool
    echo_text: str | None = None  # completions `echo`: prompt text to prepend
    # Chat `logprobs` / `top_logprobs`: None, or how many alternatives each
    # token's entry lists (0 with logprobs and no top_logprobs).
    top_logprobs: int | None = None
    # Choices per prompt (SGLang's parallel sampling).
    n: int = 1
    # A batched completions prompt: each prompt's token ids and echo text
    # (`generation` then holds the first); None for a single prompt.
    batch: list[tuple[list[int], str | None]] | None = None
    # Each prompt's rid, for requests without parallel sampling (`_choices_options`).
    prompt_rids: list[str] | None = None
    greedy: bool = False  # temperature 0: parallel samples are all the same
    # Completions `logprobs`: None, or how many alternatives each token lists.
    completion_logprobs: int | None = None
    # Chat: the tool call the model makes (with --tool-call-parser), or None.
    tool_call: ToolCall | None = None
    # The reasoning parser that splits chat replies (`reasoning.ReasoningSplitter`), if any.
    reasoning_parser: str | None = None
    # `stream_reasoning`: a stream sends the reasoning as it comes (else whole, once it ends).
    stream_reasoning: bool = True
    # `return_cached_tokens_details`: the reply's `sglext` says where its cached tokens came from.
    cached_tokens_details: bool = False
    # A reasoning model's request: (parser, body, seed) of its think block, so
    # that each parallel sample thinks its own (`sample_generation`).
    thinking: tuple[str, dict, int] | None = None

    def sample_generation(self, generation: GenerationRequest, sample: int) -> GenerationRequest:
        """Parallel sample `sample` (0: the first, or every one when greedy) of
        `generation`: a reasoning model's later samples think their own block."""
        if self.thinking is None or sample == 0:
            return generation
        parser, body, seed = self.thinking
        thinking = thinking_for(parser, body, _prompt_seed([seed >> 32, seed & 0xFFFF_FFFF, sample]))
        return replace(generation, preamble=thinking.preamble, reasoning_tokens=thinking.reasoning_tokens)

    @property
    def single(self) -> bool:
        """One prompt, one choice: the plain request path."""
        return self.n == 1 and self.batch is None

    def prompts(self) -> list[tuple[list[int], str | None]]:
        return self.batch if self.batch is not None else [(self.generation.prompt_ids, self.echo_text)]


def split_model_adapter(model: str, served_model_name: str | None) -> tuple[str, str | None]:
    """SGLang's `<base>:<adapter>` model syntax (serving_base._parse_model_parameter).

    The exact served name is kept whole even if it contains ':'; a name that
    starts with `<served>:` splits after it; otherwise split at the first ':'.
    The base name is not validated.
    """
    if ":" not in model or model == served_model_name:
        return model, None
    if served_model_name and model.startswith(served_model_name + ":"):
        base, adapter = served_model_name, model[len(served_model_name) + 1:]
    else:
        base, adapter = model.split(":", 1)
    return base.strip(), adapter.strip() or None


def _routed_dp_rank(fields: _Fields) -> int | None:
    """The data-parallel rank a router injected: `routed_dp_rank`, else its
    deprecated alias `data_parallel_rank` (SGLang maps one onto the other)."""
    rank = fields.optional_int("routed_dp_rank")
    return rank if rank is not None else fields.optional_int("data_parallel_rank")


def _openai_common(fields: _Fields, *, prompt_ids: list[int], max_tokens: int | None,
                   served_model_name: str | None) -> tuple[GenerationRequest, str, bool, bool]:
    body = fields.body
    model = body.get("model", "default")
    if not isinstance(model, str):
        fields.fail("model", "Input should be a valid string")
    try:
        min_new_tokens, no_stop_trim = _verify_sampling(fields, body, max_new_tokens=max_tokens,
                                                        min_name="min_tokens", seed_name="seed")
        priority = _priority(fields)
    except ValueError as error:
        raise openai_error(str(error)) from error
    stream = fields.boolean("stream")
    stream_options = body.get("stream_options")
    include_usage = continuous_usage_stats = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            fields.fail("stream_options", "Input should be a valid dictionary or object")
        include_usage = fields.boolean("include_usage", source=stream_options)
        continuous_usage_stats = fields.boolean("continuous_usage_stats", source=stream_options)
    rid = body.get("rid")
    if isinstance(rid, list):
        if not all(isinstance(item, str) for item in rid):
            fields.fail("rid", "Input should be a valid list of strings")
        rid = rid[0] if len(rid) == 1 else None  # a list of several: `_choices_options`
    elif rid is not None and not isinstance(rid, str):
        fields.fail("rid", "Input should be a valid string")
    for name in ("cache_salt", "extra_key"):
        if body.get(name) is not None and not isinstance(body.get(name), str):
            raise openai_error(f"The simulator accepts only a single string {name}.")
    lora_path = body.get("lora_path")
    if lora_path is not None and not isinstance(lora_path, str):
        raise openai_error("The simulator accepts only a single string lora_path.")
    # The adapter named in `model` wins over a body lora_path.
    lora_path = split_model_adapter(model, served_model_name)[1] or lora_path
    generation = GenerationRequest(
        rid=rid or new_rid(),
        prompt_ids=prompt_ids,
        max_new_tokens=max_tokens,
        stop=fields.stop_strings(),
        stop_regex=fields.stop_regexes(openai_error),
        stop_token_ids=fields.token_ids("stop_token_ids"),
        ignore_eos=fields.boolean("ignore_eos"),
        seed=fields.optional_int("seed"),
        min_new_tokens=min_new_tokens,
        no_stop_trim=no_stop_trim,
        cache_namespace=_cache_namespace(body.get("cache_salt"), body.get("extra_key")),
        priority=priority,
        stream=stream,
        lora_path=lora_path or None,
        forced_text=_constrained_reply(fields, prompt_ids),
        logit_bias=_logit_bias(body),
        routed_dp_rank=_routed_dp_rank(fields),
    )
    return generation, model, include_usage, continuous_usage_stats


def _constrained_reply(fields: _Fields, prompt_ids: list[int]) -> str | None:
    """What the model writes under the request's output constraint, as SGLang
    turns an OpenAI request into sampling params: `response_format` (a
    `json_schema`'s schema, on chat also a top-level `schema` as SGLang's
    ChatCompletionRequest takes it; any JSON object for `json_object`;
    nothing for "text"), or the `regex` / `ebnf` extras, or completions'
    `json_schema` string. A json_schema format without a schema is SGLang's
    400 (typed as each route's check types it). See `constrained_text`."""
    constraints = {kind: fields.optional_str(kind) for kind in ("regex", "ebnf", "json_schema")}
    response_format = fields.body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in RESPONSE_FORMAT_TYPES:
            fields.fail("response_format.type",
                        "Input should be 'text', 'json_object', 'json_schema' or 'structural_tag'")
        kind = response_format["type"]
        if kind == "json_object":
            constraints["json_schema"] = ANY_JSON
        elif kind == "json_schema":
            chat = fields.schema_name == "ChatCompletionRequest"
            json_schema = response_format.get("json_schema")
            schema = response_format.get("schema")
            if chat and not json_schema and schema and isinstance(schema, dict):
                json_schema = {"name": schema.get("title", "Schema"), "schema": schema}
            if json_schema is not None:
                if not isinstance(json_schema, dict):
                    fields.fail("response_format.json_schema",
                                "Input should be a valid dictionary or instance of JsonSchemaResponseFormat")
                if not isinstance(json_schema.get("name"), str):
                    fields.fail("response_format.json_schema.name", "Field required")
                if json_schema.get("schema") is not None and not isinstance(json_schema["schema"], dict):
                    fields.fail("response_format.json_schema.schema", "Input should be a valid dictionary")
            schema = json_schema.get("schema") if json_schema else None
            if schema is None:
                raise openai_error("schema_ is required for json_schema response format request.",
                                   error_type="BadRequestError" if chat else "BadRequest")
            constraints["json_schema"] = json.dumps(schema)
        elif kind == "structural_tag":
            # The whole response_format goes to the grammar backend, as SGLang's
            # to_sampling_params dumps it (legacy `structures` or xgrammar's `format`).
            constraints["structural_tag"] = json.dumps(response_format)
    try:
        return constrained_text(constraints, _prompt_seed(prompt_ids))
    except ValueError as error:
        raise openai_error(str(error)) from None


# sampling_params.json_schema's "any JSON" value (SGLang's builtin JSON grammar).
ANY_JSON = "$$ANY$$"
GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")


def _prompt_seed(prompt_ids: list[int]) -> int:
    return int.from_bytes(hashlib.blake2b(orjson.dumps(prompt_ids), digest_size=8).digest(), "little")


def constrained_text(constraints: dict[str, str | None], seed: int) -> str | None:
    """The reply SGLang's grammar backend lets the model write under
    `constraints` (sampling params `json_schema`, `regex`, `ebnf`,
    `structural_tag`; None or "" = unset), or None when none is set:
    JSON valid under the schema (`structured.schema_value`; `$$ANY$$`: a JSON
    object), or a string the regex matches (rstr's xeger); both seeded, so a
    prompt gets the same reply every time. Raises ValueError with SGLang's
    message for more than one constraint or one that does not compile. An
    `ebnf` grammar gives a string it accepts (`ebnf.sample`), a structural tag
    too (`structural_tag.sample`)."""
    given = [kind for kind in GRAMMAR_KINDS if constraints.get(kind)]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError("Only one of json_schema, regex, ebnf, or structural_tag can be set.")
    kind = given[0]
    spec = constraints[kind]
    if kind == "json_schema":
        if spec == ANY_JSON:
            return json.dumps({"answer": schema_value({"type": "string"}, seed)})
        try:
            schema = json.loads(spec)
        except ValueError as error:
            raise ValueError(f"Failed to compile json grammar: {error}") from None
        return json.dumps(schema_value(schema if isinstance(schema, dict) else {}, seed), ensure_ascii=False)
    if kind == "regex":
        try:
            re.compile(spec)
        except re.error as error:
            raise ValueError(f"Failed to compile regex grammar: {error}") from None
        return rstr.Rstr(random.Random(seed)).xeger(spec)
    if kind == "ebnf":
        try:
            return ebnf.sample(spec, seed)
        except ebnf.EbnfError as error:
            raise ValueError(f"Failed to compile ebnf grammar: {error}") from None
    try:
        return structural_tag.sample(spec, seed)
    except structural_tag.StructuralTagError as error:
        raise ValueError(f"Failed to compile structural_tag grammar: {error}") from None


def _choices_options(fields: _Fields, parsed: OpenAIRequest, batch_size: int) -> OpenAIRequest:
    """`n`, and each prompt's rid as SGLang's GenerateReqInput normalises a
    batch: a list must hold one per prompt, a string is the prefix of each
    (`<rid>_<i>`), none gives fresh ones."""
    n = fields.optional_int("n")
    if n is not None and n < 1:
        raise openai_error(f"n must be at least 1, got {n}.")
    parsed.n = n or 1
    parsed.greedy = fields.optional_float("temperature") == 0
    rid = fields.body.get("rid")
    if isinstance(rid, list):
        if len(rid) != batch_size:
            raise openai_error("The specified rids length mismatch with the batch_size for batch processing.")
        _unique_rids(rid, lambda message: openai_error(message, error_type="BadRequest"))
        parsed.prompt_rids = list(rid)
    elif batch_size == 1:
        parsed.prompt_rids = [parsed.generation.rid]
    elif rid is not None:
        parsed.prompt_rids = [f"{rid}_{index}" for index in range(batch_size)]
    else:
        parsed.prompt_rids = [new_rid() for _ in range(batch_size)]
    return parsed


# ChatCompletionMessageGenericParam's roles (matched case-insensitively); a
# ChatCompletionMessageUserParam's role is exactly "user".
GENERIC_MESSAGE_ROLES = ("system", "assistant", "tool", "function", "developer", "latest_reminder", "root")


def chat_messages_checked(messages: list, schema_name: str) -> list:
    """The messages as SGLang's pydantic union of message params takes them
    (a generic role lower-cased); a message neither member accepts gets its
    400, with both members' complaints as pydantic lists them."""
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise openai_schema_error(f"messages.{index}", "Input should be a valid dictionary or object",
                                      schema_name)
        role = message.get("role")
        if isinstance(role, str) and role.lower() in GENERIC_MESSAGE_ROLES:
            checked.append(message if role.islower() else {**message, "role": role.lower()})
            continue
        if role == "user" and "content" in message:
            checked.append(message)
            continue
        allowed = ", ".join(repr(name) for name in GENERIC_MESSAGE_ROLES)
        generic, user = f"messages.{index}.ChatCompletionMessageGenericParam", \
            f"messages.{index}.ChatCompletionMessageUserParam"
        problems = [(f"{generic}.role", "Field required" if role is None else
                     f"Value error, 'role' must be one of {allowed} (case-insensitive)." if isinstance(role, str)
                     else "Value error, 'role' must be a string")]
        if role != "user":
            problems.append((f"{user}.role", "Field required" if role is None else "Input should be 'user'"))
        if "content" not in message:
            problems.append((f"{user}.content", "Field required"))
        raise schema_errors(problems, schema_name)
    return checked


def schema_errors(problems: list[tuple[str, str]], schema_name: str) -> ApiError:
    """The 400 of a request pydantic finds several (location, problem) in."""
    if len(problems) == 1:
        return openai_schema_error(*problems[0], schema_name)
    text = "".join(f"\n{location}\n  {problem}" for location, problem in problems)
    return ApiError(400, openai_error_body(f"{len(problems)} validation errors for {schema_name}{text}",
                                           error_type="Bad Request"))


def parse_chat_request(body: Any, *, served_model_name: str | None = None,
                       tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> OpenAIRequest:
    fields = _Fields(body, "ChatCompletionRequest", openai_schema_error)
    messages = body.get("messages")
    if messages is None:
        fields.fail("messages", "Field required")
    if not isinstance(messages, list):
        fields.fail("messages", "Input should be a valid list")
    if not messages:
        raise openai_error("Messages cannot be empty.")
    messages = chat_messages_checked(messages, "ChatCompletionRequest")
    try:
        tool_call = plan_call(body.get("tools"), body.get("tool_choice"), messages, parser=tool_call_parser)
    except ToolSchemaError as error:
        raise schema_errors(error.problems, "ChatCompletionRequest") from error
    except ToolRequestError as error:
        raise openai_error(str(error)) from error
    try:
        prompt_text = render_chat_prompt(messages, template_tools(body.get("tools"), body.get("tool_choice")))
    except ValueError as error:
        raise openai_error(str(error), error_type="BadRequest") from error
    # max_completion_tokens wins over the deprecated max_tokens, as in SGLang.
    max_tokens = fields.optional_int("max_completion_tokens") or fields.optional_int("max_tokens")
    generation, model, include_usage, continuous = _openai_common(
        fields, prompt_ids=tokenize(prompt_text), max_tokens=max_tokens, served_model_name=served_model_name)
    logprobs = fields.boolean("logprobs")
    top = fields.optional_int("top_logprobs")
    if top is not None and not 0 <= top <= 20:
        raise openai_error("top_logprobs must be between 0 and 20.")
    if top and not logprobs:
        raise openai_error("When using `top_logprobs`, `logprobs` must be set to true.")
    if tool_call is not None:
        generation = replace(generation, forced_text=tool_call.text)
    # A reasoning model thinks first, before an answer or a tool call alike.
    think_seed = _prompt_seed(generation.prompt_ids)
    thinking = thinking_for(reasoning_parser, body, think_seed)
    if thinking is not None:
        generation = replace(generation, preamble=thinking.preamble, reasoning_tokens=thinking.reasoning_tokens)
    parsed = OpenAIRequest(generation, model, include_usage, continuous,
                           top_logprobs=(top or 0) if logprobs else None, tool_call=tool_call,
                           reasoning_parser=thinking.parser if thinking is not None else None,
                           stream_reasoning=fields.boolean("stream_reasoning", default=True),
                           cached_tokens_details=fields.boolean("return_cached_tokens_details"),
                           thinking=(reasoning_parser, body, think_seed) if thinking is not None else None)
    return _choices_options(fields, parsed, 1)


def parse_completion_request(body: Any, *, served_model_name: str | None = None) -> OpenAIRequest:
    fields = _Fields(body, "CompletionRequest", openai_schema_error)
    if "prompt" not in body:
        fields.fail("prompt", "Field required")
    prompt = body.get("prompt")
    if not prompt or (isinstance(prompt, list) and all(not item for item in prompt)):
        raise openai_error("Prompt cannot be empty")
    if isinstance(prompt, str):
        prompts = [(tokenize(prompt), prompt)]
    elif isinstance(prompt, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
        prompts = [(list(prompt), None)]
    elif isinstance(prompt, list) and all(isinstance(item, str) for item in prompt):
        prompts = [(tokenize(item), item) for item in prompt]
    elif isinstance(prompt, list) and all(
            isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
            for item in prompt):
        prompts = [(list(item), None) for item in prompt]
    else:
        fields.fail("prompt", "Input should be a valid string or list of token ids")
    max_tokens = fields.optional_int("max_tokens")
    if "max_tokens" not in body:
        max_tokens = 16  # CompletionRequest's default
    generation, model, include_usage, continuous = _openai_common(
        fields, prompt_ids=prompts[0][0], max_tokens=max_tokens, served_model_name=served_model_name)
    echo = fields.boolean("echo")
    if not echo:
        prompts = [(ids, None) for ids, _ in prompts]
    else:  # token ids echo as their text, special tokens left out (SGLang's _prepare_echo_prompts)
        prompts = [(ids, detokenize(ids) if text is None else text) for ids, text in prompts]
    logprobs = fields.optional_int("logprobs")
    if logprobs is not None and logprobs < 0:
        raise openai_error(f"logprobs must be at least 0, got {logprobs}.")
    parsed = OpenAIRequest(generation, model, include_usage, continuous, prompts[0][1],
                           batch=prompts if len(prompts) > 1 else None, completion_logprobs=logprobs,
                           cached_tokens_details=fields.boolean("return_cached_tokens_details"))
    return _choices_options(fields, parsed, len(prompts))


# ------------------------------------------------------------------ native requests

def native_schema_error(location: str, problem: str, _schema_name: str) -> ApiError:
    return ApiError(400, {"error": f"{location}: {problem}"})


def native_error(message: str, status: int = 400) -> ApiError:
    return ApiError(status, {"error": {"message": message}})


@dataclass(slots=True)
class NativeRequest:
    """A parsed /generate request: one generation per prompt, each with its rid
    as SGLang's GenerateReqInput normalises them, and `n` samples of each."""

    generations: list[GenerationRequest]
    n: int = 1
    # Per prompt: temperature 0, so that its parallel samples are all the same.
    greedy: list[bool] = field(default_factory=list)
    # One prompt given as such (a string, or one list of ids) and n = 1: the
    # reply is one object; otherwise a list (a stream: events with an index).
    single: bool = True
    # Why SGLang's scheduler would abort it at once (400): a constraint that does
    # not compile, a logprob_start_len past the prompt. A stream is already open
    # by then, so the route answers it as the stream's error event.
    refusal: str | None = None
    # It continues a session (`session_params`); the requests it started (set by the route).
    in_session: bool = False
    runnings: list | None = None

    @property
    def stream(self) -> bool:
        return self.generations[0].stream


def _per_prompt(fields: _Fields, name: str, batch_size: int, kind: type = str) -> list:
    """A field given once for every prompt or as a list of one per prompt,
    each None or of `kind` (str, bool or int)."""
    value = fields.body.get(name)
    values = value if isinstance(value, list) else [value] * batch_size
    if len(values) != batch_size:
        raise native_error(f"The length of {name} should be equal to the batch size.")
    for item in values:
        if item is not None and (not isinstance(item, kind) or (kind is int and isinstance(item, bool))):
            fields.fail(name, f"Input should be a valid {_KIND_NAMES[kind]}")
    return values


_KIND_NAMES = {str: "string", bool: "boolean", int: "integer"}


@dataclass(slots=True)
class NativeLogprobs:
    """What a /generate prompt's `return_logprob` asks for: logprobs of the
    input from `start` (SGLang's `logprob_start_len`; -1, the default: none,
    only the output's), `top` alternatives per position (`top_logprobs_num`)
    and the tokens' text (`return_text_in_logprobs`; else null)."""

    start: int
    top: int
    text: bool
    # `token_ids_logprob`: these tokens' logprobs at every scored position.
    token_ids: list[int] | None = None
    # The input's entries, computed once (the prompt does not change while a
    # stream repeats them in every event).
    inputs: dict | None = None


def _native_logprobs(fields: _Fields, batch_size: int, *, detokenize: bool = True) -> list[NativeLogprobs | None]:
    wanted = _per_prompt(fields, "return_logprob", batch_size, bool)
    starts = _per_prompt(fields, "logprob_start_len", batch_size, int)
    tops = _per_prompt(fields, "top_logprobs_num", batch_size, int)
    text = fields.boolean("return_text_in_logprobs") and detokenize  # no tokenizer, no texts
    queried = fields.body.get("token_ids_logprob")
    if queried and isinstance(queried, list) and all(isinstance(item, list) for item in queried):
        if len(queried) != batch_size:
            raise native_error("The length of token_ids_logprob should be equal to the batch size.")
        per_prompt = queried
    else:
        per_prompt = [queried] * batch_size
    for token_ids in per_prompt:
        _queried_ids_checked(token_ids)
    return [NativeLogprobs(start=-1 if start is None else start, top=top or 0, text=text,
                           token_ids=list(token_ids) if token_ids else None) if want else None
            for want, start, top, token_ids in zip(wanted, starts, tops, per_prompt)]


def _queried_ids_checked(token_ids: Any) -> None:
    """As SGLang's tokenizer manager checks a prompt's token_ids_logprob."""
    if not token_ids:
        return
    if not isinstance(token_ids, list):
        raise native_error("token_ids_logprob must be a flat list of integers.")
    for token_id in token_ids:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise native_error("token_ids_logprob must be a flat list of integers.")
        if not 0 <= token_id < VOCAB_SIZE:
            raise native_error(f"token_ids_logprob contains out-of-vocabulary token id {token_id}; "
                               f"valid range is [0, {VOCAB_SIZE}).")


def _unique_rids(rids: list[str], make_error) -> None:
    """A batch's rids must differ (GenerateReqInput._validate_rid_uniqueness)."""
    if len(set(rids)) != len(rids):
        duplicates = [rid for rid, count in Counter(rids).items() if count > 1]
        raise make_error(f"Duplicate request IDs detected within the request: {duplicates}")


SKIP_TOKENIZER_TEXT_MESSAGE = (
    "The engine initialized with skip_tokenizer_init=True cannot accept text prompts. Please provide input_ids "
    "or re-initialize the engine with skip_tokenizer_init=False.")


def parse_generate_request(body: Any, *, reasoning_parser: str | None = None,
                           skip_tokenizer_init: bool = False,
                           session_input: Callable[[Any, str, list[int]], list[int]] | None = None) -> NativeRequest:
    """GenerateReqInput: `text` a string or a list (a batch), or `input_ids` a
    list of ids or of id lists; `sampling_params` one object or one per prompt
    (all with the same `n`); `rid`, `lora_path`, `cache_salt` and `extra_key`
    one value or one per prompt. With n > 1 even a single prompt is a batch.
    `session_params` (one prompt only): `session_input(params, rid, ids)`
    gives the whole input the session makes of the prompt, or raises
    ValueError with why the session refuses it (the request is then refused).
    `require_reasoning` on a reasoning model (`reasoning_parser`): the reply
    opens with its think block, which meta_info's reasoning_tokens counts
    through the end tag, as SGLang's scheduler does."""
    fields = _Fields(body, "GenerateReqInput", native_schema_error)
    reasoning = reasoning_parser if fields.boolean("require_reasoning") else None
    text = body.get("text")
    input_ids = body.get("input_ids")
    if body.get("input_embeds") is not None:
        raise native_error("The simulator does not support input_embeds.")
    if (text is None) == (input_ids is None):
        raise native_error("Either text, input_ids or input_embeds should be provided.")
    if text is not None:
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, list) or not all(isinstance(item, str) for item in texts):
            fields.fail("text", "Input should be a valid string")
        if skip_tokenizer_init:
            raise native_error(SKIP_TOKENIZER_TEXT_MESSAGE)
        prompts = [tokenize(item) for item in texts]
    else:
        if not isinstance(input_ids, list) or not input_ids:
            raise native_error("input_ids cannot be empty.")
        single = not isinstance(input_ids[0], list)
        prompts = [input_ids] if single else input_ids
        for ids in prompts:
            if not isinstance(ids, list) or not ids or not all(
                    isinstance(item, int) and not isinstance(item, bool) for item in ids):
                fields.fail("input_ids", "Input should be a valid list of integers")
        prompts = [list(ids) for ids in prompts]
    batch_size = len(prompts)
    if not batch_size:
        raise native_error("Either text, input_ids or input_embeds should be provided.")
    sampling = body.get("sampling_params") or {}
    if isinstance(sampling, list):
        if len(sampling) != batch_size:
            raise native_error("The length of sampling_params should be equal to the batch size.")
        if not all(isinstance(item, dict) for item in sampling):
            fields.fail("sampling_params", "Input should be a valid dictionary")
        ns = {item.get("n", 1) for item in sampling}
        if len(ns) > 1:
            raise native_error("The parallel_sample_num should be the same for all samples in sample params.")
        samplings = sampling
    elif isinstance(sampling, dict):
        samplings = [sampling] * batch_size
    else:
        fields.fail("sampling_params", "Input should be a valid dictionary")
    n = fields.optional_int("n", source=samplings[0])
    n = 1 if n is None else n
    if n < 1:
        raise native_error(f"n must be at least 1, got {n}.")
    if n > 1:
        single = False
    rid = body.get("rid")
    if single:
        if isinstance(rid, list) and len(rid) == 1:
            rid = rid[0]
        if rid is not None and not isinstance(rid, str):
            fields.fail("rid", "Input should be a valid string")
        rids = [rid or new_rid()]
    elif rid is None:
        rids = [new_rid() for _ in range(batch_size)]
    elif isinstance(rid, str):
        rids = [f"{rid}_{index}" for index in range(batch_size)]
    elif isinstance(rid, list):
        if len(rid) != batch_size:
            raise native_error("The specified rids length mismatch with the batch_size for batch processing.")
        if not all(isinstance(item, str) for item in rid):
            fields.fail("rid", "Input should be a valid list of strings")
        _unique_rids(rid, native_error)
        rids = list(rid)
    else:
        raise native_error("The rid should be a string or a list of strings.")
    per_prompt = {name: _per_prompt(fields, name, batch_size) for name in ("lora_path", "cache_salt", "extra_key")}
    logprobs = _native_logprobs(fields, batch_size, detokenize=not skip_tokenizer_init)
    stream = fields.boolean("stream")
    generations = []
    greedy = []
    refusals = []
    in_session = body.get("session_params") is not None and session_input is not None
    if in_session and (len(prompts) != 1 or n != 1):
        raise native_error("session_params is supported for a single prompt and n = 1 only.")
    priority = None
    try:
        priority = _priority(fields)
    except ValueError as error:
        refusals.append(str(error))
    for index, (prompt_ids, params) in enumerate(zip(prompts, samplings)):
        temperature = fields.optional_float("temperature", source=params)
        greedy.append(temperature == 0)
        max_new_tokens = fields.optional_int("max_new_tokens", source=params) if "max_new_tokens" in params else 128
        min_new_tokens, no_stop_trim = 0, False
        try:
            min_new_tokens, no_stop_trim = _verify_sampling(fields, params, max_new_tokens=max_new_tokens,
                                                            min_name="min_new_tokens", seed_name="sampling_seed")
        except ValueError as error:
            refusals.append(str(error))
        forced_text = None
        try:
            forced_text = constrained_text({kind: fields.optional_str(kind, source=params) for kind in GRAMMAR_KINDS},
                                           _prompt_seed(prompt_ids))
        except ValueError as error:
            refusals.append(str(error))
        start = logprobs[index].start if logprobs[index] is not None else -1
        if start > len(prompt_ids) and not in_session:
            refusals.append(_logprob_start_refusal(start, prompt_ids))
        stream_interval = fields.optional_int("stream_interval", source=params)  # unchecked in SGLang too
        generations.append(GenerationRequest(
            rid=rids[index],
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            no_stop_trim=no_stop_trim,
            stream_interval=stream_interval,
            stop=fields.stop_strings(source=params),
            stop_regex=fields.stop_regexes(native_error, source=params),
            stop_token_ids=fields.token_ids("stop_token_ids", source=params),
            ignore_eos=fields.boolean("ignore_eos", source=params),
            seed=fields.optional_int("sampling_seed", source=params),
            cache_namespace=_cache_namespace(per_prompt["cache_salt"][index] or None,
                                             per_prompt["extra_key"][index] or None),
            priority=priority,
            stream=stream,
            lora_path=per_prompt["lora_path"][index] or None,
            forced_text=forced_text,
            logprobs=logprobs[index],
            routing_key=fields.optional_str("routing_key"),
            routed_dp_rank=_routed_dp_rank(fields),
            logit_bias=_logit_bias(params),
            detokenize=not skip_tokenizer_init,
        ))
        if reasoning is not None and (thinking := thinking_for(reasoning, {}, _prompt_seed(prompt_ids))):
            generations[-1] = replace(generations[-1], preamble=thinking.preamble,
                                      reasoning_tokens=thinking.reasoning_tokens)
    if in_session:  # last: nothing may refuse it unseen once the session has recorded it
        try:
            whole = session_input(body["session_params"], rids[0], prompts[0])
            generations[0] = replace(generations[0], prompt_ids=whole)
            start = logprobs[0].start if logprobs[0] is not None else -1
            if start > len(whole):
                refusals.append(_logprob_start_refusal(start, whole))
        except ValueError as error:
            refusals.insert(0, str(error))
    return NativeRequest(generations=generations, n=n, greedy=greedy, single=single,
                         refusal=refusals[0] if refusals else None, in_session=in_session)


def _logprob_start_refusal(start: int, prompt_ids: list[int]) -> str:
    return (f"req.logprob_start_len={start} is higher than the number of input tokens "
            f"len(req.origin_input_ids)={len(prompt_ids)}. Please use a smaller logprob_start_len.")


# ------------------------------------------------------------------ native responses

def native_meta_info(running: RunningRequest, *, final: bool, completion_tokens: int | None = None) -> dict:
    if completion_tokens is None:
        completion_tokens = running.completion_tokens
    if final and running.aborted_waiting:
        # Taken from the waiting queue: the tokenizer manager's short answer.
        meta_info = {"id": running.rid, "finish_reason": running.finish_reason,
                     "weight_version": running.weight_version,
                     "e2e_latency": running.e2e_latency_s()}
        if running.request.logprobs is not None:
            meta_info.update(native_logprobs(running, completion_tokens))
        meta_info["completion_tokens"] = completion_tokens
        return meta_info
    meta_info = {
        "id": running.rid,
        "finish_reason": running.finish_reason if final else None,
        "prompt_tokens": running.prompt_tokens,
        "weight_version": running.weight_version,
        "num_retractions": running.retractions,
        "reasoning_tokens": _reasoning_tokens(running, completion_tokens),
        "completion_tokens": completion_tokens,
        "cached_tokens": running.cached_tokens,
        "cached_tokens_details": cached_tokens_details(running),
    }
    if running.request.logprobs is not None:
        meta_info.update(native_logprobs(running, meta_info["completion_tokens"]))
    if final:
        meta_info["e2e_latency"] = running.e2e_latency_s()
    return meta_info


def cached_tokens_details(running: RunningRequest) -> dict | None:
    """Where a request's cached tokens came from, as SGLang's scheduler reports
    them: from the device pool and from the hierarchical cache's host pool
    (loaded back), or None when nothing was cached."""
    if not running.cached_tokens:
        return None
    return {"device": running.cached_tokens - running.cached_tokens_host, "host": running.cached_tokens_host}


def sglext(parsed: OpenAIRequest, runnings: list[RunningRequest]) -> dict | None:
    """An OpenAI reply's `sglext` (response level): the cached-token details
    of the first choice that has any, when the request asked for them."""
    if not parsed.cached_tokens_details:
        return None
    details = next((found for found in map(cached_tokens_details, runnings) if found is not None), None)
    return {"cached_tokens_details": details} if details is not None else None


def native_logprobs(running: RunningRequest, completion_tokens: int) -> dict:
    """meta_info's logprob fields, as SGLang's tokenizer manager fills them:
    entries [logprob, token id, text or null]; the input's from
    `logprob_start_len` (its first entry has no logprob: nothing before it was
    scored), the output's for the first `completion_tokens` tokens; with
    `top_logprobs_num`, per position the top alternatives (null where the
    entry has no logprob). A token scores by its place in the sequence, the
    prompt's first: a reply fed back as a prompt scores as it did when it
    was generated, and the OpenAI routes score the same."""
    spec: NativeLogprobs = running.request.logprobs
    if spec.inputs is None:
        prompt = running.request.prompt_ids
        start = len(prompt) if spec.start == -1 else spec.start
        entries, tops, queried = [], [], []
        for position in range(start, len(prompt)):
            token_id = prompt[position]
            if position == start:
                entries.append([None, token_id, piece_of(token_id) if spec.text else None])
                tops.append(None)
                queried.append(None)
            else:
                entry, top = _logprob_entry(spec, token_id, position)
                entries.append(entry)
                tops.append(top)
                if spec.token_ids:
                    queried.append(_queried_entries(spec, token_id, position))
        spec.inputs = {"input_token_logprobs": entries}
        if spec.top > 0:
            spec.inputs["input_top_logprobs"] = tops
        if spec.token_ids:
            spec.inputs["input_token_ids_logprobs"] = queried
    out = {"input_token_logprobs": spec.inputs["input_token_logprobs"]}
    entries, tops, queried = [], [], []
    offset = len(running.request.prompt_ids)
    for position, token_id in enumerate(running.output_ids[:completion_tokens], start=offset):
        entry, top = _logprob_entry(spec, token_id, position)
        entries.append(entry)
        tops.append(top)
        if spec.token_ids:
            queried.append(_queried_entries(spec, token_id, position))
    out["output_token_logprobs"] = entries
    out["output_token_logprobs_length"] = len(entries)
    if spec.top > 0:
        out["input_top_logprobs"] = spec.inputs["input_top_logprobs"]
        out["output_top_logprobs"] = tops
    if spec.token_ids:
        out["input_token_ids_logprobs"] = spec.inputs["input_token_ids_logprobs"]
        out["output_token_ids_logprobs"] = queried
    return out


def _queried_entries(spec: NativeLogprobs, token_id: int, position: int) -> list[list]:
    """[logprob, id, text] of each token_ids_logprob id where `token_id` stands."""
    piece = piece_of(token_id)
    return [[queried_logprob(queried, token_id, piece, position), queried, piece_of(queried) if spec.text else None]
            for queried in spec.token_ids]


def _logprob_entry(spec: NativeLogprobs, token_id: int, position: int) -> tuple[list, list]:
    """A token's [logprob, id, text] and its top alternatives in that shape."""
    scored = token_logprobs(token_id, piece_of(token_id), position, spec.top)
    entry = [scored["logprob"], token_id, scored["token"] if spec.text else None]
    top = [[alt["logprob"], piece_to_id(alt["token"]), alt["token"] if spec.text else None]
           for alt in scored["top_logprobs"]]
    return entry, top


def native_output(running: RunningRequest, *, final: bool, step: Step | None = None,
                  index: int | None = None, since: int | None = None) -> dict:
    """The cumulative output; with `step`, as it was right after that step;
    with `index`, its place in a streamed batch. With `since` (a stream under
    --incremental-streaming-output: the output tokens sent before this step),
    only what the step added: its text, its output ids and their logprob
    entries (meta_info's counts stay cumulative, as SGLang's tokenizer
    manager leaves them)."""
    if step is None or (final and since is None):
        output = {"text": running.text, "output_ids": list(running.output_ids),
                  "meta_info": native_meta_info(running, final=final)}
    else:
        count = step.completion_tokens
        meta_info = native_meta_info(running, final=final, completion_tokens=count)
        if since is None:
            output = {"text": running.text[:step.text_end], "output_ids": running.output_ids[:count],
                      "meta_info": meta_info}
        else:
            for key in INCREMENTAL_META_INFO_KEYS:
                if key in meta_info:
                    meta_info[key] = meta_info[key][since:]
            output = {"text": step.delta_text, "output_ids": running.output_ids[since:count], "meta_info": meta_info}
    if not running.request.detokenize:
        del output["text"]  # no tokenizer: ids only
    if index is not None:
        output["index"] = index
    return output


# meta_info's per-output-token lists that an incremental stream sends in slices.
INCREMENTAL_META_INFO_KEYS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")


def native_sse(running: RunningRequest, *, final: bool, step: Step | None = None, index: int | None = None,
               since: int | None = None) -> bytes:
    return b"data: " + orjson.dumps(native_output(running, final=final, step=step, index=index,
                                                  since=since)) + b"\n\n"


def native_stream_error_sse(message: str, code: int) -> bytes:
    error = {"error": {"message": message, "type": "invalid_request_error", "code": code, "retryable": False}}
    return b"data: " + orjson.dumps(error) + b"\n\n"


# ------------------------------------------------------------------ OpenAI responses

def usage_object(*, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                 enable_cache_report: bool, reasoning_tokens: int = 0) -> dict:
    """SGLang's UsageInfo: completion_tokens_details only with reasoning tokens."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens} if enable_cache_report else None,
        "reasoning_tokens": reasoning_tokens,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens} if reasoning_tokens else None,
    }


def running_usage(running: RunningRequest, enable_cache_report: bool, completion_tokens: int | None = None) -> dict:
    """Usage now, or with `completion_tokens` as it was when a step was produced."""
    if completion_tokens is None:
        completion_tokens = running.completion_tokens
    return usage_object(prompt_tokens=running.prompt_tokens, completion_tokens=completion_tokens,
                        cached_tokens=running.cached_tokens, enable_cache_report=enable_cache_report,
                        reasoning_tokens=_reasoning_tokens(running, completion_tokens))


def _reasoning_tokens(running: RunningRequest, completion_tokens: int) -> int:
    """The reasoning tokens among a reply's first `completion_tokens`: those
    of its think block, through the end tag, as SGLang's scheduler counts them."""
    return min(running.request.reasoning_tokens, completion_tokens)


def _matched_stop(finish_reason: dict | None):
    return finish_reason.get("matched") if finish_reason else None


def chat_logprobs(parsed: OpenAIRequest, steps: list[tuple[int, str, int]]) -> dict | None:
    """A choice's `logprobs` for (token id, text, position) of its generated
    tokens, or None when the request did not ask for them."""
    if parsed.top_logprobs is None:
        return None
    return {"content": [token_logprobs(token_id, text, position, parsed.top_logprobs)
                        for token_id, text, position in steps]}


def choices_usage(runnings: list[RunningRequest], n: int, enable_cache_report: bool) -> dict:
    """Usage of a request's choices, as SGLang's UsageProcessor adds them up:
    every choice's completion tokens, each prompt's tokens (and cached tokens)
    once, from the first of its `n` choices."""
    firsts = runnings[::n]
    return usage_object(prompt_tokens=sum(r.prompt_tokens for r in firsts),
                        completion_tokens=sum(r.completion_tokens for r in runnings),
                        cached_tokens=sum(r.cached_tokens for r in firsts), enable_cache_report=enable_cache_report,
                        reasoning_tokens=sum(_reasoning_tokens(r, r.completion_tokens) for r in runnings))


def _openai_response(parsed: OpenAIRequest, runnings: list[RunningRequest], kind: str, choice_body, *,
                     enable_cache_report: bool) -> dict:
    """The reply around the choices: `choice_body(index, running)` gives each
    choice's own fields, before its finish reason."""
    choices = []
    for index, running in enumerate(runnings):
        finish_reason = running.finish_reason
        choice = {"index": index, **choice_body(index, running)}
        choice.setdefault("finish_reason", finish_reason["type"] if finish_reason else None)
        choice.setdefault("matched_stop", _matched_stop(finish_reason))
        choices.append(choice)
    response = {
        "id": runnings[0].rid,
        "object": kind,
        "created": int(time.time()),
        "model": parsed.model,
        "choices": choices,
        "usage": choices_usage(runnings, parsed.n, enable_cache_report),
        "metadata": {"weight_version": runnings[0].weight_version},
    }
    extension = sglext(parsed, runnings[:1])  # SGLang reads the first result only
    if extension is not None:
        response["sglext"] = extension
    return response


def completion_logprobs(top: int, steps: list[tuple[int, str, int]], echo_text: str | None = None) -> dict:
    """A completion choice's `logprobs` as SGLang's to_openai_style_logprobs
    builds it: parallel lists, with the echoed prompt's tokens first (the
    very first has no log probability), and no text offsets (-1)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict | None] = []
    if echo_text is not None:
        for position, piece in enumerate(split_pieces(echo_text)):
            entry = token_logprobs(piece_to_id(piece), piece, position, top)
            tokens.append(piece)
            values.append(entry["logprob"] if position else None)
            tops.append({alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]} if position else None)
    for token_id, text, position in steps:
        entry = token_logprobs(token_id, text, position, top)
        tokens.append(text)
        values.append(entry["logprob"])
        tops.append({alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]})
    return {"text_offset": [-1] * len(tokens), "token_logprobs": values, "tokens": tokens, "top_logprobs": tops}


def choice_logprobs(parsed: OpenAIRequest, index: int, steps: list[tuple[int, str, int]], *,
                    with_echo: bool = True) -> dict | None:
    """Choice `index`'s logprobs for (token id, text, position) of its
    generated tokens, in its endpoint's shape; None when not asked for.
    `with_echo`: a completion's echoed prompt comes first. Positions count
    from the reply's first token; tokens score by their place after the prompt."""
    offset = len(parsed.prompts()[index // parsed.n][0])
    steps = [(token_id, text, offset + position) for token_id, text, position in steps]
    if parsed.completion_logprobs is not None:
        echo_text = parsed.prompts()[index // parsed.n][1] if with_echo else None
        return completion_logprobs(parsed.completion_logprobs, steps, echo_text)
    return chat_logprobs(parsed, steps)


def chat_response(parsed: OpenAIRequest, runnings: list[RunningRequest], *, enable_cache_report: bool,
                  logprobs: list[dict | None] | None = None) -> dict:
    def message(index: int, running: RunningRequest) -> dict:
        call = parsed.tool_call
        if call is None:
            # SGLang drops tool_calls when there are none.
            content, reasoning = running.text, None
            if parsed.reasoning_parser is not None:
                reasoning, content = ReasoningSplitter(parsed.reasoning_parser).split(running.text)
            return {"message": {"role": "assistant", "content": content, "reasoning_content": reasoning or None},
                    "logprobs": logprobs[index] if logprobs else None}
        # The reasoning parser takes the think block first, then the tool-call
        # parser the call, leaving what came before it (stripped) as content:
        # nothing after a block it split off, the block itself when it split
        # none; a call cut short is dropped.
        finish_reason = running.finish_reason
        preamble = running.request.preamble or ""
        complete = running.text == preamble + call.text
        reasoning, before = "", running.text[:len(preamble)]
        if parsed.reasoning_parser is not None:
            reasoning, before = ReasoningSplitter(parsed.reasoning_parser).split(before)
        content = before.strip()
        body = {"message": {"role": "assistant", "content": content, "reasoning_content": reasoning or None,
                            **({"tool_calls": call.message_tool_calls(index)} if complete else {})},
                "logprobs": logprobs[index] if logprobs else None}
        if complete and finish_reason is not None and finish_reason["type"] == "stop":
            body.update(finish_reason="tool_calls", matched_stop=None)
        return body

    return _openai_response(parsed, runnings, "chat.completion", message, enable_cache_report=enable_cache_report)


def completion_response(parsed: OpenAIRequest, runnings: list[RunningRequest], *, enable_cache_report: bool,
                        logprobs: list[dict | None] | None = None) -> dict:
    prompts = parsed.prompts()

    def text(index: int, running: RunningRequest) -> dict:
        echo_text = prompts[index // parsed.n][1]
        return {"text": running.text if echo_text is None else echo_text + running.text,
                "logprobs": logprobs[index] if logprobs else None}

    return _openai_response(parsed, runnings, "text_completion", text, enable_cache_report=enable_cache_report)


def openai_stream_error_sse(message: str, code: int) -> bytes:
    """SGLang's mid-stream error: the flat error object wrapped in "error"."""
    body = {"error": openai_error_body(message, error_type=HTTPStatus(code).name, code=code)}
    return b"data: " + orjson.dumps(body) + b"\n\n"


class ChatChunkWriter:
    """Pre-encoded pieces of one request's chat.completion.chunk events.

    Field order and nulls follow SGLang's msgspec StreamChunk: `delta` always
    carries `reasoning_content` (null), `usage` appears only when set.
    """

    __slots__ = ("_delta", "_head", "_choice_tail", "_usage_head", "model", "rid", "created")

    def __init__(self, *, rid: str, model: str, created: int, index: int = 0) -> None:
        self.rid = rid
        self.model = model
        self.created = created
        head = b'{"id":' + orjson.dumps(rid) + b',"object":"chat.completion.chunk","created":' + \
            str(created).encode() + b',"model":' + orjson.dumps(model)
        self._delta = b"data: " + head + b',"choices":[{"index":' + str(index).encode() + b',"delta":{'
        self._head = self._delta + b'"reasoning_content":null,'
        self._choice_tail = b'},"logprobs":null,"finish_reason":null,"matched_stop":null}]'
        self._usage_head = b"data: " + head + b',"choices":[],"usage":'

    def role_chunk(self) -> bytes:
        return self._head + b'"role":"assistant","content":""' + self._choice_tail + b"}\n\n"

    def content_chunk(self, delta_text: str, usage: dict | None = None, logprobs: dict | None = None) -> bytes:
        return self._chunk(self._head + b'"content":' + orjson.dumps(delta_text), usage, logprobs)

    def reasoning_chunk(self, delta_text: str | None, usage: dict | None = None,
                        logprobs: dict | None = None) -> bytes:
        """A reasoning delta (`--reasoning-parser`); with None, a chunk that
        only carries logprobs whose token the parser held back."""
        return self._chunk(self._delta + b'"reasoning_content":' + orjson.dumps(delta_text), usage, logprobs)

    def _chunk(self, head: bytes, usage: dict | None, logprobs: dict | None) -> bytes:
        tail = self._choice_tail
        if logprobs is not None:
            tail = tail.replace(b'"logprobs":null', b'"logprobs":' + orjson.dumps(logprobs), 1)
        if usage is None:
            return head + tail + b"}\n\n"
        return head + tail + b',"usage":' + orjson.dumps(usage) + b"}\n\n"

    def tool_call_chunk(self, tool_call: dict, usage: dict | None = None) -> bytes:
        """A tool-call delta: SGLang builds these with pydantic, so every delta
        field is there (null) and `usage` too."""
        return (self._delta + b'"role":null,"content":null,"reasoning_content":null,"tool_calls":['
                + orjson.dumps(tool_call) + b']},"logprobs":null,"finish_reason":null,"matched_stop":null}],"usage":'
                + orjson.dumps(usage) + b"}\n\n")

    def finish_chunk(self, finish_type: str, matched_stop) -> bytes:
        return (self._head[:-1] + b'},"logprobs":null,"finish_reason":' + orjson.dumps(finish_type)
                + b',"matched_stop":' + orjson.dumps(matched_stop) + b"}]}\n\n")

    def usage_chunk(self, usage: dict) -> bytes:
        return self._usage_head + orjson.dumps(usage) + b"}\n\n"

    def sglext_chunk(self, extension: dict) -> bytes:
        return _sglext_chunk(self._usage_head, extension)


class CompletionChunkWriter:
    """Pre-encoded pieces of one request's text_completion stream events."""

    __slots__ = ("_head", "_usage_head")

    def __init__(self, *, rid: str, model: str, created: int, index: int = 0) -> None:
        head = b'{"id":' + orjson.dumps(rid) + b',"object":"text_completion","created":' + \
            str(created).encode() + b',"model":' + orjson.dumps(model)
        self._head = b"data: " + head + b',"choices":[{"index":' + str(index).encode() + b',"text":'
        self._usage_head = b"data: " + head + b',"choices":[],"usage":'

    def text_chunk(self, delta_text: str, finish_reason: dict | None, usage: dict | None = None,
                   logprobs: dict | None = None) -> bytes:
        finish_type = finish_reason["type"] if finish_reason else None
        chunk = (self._head + orjson.dumps(delta_text) + b',"logprobs":' + orjson.dumps(logprobs)
                 + b',"finish_reason":'
                 + orjson.dumps(finish_type) + b',"matched_stop":' + orjson.dumps(_matched_stop(finish_reason))
                 + b"}]")
        # CompletionStreamResponse is dumped with all fields: "usage" is null when unset.
        return chunk + b',"usage":' + orjson.dumps(usage) + b"}\n\n"

    def usage_chunk(self, usage: dict) -> bytes:
        # SGLang dumps this one with exclude_none=True: null fields vanish.
        trimmed = {key: value for key, value in usage.items() if value is not None}
        return self._usage_head + orjson.dumps(trimmed) + b"}\n\n"

    def sglext_chunk(self, extension: dict) -> bytes:
        return _sglext_chunk(self._usage_head, extension)


def _sglext_chunk(usage_head: bytes, extension: dict) -> bytes:
    """The chunk that carries a stream's `sglext`, after every choice has
    finished and before the usage chunk: no choices, usage null."""
    return usage_head + b'null,"sglext":' + orjson.dumps(extension) + b"}\n\n"
