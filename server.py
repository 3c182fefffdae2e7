"""--serve: one web page and a JSON API for every registered task, on uvicorn + Starlette.

    python main.py --serve [--host 127.0.0.1] [--port 8000] [--checkpoint_dir checkpoints]

    GET  /                 the page (index.html)
    GET  /api/models       which models are loaded: {"cls": {"ready": true, ...}, "lm": {...}, "seq2seq": {...}}
    GET  /openapi.json     the API's description (OpenAPI 3.1), built from the task registry
    POST /api/routing      {"task": "cls", "text": "..."} -> {"tokens": [...], "layers": [{"layer": name,
                           "experts": [[[expert, probability] x 3] per token], "chosen": [[experts] per token]}]}
    POST <task.route>      one endpoint per task (Task.route, Task.request_fields, Task.answer):
         /api/classify     {"text": "..."}                         -> {"label": "...", "probs": {...}, "unsure": false}
         /api/generate     {"prompt": "...", "max_new_tokens": 100, "temperature": 0.8, "top_p": 0.95,
                            "top_k": 0, "seed": 1337, "stop_at_eos": false, "stream": false}
                           -> {"text": "...", "new_tokens": n}; with "stream": true, server-sent events: one
                              {"text": piece, "new_tokens": n} per piece, then {"done": true, ...}
         /api/pinyin       {"text": "woaibiancheng", "beam": 4, "num_candidates": 1}
                           -> {"pred": "...", "candidates": [{"text": "...", "score": -0.1}, ...], "kept": [...]}

Every error is JSON {"error": "..."} in one line: 400 a bad body or field (not JSON, NaN/Infinity, nested too
deep, a field of the wrong type or range, an unknown field), 404 unknown path, 405 wrong method, 413 a body over
64 KiB (refused from its Content-Length, before it is read), 415 a POST that is not application/json (so a web
page elsewhere cannot post a plain form to this one), 421 a Host header that is not this machine's while bound
to loopback (DNS rebinding), 503 a model not trained or the server at its concurrency limit (with Retry-After),
504 past the per-request deadline. Model calls run in worker threads, one call per model at a time, with torch's
threads split between the models so that three calls at once do not oversubscribe the cores.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
from http import HTTPStatus

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from analyze import token_routing
from api import ApiError, field
from config import Options
from errors import DataError
from registry import TASKS

MAX_BODY = 64 * 1024
MAX_DEPTH = 8                 # JSON nesting a request may have (the fields are scalars)
DEADLINE = 120.0              # seconds a model call may take before the client gets a 504
RETRY_AFTER = 1               # seconds, in that 503's Retry-After
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html")


class Models:
    """The trained model of each registered task, loaded once; a model that is missing keeps the message that
    says how to train it. Each task answers its own endpoint (Task.route, Task.answer)."""

    def __init__(self, paths: dict[str, str], device):
        self.device, self.paths, self.errors, self.loaded = device, paths, {}, {}
        self.locks = {name: threading.Lock() for name in TASKS}
        for name, task in TASKS.items():
            try:
                self.loaded[name] = task.serve_load(paths[name], device)
            except DataError as e:
                self.errors[name] = str(e)
        self.routes = {task.route: name for name, task in TASKS.items()}

    def status(self) -> dict:
        out = {}
        for name, task in TASKS.items():
            if name in self.errors:
                out[name] = {"ready": False, "error": self.errors[name]}
            else:
                out[name] = {"ready": True, "checkpoint": self.paths[name], **task.serve_status(self.loaded[name])}
        return out

    def ready(self, name: str) -> None:
        """503 with the command that trains it, for a model that is not loaded."""
        if name in self.errors:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, self.errors[name])

    def task_for(self, path: str, req: dict):
        """The task of an endpoint, its request checked against the fields it declares."""
        name = self.routes[path]
        task = TASKS[name]
        known_fields(req, task.request_fields, path)
        self.ready(name)
        return name, task

    def answer(self, path: str, req: dict) -> dict:
        name, task = self.task_for(path, req)
        with self.locks[name]:
            return task.answer(self.loaded[name], req, self.device)

    def routing(self, req: dict) -> dict:
        """POST /api/routing {"task": name, "text": ...}: the experts each token of the text goes to, per layer."""
        known_fields(req, ("task", "text"), "/api/routing")
        name, text = field(req, "task", str), field(req, "text", str)
        if name not in TASKS:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field 'task'={name!r}: one of {', '.join(TASKS)}")
        self.ready(name)
        model, tokenizer = TASKS[name].serve_model(self.loaded[name])
        with self.locks[name]:
            return token_routing(TASKS[name], model, tokenizer, text[:2000], self.device)

    def stream(self, path: str, req: dict):
        """The answer as a sequence of events (Task.stream). Not under the model's lock: a client may stop
        reading half-way, and the call keeps no state outside itself (its own KV cache and generator)."""
        name, task = self.task_for(path, req)
        yield from task.stream(self.loaded[name], req, self.device)


def known_fields(req: dict, fields, path: str) -> None:
    """400 for a field the endpoint does not take (a misspelt one would otherwise be silently ignored)."""
    unknown = sorted(set(req) - set(fields))
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field {unknown[0]!r} (fields of {path}: {', '.join(fields)})")


def depth(value, limit: int) -> int:
    """How deep a parsed JSON value nests (stops counting past `limit`)."""
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(v, dict):
            stack += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            stack += [(x, d + 1) for x in v]
    return deepest


def no_constants(name: str):  # NaN, Infinity, -Infinity are not JSON, and pass every range check
    raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {name} is not a number")


async def read_json(request: Request) -> dict:
    """The request's JSON object, or ApiError: Content-Type, size (from Content-Length, before reading; or as the
    body arrives), syntax, constants, depth."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be application/json, not {kind!r}")
    try:
        length = int(request.headers.get("content-length", "0"))
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "bad Content-Length header") from None
    if length > MAX_BODY:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; the limit is {MAX_BODY}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes; the limit is "
                                                                f"{MAX_BODY}")
    try:
        req = json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {e}") from None
    except RecursionError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(req, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    if depth(req, MAX_DEPTH) > MAX_DEPTH:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body nests deeper than {MAX_DEPTH} levels")
    return req


def error(status: HTTPStatus, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def make_app(models: Models, loopback: bool, limit: int = Options.limit_concurrency) -> Starlette:
    """The ASGI app: routes from the registry, and in front of them the Host check and the concurrency limit."""
    in_flight = 0

    async def page(request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    async def status(request: Request) -> Response:
        return JSONResponse(models.status())

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_spec())

    async def answered(request: Request, respond) -> Response:
        """respond(the request's JSON object) -> its Response; a bad request and the deadline as JSON errors."""
        try:
            return await respond(await read_json(request))
        except ApiError as e:
            return error(e.status, str(e))
        except asyncio.TimeoutError:
            return error(HTTPStatus.GATEWAY_TIMEOUT, f"no answer within {DEADLINE:g} s")

    async def in_worker(call, *args) -> Response:  # a model call, in a worker thread, within the deadline
        return JSONResponse(await asyncio.wait_for(run_in_threadpool(call, *args), DEADLINE))

    async def routing(request: Request) -> Response:
        return await answered(request, lambda req: in_worker(models.routing, req))

    async def answer(request: Request) -> Response:
        path = request.url.path

        async def respond(req: dict) -> Response:
            if req.get("stream") is True and hasattr(TASKS[models.routes[path]], "stream"):
                events = models.stream(path, req)
                first = await run_in_threadpool(next, events, None)  # field errors surface before the 200
                return StreamingResponse(sse(first, events), media_type="text/event-stream")
            return await in_worker(models.answer, path, req)

        return await answered(request, respond)

    async def sse(first, events):
        if first is not None:
            yield f"data: {json.dumps(first, ensure_ascii=False)}\n\n"
        try:
            async for event in iterate_in_threadpool(events):
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps({'error': str(e)}, ensure_ascii=False)}\n\n"

    async def not_found(request: Request, exc) -> Response:
        if getattr(exc, "status_code", 404) == 405:
            return error(HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.url.path}")
        return error(HTTPStatus.NOT_FOUND, f"no such path: {request.url.path}")

    async def server_error(request: Request, exc) -> Response:  # a bug must not take the server down
        return error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    routes = [Route("/", page), Route("/index.html", page), Route("/api/models", status),
              Route("/openapi.json", openapi), Route("/api/routing", routing, methods=["POST"])] + [
        Route(path, answer, methods=["POST"]) for path in models.routes]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 500: server_error})

    async def guard(scope, receive, send):
        """Host check (loopback only) and the concurrency limit, in front of every request."""
        nonlocal in_flight
        if scope["type"] != "http":
            return await app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if loopback and name not in LOOPBACK:
            return await error(HTTPStatus.MISDIRECTED_REQUEST, f"Host {host!r} is not this machine; the server "
                                                               "answers 127.0.0.1 and localhost")(scope, receive, send)
        if in_flight >= limit:
            return await error(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {in_flight} requests in flight; retry",
                               **{"Retry-After": str(RETRY_AFTER)})(scope, receive, send)
        in_flight += 1
        try:
            await app(scope, receive, send)
        finally:
            in_flight -= 1

    return guard


def openapi_spec() -> dict:
    """OpenAPI 3.1 from the registry: each task's endpoint with the fields it takes (no others)."""
    paths = {"/api/models": {"get": {"summary": "which models are loaded", "responses": {"200": {
        "description": "per task: ready, checkpoint or the error"}}}}}
    for task in TASKS.values():
        schema = {"type": "object", "additionalProperties": False,
                  "properties": {k: {"type": t} for k, t in task.request_fields.items()}}
        paths[task.route] = {"post": {"summary": f"the {task.name} model", "requestBody": {
            "required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "the answer"}, "400": {"description": "a bad field"},
                          "503": {"description": "not trained, or busy"}}}}
    return {"openapi": "3.1.0", "info": {"title": "MoE toolkit", "version": "1"}, "paths": paths}


def serve(opts: Options, device) -> int:
    if not 0 <= opts.port <= 65535:
        raise DataError(f"--port {opts.port}: must be 0-65535 (0 picks a free port)")
    if opts.limit_concurrency < 1:
        raise DataError(f"--limit_concurrency {opts.limit_concurrency}: must be >= 1")
    paths = {task: os.path.join(opts.checkpoint_dir, f"{task}.pt") for task in TASKS}
    models = Models(paths, device)
    loopback = opts.host in LOOPBACK
    if not loopback:
        print(f"warning: --host {opts.host} answers other machines too; the API has no authentication",
              file=sys.stderr)
    # one model call per model at a time: the cores shared between the models, not oversubscribed
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(TASKS)))
    try:
        sock = socket.create_server((opts.host, opts.port), family=socket.AF_INET6 if ":" in opts.host
                                    else socket.AF_INET)
    except OSError as e:
        raise DataError(f"--serve: cannot listen on {opts.host}:{opts.port} ({e.strerror})") from None
    for task, status in models.status().items():
        print(f"{task}: {'ready' if status['ready'] else status['error']}", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    print(f"serving on http://{host}:{port}/ (Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(make_app(models, loopback, opts.limit_concurrency),
                            log_level="warning" if opts.quiet else "info", timeout_keep_alive=5,
                            timeout_graceful_shutdown=10, access_log=not opts.quiet)
    # SIGTERM and Ctrl-C: uvicorn finishes the requests in flight, then stops, and raises the signal again once
    # it is done; a SIGTERM handler of ours makes that a clean exit (0) instead of death by signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
