"""The REST API's web app: MLflow's own scoring server (`mlflow.pyfunc.scoring_server`, the app
`mlflow models serve` runs, with its `/ping`, `/version` and `/invocations`) behind admission
control by bytes.

MLflow's server reads a whole request into memory and parses it (JSON, then a DataFrame, then
base64) before the model sees a photo, so memory grows with the bytes being parsed at once, not
with the number of connections: 8 connections each sending a 20 MB photo took a worker from 0.7 to
1.5 GB. `ByteBudget` bounds that in each worker, before a byte is read:

- a request declaring more than `max_request` bytes: 413, one line;
- a request that would take the bytes in flight past `budget`: 503 "busy, retry" (Retry-After: 1);
- a POST without a Content-Length (chunked): 411, one line;
and otherwise the request goes to MLflow's app, its bytes counted until its answer is sent.
A refused request's body is read and dropped first (up to DRAIN_LIMIT bytes), so the client,
still sending, gets the answer instead of a reset connection.

`cleanmessy api` runs `uvicorn cleanmessy.serving.rest:app` with the downloaded model's path in
`__pyfunc_model_path__`, as `mlflow models serve --env-manager local` runs MLflow's app; the
limits come from CLEANMESSY_API_MAX_REQUEST_MB and CLEANMESSY_API_BUDGET_MB."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MIB = 2**20
ENV_MAX_REQUEST_MB = "CLEANMESSY_API_MAX_REQUEST_MB"
ENV_BUDGET_MB = "CLEANMESSY_API_BUDGET_MB"
MAX_REQUEST_MB = 64  # one request: 2 photos at the 15 MB cap (base64), or 64 photos of ~750 KB
BUDGET_MB = 64  # bytes of requests a worker parses at once (about 4-5 times that in memory)
DRAIN_LIMIT = 256 * MIB  # a refused body is read and dropped up to this; past it the connection is closed


class ByteBudget:
    """ASGI middleware: admission control by declared request bytes (see the module's doc)."""

    def __init__(self, app: ASGIApp, max_request: int = MAX_REQUEST_MB * MIB, budget: int = BUDGET_MB * MIB) -> None:
        self.app, self.max_request, self.budget = app, max_request, max(budget, max_request)
        self.in_flight = 0  # one event loop per worker: no lock needed between awaits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is None:
            await self.refuse(411, "send a Content-Length (a chunked request is not accepted)", 0, receive, send)
            return
        try:
            length = int(declared)
            if length < 0:
                raise ValueError
        except ValueError:
            await self.refuse(400, "the Content-Length is not a number of bytes", 0, receive, send)
            return
        if length > self.max_request:
            await self.refuse(413, f"the request is {length:,} bytes, over the {self.max_request:,}-byte limit: "
                                   "send fewer or smaller photos a request", length, receive, send)
            return
        if self.in_flight + length > self.budget:
            await self.refuse(503, "busy: the server is reading other requests; retry in a second", length,
                              receive, send, {"retry-after": "1"})
            return
        self.in_flight += length
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= length

    @staticmethod
    async def refuse(status: int, message: str, length: int, receive: Receive, send: Send,
                     headers: dict[str, str] | None = None) -> None:
        """Drop the body (when it is at most DRAIN_LIMIT bytes), then answer `status` with MLflow's
        error shape: {"error_code", "message"}."""
        if 0 < length <= DRAIN_LIMIT:
            while True:
                message_in = await receive()
                if message_in["type"] != "http.request" or not message_in.get("more_body", False):
                    break
        code = {400: "BAD_REQUEST", 411: "BAD_REQUEST", 413: "RESOURCE_LIMIT_EXCEEDED",
                503: "TEMPORARILY_UNAVAILABLE"}[status]
        body = json.dumps({"error_code": code, "message": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *((k.encode(), v.encode()) for k, v in (headers or {}).items())]})
        await send({"type": "http.response.body", "body": body})


def _megabytes(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(float(value) * MIB) if value else default * MIB


def __getattr__(name: str) -> Any:
    """`app`, built on first use (uvicorn imports it by name in each worker): MLflow's scoring
    app, which loads the model from `__pyfunc_model_path__`, behind a ByteBudget."""
    if name != "app":
        raise AttributeError(name)
    from cleanmessy.malloc import give_back_freed_memory

    give_back_freed_memory()  # before the model loads and the server's threads start
    from mlflow.pyfunc.scoring_server.app import app as mlflow_app

    global app
    app = ByteBudget(mlflow_app, _megabytes(ENV_MAX_REQUEST_MB, MAX_REQUEST_MB), _megabytes(ENV_BUDGET_MB, BUDGET_MB))
    return app
