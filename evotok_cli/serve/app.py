"""The HTTP surface: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, vLLM's /tokenize,
/detokenize and /version, plus GET / (a live page), /health and /metrics. Every error is an OpenAI error
object; every request gets one access-log line on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from evotok_cli.serve.asgi import HttpMiddleware
from evotok_cli.serve.guard import Guard, Limits
from evotok_cli.serve.metrics import CONTENT_TYPE
from evotok_cli.serve.page import CSP, render_page
from evotok_cli.serve.plan import CANVAS_RULE, make_plan
from evotok_cli.serve.responses import Reply, response
from evotok_cli.serve.schema import MAX_BODY_BYTES, ApiError, check_model, parse_chat, parse_completion, parse_json
from evotok_cli.serve.sessions import Service, Session
from evotok_cli.serve.stream import chunks, failure_of, timeout_error
from evotok_cli.serve.tokenize import detokenize, render, tokenize

ROUTES = ("/", "/health", "/metrics", "/version", "/tokenize", "/detokenize", "/v1/models", "/v1/completions",
          "/v1/chat/completions")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection before the answer
# a streamed answer's status line is sent before it can fail: its access-log line and metrics take the
# status the failure would have had (the note the stream left), not the 200 already sent
NOTE_STATUS = {"disconnect": CLIENT_GONE, "timeout": 504, "shutting_down": 503, "internal_error": 500,
               "invalid_value": 400}


def create_app(service: Service, *, api_key: str | None, decoders: list[str], strict: bool = False,
               allowed_origins: list[str] | None = None, limits: Limits | None = None) -> Any:
    """The ASGI application: FastAPI's routes inside the access log. `strict` refuses unknown request
    fields (400) instead of ignoring them; `allowed_origins` turns CORS on for those origins ("*": any);
    `limits` are what `guard.Guard` checks before any route runs."""
    api = FastAPI(title="evotok serve", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan(service))
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        api.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["*"], expose_headers=["Warning"],
                           max_age=600)
    authorize = authorizer(api_key)
    add_status_routes(api, service, decoders, authorize)
    add_tokenizer_routes(api, service, authorize, strict)
    add_openai_routes(api, service, authorize, strict)
    add_error_handlers(api)
    return AccessLog(Guard(api, limits or Limits()), service)  # Limits(): any Host (in-process tests)


def lifespan(service: Service) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The service learns the event loop at start-up (its engine thread posts there) and stops at shutdown."""
    @contextlib.asynccontextmanager
    async def span(_: FastAPI) -> AsyncIterator[None]:
        service.loop = asyncio.get_running_loop()
        yield
        await asyncio.to_thread(service.stop, 10.0)
    return span


def authorizer(api_key: str | None) -> Callable[[Request], None]:
    """The check of `Authorization: Bearer KEY` on the routes that need it (none without --api-key)."""
    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send the header Authorization: Bearer KEY)",
                           code="invalid_api_key")
    return authorize


def add_status_routes(api: FastAPI, service: Service, decoders: list[str],
                      authorize: Callable[[Request], None]) -> None:
    """GET / (the live page), /health, /metrics and /version: what the server is and how it is doing."""
    served = service.served

    @api.get("/")
    async def page() -> HTMLResponse:
        text = render_page(served.name, decoders, served.defaults, served.decoder)
        return HTMLResponse(text, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})

    @api.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        body = {"status": "draining" if service.draining else "ok", "model": served.name,
                "live_rows": service.engine.live_rows, "waiting": service.waiting()}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @api.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        authorize(request)
        text = service.metrics.render(service.engine, waiting=service.waiting(), in_flight=len(service.sessions))
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @api.get("/version")
    async def version() -> JSONResponse:
        from evotok_cli import __version__

        return JSONResponse({"version": __version__})


def add_tokenizer_routes(api: FastAPI, service: Service, authorize: Callable[[Request], None],
                         strict: bool) -> None:
    """vLLM's POST /tokenize and /detokenize."""
    served = service.served

    @api.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        return await off_loop(service, request, authorize, lambda body: tokenize(body, served, strict=strict))

    @api.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return await off_loop(service, request, authorize, lambda body: detokenize(body, served, strict=strict))


async def off_loop(service: Service, request: Request, authorize: Callable[[Request], None],
                   answer: Callable[[Any], tuple[dict[str, Any], list[str]]]) -> Response:
    """A tokenizer endpoint's whole work in a worker thread, with a completion request's time budget
    (`service.prepare`): parsing, the chat template, the tokenizer, and the JSON of an answer that can
    hold millions of ids. Any of them on the event loop would stall /health and SIGTERM for seconds."""
    authorize(request)
    raw, deadline = await read_body(request), service.deadline()

    def work() -> tuple[Response, list[str]]:
        body, ignored = answer(parse_json(raw))
        return Response(render(body), media_type="application/json"), ignored  # rendered here, in slices

    reply, ignored = await service.prepare(work, deadline)
    reply.headers.update(ignored_fields(ignored, request))
    return reply


def add_openai_routes(api: FastAPI, service: Service, authorize: Callable[[Request], None], strict: bool) -> None:
    """OpenAI's /v1/models (and one model by id), /v1/completions and /v1/chat/completions."""
    served = service.served

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card(service)]})

    @api.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> JSONResponse:
        authorize(request)
        check_model(name, served.name)
        return JSONResponse(model_card(service))

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(service, request, chat=False, authorize=authorize, strict=strict)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(service, request, chat=True, authorize=authorize, strict=strict)


def add_error_handlers(api: FastAPI) -> None:
    """Every error as an OpenAI error object: ours as raised, Starlette's 404/405 named, anything else a
    bare 500 (its traceback goes to the log, never to the client)."""
    @api.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        body = ApiError(exc.status_code, str(exc.detail), code=code).body()
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        body = ApiError(500, "internal server error", code="internal_error", type="server_error").body()
        return JSONResponse(body, status_code=500)


def model_card(service: Service) -> dict[str, Any]:
    """OpenAI's model object, plus vLLM's `max_model_len` (prompt + canvas must fit it) and how evotok turns
    `max_tokens` into a canvas."""
    served = service.served
    d = served.defaults
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "evotok", "root": served.name,
            "max_model_len": served.model.max_length, "adapter": served.adapter, "decoder": served.decoder,
            "evotok": {"gen_length": d["gen_length"], "block_length": d["block_length"], "steps": d["steps"],
                       "canvas_rule": CANVAS_RULE, "quantize": served.model.quantize}}


async def read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it passes the limit rather than after reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {declared} bytes, over the limit of {MAX_BODY_BYTES}",
                       code="body_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes", code="body_too_large")
    return bytes(body)


async def complete(service: Service, request: Request, *, chat: bool, authorize: Callable[[Request], None],
                   strict: bool = False) -> Response:
    """One completion request: check, plan, submit, then answer whole or as a stream."""
    arrival = time.perf_counter()
    deadline = service.deadline()
    authorize(request)
    if service.draining:
        raise ApiError(503, "the server is shutting down", code="shutting_down", type="server_error")
    raw = await read_body(request)
    served = service.served

    def prepare() -> tuple[Any, Any]:  # in a worker thread, with a time budget: the event loop stays free
        body = parse_json(raw)
        fields = parse_chat(body, strict=strict) if chat else parse_completion(body, strict=strict)
        check_model(fields.model, served.name)
        return fields, make_plan(fields, served)

    fields, plan = await service.prepare(prepare, deadline)
    headers = ignored_fields(fields.ignored, request)
    session = service.open(plan, events=fields.stream and ("evolve" if fields.stream_mode == "evolve" else "final"))
    reply = Reply(chat=chat, model=served.name)
    note = noter(request)
    if fields.stream:
        return StreamingResponse(chunks(service, session, fields, reply, deadline, note, arrival=arrival),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    try:
        outcome = await wait(service, session, request, deadline)
    finally:
        service.close(session)
        service.metrics.queued(session, arrival)
    if outcome == "disconnect":
        note("disconnect")
        return Response(status_code=CLIENT_GONE)
    if outcome == "timeout":
        note("timeout")
        raise timeout_error(service.timeout)
    failure = next((f for f in (failure_of(job, session) for _, job in session.jobs) if f is not None), None)
    if failure is not None:
        raise failure
    results = session.results(served.model)
    service.metrics.prompt_tokens += plan.prompt_tokens
    service.metrics.completion_tokens += sum(r["tokens"] for r in results)
    body = response(reply, results, plan)
    service.metrics.answered(time.perf_counter() - arrival, [c["finish_reason"] for c in body["choices"]],
                             whole=True)
    return JSONResponse(body, headers=headers)


def ignored_fields(ignored: list[str], request: Request) -> dict[str, str]:
    """The unknown fields a request sent, ignored: a `Warning` header naming them and a log line."""
    if not ignored:
        return {}
    names = ", ".join(ignored[:20]) + (f" and {len(ignored) - 20} more" if len(ignored) > 20 else "")
    shown = json.dumps(names)[1:-1].replace('\\"', "'")[:1000]  # ASCII, no control characters, no quote
    print(f"warning: {request.url.path}: unknown fields ignored: {shown}", file=sys.stderr, flush=True)
    return {"Warning": f'299 evotok "unknown fields ignored: {shown}"'}


def noter(request: Request) -> Callable[[str], None]:
    """Lets a handler add a word (disconnect, timeout, ...) to its access-log line."""
    state = request.scope.setdefault("state", {})
    return lambda text: state.__setitem__("evotok_note", text)


async def wait(service: Service, session: Session, request: Request, deadline: float) -> str:
    """Wait for the session's jobs: "done", or "disconnect" / "timeout" after cancelling them."""
    finished = asyncio.ensure_future(session.finished.wait())
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({finished, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished.cancel()
        gone.cancel()
    if session.finished.is_set():
        return "done"
    reason = "disconnect" if gone in done else "timeout"
    service.cancel(session, reason)
    return reason


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class AccessLog(HttpMiddleware):
    """One stderr line per request (client, method, path, status, seconds, note) and the request counters;
    also the last stop for an unexpected exception: logged with its traceback here, never sent."""

    def __init__(self, app: Any, service: Service):
        super().__init__(app)
        self.service = service

    async def http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        start, status = time.monotonic(), [0]
        scope.setdefault("state", {})

        async def record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        except Exception as exc:
            status[0] = status[0] or 500
            print(f"error: unexpected {type(exc).__name__} serving {scope['path']}: {exc}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
        finally:
            self.log(scope, status[0], time.monotonic() - start)

    def log(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        note = scope["state"].get("evotok_note")
        status = NOTE_STATUS.get(note, status) if status == 200 or note == "disconnect" else status
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        self.service.metrics.request(route, status, seconds)
        client = scope.get("client") or ("-", 0)
        shown = json.dumps(path)[1:-1]  # control characters escaped: one request, one line
        print(f'{client[0]}:{client[1]} "{scope["method"]} {shown}" {status} {seconds:.3f}s'
              + (f" {note}" if note else ""), file=sys.stderr, flush=True)
