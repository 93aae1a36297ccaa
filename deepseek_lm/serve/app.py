"""The HTTP layer: OpenAI-shaped routes over a `BatchEngine`, errors in OpenAI's JSON shape, metrics, the page.

    app = create_app(engine, model_name="demo")     # engine: a started deepseek_lm.generate.BatchEngine
    uvicorn.run(app)                                # or `deepseek-lm serve`, which also stops cleanly

Every failure a client can cause is a 4xx JSON error (`{"error": {"message", "type", "param", "code"}}`), and
the server keeps serving; a full queue is a 503 with Retry-After. Generation runs in the engine's thread;
each engine request hands its events to this event loop through `call_soon_threadsafe` (generation.py).
"""

from __future__ import annotations

import json
import secrets
import sys
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from deepseek_lm.generate.batching import BatchEngine
from deepseek_lm.serve import protocol as P
from deepseek_lm.serve.generation import Completions
from deepseek_lm.serve.metrics import Metrics
from deepseek_lm.serve.protocol import APIError

PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(
    engine: BatchEngine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    chat_format: Any = None,
) -> FastAPI:
    """`chat_format`: a `deepseek_lm.data.chat.ChatFormat` for /v1/chat/completions (None: the route answers
    400). The engine is closed when the app shuts down."""
    metrics = Metrics(engine.stats, engine.prefix_cache.stats if engine.prefix_cache is not None else None)
    server = Completions(engine, model_name, metrics, chat_format)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="deepseek-lm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    app.add_middleware(_CountRequests, counter=metrics.requests)
    auth = [Depends(_key_checker(api_key))]

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        return await server.generate(body, request, "completion")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        return await server.generate(body, request, "chat")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def model(name: str) -> dict:
        server.check_model(name)
        return server.model_card()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    _error_handlers(app)
    return app


def _key_checker(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given:
            raise APIError(401, "no API key: send the header 'Authorization: Bearer KEY'", "invalid_request_error",
                           code="invalid_api_key")  # fmt: skip
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", "invalid_request_error", code="invalid_api_key")

    return check


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = (
                f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                None,
            )
        else:
            param = ".".join(loc) or None
            given = f"; got {_shown(first['input'])}" if "input" in first and loc else ""
            said = first["msg"].removeprefix("Value error, ")  # our validators' own sentences
            message = f"{param}: {said}{given}" if param else said
        return JSONResponse(P.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, APIError):
            return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(exc.detail), type_), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc, file=sys.stderr)
        message = f"internal error: {type(exc).__name__} (see the server's log)"
        return JSONResponse(P.error_body(message, "server_error"), status_code=500)


def _shown(value: Any) -> str:
    """A value as the error message quotes it: JSON, 80 characters at most, never a lone surrogate."""
    return json.dumps(value, default=str)[:80]


class _CountRequests:
    """Count /v1/ requests by route and status (a plain ASGI wrapper: streamed bodies pass untouched)."""

    def __init__(self, app: Any, counter: Any) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")  # the route's template: a bounded set of label values
                self.counter.labels(getattr(route, "path", "unknown"), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


class _BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, by Content-Length or while reading."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(
            413, f"the request body is larger than {self.limit:,} bytes", "invalid_request_error"
        )
        length = dict(scope.get("headers", ())).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = JSONResponse(too_large.body, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise too_large  # FastAPI passes an HTTPException raised while it reads the body on
            return message

        await self.app(scope, limited, send)
