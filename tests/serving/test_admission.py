"""The app's admission control (`serving.app.admit`, what `cleanmessy serve` applies): a crowd gets
"busy" at once past the queue, never a timeout, and the app serves normally afterwards. On a
Gradio app whose function waits for the test, so the queue's state does not depend on the
machine's speed."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import gradio as gr

from cleanmessy.serving.app import CONCURRENCY, MAX_QUEUE, admit


def call(base: str, value: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}gradio_api/call/slow", json.dumps({"data": [value]}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def outcome(base: str, event_id: str) -> str:
    with urllib.request.urlopen(f"{base}gradio_api/call/slow/{event_id}", timeout=60) as stream:
        event = ""
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("complete", "error"):
                return f"{event} {line.removeprefix('data: ')}"
    return "no outcome"


def test_past_its_queue_the_app_answers_busy_at_once_and_serves_afterwards():
    gate = threading.Event()

    def slow(value: str) -> str:
        gate.wait(60)
        return value

    with gr.Blocks() as demo:
        box, out = gr.Textbox(), gr.Textbox()
        gr.Button().click(slow, box, out, api_name="slow")
    admit(demo)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        base = demo.local_url
        crowd = CONCURRENCY + MAX_QUEUE + 6
        answers, seconds = [], []
        for i in range(crowd):  # each call returns at once: queued (an event id) or refused
            started = time.monotonic()
            answers.append(call(base, f"photo {i}"))
            seconds.append(time.monotonic() - started)
        queued = [a["event_id"] for status, a in answers if status == 200]
        busy = [a for status, a in answers if status != 200]
        # MAX_QUEUE waiting, plus those the workers had taken (0 to CONCURRENCY) when the queue filled
        assert MAX_QUEUE <= len(queued) <= MAX_QUEUE + CONCURRENCY, answers
        assert len(busy) == crowd - len(queued) >= 4
        assert all(status == 503 for status, _ in answers if status != 200)
        assert all(a["detail"] == f"Queue is full. Max size is {MAX_QUEUE} and size is {MAX_QUEUE}." for a in busy)
        assert max(seconds) < 10  # nobody waited for a worker to be refused
        gate.set()
        assert [outcome(base, event_id) for event_id in queued] == \
            [f'complete ["photo {i}"]' for i in range(len(queued))]
        status, again = call(base, "afterwards")
        assert status == 200 and outcome(base, again["event_id"]) == 'complete ["afterwards"]'
    finally:
        gate.set()
        demo.close()
