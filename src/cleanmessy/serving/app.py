"""The Gradio app: classify a room photo with the model the registry holds at a stage, and show a
Grad-CAM heat map of what drove the "messy" score."""

from __future__ import annotations

import atexit
import contextvars
import hashlib
import hmac
import io
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from PIL import Image, UnidentifiedImageError
from starlette.middleware import Middleware

from cleanmessy import card
from cleanmessy.errors import UserError
from cleanmessy.images import DEFAULT_MAX_PIXELS, ImageError, open_rgb
from cleanmessy.pyfunc import MAX_PHOTO_BYTES
from cleanmessy.requestlog import RequestLog
from cleanmessy.serving.explain import overlay
from cleanmessy.serving.feedback import (
    NOT_A_ROOM,
    FeedbackError,
    FeedbackStore,
    client_key,
    feedback_confirmation,
    feedback_route,
    record_correction,
)
from cleanmessy.serving.follow import DEFAULT_POLL_SECONDS, ModelFollower
from cleanmessy.serving.model import DEFAULT_MIN_SIDE, ServedModel

log = logging.getLogger(__name__)
MAX_UPLOAD = f"{MAX_PHOTO_BYTES // 2**20}mb"  # the registered model's own limit
CONCURRENCY = 2  # classifications at a time
MAX_QUEUE = 16  # requests waiting for a worker; more are refused at once
PANEL_HEIGHT = 320  # px: photo and heat map keep their panel size whatever the photo's size
CSS = """
#data-warning { border: 2px solid #d97706; border-radius: 8px; padding: 0.25em 1em; background: #fef3c7; }
#data-warning * { color: #78350f !important; }
#status p { font-weight: 600; color: #b91c1c; }
#familiarity.unfamiliar { border: 2px solid #b91c1c; border-radius: 8px; padding: 0.25em 1em; background: #fee2e2; }
#familiarity.unfamiliar * { color: #7f1d1d !important; }
#photo img, #heatmap img { width: 100%; height: 100%; object-fit: contain; }
"""


class PhotoInput(gr.Image):
    """gr.Image that hands the app the uploaded file untouched: the app decodes and checks it with
    `open_rgb`, like the CLI and ingest, and says what is wrong in words (Gradio's own decoding
    would fail on a non-image with a bare "Error" and a traceback in the server log)."""

    is_template = True  # rendered by the frontend as a plain Image

    def preprocess(self, payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        try:  # None, or an image sent inline as a data: URL
            return super().preprocess(payload)
        except (UnidentifiedImageError, OSError, ValueError):
            raise gr.Error(f"Cannot classify this file (not_an_image): {NOT_AN_IMAGE}.",
                           print_exception=False) from None


class HeatMapOutput(gr.Image):
    """gr.Image that writes its outputs into Gradio's cache atomically. Gradio names a cached image
    by its content hash and rewrites the file on every request; two requests with the same photo
    then make the same file, and one client can download it while the other truncates and
    rewrites it (seen with 8 parallel clients: "Too little data for declared Content-Length").
    Here the file is written once, to a temporary name, then renamed into place."""

    is_template = True

    def postprocess(self, value):
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format=self.format.upper())
            data = buffer.getvalue()
            target = Path(self.GRADIO_CACHE) / hashlib.sha256(data).hexdigest() / f"gradcam.{self.format}"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{uuid.uuid4().hex}.part")
                partial.write_bytes(data)
                os.replace(partial, target)
            value = str(target)
        return super().postprocess(value)


def _percent(value: float) -> str:
    return f"{value * 100:.1f} %"


def training_markdown(info: dict) -> str:
    """The training data and test accuracy, in a sentence or two a user understands."""
    data, accuracy, n_test = info.get("training_data"), info.get("test_accuracy"), info.get("test_images")
    if data:
        text = f"Trained on {data['description'].rstrip('.')}"
        if data.get("n_images"):
            counts = ", ".join(f"{c} {n}" for c, n in data.get("classes", {}).items())
            text += f" — {data['n_images']} images" + (f" ({counts})" if counts else "")
        text += "."
        held_out = "held-out images of that data"
    else:
        text = "Training data: not recorded (this version was registered before the pipeline recorded it)."
        held_out = "held-out images"
    if accuracy is None:
        text += " Test accuracy: not recorded."
    else:
        text += f" Test accuracy {_percent(accuracy)}"
        if n_test:  # the interval is what a small test set's accuracy means
            low, high = card.wilson_interval(round(accuracy * n_test), n_test)
            text += f" (95 % interval {_percent(low)}–{_percent(high)}) on {n_test} {held_out}"
        text += "."
    return text


def data_warning(info: dict) -> str:
    """card.data_warning, its first sentence in bold; empty for a model trained on photos."""
    head, _, rest = card.data_warning(info.get("training_data")).partition(". ")
    return f"**{head}.** {rest}" if head else ""


def info_markdown(info: dict) -> str:
    stages = ", ".join(info["stages"]) or "none"
    text = (f"**Model** `{info['name']}` version **{info['version']}** · stage: **{stages}** · "
            f"run `{info['run_id']}` · classes: {', '.join(info['class_names'])} · input {info['image_size']} px · "
            f"photos from {info.get('min_side', DEFAULT_MIN_SIDE)} px on a side")
    if info.get("serving_since"):
        if info.get("follows_alias"):
            following = f", following `{info['model_uri']}`"
        elif info.get("model_uri", info["uri"]) != info["uri"]:
            following = f"; `{info['model_uri']}` is not checked again (--poll 0)"
        else:
            following = ""
        text += f"\n\nServing version {info['version']} since {info['serving_since']}{following}."
    if info.get("load_error"):
        text += f"\n\n**Not updated:** {info['load_error']}"
    return f"{text}\n\n{training_markdown(info)}"


UNFAMILIAR_WARNING = "Unlike the photos this model was trained on; don't trust this label."


def familiarity_markdown(familiarity: float | None, unfamiliar: bool | None, alpha: float) -> str:
    """The line under the label: a warning when the photo is unfamiliar, else how familiar it is."""
    if familiarity is None:
        return "Familiarity: not measured (this version was registered before the pipeline measured it)."
    score = f"familiarity {familiarity * 100:.1f} %, flagged below {alpha * 100:.0f} %"
    if unfamiliar:
        return (f"**⚠ {UNFAMILIAR_WARNING}** Only {familiarity * 100:.1f} % of the training photos are as far "
                f"from the others as this photo is from them (flagged below {alpha * 100:.0f} %).")
    return f"Like the photos this model was trained on ({score})."


NOT_AN_IMAGE = "not an image this app can read; try a JPEG or PNG photo"
NO_PHOTO = "Upload or paste a photo first."
NO_CARD = "No model card was logged with this version."


def rejection(exc: ImageError) -> str:
    """One line for the user: what is wrong with the file, with ingest's reason code."""
    detail = NOT_AN_IMAGE if exc.reason == "not_an_image" else str(exc)
    return f"Cannot classify this file ({exc.reason}): {detail}."


def example_photos(served: ServedModel, folder: Path, per_class: int = 2, side: int = 256) -> list[str]:
    """A few test-split photos of the data the served model was trained on, as `side` px copies in
    `folder`: only when that data is the project's ingested data (its manifest is the one the
    model's training run recorded), so the examples are never of another kind than the model's.
    Otherwise none: no gallery is better than pictures the model has nothing to say about."""
    import pandas as pd

    from cleanmessy.lineage import manifest_hash
    from cleanmessy.project import project_paths

    try:
        paths = project_paths()
        if not served.data_manifest_sha256 or manifest_hash(paths.manifest) != served.data_manifest_sha256:
            return []
        test = pd.read_csv(paths.split_csv("test"), usecols=["path", "label"])
    except (UserError, OSError, ValueError):  # not in a project, or its data is not there
        return []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for label in served.class_names:
        for i, rel in enumerate(test[test["label"] == label]["path"].head(per_class)):
            try:
                photo, _ = open_rgb(paths.root / rel)
            except (ImageError, OSError):
                continue
            photo.thumbnail((side, side))
            path = folder / f"{label}_{i}.png"
            photo.save(path)
            out.append(str(path))
    return out


FEEDBACK_NOTE = ("**Feedback is on.** If a label is wrong, say so with the buttons under the result: the photos "
                 "you correct are kept in this project (`data/feedback/`) to retrain the model at its next "
                 "`dvc repro`.")


def feedback_store() -> FeedbackStore:
    """The project's `data/feedback` (for `serve --feedback`); a UserError outside a project."""
    from cleanmessy.project import project_paths

    try:
        paths = project_paths()
    except UserError as exc:
        raise UserError(f"--feedback keeps corrections in the project's data/feedback: {exc}") from None
    return FeedbackStore(paths.feedback, paths.root)


def feedback_ui(store: FeedbackStore, follower: ModelFollower, photo: gr.Image, label: gr.Label,
                max_pixels: int) -> None:
    """`serve --feedback`, inside build_app's Blocks: the note that corrected photos are kept, the
    "Wrong? It is ..." buttons (one per class and "not a room", shown once a photo has a label) and
    the confirmation line. A click sends only the photo and the chosen label: the server classifies
    the photo again with the model it serves (record_correction), whatever the page showed."""
    gr.Markdown(FEEDBACK_NOTE, elem_id="feedback-note")
    with gr.Row(visible=False, elem_id="feedback") as buttons_row:
        gr.Markdown("**Wrong?** It is:", elem_id="feedback-question")
        choices = {**{name: name for name in follower.current.class_names}, NOT_A_ROOM: "not a room"}
        buttons = {name: gr.Button(text, size="sm", elem_id=f"feedback-{name}") for name, text in choices.items()}
    confirmation = gr.Markdown("", elem_id="feedback-status")

    def correct(photo_path: str | None, chosen: str, client: str) -> str:
        if not photo_path:
            return NO_PHOTO
        try:
            kept = record_correction(store, follower.current, Path(photo_path).read_bytes(), chosen, max_pixels,
                                     client)
        except FeedbackError as exc:
            log.warning("feedback refused: %s", exc)
            return f"Not kept ({exc})."
        except OSError as exc:  # the upload vanished from Gradio's cache, a full disk
            log.warning("feedback not kept: %s", exc)
            return f"Not kept: {exc.strerror or exc}."
        return feedback_confirmation(kept.label, kept.relative, kept.new)

    def shown(value) -> tuple:
        return gr.Row(visible=bool(value)), ""

    # The buttons follow the label: shown when a photo has one, hidden with a new photo (the page
    # empties the label in the browser, which fires no change event) or none.
    label.change(shown, label, [buttons_row, confirmation], show_progress="hidden", api_visibility="private")
    for gone in (photo.upload, photo.clear):
        gone(lambda: shown(None), None, [buttons_row, confirmation], show_progress="hidden", api_visibility="private")
    def clicked(chosen: str) -> Callable[..., str]:
        def click(photo_path: str | None, request: gr.Request) -> str:  # Gradio passes the request
            address = request.client.host if request.client else None
            return correct(photo_path, chosen, client_key(request.username, address))
        return click

    for name, button in buttons.items():
        button.click(clicked(name), photo, confirmation, show_progress="minimal", api_visibility="private")


def build_app(follower: ModelFollower, examples: list[str], max_pixels: int = DEFAULT_MAX_PIXELS,
              delete_cache: tuple[int, int] | None = None, feedback: FeedbackStore | None = None) -> gr.Blocks:
    """The app over `follower.current`: each request takes the model served at that moment, and the
    model panel follows it (refreshed on page load and on a timer while the app follows an alias).
    With `feedback` (`serve --feedback`), corrections are offered and kept there (feedback_ui)."""
    class_names = follower.current.class_names  # the page's label has a row per class
    examples_of = follower.current.data_manifest_sha256  # the data the examples come from

    def open_photo(photo_path: str, served: ServedModel) -> Image.Image:
        """The photo in RGB, or ImageError with ingest's reason code (too_small below the model's min_side)."""
        try:
            photo, _ = open_rgb(Path(photo_path), min_side=served.min_side, max_pixels=max_pixels)
        except OSError as exc:  # vanished from Gradio's cache, unreadable
            raise ImageError("unreadable", f"the uploaded file could not be read ({exc.strerror or exc})") from None
        return photo

    def refuse(photo_path: str, exc: ImageError) -> str:
        # A user's mistake: one line in the server log, no traceback.
        log.warning("refused %s: %s: %s", Path(photo_path).name, exc.reason, exc)
        return rejection(exc)

    def predict(photo, served: ServedModel):
        probs, cam = served.explain(photo)
        return {c: float(p) for c, p in zip(served.class_names, probs)}, overlay(photo, cam)

    def familiarity_of(photo_path: str, served: ServedModel):
        """The registered model's own answer for the uploaded file (as the REST server gives it, and
        logged to the request log): the familiarity line and whether to show it as a warning."""
        row = served.classify([Path(photo_path).read_bytes()]).iloc[0]
        alpha = served.classifier.familiarity.alpha if served.has_familiarity else 0.0
        text = familiarity_markdown(row["familiarity"], row["unfamiliar"], alpha)
        return gr.Markdown(text, elem_classes=["unfamiliar"] if row["unfamiliar"] else [], visible=True)

    def check_upload(photo_path: str | None):
        """On upload: a file that cannot be classified is removed from the input (no broken-image
        icon) and the reason shown at once."""
        if not photo_path:
            return gr.skip(), gr.skip()
        try:
            open_photo(photo_path, follower.current)
        except ImageError as exc:
            return None, refuse(photo_path, exc)
        return gr.skip(), gr.skip()

    def classify_in_browser(photo_path: str | None):
        """The Classify button: mistakes become a message under the button, not an error state;
        the familiarity line (a warning for an unfamiliar photo) stays beside the label."""
        if not photo_path:
            return None, None, gr.Markdown(visible=False), NO_PHOTO
        served = follower.current
        try:
            photo = open_photo(photo_path, served)
        except ImageError as exc:
            return None, None, gr.Markdown(visible=False), refuse(photo_path, exc)
        return *predict(photo, served), familiarity_of(photo_path, served), ""

    def classify(photo_path: str | None):
        """The `/predict` API: a file that cannot be classified is an error with the reason."""
        if not photo_path:
            raise gr.Error(NO_PHOTO, print_exception=False)
        served = follower.current
        try:
            photo = open_photo(photo_path, served)
        except ImageError as exc:
            raise gr.Error(refuse(photo_path, exc), print_exception=False) from None
        if served.classifier.request_log is not None:  # logged as the browser's are (the answer is the same)
            served.classify([Path(photo_path).read_bytes()])
        return predict(photo, served)

    def model_info() -> dict:
        return follower.info()

    def panel():
        """The model panel, the training-data warning and the model card of the model served now,
        and the examples only while they are of that model's data."""
        info = follower.info()
        warning = data_warning(info)
        shown = [info_markdown(info), gr.Markdown(warning, visible=bool(warning)), info["model_card"] or NO_CARD]
        return [*shown, gr.Dataset(visible=follower.current.data_manifest_sha256 == examples_of)][:len(panels)]

    info = follower.info()
    with gr.Blocks(title="Clean vs Messy", delete_cache=delete_cache) as demo:
        gr.Markdown("# Clean vs Messy\nIs this room tidy or cluttered? Upload or paste a photo.")
        model_panel = gr.Markdown(info_markdown(info), elem_id="model-info")
        warning_panel = gr.Markdown(data_warning(info), elem_id="data-warning", visible=bool(data_warning(info)))
        with gr.Accordion("Model card", open=False):
            card_panel = gr.Markdown(info["model_card"] or NO_CARD)
        with gr.Row():
            with gr.Column():
                # image_mode=None: Gradio hands over the uploaded file untouched, so the app decodes it
                # with the same function as the CLI and training (Gradio's RGBA->RGB turns alpha black).
                photo = PhotoInput(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                   label="Room photo", elem_id="photo", height=PANEL_HEIGHT)
                submit = gr.Button("Classify", variant="primary", elem_id="classify")
                status = gr.Markdown("", elem_id="status")
                examples_label = "Examples (test photos of the model's own data)"
                gallery = gr.Examples(examples, inputs=photo, label=examples_label) if examples else None
            with gr.Column():
                label = gr.Label(num_top_classes=len(class_names), label="Prediction", elem_id="label")
                familiar = gr.Markdown("", elem_id="familiarity", visible=False)
                # JPEG: 0.2 ms to encode a 256 px overlay against 7 ms for Gradio's default WebP.
                heat = HeatMapOutput(type="pil", format="jpeg", label='Grad-CAM: regions that drove the "messy" score',
                                elem_id="heatmap", interactive=False, height=PANEL_HEIGHT)
        # ---- feedback (`serve --feedback`; feedback_ui): nothing of it without the option ----
        if feedback is not None:
            feedback_ui(feedback, follower, photo, label, max_pixels)
        # ---- end of feedback ----
        # A new photo: the old results and message go at once, in the browser (a server round trip
        # could land after a quick Classify), then the server checks the file.
        photo.upload(None, None, [label, heat, status], js="() => [null, null, '']")
        photo.upload(lambda: gr.Markdown(visible=False), None, familiar, show_progress="hidden", queue=False,
                     api_visibility="private")
        photo.upload(check_upload, photo, [photo, status], show_progress="hidden", api_visibility="private")
        photo.clear(lambda: "", None, status, show_progress="hidden", api_visibility="private")
        submit.click(classify_in_browser, photo, [label, heat, familiar, status], show_progress_on=[label, heat],
                     api_visibility="private")
        # Programmatic clients (gradio_client) call /predict: same inputs and outputs, errors as errors.
        # The browser never triggers it; the hidden button only carries the endpoint.
        api_trigger = gr.Button(visible=False, elem_id="predict-api")
        api_trigger.click(classify, photo, [label, heat], api_name="predict")
        gr.api(model_info, api_name="model_info")
        panels = [model_panel, warning_panel, card_panel, *([gallery.dataset] if gallery else [])]
        demo.load(panel, None, panels, show_progress="hidden", api_visibility="private")
        if follower.follows:
            gr.Timer(follower.poll_seconds).tick(panel, None, panels, show_progress="hidden", queue=False,
                                                 api_visibility="private")
    return demo


# The client address of the login request being checked: Gradio calls the login check with the
# user name and password only, so ClientAddress (ASGI middleware) sets it around each /login.
_login_client: contextvars.ContextVar[str] = contextvars.ContextVar("login_client", default="")


class ClientAddress:
    """ASGI middleware: the client's address of a `/login` request, for LoginLimiter."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or not str(scope.get("path", "")).endswith("/login"):
            await self.app(scope, receive, send)
            return
        token = _login_client.set(str((scope.get("client") or ("",))[0]))
        try:
            await self.app(scope, receive, send)
        finally:
            _login_client.reset(token)


class LoginLimiter:
    """Gradio's login check with a brake: after `max_failures` wrong passwords for a user from one
    client address within `window` seconds, every login of that user from that address is refused
    (the right password too) until the window has passed. Guessing a password then takes days, not
    seconds, and a stranger's wrong passwords lock out only the stranger's address, never the real
    user's. At most `max_tracked` (user, address) pairs are remembered: bounded memory."""

    def __init__(self, user: str, password: str, max_failures: int = 5, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_tracked: int = 10_000) -> None:
        self._user, self._password = user, password
        self.max_failures, self.window, self._clock, self.max_tracked = max_failures, window, clock, max_tracked
        self._failures: dict[tuple[str, str], list[float]] = {}

    def __call__(self, user: str, password: str) -> bool:
        now, key = self._clock(), (user, _login_client.get())
        recent = [t for t in self._failures.get(key, []) if now - t < self.window]
        if len(recent) >= self.max_failures:
            self._failures[key] = recent
            log.warning("login refused for %r from %s: %d wrong passwords in the last %.0f s", user[:40],
                        key[1] or "this process", len(recent), self.window)
            return False
        if hmac.compare_digest(user.encode(), self._user.encode()) and \
                hmac.compare_digest(password.encode(), self._password.encode()):
            return True
        if len(self._failures) >= self.max_tracked:  # forget the pairs whose failures are all old
            self._failures = {k: v for k, v in self._failures.items() if now - v[-1] < self.window}
        if len(self._failures) < self.max_tracked or key in self._failures:
            self._failures[key] = [*recent, now]
        return False


def admit(demo: gr.Blocks) -> gr.Blocks:
    """Admission control: CONCURRENCY classifications at a time, at most MAX_QUEUE waiting; past
    that a client is told at once that the queue is full (Gradio's 503 "Queue is full": busy,
    retry), not left to time out. Uploads are not queued: they go to disk, capped at MAX_UPLOAD."""
    return demo.queue(default_concurrency_limit=CONCURRENCY, max_size=MAX_QUEUE)


def auth_from(value: str | None) -> tuple[str, str] | None:
    """`user:password` from --auth or CLEANMESSY_AUTH, for Gradio's basic login."""
    value = value or os.environ.get("CLEANMESSY_AUTH")
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth / CLEANMESSY_AUTH must be user:password")
    return user, password


def serve(model_uri: str, host: str, port: int, auth: str | None, max_pixels: int, upload_ttl: int = 900,
          poll_seconds: float = DEFAULT_POLL_SECONDS, request_log: RequestLog | None = None,
          feedback: bool = False) -> None:
    """Load the model, warm it up, then serve until interrupted; an alias is checked every
    `poll_seconds` and a moved one loaded (ModelFollower). Uploads are deleted `upload_ttl` seconds
    after they arrive, so anonymous users cannot fill the disk. With `feedback`, corrections are
    offered in the page and at `POST /feedback`, and kept in the project's data/feedback."""
    credentials = auth_from(auth)
    store = feedback_store() if feedback else None
    follower = ModelFollower(model_uri, poll_seconds, load=lambda uri: ServedModel.load(uri, request_log))
    examples_dir = Path(tempfile.mkdtemp(prefix="cleanmessy-examples-"))
    atexit.register(shutil.rmtree, examples_dir, ignore_errors=True)
    examples = example_photos(follower.current, examples_dir)
    demo = build_app(follower, examples, max_pixels, delete_cache=(upload_ttl, upload_ttl), feedback=store)
    # POST /feedback, on the app before it serves (a route added after launch could miss early requests)
    routes = [feedback_route(store, lambda: follower.current, max_pixels)] if store is not None else []
    admit(demo)
    try:
        demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                    auth=LoginLimiter(*credentials) if credentials else None,
                    max_file_size=MAX_UPLOAD, allowed_paths=[str(examples_dir)], show_error=True,
                    quiet=True, enable_monitoring=False, css=CSS, prevent_thread_lock=True,
                    app_kwargs={"routes": routes, "middleware": [Middleware(ClientAddress)]})
    except OSError:  # Gradio says "Cannot find empty port" for both causes
        raise UserError(f"cannot serve on {host}:{port}: the port is in use, or {host} is not an address of "
                        "this machine; choose another --port (or --host)") from None
    follower.start()
    log.info("serving on http://%s:%d", host, port)
    if store is not None:
        log.info("feedback on: corrections are kept in %s (POST http://%s:%d/feedback too)", store.relative(store.root),
                 host, port)
    demo.block_thread()
