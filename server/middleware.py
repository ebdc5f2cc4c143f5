"""Plain ASGI middleware (not @app.middleware / BaseHTTPMiddleware: no extra task or
response re-wrapping per request, so SSE streams and their cancellation pass straight through)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from . import protocol as P
from .metrics import Metrics


class RequestCounter:
    """Counts responses by route and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status["code"])).inc()


class TooLarge(HTTPException):
    """Raised from receive() once a chunked body passes the limit. An HTTPException, because
    FastAPI turns any other error while reading a body into a 400."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body is over this server's {max_bytes} byte limit")


class BodyLimit:
    """Refuses request bodies over `max_bytes` with an OpenAI-shaped 413: at once from
    Content-Length, or while reading a chunked body, before any of it is parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def _refuse(self, send) -> None:
        error = P.ErrorDetail(message=TooLarge(self.max_bytes).detail, type="invalid_request_error",
                              code="request_too_large")
        body = json.dumps(P.ErrorResponse(error=error).model_dump()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise TooLarge(self.max_bytes)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except TooLarge:  # raised outside a route's body parsing
            if not started:
                await self._refuse(send)
