"""The FastAPI app: OpenAI-compatible completions and chat completions, streamed or not, over loaded decoders.

The model is fixed when the app is built; a request's `model` field is accepted and ignored (responses name
the served model). A request may pick one of the loaded methods with the `specdec_method` extension. Every
error, validation errors included, is answered as OpenAI-style JSON with a 4xx status (5xx only for a bug or
a busy server).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from specdec import __version__
from specdec.api import SpecDecoder, encode_text, sampling_params
from specdec.errors import InputError
from specdec.server.errors import APIError
from specdec.server.formats import ChatFormat, CompletionFormat, Format
from specdec.server.schemas import ChatCompletionRequest, CompletionRequest
from specdec.server.structured import response_constraint, tool_plan
from specdec.server.worker import Delta, EngineWorker, Failed, Finished, Job, Prompt, Started


@dataclass
class Limits:
    max_prompt_tokens: int | None = None  # None: only the model's context limits the prompt
    max_tokens: int = 1024  # the largest max_tokens a request may ask for (and chat's default)
    max_body_bytes: int = 1 << 20
    max_queued: int = 64  # requests waiting behind the running ones; more get 503
    # generations advancing together (continuous batching; one shared forward per step where the method and
    # runtime can batch: specdec.batch); 1 = one at a time
    max_batch: int = 8


def check_api_key(api_key: str | None) -> None:
    """None = no key. An empty key would turn authentication on with a secret that a bare `Authorization:
    Bearer` header matches (and silence the warning about serving without one): refused."""
    if api_key is None:
        return
    if not isinstance(api_key, str) or not api_key.strip():
        raise InputError(
            "the API key is empty (--api-key or $SPECDEC_API_KEY): give a non-empty key, or none to serve "
            "without authentication"
        )
    if api_key != api_key.strip():
        raise InputError(
            "the API key starts or ends with whitespace, which no Authorization header can carry"
        )


def create_app(
    decoders: SpecDecoder | Mapping[str, SpecDecoder],
    *,
    model_name: str = "default",
    default_method: str | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    engine_thread: bool = True,
    prefix_cache_mb: float = 0.0,
) -> FastAPI:
    """`decoders`: one SpecDecoder, or method name -> SpecDecoder (all over the same target model).
    `engine_thread`: the engine loop runs on a thread of its own; False: the caller runs
    `app.state.worker.run()` (`specdec serve` does, on the thread that loaded the models).
    `prefix_cache_mb`: committed prefixes kept across requests on the native runtime within this budget
    (`specdec.runtime.prefix`; 0: none)."""
    check_api_key(api_key)
    if isinstance(decoders, SpecDecoder):
        decoders = {decoders.drafter.name: decoders}
    decoders = dict(decoders)
    if not decoders:
        raise InputError("no decoder to serve")
    default_method = default_method or next(iter(decoders))
    if default_method not in decoders:
        raise InputError(f"default method {default_method!r} is not among the loaded: {', '.join(decoders)}")
    limits = limits or Limits()
    worker = EngineWorker(limits.max_queued, limits.max_batch, own_thread=engine_thread)
    if prefix_cache_mb > 0:
        from specdec.runtime import attach_prefix_cache

        models = {id(d.model): d.model for d in decoders.values() if isinstance(d, SpecDecoder)}
        worker.metrics.watch(
            [c for c in (attach_prefix_cache(m, prefix_cache_mb) for m in models.values()) if c]
        )
    served = _Served(decoders, model_name, default_method, api_key, limits, worker, int(time.time()))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    # No /docs: request bodies are parsed by hand (for OpenAI-style errors), so the schema would be empty.
    app = FastAPI(
        title="specdec",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.worker = worker
    app.state.model_name = model_name
    app.state.methods = list(decoders)
    app.state.default_method = default_method
    _install_error_handlers(app)
    _add_model_routes(app, served)
    _add_generation_routes(app, served)
    return app


@dataclass(frozen=True)
class _Served:
    """What the routes of one app share: the loaded decoders and the server's settings."""

    decoders: dict[str, SpecDecoder]
    model_name: str
    default_method: str
    api_key: str | None
    limits: Limits
    worker: EngineWorker
    created: int  # the model card's creation time: when the app was built

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise APIError(
                401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    def pick(self, method: str | None) -> tuple[str, SpecDecoder]:
        method = method or self.default_method
        if method not in self.decoders:
            raise APIError(
                400,
                f"method {method!r} is not loaded on this server (loaded: {', '.join(self.decoders)})",
                param="specdec_method",
            )
        return method, self.decoders[method]

    def model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "specdec",
            "specdec_methods": list(self.decoders),
            "specdec_default_method": self.default_method,
        }


def _add_model_routes(app: FastAPI, served: _Served) -> None:
    """/health and the OpenAI model listing."""

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.model_name, **served.worker.snapshot()}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus' text format (specdec.server.metrics); like /health, open to scrapers without the key."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(served.worker.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        served.authorize(request)
        return {"object": "list", "data": [served.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> dict:
        served.authorize(request)
        if model_id != served.model_name:
            raise APIError(
                404, f"model {model_id!r} is not served here (this server serves {served.model_name!r})"
            )
        return served.model_card()


def _add_generation_routes(app: FastAPI, served: _Served) -> None:
    """/v1/completions and /v1/chat/completions."""
    limits, worker, model_name = served.limits, served.worker, served.model_name

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        served.authorize(request)
        body = await read_body(request, CompletionRequest, limits.max_body_bytes)
        method, decoder = served.pick(body.specdec_method)
        if isinstance(body.prompt, list):
            vocab = decoder.model.config.get_text_config(decoder=True).vocab_size
            if not all(0 <= t < vocab for t in body.prompt):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        constraint = response_constraint(body.response_format)
        params = _generation_params(body, body.max_tokens, limits, constraint)
        prompt = Prompt(
            partial(decoder.encode, body.prompt), "prompt", limits.max_prompt_tokens, limits.max_tokens
        )
        job = Job(decoder, method, prompt, params)
        return await _respond(worker, request, job, body, CompletionFormat(model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        served.authorize(request)
        body = await read_body(request, ChatCompletionRequest, limits.max_body_bytes)
        method, decoder = served.pick(body.specdec_method)
        if not getattr(decoder.tokenizer, "chat_template", None):
            raise APIError(
                400,
                f"model {model_name!r} has no chat template (its tokenizer defines none), so chat messages "
                "cannot be rendered; use /v1/completions with a plain prompt",
                param="messages",
                code="chat_template_missing",
            )
        messages = [m.for_template() for m in body.messages]
        plan = tool_plan(body.tools, body.tool_choice)
        constraint = response_constraint(body.response_format)
        if plan is not None and plan.forced:
            if constraint is not None:
                raise APIError(400, "a forced tool call and a response_format cannot both shape the reply")
            constraint = plan.constraint()
        params = _generation_params(body, body.requested_max_tokens, limits, constraint)
        encode = partial(_render_chat, decoder, messages, plan.tools if plan is not None else None)
        job = Job(
            decoder, method, Prompt(encode, "messages", limits.max_prompt_tokens, limits.max_tokens), params
        )
        return await _respond(worker, request, job, body, ChatFormat(model_name, plan))


def _generation_params(body, max_tokens: int | None, limits: Limits, constraint=None) -> dict:
    """SamplingParams fields from a request, validated now (max_new_tokens None: decided after tokenizing;
    a bad constraint is a 400 with the grammar engine's message)."""
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(
            400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}", "max_tokens"
        )
    params = {
        "max_new_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "stop": body.stop,
        "constraint": constraint,
    }
    try:
        sampling_params(**{**params, "max_new_tokens": max_tokens or 1})
    except InputError as e:
        raise APIError(400, str(e)) from None
    return params


async def _respond(worker: EngineWorker, request: Request, job: Job, body, fmt: Format) -> Response:
    """Queue the job; answer with its error, its whole result, or a stream of its events."""
    worker.submit(job)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        first = await _next_event(job, gone)
        if isinstance(first, Failed):
            raise first.error
        if body.stream:
            gone.cancel()  # from here the response's own sending notices a client that left
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                _sse(job, fmt, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(job.cancel),  # also when the client left before the first chunk
            )
        while isinstance(first, Started | Delta):
            first = await _next_event(job, gone)
        if isinstance(first, Failed):
            raise first.error
        return JSONResponse(fmt.full(first))
    except _ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    except BaseException:
        job.cancel()
        raise
    finally:
        gone.cancel()


class _ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone. The body is read by now, so the ASGI server's next message is the
    disconnect, sent the moment the connection closes (a poll once waited for a pause between events,
    which never came while tokens flowed, so a generation whose client had left ran to its end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(job: Job, gone: asyncio.Future):
    """The job's next event; if the client leaves first, the job is cancelled (it stops at its next step)."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone.done():
            job.cancel()
            raise _ClientGone
        return getter.result()
    finally:
        getter.cancel()


async def _sse(job: Job, fmt: Format, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events after the job started. A client disconnect cancels this task (Starlette listens
    for it), which cancels the job in `finally`: the engine stops after its current step."""
    try:
        for chunk in fmt.opening():
            yield _data(chunk)
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                for chunk in fmt.chunks(event.text):
                    yield _data(chunk)
            elif isinstance(event, Finished):
                for chunk in fmt.chunks("", event):
                    yield _data(chunk)
                if include_usage:
                    yield _data(fmt.usage_chunk(event))
                break
            elif isinstance(event, Failed):  # only a bug can fail a generation after it started
                yield _data(event.error.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _render_chat(decoder: SpecDecoder, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    tokenizer = decoder.tokenizer
    text = _apply_template(tokenizer, messages, tools)
    if any("tool_calls" in m for m in messages):
        try:
            ignored = _apply_template(tokenizer, [_without_calls(m) for m in messages], tools) == text
        except APIError:  # it needs them: it renders them
            ignored = False
        if ignored:  # a template that knows no tool calls would drop them silently: they go in the content
            text = _apply_template(tokenizer, [_calls_as_content(m) for m in messages], tools)
    # the template wrote any BOS itself
    return encode_text(decoder.model, tokenizer, text, "the messages", add_special_tokens=False)


def _apply_template(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The chat template over the messages (and the tools, for a template that renders them)."""
    from jinja2 import TemplateError

    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    except TemplateError as e:
        raise APIError(
            400, f"the model's chat template refused these messages: {e}", param="messages"
        ) from None


def _without_calls(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "tool_calls"}


def _calls_as_content(message: dict) -> dict:
    if "tool_calls" not in message:
        return message
    calls = json.dumps({"tool_calls": message["tool_calls"]}, ensure_ascii=False)
    content = f"{message['content']}\n{calls}" if message["content"] else calls
    return {**_without_calls(message), "content": content}


async def read_body(request: Request, schema: type[BaseModel], limit: int):
    # JSON only, declared as such. A browser sends text/plain, form types or no type at all from any web page
    # without asking first (no CORS preflight), so accepting them would let any page open on this machine
    # start generations on a local server.
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        raise APIError(
            415,
            f"the request body must be JSON sent with 'Content-Type: application/json' "
            f"(got {content_type or 'no Content-Type'!r})",
            code="unsupported_media_type",
        )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(
            413, f"request body too large ({length} bytes; the limit is {limit})", code="too_large"
        )
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(
                    413, f"request body too large (over the limit of {limit} bytes)", code="too_large"
                )
    except ClientDisconnect:  # gone mid-body (or closed for missing its deadline): an answer nobody reads
        raise APIError(400, "the client closed the connection before sending the whole body") from None
    try:
        return schema.model_validate_json(bytes(raw))
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        if errors[0]["type"] == "json_invalid":
            _refuse_lone_surrogates(bytes(raw))
        raise _validation_error(errors) from None


def _refuse_lone_surrogates(raw: bytes) -> None:
    """A body pydantic's parser calls invalid that is valid JSON holds a lone surrogate escape ("\\udce9",
    or "\\ud83d" with no low half after it): JSON's syntax allows it, but it encodes no character. Said so,
    naming the field, rather than "not valid JSON"."""
    try:
        value = json.loads(raw)
    except ValueError:  # really not JSON (or not UTF-8)
        return
    found = _surrogate_in(value, "")
    if found is not None:
        param, code = found
        raise APIError(
            400,
            f"{param or 'the request body'}: a lone surrogate escape (\\u{code:04x}) encodes no character; "
            "strings must be valid Unicode",
            param=param or None,
        )


def _surrogate_in(value: Any, path: str) -> tuple[str, int] | None:
    """(where, code point) of the first lone surrogate in a parsed JSON value, keys included."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, ord(value[e.start])
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip(".")
        found = _surrogate_in(key, where) if isinstance(key, str) else None
        found = found or _surrogate_in(item, where)
        if found is not None:
            return found
    return None


def _validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    first = errors[0]
    loc = first.get("loc", ())
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first['ctx']['error']})")
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return APIError(400, f"missing required parameter: {param}", param=param)
    if first["type"] == "finite_number":  # NaN or Infinity, which Python's json module writes
        return APIError(400, f"{param}: must be a finite number", param=param)
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:  # a bug: logged by Starlette
        return APIError(500, "internal server error (see the server log)").response()
