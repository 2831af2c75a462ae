"""aiohttp application: SGLang's HTTP endpoints plus the simulator's /sim/* hooks.

Handlers parse with `protocol`, hand a `GenerationRequest` to the engine and
write SGLang-shaped replies. Streaming details that matter to clients:
- OpenAI streams send their headers together with the first chunk, after
  the first token (SGLang kick-starts the generator so that validation errors
  can still be a 400 JSON answer); native `/generate` streams send headers
  at once, so errors found by the engine arrive as an SSE error event;
- chunks ready at the same moment (no inter-token delay) go out in one write.

Client disconnects cancel the handler (`handler_cancellation=True`); the
engine then records the request's rid as `disconnected`.

LoRA: `/load_lora_adapter` and `/unload_lora_adapter` reply
`{success, error_message, loaded_adapters}` with 200 or 400; loaded adapters
are listed in `/v1/models`. Slow start: /health and /ready answer 503 until
`--startup-delay-ms` (or a `startup_delay_ms` sent to /sim/faults) has passed.
Health: /health and /health_generate answer 200 after one poll of the engine
(`--health-poll-ms`, SGLang's one second), 503 once SGLANG_HEALTH_CHECK_TIMEOUT
has passed while the engine hangs (see `InfoHandlers.health`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timezone

import orjson
from aiohttp import web

from . import __version__ as SIM_VERSION
from .config import RuntimeSettings, ServerConfig
from .embedding import (
    embedding_response,
    embedding_vector,
    encode_output,
    parse_embedding_request,
    parse_encode_request,
)
from .data_parallel import DataParallel
from .engine import GenerationRequest, InjectedFailure, RequestRejected, RunningRequest, SimEngine, Step
from .sessions import SessionError, Sessions
from .lora import LoraError
from .tools import CallStream
from .metrics import SchedulerGauges, render_prometheus
from .protocol import (
    SSE_DONE,
    ApiError,
    ChatChunkWriter,
    CompletionChunkWriter,
    NativeRequest,
    OpenAIRequest,
    chat_response,
    choice_logprobs,
    choices_usage,
    completion_response,
    invalid_json_error,
    native_error,
    native_output,
    native_sse,
    native_stream_error_sse,
    new_rid,
    openai_error,
    openai_stream_error_sse,
    parse_chat_request,
    parse_completion_request,
    parse_generate_request,
    running_usage,
    sglext,
    unsupported_media_type_error,
    usage_object,
)
from .parse_endpoints import parse_function_call_response, separate_reasoning_response
from .reasoning import ReasoningSplitter
from .tokenizer import piece_of
from .tokenizing import detokenize_response, tokenize_response

logger = logging.getLogger("inference.sim")

# Version string SGLang reports; the simulator mimics this release.
SGLANG_VERSION = "0.5.23"

# Flush pending SSE chunks after this many even when more are ready, so a long
# zero-latency generation does not buffer its whole output.
MAX_COALESCED_CHUNKS = 64

ENGINE_KEY = web.AppKey("engine", SimEngine)
CONFIG_KEY = web.AppKey("config", ServerConfig)
STARTED_AT_KEY = web.AppKey("started_at", float)

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_CLIENT_GONE = (ConnectionResetError, ConnectionError)


def _step_logprobs(parsed: OpenAIRequest, index: int, step, first: bool, running: RunningRequest,
                   textless: bool = False) -> dict | None:
    """The logprobs a streamed chunk carries for choice `index`'s step: its
    token's (each of its tokens' that has text, for an event of several;
    with `textless`, also one that added no text, as the EOS), after (on a
    completion's first chunk) the echoed prompt's."""
    if parsed.top_logprobs is None and parsed.completion_logprobs is None:
        return None
    if step.tokens_from >= 0:
        steps = [(token_id, piece, position) for position, token_id in
                 enumerate(running.output_ids[step.tokens_from:step.completion_tokens], start=step.tokens_from)
                 if (piece := piece_of(token_id))]
    else:
        steps = [(step.token_id, step.delta_text or piece_of(step.token_id), step.completion_tokens - 1)] \
            if step.token_id is not None and (step.delta_text or textless) else []
    if not steps and not first:
        return None
    return choice_logprobs(parsed, index, steps, with_echo=first)


def _merged(held: list[Step], tokens_from: int, delta_text: str) -> Step:
    """One stream event of the steps `held` (the last decides its finish),
    with the text it adds."""
    last = held[-1]
    if len(held) == 1 and last.delta_text == delta_text:
        return last
    return replace(last, delta_text=delta_text, tokens_from=tokens_from)


def _may_become_stop(text: str, stops: tuple[str, ...]) -> bool:
    """The text ends with the start of a stop string (SGLang's
    check_match_stop_str_prefix): what it shows now may yet be trimmed."""
    return any(text.endswith(stop[:size]) for stop in stops if stop
               for size in range(1, min(len(stop), len(text)) + 1))


class _ChoiceChunks:
    """One choice's stream events, step by step, in SGLang's order: chat sends
    a role chunk first, then a chunk per token (with the choice's own usage
    under continuous_usage_stats, and its logprobs), then the finish chunk;
    completions send a chunk per step, the echoed prompt in the first."""

    __slots__ = ("_parsed", "_index", "_running", "_chat", "_echo", "_enable_cache_report", "_first", "_call",
                 "_reasoning", "_flush", "writer")

    def __init__(self, parsed: OpenAIRequest, index: int, running: RunningRequest, *, chat: bool, created: int,
                 enable_cache_report: bool, flush_logprobs: bool = False) -> None:
        self._parsed, self._index, self._running, self._chat = parsed, index, running, chat
        # A server with a reasoning or tool-call parser sends a step's logprobs
        # that no chunk carried (a tool call's, the EOS's) in a chunk of their
        # own, as SGLang's serving_chat does; without one they are dropped.
        self._flush = chat and flush_logprobs
        self._echo = None if chat else parsed.prompts()[index // parsed.n][1]
        self._enable_cache_report = enable_cache_report
        self._first = True
        # A tool call: its deltas replace the content ones (`tools.CallStream`).
        self._call = CallStream(parsed.tool_call, index) if chat and parsed.tool_call is not None else None
        # A reasoning model's think block: its deltas go out as reasoning_content.
        self._reasoning = ReasoningSplitter(parsed.reasoning_parser, stream=parsed.stream_reasoning) \
            if chat and parsed.reasoning_parser is not None else None
        writer_class = ChatChunkWriter if chat else CompletionChunkWriter
        self.writer = writer_class(rid=running.rid, model=parsed.model, created=created, index=index)

    def for_step(self, step: Step) -> list[bytes]:
        parsed, running, writer = self._parsed, self._running, self.writer
        first, self._first = self._first, False
        continuous = parsed.continuous_usage_stats
        if not self._chat:
            delta = step.delta_text
            if first and self._echo is not None:
                delta = self._echo + delta
            # Completions' continuous usage carries no cached-token details in SGLang.
            usage = usage_object(prompt_tokens=running.prompt_tokens, completion_tokens=step.completion_tokens,
                                 cached_tokens=0, enable_cache_report=False) if continuous else None
            # Every generated token's, the EOS's too: SGLang's serving_completions
            # sends whatever output logprobs a chunk has not sent yet.
            logprobs = _step_logprobs(parsed, self._index, step, first, running, textless=True)
            return [writer.text_chunk(delta, step.finish_reason, usage, logprobs)]
        out = [writer.role_chunk()] if first else []
        if self._call is not None:
            return out + self._tool_call_chunks(step)
        if self._reasoning is not None:
            return out + self._reasoning_chunks(step, step.delta_text)
        usage = running_usage(running, self._enable_cache_report, step.completion_tokens) if continuous else None
        if step.delta_text:
            out.append(writer.content_chunk(step.delta_text, usage, _step_logprobs(parsed, self._index, step, False, running)))
        elif self._flush and (logprobs := _step_logprobs(parsed, self._index, step, False, running, True)) is not None:
            out.append(writer.reasoning_chunk(None, usage, logprobs))
        if step.finish_reason is not None:
            out.append(writer.finish_chunk(step.finish_reason["type"], step.finish_reason.get("matched")))
        return out


    def _reasoning_chunks(self, step: Step, text: str, *, ends: bool = False) -> list[bytes]:
        """As SGLang streams through a reasoning parser: the step's `text` split
        into a reasoning and a content chunk (what the parser holds back, a
        possible tag, goes out later, or at the end of the reply or, with
        `ends`, of the text it parses); the step's logprobs on the first of
        them, else alone. Without a parser (`separate_reasoning` false), all
        of it is content."""
        running, writer = self._running, self.writer
        if self._reasoning is None:
            reasoning, content = "", text
        else:
            reasoning, content = self._reasoning.feed(text) if text else ("", "")
        finish = step.finish_reason
        if self._reasoning is not None and (ends or (finish is not None and finish["type"] != "abort")):
            rest_reasoning, rest_content = self._reasoning.finish()
            reasoning, content = reasoning + rest_reasoning, content + rest_content
        usage = (running_usage(running, self._enable_cache_report, step.completion_tokens)
                 if self._parsed.continuous_usage_stats else None)
        logprobs = _step_logprobs(self._parsed, self._index, step, False, running, self._flush)
        out = []
        if reasoning:
            out.append(writer.reasoning_chunk(reasoning, usage, logprobs))
            logprobs = None
        if content:
            out.append(writer.content_chunk(content, usage, logprobs))
            logprobs = None
        if logprobs is not None:
            out.append(writer.reasoning_chunk(None, usage, logprobs))
        if finish is not None:
            out.append(writer.finish_chunk(finish["type"], finish.get("matched")))
        return out

    def _tool_call_chunks(self, step: Step) -> list[bytes]:
        """A reply that calls a tool: what it writes before the call (a
        reasoning model's think block) streams as reasoning and content, as
        above; then the call's deltas, and the finish chunk."""
        running = self._running
        preamble = running.request.preamble or ""
        start = step.text_end - len(step.delta_text)
        out: list[bytes] = []
        if start < len(preamble):
            head = step.delta_text[:len(preamble) - start]
            if step.text_end <= len(preamble):  # all of this step is before the call
                return self._reasoning_chunks(step, head, ends=step.text_end == len(preamble))
            out += self._reasoning_chunks(replace(step, finish_reason=None), head, ends=True)
        usage = (running_usage(running, self._enable_cache_report, step.completion_tokens)
                 if self._parsed.continuous_usage_stats else None)
        out += [self.writer.tool_call_chunk(delta, usage)
                for delta in self._call.feed(running.text[len(preamble):step.text_end])]
        if start >= len(preamble) and (logprobs := _step_logprobs(
                self._parsed, self._index, step, False, running, True)) is not None:
            out.append(self.writer.reasoning_chunk(None, usage, logprobs))  # no call chunk carries them
        if step.finish_reason is not None:
            # A call that stopped naturally finishes as `tool_calls` (the matched stop stays).
            finish_type = step.finish_reason["type"]
            if finish_type == "stop" and running.text == preamble + self._parsed.tool_call.text:
                finish_type = "tool_calls"
            out.append(self.writer.finish_chunk(finish_type, step.finish_reason.get("matched")))
        return out


def _json(body, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _read_json_body(request: web.Request, *, require_json_content_type: bool):
    if require_json_content_type:
        media_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise unsupported_media_type_error()
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise invalid_json_error(error) from error


# ---------------------------------------------------------------- middleware

# Endpoints that --admin-api-key guards (SGLang's AuthLevel.ADMIN_OPTIONAL).
ADMIN_PATHS = ("/flush_cache", "/abort_request", "/load_lora_adapter", "/unload_lora_adapter",
               "/update_weights_from_disk", "/update_weight_version")


def _native_abort_error(error: dict) -> ApiError:
    """/generate's answer to a request the engine aborted with a status: SGLang
    raises ValueError for 400, answered {"error": {"message"}}, and an
    HTTPException for the others, answered in the flat error shape with type =
    the status code."""
    status = error["status_code"]
    if status == 400:
        return native_error(error["message"])
    return ApiError(status, {"object": "error", "message": error["message"], "type": str(status),
                             "param": None, "code": status})


def _auth_middleware(api_key: str | None, admin_api_key: str | None = None):
    """`--api-key` guards every endpoint but health, readiness and metrics. With
    `--admin-api-key`, the admin endpoints take that key (and only it); without
    it, they take the API key like the rest."""
    @web.middleware
    async def check_api_key(request: web.Request, handler):
        path = request.path
        # SGLang leaves health, readiness and metrics open; /sim/* are the
        # simulator's own test hooks and stay open too.
        if request.method == "OPTIONS" or path.startswith(("/health", "/ready", "/metrics", "/sim/")):
            return await handler(request)
        required = admin_api_key if admin_api_key is not None and path in ADMIN_PATHS else api_key
        if required is None:
            return await handler(request)
        authorization = request.headers.get("Authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), required.encode()):
            return _json({"error": "Unauthorized"}, status=401)
        return await handler(request)

    return check_api_key


@web.middleware
async def _debug_log_middleware(request: web.Request, handler):
    """Log every request and its status (installed with --log-level debug only)."""
    try:
        response = await handler(request)
    except web.HTTPException as error:  # e.g. 404 / 405 raised by the router
        logger.debug("%s %s -> %s", request.method, request.path_qs, error.status)
        raise
    logger.debug("%s %s -> %s", request.method, request.path_qs, response.status)
    return response


@web.middleware
async def _api_error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as error:
        return _json(error.body, status=error.status)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as error:
        # FastAPI's default bodies, as SGLang (a FastAPI app) sends them.
        return _json({"detail": error.reason}, status=error.status)


# ---------------------------------------------------------------- generation

class GenerationHandlers:
    def __init__(self, dp: DataParallel, config: ServerConfig) -> None:
        self.dp = dp
        self.engine = dp.ranks[0]  # embeddings and the adapters' names
        self.config = config
        self.sessions = Sessions(streaming_enabled=config.enable_streaming_session)

    async def open_session(self, request: web.Request) -> web.Response:
        """SGLang's /open_session: the new session's id, a JSON string."""
        try:
            return _json(self.sessions.open(await _read_json_body(request, require_json_content_type=False)))
        except SessionError as error:
            return _json({"error": {"message": str(error)}}, status=400)

    async def close_session(self, request: web.Request) -> web.Response:
        try:
            self.sessions.close(await _read_json_body(request, require_json_content_type=False))
        except SessionError as error:
            return _json({"error": {"message": str(error)}}, status=400)
        return web.Response(status=200)

    def _session_input(self, params, rid: str, input_ids: list[int]) -> list[int]:
        """A session request's whole input; the session requests it replaces are aborted."""
        plan = self.sessions.plan(params, rid=rid, input_ids=input_ids, output_so_far=self._output_so_far)
        for replaced in plan.abort_rids:
            self.dp.abort(rid=replaced, abort_all=False)
        return plan.input_ids

    def _output_so_far(self, rid: str) -> list[int]:
        running = next(filter(None, (engine.find_active(rid) for engine in self.dp.ranks)), None)
        return list(running.output_ids) if running is not None else []

    def _session_ended(self, parsed: NativeRequest, runnings: list[RunningRequest] | None) -> None:
        """What a session request ended with is what the session continues from."""
        if runnings:
            for running in runnings:
                reason = running.finish_reason or {}
                self.sessions.finished(running.rid, running.output_ids, completed=reason.get("type") != "abort")
        else:
            for generation in parsed.generations:
                self.sessions.finished(generation.rid, [], completed=False)

    async def _admit_openai(self, generation) -> RunningRequest:
        return await self._openai_answered(self.dp.admit(generation))

    async def _openai_answered(self, call):
        """Awaits an engine call; its refusals and injected failures become
        errors in the OpenAI routes' shape."""
        try:
            return await call
        except RequestRejected as error:
            self.dp.stats.requests_rejected += 1
            raise openai_error(error.message, error_type=error.error_type, status=error.status_code) from error
        except InjectedFailure as error:
            raise openai_error(f"Internal server error: {error}", error_type="InternalServerError",
                               status=500) from error

    def _generation_only(self, *, native: bool = False) -> None:
        if self.config.is_embedding:
            message = ("This model does not appear to be a generation model: it was launched with "
                       "`--is-embedding`; use /v1/embeddings.")
            raise native_error(message) if native else openai_error(message)

    # ---- OpenAI embeddings

    def _embedding_model(self, *, native: bool) -> dict:
        """The embedding model's shape, as the request parsers take it; refused
        on a generation model, in the route's error shape."""
        config = self.config
        if not config.is_embedding:
            message = ("This model does not appear to be an embedding model by default. Please add "
                       "`--is-embedding` when launching the server or try another model.")
            raise native_error(message) if native else openai_error(message)
        return {"dim": config.embedding_dim, "model_path": config.model_path, "is_matryoshka": config.is_matryoshka,
                "matryoshka_dimensions": config.matryoshka_dimensions}

    async def embeddings(self, request: web.Request) -> web.Response:
        config = self.config
        model = self._embedding_model(native=False)
        parsed = parse_embedding_request(await _read_json_body(request, require_json_content_type=True), **model)
        await self._openai_answered(self.engine.embed(parsed.inputs))
        seed = config.seed ^ self.dp.weights.seed
        vectors = [embedding_vector(ids, dim=config.embedding_dim, seed=seed, dimensions=parsed.dimensions)
                   for ids in parsed.inputs]
        return _json(embedding_response(vectors, model=config.model_path,
                                        prompt_tokens=sum(len(ids) for ids in parsed.inputs),
                                        encoding_format=parsed.encoding_format))

    async def encode(self, request: web.Request) -> web.Response:
        """SGLang's native POST /encode: the embedding of each prompt, with its meta_info."""
        config = self.config
        model = self._embedding_model(native=True)
        parsed = parse_encode_request(await _read_json_body(request, require_json_content_type=False), **model)
        started = time.perf_counter()
        try:
            await self.engine.embed(parsed.inputs)
        except (RequestRejected, InjectedFailure) as error:
            raise native_error(str(error), 500 if isinstance(error, InjectedFailure) else 400) from error
        latency = time.perf_counter() - started
        weights = self.dp.weights
        outputs = [encode_output(embedding_vector(ids, dim=config.embedding_dim, seed=config.seed ^ weights.seed,
                                                  dimensions=parsed.dimensions),
                                 rid=rid, prompt_tokens=len(ids), e2e_latency=latency,
                                 weight_version=weights.weight_version)
                   for ids, rid in zip(parsed.inputs, parsed.rids)]
        return _json(outputs[0] if parsed.single else outputs)

    @property
    def _parsers_configured(self) -> bool:
        """The server has a reasoning or tool-call parser (SGLang then sends a
        step's stray logprobs in a chunk of their own)."""
        return bool(self.config.reasoning_parser or self.config.tool_call_parser)

    def _openai_defaults(self, parsed: OpenAIRequest, request: web.Request) -> OpenAIRequest:
        """--stream-response-default-include-usage: a stream ends with its usage
        chunk whether or not the request asked (SGLang's should_include_usage);
        the X-SMG-Routing-Key header is the request's routing key, and an
        X-Data-Parallel-Rank header overrides the body's routed_dp_rank."""
        if self.config.stream_response_default_include_usage:
            parsed.include_usage = True
        parsed.generation.routing_key = request.headers.get("x-smg-routing-key")
        rank = request.headers.get("x-data-parallel-rank")
        if rank is not None:
            try:
                parsed.generation.routed_dp_rank = int(rank)
            except ValueError:
                # SGLang's HTTPException, in its flat error shape (type: the status).
                raise ApiError(400, {"object": "error", "type": "400", "param": None, "code": 400,
                                     "message": "Invalid X-Data-Parallel-Rank header: must be an integer, "
                                                f"got '{rank}'"}) from None
        return parsed

    # ---- OpenAI chat

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._generation_only()
        await self.dp.weights.admission()  # behind a pending weight update
        parsed = self._openai_defaults(parse_chat_request(
            await _read_json_body(request, require_json_content_type=True),
            served_model_name=self.config.served_model_name, tool_call_parser=self.config.tool_call_parser,
            reasoning_parser=self.config.reasoning_parser), request)
        max_tokens, context_length = parsed.generation.max_new_tokens, self.config.context_length
        if max_tokens and max_tokens > context_length and not self.config.allow_auto_truncate:
            # serving_chat's own check, before the prompt is counted (its wording, space missing).
            raise openai_error(f"max_completion_tokens is too large: {max_tokens}."
                               f"This model supports at most {context_length} completion tokens.")
        if not parsed.single:
            return await self._choices(request, parsed, chat=True)
        running = await self._admit_openai(parsed.generation)
        try:
            if not parsed.generation.stream:
                return await self._openai_unary(parsed, [running], chat_response)
            return await self._stream_one(request, parsed, running, chat=True)
        finally:
            running.engine.finalize(running)

    async def _collect(self, running: RunningRequest) -> tuple[list[tuple[int, str, int]], dict | None]:
        """Runs a request to its end: its tokens as (id, text, position), for
        logprobs, and its error if it failed. Every output token is there, as
        SGLang's whole replies list them: a matched stop token and the EOS
        too, with the text of their id (a special token's name)."""
        error = None
        tokens: list[tuple[int, str, int]] = []
        async with contextlib.aclosing(running.engine.run(running)) as steps:
            async for step in steps:
                if step.error is not None:
                    error = step.error
                elif step.token_id is not None:
                    tokens.append((step.token_id, step.delta_text or piece_of(step.token_id),
                                   step.completion_tokens - 1))
        return tokens, error

    async def _openai_unary(self, parsed: OpenAIRequest, runnings: list[RunningRequest], build) -> web.Response:
        if len(runnings) == 1:
            results = [await self._collect(runnings[0])]
        else:
            results = await asyncio.gather(*(self._collect(running) for running in runnings))
        for _, error in results:
            if error is not None:
                # SGLang raises ValueError for an abort with status 400, which the
                # OpenAI layer answers as its own 400s, and HTTPException(status)
                # for the others, answered in the flat shape with type = the code.
                status = error["status_code"]
                raise openai_error(error["message"], error_type="BadRequestError" if status == 400 else str(status),
                                   status=status)
        logprobs = None
        if parsed.top_logprobs is not None or parsed.completion_logprobs is not None:
            logprobs = [choice_logprobs(parsed, index, tokens) for index, (tokens, _) in enumerate(results)]
        return _json(build(parsed, runnings, enable_cache_report=self.config.enable_cache_report, logprobs=logprobs))

    # ---- several choices: n > 1, or a batch of completion prompts

    async def _choices(self, request: web.Request, parsed: OpenAIRequest, *, chat: bool) -> web.StreamResponse:
        runnings = await self._start_choices(parsed)
        try:
            if not parsed.generation.stream:
                return await self._openai_unary(parsed, runnings, chat_response if chat else completion_response)
            return await self._stream_choices(request, parsed, runnings, chat=chat)
        finally:
            for running in runnings:
                running.engine.finalize(running)

    async def _start_choices(self, parsed: OpenAIRequest) -> list[RunningRequest]:
        template = parsed.generation
        generations = [replace(template, rid=rid, prompt_ids=prompt_ids)
                       for (prompt_ids, _), rid in zip(parsed.prompts(), parsed.prompt_rids)]
        return await self._start_samples(generations, parsed.n, [parsed.greedy] * len(generations),
                                         self._admit_openai, parsed.sample_generation)

    async def _start_samples(self, generations: list[GenerationRequest], n: int, greedy: list[bool],
                             admit, vary=None) -> list[RunningRequest]:
        """One engine request per choice, prompt by prompt, as SGLang's
        tokenizer manager sends a batch: with n > 1 each prompt first runs
        alone with max_new_tokens 0, so that its n samples find it cached, and
        every sample gets a fresh rid; without, each prompt's request takes
        the rid the batch gave it. `admit` answers refusals in the route's
        error shape; `vary(generation, sample)`, if given, makes a sample's
        own request (`OpenAIRequest.sample_generation`)."""
        runnings: list[RunningRequest] = []
        try:
            if n == 1:
                for generation in generations:
                    runnings.append(await admit(generation))
                return runnings
            for generation in generations:
                await self._collect(await admit(
                    replace(generation, rid=new_rid(), max_new_tokens=0, stream=False)))
            for generation, same in zip(generations, greedy):
                for sample in range(n):
                    sample = 0 if same else sample
                    varied = vary(generation, sample) if vary is not None else generation
                    runnings.append(await admit(replace(varied, rid=new_rid(), sample=sample)))
            return runnings
        except BaseException:
            for running in runnings:
                running.engine.finalize(running)
            raise

    async def _stream_choices(self, request: web.Request, parsed: OpenAIRequest, runnings: list[RunningRequest],
                              *, chat: bool) -> web.StreamResponse:
        """Every choice's chunks as its tokens come, each with its index (and its
        request's rid, as SGLang sends them); continuous usage counts the
        choice's own tokens, the final usage chunk all of them."""
        created = int(time.time())
        choices = [_ChoiceChunks(parsed, index, running, chat=chat, created=created,
                                 enable_cache_report=self.config.enable_cache_report,
                                 flush_logprobs=self._parsers_configured)
                   for index, running in enumerate(runnings)]

        response: web.StreamResponse | None = None
        pending: list[bytes] = []
        try:
            async with contextlib.aclosing(self._interleaved(runnings)) as steps:
                async for index, step, more_ready in steps:
                    if step.error is not None:
                        pending.append(openai_stream_error_sse(step.error["message"], step.error["status_code"]))
                        break
                    pending.extend(choices[index].for_step(step))
                    if not more_ready or len(pending) >= MAX_COALESCED_CHUNKS:
                        response = await self._flush_sse(request, response, pending)
                else:
                    if (extension := sglext(parsed, runnings)) is not None:
                        pending.append(choices[0].writer.sglext_chunk(extension))
            if parsed.include_usage:
                pending.append(choices[0].writer.usage_chunk(
                    choices_usage(runnings, parsed.n, self.config.enable_cache_report)))
            pending.append(SSE_DONE)
            response = await self._finish_sse(request, response, pending)
        except _CLIENT_GONE:
            for running in runnings:
                running.engine.mark_disconnected(running)
        return response if response is not None else web.Response(status=499)

    def _streamed(self, running: RunningRequest) -> AsyncIterator[Step]:
        """A streamed request's events, as SGLang's scheduler hands them on:
        the first token at once, then whenever `stream_interval` tokens (the
        request's, else --stream-interval) are unsent, and at the finish; an
        event of several tokens is one Step (`tokens_from`). While the text
        ends with the start of a stop string nothing is sent, so a stop string
        trimmed at the finish never shows in the stream. A failure ends the
        stream without the tokens not yet sent. (Every step as it comes, from
        the engine itself, when there is nothing to hold.)"""
        interval = running.request.stream_interval or self.config.stream_interval
        stops = running.request.stop
        if interval <= 1 and not stops:
            return running.engine.run(running)
        return self._held_back(running, interval, stops)

    async def _held_back(self, running: RunningRequest, interval: int, stops: tuple[str, ...]) -> AsyncIterator[Step]:
        async with contextlib.aclosing(running.engine.run(running)) as steps:
            held: list[Step] = []
            sent = 0  # output tokens sent
            seen, sent_text = "", 0  # the text as the steps wrote it, and how much of it was sent
            async for step in steps:
                if step.error is not None:
                    yield step
                    return
                held.append(step)
                seen += step.delta_text
                count = step.completion_tokens
                if step.finish_reason is not None:
                    # The finish trims a matched stop string: the rest of the final text.
                    yield _merged(held, sent, running.text[sent_text:step.text_end])
                    return
                if (interval <= 1 or count - sent >= interval or (sent == 0 and count > 0)) \
                        and not (stops and _may_become_stop(seen, stops)):
                    yield _merged(held, sent, seen[sent_text:])
                    held, sent, sent_text = [], count, len(seen)

    async def _interleaved(self, runnings: list[RunningRequest]) -> AsyncIterator[tuple[int, Step, bool]]:
        """Every request's steps as they come: (its index, the step, whether
        another step is already waiting), until every request has ended."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, running: RunningRequest) -> None:
            try:
                async with contextlib.aclosing(self._streamed(running)) as steps:
                    async for step in steps:
                        queue.put_nowait((index, step))
            finally:
                queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(index, running)) for index, running in enumerate(runnings)]
        try:
            open_requests = len(tasks)
            while open_requests:
                index, step = await queue.get()
                if step is None:
                    open_requests -= 1
                else:
                    yield index, step, not queue.empty()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_one(self, request: web.Request, parsed: OpenAIRequest, running: RunningRequest,
                          *, chat: bool) -> web.StreamResponse:
        """One choice's stream (`_ChoiceChunks`); steps ready at once go out
        in one write, the last with the usage chunk and [DONE]."""
        choice = _ChoiceChunks(parsed, 0, running, chat=chat, created=int(time.time()),
                               enable_cache_report=self.config.enable_cache_report,
                               flush_logprobs=self._parsers_configured)
        response: web.StreamResponse | None = None
        pending: list[bytes] = []
        try:
            async with contextlib.aclosing(self._streamed(running)) as steps:
                async for step in steps:
                    if step.error is not None:
                        pending.append(openai_stream_error_sse(step.error["message"], step.error["status_code"]))
                        break
                    pending.extend(choice.for_step(step))
                    if step.finish_reason is None and (not step.more_ready or len(pending) >= MAX_COALESCED_CHUNKS):
                        response = await self._flush_sse(request, response, pending)
                else:
                    if (extension := sglext(parsed, [running])) is not None:
                        pending.append(choice.writer.sglext_chunk(extension))
            if parsed.include_usage:
                pending.append(choice.writer.usage_chunk(running_usage(running, self.config.enable_cache_report)))
            pending.append(SSE_DONE)
            response = await self._finish_sse(request, response, pending)
        except _CLIENT_GONE:
            running.engine.mark_disconnected(running)
        return response if response is not None else web.Response(status=499)

    async def _finish_sse(self, request: web.Request, response: web.StreamResponse | None,
                          pending: list[bytes]) -> web.StreamResponse:
        """Send the remaining chunks and end the body in one go."""
        if response is None:
            response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
            await response.prepare(request)
        await response.write_eof(b"".join(pending))
        pending.clear()
        return response

    async def _flush_sse(self, request: web.Request, response: web.StreamResponse | None,
                         pending: list[bytes]) -> web.StreamResponse:
        if response is None:
            response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
            await response.prepare(request)
        if pending:
            await response.write(b"".join(pending))
            pending.clear()
        return response

    # ---- OpenAI completions

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._generation_only()
        await self.dp.weights.admission()  # behind a pending weight update
        parsed = self._openai_defaults(parse_completion_request(
            await _read_json_body(request, require_json_content_type=True),
            served_model_name=self.config.served_model_name), request)
        if not parsed.single:
            return await self._choices(request, parsed, chat=False)
        running = await self._admit_openai(parsed.generation)
        try:
            if not parsed.generation.stream:
                return await self._openai_unary(parsed, [running], completion_response)
            return await self._stream_one(request, parsed, running, chat=False)
        finally:
            running.engine.finalize(running)

    # ---- native /generate

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self._generation_only(native=True)
        await self.dp.weights.admission()  # behind a pending weight update
        parsed = parse_generate_request(await _read_json_body(request, require_json_content_type=False),
                                        reasoning_parser=self.config.reasoning_parser,
                                        skip_tokenizer_init=self.config.skip_tokenizer_init,
                                        session_input=self._session_input)
        if not parsed.in_session:
            return await self._generate(request, parsed)
        try:
            return await self._generate(request, parsed)
        finally:
            self._session_ended(parsed, parsed.runnings)

    async def _generate(self, request: web.Request, parsed: NativeRequest) -> web.StreamResponse:
        if not parsed.stream:
            runnings = parsed.runnings = await self._start_native(parsed)
            try:
                if parsed.single:
                    return await self._generate_unary(runnings[0])
                return await self._generate_batch_unary(runnings)
            finally:
                for running in runnings:
                    running.engine.finalize(running)

        # SGLang starts the SSE response before the engine validates the
        # request, so a rejection arrives as an SSE error event; injected
        # failures are still answered (500) before any byte.
        try:
            runnings = parsed.runnings = await self._start_native(parsed)
        except ApiError as error:
            if error.status == 500:
                raise
            response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
            await response.prepare(request)
            await response.write(native_stream_error_sse(error.body["error"]["message"], error.status) + SSE_DONE)
            await response.write_eof()
            return response
        try:
            if parsed.single:
                return await self._generate_stream(request, runnings[0])
            return await self._generate_batch_stream(request, runnings)
        finally:
            for running in runnings:
                running.engine.finalize(running)

    async def _start_native(self, parsed: NativeRequest) -> list[RunningRequest]:
        if parsed.refusal is not None:
            raise native_error(parsed.refusal, 400)
        if parsed.single:
            return [await self._admit_native(parsed.generations[0])]
        if len(parsed.generations) > 1:  # a batch's adapters are resolved together, before any prompt
            try:
                names = [generation.lora_path for generation in parsed.generations]
                await asyncio.gather(*(engine.lora.resolve_batch(names) for engine in self.dp.ranks))
            except LoraError as error:
                self.dp.stats.requests_rejected += 1
                raise native_error(error.message, 400) from error
        return await self._start_samples(parsed.generations, parsed.n, parsed.greedy, self._admit_native)

    async def _generate_batch_unary(self, runnings: list[RunningRequest]) -> web.Response:
        """A batch (or n > 1): the list of every request's output, in order."""
        results = await asyncio.gather(*(self._collect(running) for running in runnings))
        for _, error in results:
            if error is not None:
                raise _native_abort_error(error)
        return _json([native_output(running, final=True) for running in runnings])

    async def _generate_batch_stream(self, request: web.Request, runnings: list[RunningRequest]) -> web.StreamResponse:
        """A batch streamed: every request's cumulative outputs as they come,
        each with `index`, its place in the batch (prompt by prompt, then
        sample), as SGLang's tokenizer manager interleaves them."""
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        pending: list[bytes] = []
        # --incremental-streaming-output: each event carries only what is new.
        sent = [0] * len(runnings) if self.config.incremental_streaming_output else None
        try:
            await response.prepare(request)
            async with contextlib.aclosing(self._interleaved(runnings)) as steps:
                async for index, step, more_ready in steps:
                    if step.error is not None:
                        pending.append(native_stream_error_sse(step.error["message"], step.error["status_code"]))
                        break
                    pending.append(native_sse(runnings[index], final=step.finish_reason is not None, step=step,
                                              index=index, since=sent[index] if sent is not None else None))
                    if sent is not None:
                        sent[index] = step.completion_tokens
                    if not more_ready or len(pending) >= MAX_COALESCED_CHUNKS:
                        await response.write(b"".join(pending))
                        pending.clear()
            pending.append(SSE_DONE)
            await response.write_eof(b"".join(pending))
        except _CLIENT_GONE:
            for running in runnings:
                running.engine.mark_disconnected(running)
        return response

    async def _generate_unary(self, running: RunningRequest) -> web.Response:
        error = None
        async with contextlib.aclosing(running.engine.run(running)) as steps:
            async for step in steps:
                if step.error is not None:
                    error = step.error
        if error is not None:
            raise _native_abort_error(error)
        return _json(native_output(running, final=True))

    async def _generate_stream(self, request: web.Request, running: RunningRequest) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        pending: list[bytes] = []
        incremental = self.config.incremental_streaming_output
        sent = 0
        try:
            await response.prepare(request)
            async with contextlib.aclosing(self._streamed(running)) as steps:
                async for step in steps:
                    if step.error is not None:
                        pending.append(native_stream_error_sse(step.error["message"], step.error["status_code"]))
                        break
                    final = step.finish_reason is not None
                    pending.append(native_sse(running, final=final, step=step, since=sent if incremental else None))
                    sent = step.completion_tokens
                    if not final and (not step.more_ready or len(pending) >= MAX_COALESCED_CHUNKS):
                        await response.write(b"".join(pending))
                        pending.clear()
            pending.append(SSE_DONE)
            await response.write_eof(b"".join(pending))
        except _CLIENT_GONE:
            running.engine.mark_disconnected(running)
        return response

    async def _admit_native(self, generation) -> RunningRequest:
        try:
            return await self.dp.admit(generation)
        except RequestRejected as error:
            self.dp.stats.requests_rejected += 1
            raise native_error(error.message, error.status_code) from error
        except InjectedFailure as error:
            raise native_error(f"Internal server error: {error}", 500) from error


# ---------------------------------------------------------------- info / control

class InfoHandlers:
    def __init__(self, dp: DataParallel, config: ServerConfig, started_at: float) -> None:
        self.dp = dp
        engine = self.engine = dp.ranks[0]  # settings and timing are the server's; adapters' names
        self.config = config
        self.started_at = started_at
        # time.monotonic() after which /health answers 200 (slow start)
        self.ready_at = time.monotonic() + engine.timing.wall_s(config.startup_delay_ms / 1e3)

    def _serving(self) -> bool:
        return not self.engine.settings.unhealthy and time.monotonic() >= self.ready_at

    async def health(self, request: web.Request) -> web.Response:
        """SGLang's health check: 503 while starting (or with the `unhealthy`
        fault); else it sends the engine a one-token generation and looks every
        second whether the engine has answered anything since, giving up with
        503 after SGLANG_HEALTH_CHECK_TIMEOUT. An engine that is not hung always
        answers, so the simulator waits one poll and reads the `hang` fault
        (the probe itself does not enter the batch or the statistics).
        SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false: /health answers at once."""
        if not self._serving():
            return web.Response(status=503)
        config = self.config
        if request.path == "/health" and not config.health_generation:
            return web.Response(status=200)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.health_check_timeout_s
        poll_s = max(config.health_poll_ms / 1e3, 0.001)  # a 0 poll must not spin while hung
        while loop.time() < deadline:
            await asyncio.sleep(poll_s)
            if not self.engine.settings.hang:
                return web.Response(status=200)
        logger.error("Health check failed: no answer from the engine in %.1f s", config.health_check_timeout_s)
        return web.Response(status=503)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._serving() else 503)

    def _model_card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": int(self.started_at), "owned_by": "sglang",
                "root": model_id, "parent": None, "max_model_len": self.config.context_length}

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _read_json_body(request, require_json_content_type=True)
        return _json(tokenize_response(body, context_length=self.config.context_length))

    async def detokenize(self, request: web.Request) -> web.Response:
        return _json(detokenize_response(await _read_json_body(request, require_json_content_type=True)))

    async def separate_reasoning(self, request: web.Request) -> web.Response:
        return _json(separate_reasoning_response(await _read_json_body(request, require_json_content_type=False)))

    async def parse_function_call(self, request: web.Request) -> web.Response:
        return _json(parse_function_call_response(await _read_json_body(request, require_json_content_type=False)))

    async def list_models(self, request: web.Request) -> web.Response:
        served = self.dp.weights.served_model_name
        cards = [self._model_card(served)]
        for adapter in self.engine.lora.loaded():
            cards.append({"id": adapter.name, "object": "model", "created": int(self.started_at),
                          "owned_by": "sglang", "root": adapter.path, "parent": served,
                          "max_model_len": None})
        return _json({"object": "list", "data": cards})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model != self.dp.weights.served_model_name:
            return _json({"error": {"message": f"The model '{model}' does not exist",
                                    "type": "invalid_request_error", "param": "model",
                                    "code": "model_not_found"}}, status=404)
        return _json(self._model_card(model))

    async def model_info(self, request: web.Request) -> web.Response:
        config = self.config
        weights = self.dp.weights
        return _json({
            "model_path": weights.model_path,
            "served_model_name": weights.served_model_name,
            "tokenizer_path": config.model_path,
            "is_generation": not config.is_embedding,
            "preferred_sampling_params": None,
            "weight_version": weights.weight_version,
            "load_format": weights.load_format,
            "reasoning_parser": self.config.reasoning_parser,
            "tool_call_parser": self.config.tool_call_parser,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "sglang_sim",
            "architectures": ["SGLangSimulatorForCausalLM"],
        })

    def _server_args(self) -> dict:
        config = self.config
        weights = self.dp.weights
        return {
            "model_path": weights.model_path,
            "tokenizer_path": config.model_path,
            "served_model_name": weights.served_model_name,
            "host": config.host,
            "port": config.port,
            "context_length": config.context_length,
            "enable_cache_report": config.enable_cache_report,
            "api_key": None,  # never echoed
            "max_running_requests": config.max_running_requests,
            "max_total_tokens": config.max_total_tokens,
            "chunked_prefill_size": config.chunked_prefill_size,
            "page_size": config.page_size,
            "disable_radix_cache": config.disable_radix_cache,
            "radix_eviction_policy": config.radix_eviction_policy,
            "radix_eviction_policy_config": config.radix_eviction_policy_config,
            "enable_streaming_session": config.enable_streaming_session,
            "enable_hierarchical_cache": config.enable_hierarchical_cache,
            "hicache_ratio": config.hicache_ratio,
            "hicache_size": config.hicache_size,
            "hicache_write_policy": config.hicache_write_policy,
            "hicache_io_backend": config.hicache_io_backend,
            "hicache_mem_layout": config.hicache_mem_layout,
            "hicache_storage_backend": None,
            "schedule_policy": config.schedule_policy,
            "enable_priority_scheduling": config.enable_priority_scheduling,
            "disable_priority_preemption": config.disable_priority_preemption,
            "default_priority_value": config.default_priority_value,
            "abort_on_priority_when_disabled": config.abort_on_priority_when_disabled,
            "schedule_low_priority_values_first": config.schedule_low_priority_values_first,
            "priority_scheduling_preemption_threshold": config.priority_scheduling_preemption_threshold,
            "retraction_policy": config.retraction_policy,
            "max_queued_requests": config.max_queued_requests,
            "schedule_conservativeness": config.schedule_conservativeness,
            "enable_mixed_chunk": False,
            "stream_interval": config.stream_interval,
            "incremental_streaming_output": config.incremental_streaming_output,
            "stream_response_default_include_usage": config.stream_response_default_include_usage,
            "tp_size": 1,
            "dp_size": config.dp_size,
            "pp_size": 1,
            "load_balance_method": config.load_balance_method,
            "disaggregation_mode": "null",
            "enable_lora": config.enable_lora,
            "lora_paths": [dict(entry) for entry in config.lora_paths] or None,
            "max_loras_per_batch": config.max_loras_per_batch,
            "max_loaded_loras": config.max_loaded_loras,
            "lora_eviction_policy": config.lora_eviction_policy,
            "max_lora_rank": config.max_lora_rank,
            "lora_target_modules": list(config.lora_target_modules) if config.lora_target_modules else None,
            "lora_backend": config.lora_backend,
            "max_lora_chunk_size": config.max_lora_chunk_size,
            "enable_lora_overlap_loading": config.enable_lora_overlap_loading,
            "enable_metrics": True,
            "is_embedding": config.is_embedding,
            "tool_call_parser": config.tool_call_parser,
            "reasoning_parser": config.reasoning_parser,
            "skip_tokenizer_init": config.skip_tokenizer_init,
            "weight_version": weights.weight_version,
            "random_seed": config.seed,
            # Launch flags about hardware and kernels, as given (no effect here).
            **config.hardware_flags,
            "load_format": weights.load_format,  # the launch's, until a weight update gives another
        }

    async def server_info(self, request: web.Request) -> web.Response:
        engine = self.engine
        config = self.config
        return _json({
            **self._server_args(),
            # The scheduler's init info, merged in at the top level as SGLang's build_server_info does.
            "status": "ready",
            "max_total_num_tokens": engine.capacity_tokens,
            "max_req_input_len": engine.max_req_len - 5,
            "startup_time": self.started_at,
            "internal_states": [{
                "last_gen_throughput": round(rank.gen_throughput(), 2),
                "num_running_reqs": rank.num_running_requests,
                "num_waiting_reqs": rank.num_waiting_requests,
                "max_total_num_tokens": config.max_total_tokens,
                "effective_max_running_requests_per_dp": config.max_running_requests,
            } for rank in self.dp.ranks],
            "version": SGLANG_VERSION,
            "frontend": "python",
            "simulator": {
                "name": "inference.sim", "version": SIM_VERSION, "preset": config.preset,
                "prefill_tokens_per_s": config.prefill_tokens_per_s, "decode_base_ms": config.decode_base_ms,
                "decode_per_request_ms": config.decode_per_request_ms, "time_scale": config.time_scale,
                "lora_load_ms": config.lora_load_ms,
            },
        })

    def _load_core(self, engine: SimEngine) -> dict:
        running_tokens = engine.running_tokens()
        return {
            "timestamp": time.time(),
            "dp_rank": engine.dp_rank,
            "num_running_reqs": engine.num_running_requests,
            "num_waiting_reqs": engine.num_waiting_requests,
            "num_waiting_uncached_tokens": engine.waiting_uncached_tokens(),
            "num_used_tokens": engine.used_tokens(),
            "num_total_tokens": running_tokens,
            "num_active_tokens": running_tokens,
            "num_prealloc_ready_tokens": 0,
            "max_total_num_tokens": self.config.max_total_tokens,
            "max_running_requests": self.config.max_running_requests,
            "token_usage": round(engine.token_usage(), 4),
            "gen_throughput": round(engine.gen_throughput(), 2),
            "cache_hit_rate": round(engine.cache_hit_rate(), 4),
            "utilization": round(engine.num_running_requests / max(1, self.config.max_running_requests), 4),
            "total_prefill_uncached_tokens": engine.prompt_tokens_total - engine.cached_tokens_total,
            "total_prefill_busy_us": 0,
            "decode_moments": None,
        }

    async def get_load(self, request: web.Request) -> web.Response:
        """Pre-0.5.23 shape: one dict per DP rank (what sglang-router polls)."""
        return _json([{"dp_rank": engine.dp_rank,
                       "num_reqs": engine.num_running_requests + engine.num_waiting_requests,
                       "num_waiting_reqs": engine.num_waiting_requests, "num_tokens": engine.running_tokens(),
                       "token_usage": round(engine.token_usage(), 4)} for engine in self.dp.ranks])

    async def v1_loads(self, request: web.Request) -> web.Response:
        valid_sections = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}
        include = request.query.get("include")
        include_set = {item.strip() for item in include.split(",")} if include else None
        if include_set is not None and not include_set <= valid_sections:
            return _json({"object": "error", "type": "400", "param": None, "code": 400,
                          "message": f"Invalid include sections: {include_set - valid_sections}. "
                                     f"Valid options: {sorted(valid_sections)}"}, status=400)
        dp_rank = request.query.get("dp_rank")
        loads = []
        for engine in self.dp.ranks:
            if dp_rank is not None and dp_rank != str(engine.dp_rank):
                continue  # the tokenizer manager's filter: a rank it does not have gives []
            load = self._load_core(engine)
            if include_set is None or "all" in include_set or "memory" in include_set:
                load["memory"] = {"weight_gb": 0.0, "kv_cache_gb": 0.0, "graph_gb": 0.0,
                                  "token_capacity": self.config.max_total_tokens}
            if include_set is None or "all" in include_set or "queues" in include_set:
                load["queues"] = {"waiting": engine.num_waiting_requests, "grammar": 0, "paused": 0,
                                  "retracted": engine.last_retracted, "prealloc_ready": 0}
            if self.config.enable_lora and (include_set is None or "all" in include_set or "lora" in include_set):
                load["lora"] = {"loaded_adapters": len(engine.lora.loaded()),
                                "max_loaded_loras": self.config.max_loaded_loras,
                                "max_loras_per_batch": self.config.max_loras_per_batch}
            loads.append(load)
        if request.query.get("format") == "prometheus":
            lines = []
            for entry in loads:
                for key, value in entry.items():
                    samples = value.items() if isinstance(value, dict) else [(None, value)]
                    prefix = {"queues": "queues", "memory": "memory"}.get(key, key)
                    for sub_key, sub_value in samples:
                        if isinstance(sub_value, bool) or not isinstance(sub_value, (int, float)) or key == "dp_rank":
                            continue
                        name = f"sglang_{prefix}_{sub_key}" if sub_key else f"sglang_{key}"
                        lines.append(f"# TYPE {name} gauge")
                        lines.append(f'{name}{{dp_rank="{entry["dp_rank"]}"}} {sub_value}')
            return web.Response(text="\n".join(lines) + "\n", content_type="text/plain",
                                headers={"X-Content-Type-Version": "0.0.4"})
        return _json({"timestamp": datetime.now(timezone.utc).isoformat(), "version": SGLANG_VERSION,
                      "accelerator": None, "num_accelerators": len(self.dp.ranks), "loads": loads})

    async def metrics(self, request: web.Request) -> web.Response:
        config = self.config
        several = len(self.dp.ranks) > 1
        text = render_prometheus(stats=self.dp.stats, model_name=config.served_model_name, schedulers=[
            SchedulerGauges(
                dp_rank=engine.dp_rank if several else None,
                num_running_reqs=engine.num_running_requests, num_queue_reqs=engine.num_waiting_requests,
                token_usage=engine.token_usage(), cache_hit_rate=engine.cache_hit_rate(),
                gen_throughput=engine.gen_throughput(), kv_tokens=engine.kv_token_counts(),
                lora_slots=(engine.lora_slots_used(), config.max_loras_per_batch) if config.enable_lora else None,
                evicted_tokens=engine.cache.evicted_tokens_total, num_retracted_reqs=engine.last_retracted,
                queues_by_priority=engine.queues_by_priority(),
                hicache_host_tokens=((engine.cache.host_tokens, engine.cache.host_capacity_tokens)
                                     if engine.cache.hierarchical else None),
                hicache_counters=engine.cache.hicache_counters() if engine.cache.hierarchical else None)
            for engine in self.dp.ranks])
        # prometheus_client's CONTENT_TYPE_LATEST for the text format, as SGLang sends it.
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self.dp.flush_cache():
            return web.Response(text=(
                "Cache flushed.\nPlease check backend logs for more details. "
                "(When there are running or waiting requests, the operation will not be performed.)\n"))
        return web.Response(text="Flush cache failed.\n", status=400)

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await _read_json_body(request, require_json_content_type=False) if request.can_read_body else {}
        if not isinstance(body, dict):
            return _json({"error": {"message": "Request body must be a JSON object."}}, status=400)
        rid = body.get("rid") or ""
        abort_all = bool(body.get("abort_all", False))
        if not isinstance(rid, str):
            return _json({"error": {"message": "rid must be a string."}}, status=400)
        self.dp.abort(rid=rid, abort_all=abort_all)
        return web.Response(status=200)

    # ---- LoRA

    async def _lora_body(self, request: web.Request, *fields_needed: str) -> dict:
        body = await _read_json_body(request, require_json_content_type=False)
        if not isinstance(body, dict):
            raise ApiError(400, {"error": "body: Input should be a valid dictionary"})
        for name in fields_needed:
            if not isinstance(body.get(name), str) or not body.get(name):
                raise ApiError(400, {"error": f"{name}: Field required (a non-empty string)"})
        if "pinned" in body and not isinstance(body["pinned"], bool):
            raise ApiError(400, {"error": "pinned: Input should be a valid boolean"})
        return body

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._lora_body(request, "lora_name", "lora_path")
        registry = self.engine.lora
        try:
            # Every data-parallel rank loads it (the tokenizer manager broadcasts); rank 0 answers.
            loaded, *_ = await asyncio.gather(*(
                engine.lora.load(name=body["lora_name"], path=body["lora_path"], pinned=body.get("pinned", False))
                for engine in self.dp.ranks))
        except LoraError as error:
            return _json(_lora_result(False, error.message,
                                      registry.loaded_adapters() if error.loaded_adapters_known else None), 400)
        return _json(_lora_result(True, "", loaded))

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._lora_body(request, "lora_name")
        registry = self.engine.lora
        try:
            loaded, *_ = await asyncio.gather(*(engine.lora.unload(name=body["lora_name"])
                                                for engine in self.dp.ranks))
        except LoraError as error:
            return _json(_lora_result(False, error.message,
                                      registry.loaded_adapters() if error.loaded_adapters_known else None), 400)
        return _json(_lora_result(True, "", loaded))

    # ---- weights

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        """SGLang's in-place weight update (see `weights`): waits for the requests
        in flight, holding new ones back; loads `model_path` or fails with the
        loader's message; flushes every rank's prefix cache (unless
        `flush_cache` is false). Several data-parallel ranks answer together:
        their messages joined by " | ", `num_paused_requests` a list."""
        body = await _read_json_body(request, require_json_content_type=False)
        if not isinstance(body, dict) or not isinstance(body.get("model_path"), str):
            raise ApiError(400, {"object": "error", "message": "model_path: Field required (a string)",
                                 "type": "Bad Request", "param": None, "code": 400})
        weights, dp = self.dp.weights, self.dp
        if body.get("abort_all_requests"):
            dp.abort(rid="", abort_all=True)
        weights.begin_update()
        try:
            while dp.active_requests:
                await asyncio.sleep(0.005)
            path = body["model_path"]
            if not weights.loadable(path):
                success, message = False, f"Failed to get weights iterator: Cannot find any model weights with `{path}`."
            else:
                weights.load(path, body.get("load_format"))
                if body.get("flush_cache", True):
                    dp.flush_cache()
                success, message = True, "Succeeded to update model weights."
        finally:
            weights.end_update()
        ranks = len(dp.ranks)
        if ranks > 1:
            message = " | ".join([message] * ranks)
        version = body.get("weight_version")
        if success and isinstance(version, str):
            weights.weight_version = version
            message += f" Weight version updated to {version}."
        return _json({"success": success, "message": message, "num_paused_requests": [0] * ranks if ranks > 1 else 0},
                     status=200 if success else 400)

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await _read_json_body(request, require_json_content_type=False)
        if not isinstance(body, dict) or not isinstance(body.get("new_version"), str):
            raise ApiError(400, {"object": "error", "message": "new_version: Field required (a string)",
                                 "type": "Bad Request", "param": None, "code": 400})
        if body.get("abort_all_requests", True):
            self.dp.abort(rid="", abort_all=True)
        version = self.dp.weights.weight_version = body["new_version"]
        return _json({"success": True, "message": f"Weight version updated to {version}", "new_version": version})

    # ---- simulator hooks

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json(self.engine.settings.as_dict())

    async def update_faults(self, request: web.Request) -> web.Response:
        body = await _read_json_body(request, require_json_content_type=False)
        if not isinstance(body, dict):
            return _json({"error": "Body must be a JSON object of fault settings."}, status=400)
        was_hanging = self.engine.settings.hang
        try:
            self.engine.settings.update_from(body)
        except ValueError as error:
            return _json({"error": str(error)}, status=400)
        if was_hanging and not self.engine.settings.hang:
            self.dp.release_hung_requests()
        if "startup_delay_ms" in body:
            # A (re)start from now: /health answers 503 for this long.
            self.ready_at = time.monotonic() + self.engine.timing.wall_s(self.engine.settings.startup_delay_ms / 1e3)
        return _json(self.engine.settings.as_dict())

    async def get_stats(self, request: web.Request) -> web.Response:
        return _json(self.dp.stats_snapshot())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.dp.reset_stats()
        return _json(self.dp.stats_snapshot())


def _lora_result(success: bool, error_message: str, loaded_adapters: dict | None) -> dict:
    """SGLang's LoRAUpdateOutput as its route dumps it: every field, the
    request fields it inherits (rid, http_worker_ipc) first."""
    return {"rid": None, "http_worker_ipc": None, "success": success, "error_message": error_message,
            "loaded_adapters": loaded_adapters}


def build_app(*, config: ServerConfig, settings: RuntimeSettings) -> web.Application:
    try:
        dp = DataParallel(config=config, settings=settings)
    except LoraError as error:
        raise SystemExit(f"--lora-paths: {error.message}") from error
    middlewares = [_api_error_middleware, _auth_middleware(config.api_key, config.admin_api_key)]
    if logger.isEnabledFor(logging.DEBUG):
        middlewares.insert(0, _debug_log_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    app[ENGINE_KEY] = dp.ranks[0]
    app[CONFIG_KEY] = config
    app[STARTED_AT_KEY] = time.time()
    generation = GenerationHandlers(dp, config)
    info = InfoHandlers(dp, config, app[STARTED_AT_KEY])
    router = app.router
    router.add_post("/generate", generation.generate)
    router.add_put("/generate", generation.generate)
    router.add_post("/v1/chat/completions", generation.chat_completions)
    router.add_post("/v1/completions", generation.completions)
    router.add_post("/v1/embeddings", generation.embeddings)
    for method in ("GET", "POST"):
        router.add_route(method, "/open_session", generation.open_session)
        router.add_route(method, "/close_session", generation.close_session)
    router.add_post("/encode", generation.encode)
    router.add_put("/encode", generation.encode)
    router.add_get("/v1/models", info.list_models)
    router.add_post("/separate_reasoning", info.separate_reasoning)
    router.add_post("/parse_function_call", info.parse_function_call)
    for prefix in ("", "/v1"):
        router.add_post(f"{prefix}/tokenize", info.tokenize)
        router.add_post(f"{prefix}/detokenize", info.detokenize)
    router.add_get("/v1/models/{model:.+}", info.retrieve_model)
    for path in ("/health", "/health_generate"):
        router.add_get(path, info.health)
    router.add_get("/ready", info.ready)
    for path in ("/model_info", "/get_model_info"):
        router.add_get(path, info.model_info)
    for path in ("/server_info", "/get_server_info"):
        router.add_get(path, info.server_info)
    router.add_get("/get_load", info.get_load)
    router.add_get("/v1/loads", info.v1_loads)
    router.add_get("/metrics", info.metrics)
    router.add_route("GET", "/flush_cache", info.flush_cache)
    router.add_route("POST", "/flush_cache", info.flush_cache)
    router.add_post("/abort_request", info.abort_request)
    router.add_post("/load_lora_adapter", info.load_lora_adapter)
    router.add_post("/unload_lora_adapter", info.unload_lora_adapter)
    router.add_post("/update_weights_from_disk", info.update_weights_from_disk)
    router.add_post("/update_weight_version", info.update_weight_version)
    router.add_get("/sim/faults", info.get_faults)
    router.add_post("/sim/faults", info.update_faults)
    router.add_get("/sim/stats", info.get_stats)
    router.add_post("/sim/stats/reset", info.reset_stats)
    return app


async def serve(*, config: ServerConfig, settings: RuntimeSettings) -> None:
    """Run until cancelled (SIGINT/SIGTERM handled by the caller)."""
    app = build_app(config=config, settings=settings)
    # handler_cancellation: a client disconnect cancels its handler, which is
    # how an idle (waiting, hung) request learns that its client is gone.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=4096, reuse_address=True)
    await site.start()
    logger.warning("SGLang simulator serving %s on http://%s:%d", config.served_model_name, config.host, config.port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
