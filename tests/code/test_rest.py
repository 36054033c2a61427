"""The REST API's admission control by bytes (serving/rest.py), on a stand-in for MLflow's app:
every refusal is at once, before the body is parsed, with one line in MLflow's error shape."""

from __future__ import annotations

import asyncio
import json

import pytest

from cleanmessy.serving import rest
from cleanmessy.serving.rest import ByteBudget


class Inner:
    """A stand-in for MLflow's scoring app: reads the whole body, then answers 200 once `release`
    is set (so a request can be held in flight)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[int] = []

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append(len(body))
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def request(app, size: int, headers: dict[str, str] | None = None, chunk: int = 65536) -> dict:
    """One POST /invocations of `size` bytes (sent in chunks); its status, headers and JSON body,
    and how many body bytes the app read."""
    sent = {"offset": 0}
    answer: dict = {"body": b""}

    async def receive():
        start = sent["offset"]
        sent["offset"] = min(size, start + chunk)
        return {"type": "http.request", "body": b"x" * (sent["offset"] - start), "more_body": sent["offset"] < size}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], dict(message["headers"])
        else:
            answer["body"] += message.get("body", b"")

    declared = {"content-length": str(size)} if headers is None else headers
    scope = {"type": "http", "method": "POST", "path": "/invocations",
             "headers": [(k.encode(), v.encode()) for k, v in declared.items()]}
    await app(scope, receive, send)
    return {**answer, "read": sent["offset"]}


def run(coroutine, seconds: float = 10):
    """asyncio.run with a deadline: a request that reaches the held app by mistake fails, not hangs."""
    return asyncio.run(asyncio.wait_for(coroutine, seconds))


def test_a_request_within_the_limits_reaches_mlflows_app():
    inner = Inner()
    inner.release.set()
    answer = run(request(ByteBudget(inner, max_request=1000, budget=2000), 1000))
    assert answer["status"] == 200 and inner.seen == [1000]


def test_a_request_over_the_limit_is_413_in_one_line_and_never_reaches_the_app():
    """Refused from its Content-Length alone; its body is read and dropped (so a client still
    sending gets the answer, not a reset connection), never kept."""
    inner = Inner()
    answer = run(request(ByteBudget(inner, max_request=1000, budget=2000), 1001))
    assert answer["status"] == 413 and inner.seen == [] and answer["read"] == 1001
    message = json.loads(answer["body"])
    assert message["error_code"] == "RESOURCE_LIMIT_EXCEEDED"
    assert message["message"] == "the request is 1,001 bytes, over the 1,000-byte limit: send fewer or smaller " \
                                 "photos a request"


def test_past_the_bytes_in_flight_a_request_is_busy_at_once_and_the_budget_comes_back():
    """With one request in flight holding most of the budget, the next is 503 with Retry-After
    (busy, retry) at once; once the first is answered its bytes are free again."""

    async def scenario():
        inner = Inner()
        app = ByteBudget(inner, max_request=1000, budget=1500)
        held = asyncio.create_task(request(app, 1000))
        while not inner.seen:  # until the first is in MLflow's app
            await asyncio.sleep(0)
        busy = await asyncio.wait_for(request(app, 600), 10)  # at once (a hang without the budget)
        small = asyncio.create_task(request(app, 500))  # fits beside it
        while len(inner.seen) < 2:
            await asyncio.sleep(0)
        inner.release.set()
        return busy, await held, await small, await request(app, 1000), app.in_flight

    busy, held, small, after, in_flight = run(scenario())
    assert busy["status"] == 503 and busy["headers"][b"retry-after"] == b"1"
    assert json.loads(busy["body"])["message"] == "busy: the server is reading other requests; retry in a second"
    assert held["status"] == small["status"] == after["status"] == 200 and in_flight == 0


@pytest.mark.parametrize(("headers", "status", "words"), [
    ({}, 411, "send a Content-Length"),
    ({"content-length": "12abc"}, 400, "not a number of bytes"),
    ({"content-length": "-5"}, 400, "not a number of bytes"),
])
def test_a_request_without_a_usable_length_is_refused_in_one_line(headers, status, words):
    inner = Inner()
    answer = run(request(ByteBudget(inner, max_request=1000), 10, headers))
    assert answer["status"] == status and words in json.loads(answer["body"])["message"] and inner.seen == []


def test_get_requests_pass_through(monkeypatch):
    """/ping, /health and /version are GETs: never counted or refused."""
    calls = []

    async def inner(scope, receive, send):
        calls.append(scope["path"])

    run(ByteBudget(inner, max_request=1)({"type": "http", "method": "GET", "path": "/ping", "headers": []},
                                                 None, None))
    assert calls == ["/ping"]


def test_the_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(rest.ENV_MAX_REQUEST_MB, "2")
    assert rest._megabytes(rest.ENV_MAX_REQUEST_MB, rest.MAX_REQUEST_MB) == 2 * 2**20
    monkeypatch.delenv(rest.ENV_MAX_REQUEST_MB)
    assert rest._megabytes(rest.ENV_MAX_REQUEST_MB, rest.MAX_REQUEST_MB) == rest.MAX_REQUEST_MB * 2**20
