"""Corrections from the people a server answers, kept where the next `dvc repro` learns from them.

`cleanmessy serve --feedback` offers "Wrong? It is clean / messy / not a room" once a photo has been
classified, and an HTTP endpoint, `POST /feedback`. Each correction keeps the original photo under
`data/feedback/<label>/<sha256>.<ext>` (the extension of its decoded format) and one JSON line in
`data/feedback/corrections.jsonl`: the time, the model version, the photo's sha256, what the model
said (its label, familiarity score and flag) and the corrected label. No photo bytes go anywhere
else. `data/feedback` is a dependency of the ingest stage (dvc.yaml): the next `dvc repro` merges
the class folders into the training data (stages/ingest.py); `not-a-room/` never becomes training
data. What the model said is the server's own classification of the same bytes, never the client's.

The store is bounded (MAX_STORE_PHOTOS photos, MAX_STORE_BYTES bytes, and never past MIN_FREE_BYTES
left on the disk): past any, a correction is refused with "feedback store full". One client (the
logged-in user, else the client's address) may add at most MAX_PER_CLIENT corrections an hour, so
no one can fill the store or flood the training data alone; each line records that client, so a
bad actor's corrections can be found and removed before the next `dvc repro`. Ingest bounds what
feedback may add to each class (`ingest.feedback_max_share`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cleanmessy.images import DEFAULT_MAX_PIXELS, FORMAT_SUFFIX, ImageError, open_rgb
from cleanmessy.project import FEEDBACK_NOT_A_ROOM
from cleanmessy.pyfunc import MAX_PHOTO_BYTES  # one photo: the app's upload limit (app.MAX_UPLOAD)

if TYPE_CHECKING:
    from cleanmessy.serving.model import ServedModel

log = logging.getLogger(__name__)

NOT_A_ROOM = FEEDBACK_NOT_A_ROOM  # the folder and label of "not a room"; the app's button says "not a room"
CORRECTIONS = "corrections.jsonl"
MAX_STORE_PHOTOS = 10_000
MAX_STORE_BYTES = 500 * 2**20  # photos and corrections.jsonl together
MIN_FREE_BYTES = 2**30  # the disk keeps at least this free: corrections never fill it for the pipeline
MAX_PER_CLIENT = 100  # new corrections a client may add within CLIENT_WINDOW seconds
CLIENT_WINDOW = 3600.0
MAX_CLIENTS_TRACKED = 10_000  # bounded memory: clients whose corrections are all older are forgotten
OTHER_SUFFIX = ".img"  # a format FORMAT_SUFFIX does not name (ingest names it so too)


class FeedbackError(ValueError):
    """A correction that is not kept; `reason` is a short stable code (an ImageError's for a photo
    that is not a usable image), str() one line for the user."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {super().__str__()}"


@dataclass(frozen=True)
class Correction:
    """A kept correction: the photo's file (and its path relative to the project), its sha256 and
    label; `new` is False when that photo was already kept under that label (nothing written)."""

    path: Path
    relative: str
    sha256: str
    label: str
    new: bool


def label_from(text: str) -> str:
    """A correction's label as a client may send it: "not a room" is `not-a-room`."""
    text = (text or "").strip()
    return NOT_A_ROOM if text.casefold() in ("not a room", NOT_A_ROOM) else text


def labels_for(class_names: list[str]) -> list[str]:
    """The labels a correction may have for a model with these classes."""
    return [*class_names, NOT_A_ROOM]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """A familiarity score or flag as JSON has it: None for a missing one (NaN is not JSON)."""
    if value is None:
        return None
    if hasattr(value, "item"):  # a numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class FeedbackStore:
    """`data/feedback` of a project: photos by label and content hash, and the corrections' log."""

    def __init__(self, root: Path, project_root: Path | None = None, max_photos: int = MAX_STORE_PHOTOS,
                 max_bytes: int = MAX_STORE_BYTES, min_free: int = MIN_FREE_BYTES,
                 max_per_client: int = MAX_PER_CLIENT, window: float = CLIENT_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(root)
        self.project_root = Path(project_root) if project_root else self.root.parent.parent
        self.max_photos, self.max_bytes, self.min_free = max_photos, max_bytes, min_free
        self.max_per_client, self.window, self._clock = max_per_client, window, clock
        self._recent: dict[str, list[float]] = {}  # client -> times of its new corrections in the window
        self._lock = threading.Lock()  # one correction at a time: the checks, the write and the line

    def _admit(self, client: str) -> None:
        """FeedbackError `too_many` when `client` has added max_per_client corrections within the
        window; otherwise counts this one. Called under the lock."""
        now = self._clock()
        recent = [t for t in self._recent.get(client, []) if now - t < self.window]
        if len(recent) >= self.max_per_client:
            self._recent[client] = recent
            raise FeedbackError("too_many", f"{len(recent)} corrections from this client in the last "
                                            f"{self.window / 60:.0f} minutes, the most one client may send; "
                                            "try again later")
        if len(self._recent) >= MAX_CLIENTS_TRACKED and client not in self._recent:
            self._recent = {k: v for k, v in self._recent.items() if v and now - v[-1] < self.window}
        self._recent[client] = [*recent, now]

    @property
    def log_path(self) -> Path:
        return self.root / CORRECTIONS

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.project_root).as_posix()
        except ValueError:
            return path.as_posix()

    def usage(self) -> tuple[int, int]:
        """(photos, bytes) the store holds now: the files in its label folders and the log."""
        photos = size = 0
        if self.log_path.is_file():
            size += self.log_path.stat().st_size
        if not self.root.is_dir():
            return photos, size
        for folder in os.scandir(self.root):
            if not folder.is_dir(follow_symlinks=False) or folder.name.startswith("."):
                continue
            for entry in os.scandir(folder.path):
                if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                    photos += 1
                    size += entry.stat(follow_symlinks=False).st_size
        return photos, size

    @staticmethod
    def check_photo(data: bytes, *, min_side: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
        """The decoded format of `data` (PNG, JPEG, ...), or FeedbackError with ImageError's reason."""
        if len(data) > MAX_PHOTO_BYTES:
            raise FeedbackError("file_too_large", f"{len(data):,} bytes, over the {MAX_PHOTO_BYTES:,}-byte "
                                                  "limit for one photo")
        try:
            _, info = open_rgb(bytes(data), min_side=min_side, max_pixels=max_pixels)
        except ImageError as exc:
            detail = "not an image this app can read; send a JPEG or PNG photo" \
                if exc.reason == "not_an_image" else str(exc)
            raise FeedbackError(exc.reason, detail) from None
        return info.format

    def store(self, photo_bytes: bytes, corrected_label: str, *, model: str, classes: list[str],
              prediction: str | None, familiarity: float | None, unfamiliar: bool | None,
              min_side: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, client: str = "") -> Correction:
        """Keep a correction: the photo under `<label>/<sha256>.<ext>` (written to a temporary name
        in that folder, then renamed) and its JSON line. `classes`: the served model's class names;
        the label is one of them or `not-a-room`. `model` is "name/version"; `prediction`,
        `familiarity` and `unfamiliar` are what that model said of this photo. The same photo
        corrected again to the same label writes nothing and returns `new=False`. `client` (a user
        name or an address) is recorded, and limited to max_per_client new corrections a window."""
        label = label_from(corrected_label)
        allowed = labels_for(classes)
        if label not in allowed:
            raise FeedbackError("unknown_label", f"{corrected_label!r} is not a label of this model; "
                                                 f"use one of {', '.join(allowed)}")
        if label in ("", ".", "..") or "/" in label or "\\" in label or label.startswith("."):
            raise FeedbackError("unknown_label", f"{label!r} cannot name a folder")
        fmt = self.check_photo(photo_bytes, min_side=min_side, max_pixels=max_pixels)
        sha256 = hashlib.sha256(photo_bytes).hexdigest()
        target = self.root / label / f"{sha256}{FORMAT_SUFFIX.get(fmt, OTHER_SUFFIX)}"
        line = json.dumps({"time": _now(), "model": model, "sha256": sha256, "prediction": prediction,
                           "familiarity": _plain(familiarity), "unfamiliar": _plain(unfamiliar), "label": label,
                           "file": f"{label}/{target.name}", "client": client[:200]},
                          separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            if target.is_file():
                return Correction(target, self.relative(target), sha256, label, new=False)
            photos, size = self.usage()
            if photos + 1 > self.max_photos or size + len(photo_bytes) + len(line) > self.max_bytes:
                raise FeedbackError("store_full", f"feedback store full ({photos:,} photos, {size / 2**20:.0f} MB in "
                                                  f"{self.relative(self.root)}; limits {self.max_photos:,} photos, "
                                                  f"{self.max_bytes / 2**20:.0f} MB): this correction is not kept")
            free = shutil.disk_usage(self.root if self.root.is_dir() else self.project_root).free
            if free - len(photo_bytes) < self.min_free:
                raise FeedbackError("store_full", f"feedback store full: the disk has {free / 2**20:,.0f} MB free and "
                                                  f"keeps at least {self.min_free / 2**20:,.0f} MB for the pipeline; "
                                                  "this correction is not kept")
            self._admit(client)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{uuid.uuid4().hex}.part")
            try:
                with open(partial, "xb") as out:
                    out.write(photo_bytes)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as out:  # one write: a whole line
                out.write(line)
        log.info("feedback: kept %s (%s said %s)", self.relative(target), model, prediction)
        return Correction(target, self.relative(target), sha256, label, new=True)


def feedback_confirmation(label: str, relative: str, new: bool) -> str:
    """The line the app shows once a correction is kept."""
    said = "not a room" if label == NOT_A_ROOM else label
    use = ("it joins the out-of-distribution evaluation set, never the training data" if label == NOT_A_ROOM
           else "the next `dvc repro` trains on it")
    return f"{'Thank you: kept' if new else 'Already kept'} as **{said}** (`{relative}`); {use}."


def record_correction(store: FeedbackStore, served: ServedModel, photo_bytes: bytes, label: str,
                      max_pixels: int = DEFAULT_MAX_PIXELS, client: str = "") -> Correction:
    """A correction of what `served` says of `photo_bytes`: the photo is checked first (as the app
    checks uploads: the model's smallest side, the server's pixel budget), then classified here,
    by the served model itself, so what the log says the model predicted is the server's answer,
    whatever a client claims."""
    label = label_from(label)
    allowed = labels_for(served.class_names)
    if label not in allowed:  # before running the model
        raise FeedbackError("unknown_label", f"{label!r} is not a label of this model; use one of {', '.join(allowed)}")
    store.check_photo(photo_bytes, min_side=served.min_side, max_pixels=max_pixels)
    row = served.classify([bytes(photo_bytes)], log=False).iloc[0]
    if row.get("error"):
        reason, _, detail = str(row["error"]).partition(": ")
        raise FeedbackError(reason or "not_classified", detail or str(row["error"]))
    version = served.version
    return store.store(photo_bytes, label, model=f"{version.name}/{version.version}", classes=served.class_names,
                       prediction=str(row["label"]), familiarity=row.get("familiarity"),
                       unfamiliar=row.get("unfamiliar"), min_side=served.min_side, max_pixels=max_pixels,
                       client=client)


# ---------------------------------------------------------------- the HTTP endpoint

STATUS = {"store_full": 507, "too_many": 429}  # any other FeedbackError: 400


class _TooLarge(Exception):
    pass


def _user(request: Any) -> str | None:
    """Gradio's login (--auth): the user the cookie its /login sets names, None when not logged
    in; "" without a login (a plain Starlette app, or Gradio without --auth), where everyone is."""
    app = request.app
    if getattr(app, "auth", None) is None and getattr(app, "auth_dependency", None) is None:
        return ""
    cookie_id, cookies = getattr(app, "cookie_id", ""), request.cookies
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    user = getattr(app, "tokens", {}).get(token) if token else None
    return None if user is None else str(user)


def client_key(user: str | None, address: str | None) -> str:
    """Who sent a correction, for the per-client limit and the log: the logged-in user, else the
    client's address."""
    return f"user:{user}" if user else f"address:{address or 'unknown'}"


def feedback_route(store: FeedbackStore, current: Callable[[], ServedModel], max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_body: int = MAX_PHOTO_BYTES + 2**20):
    """The route `POST /feedback` (a Starlette Route, for the Gradio server's app): multipart, a
    file `photo` and a field `label`. Answers `{"stored", "sha256", "label", "new"}` (stored: the
    photo's path in the project; new: false when it was kept already); 400 with `{"error": one
    line}` for bad input, 401 without Gradio's login when the app has one (--auth), 413 past
    `max_body` bytes (the body is never read further), 507 when the store is full. `current()`
    gives the model served now, which classifies the photo again (record_correction)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def refuse(status: int, message: str) -> JSONResponse:
        log.warning("feedback refused (HTTP %d): %s", status, message)
        return JSONResponse({"error": message}, status_code=status)

    async def feedback(request: Request) -> JSONResponse:
        user = _user(request)
        if user is None:
            return refuse(401, "not logged in: log in through the app's /login first (the server runs with --auth)")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body:
            return refuse(413, f"the request is {int(length):,} bytes, over the {max_body:,}-byte limit")
        received = 0

        async def receive():  # counts the body as it arrives: a chunked upload is capped too
            nonlocal received
            message = await request.receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise _TooLarge
            return message

        try:
            form = await Request(request.scope, receive).form(max_files=1, max_fields=4)
        except _TooLarge:
            return refuse(413, f"the request is over the {max_body:,}-byte limit")
        except Exception as exc:  # noqa: BLE001 - a malformed multipart body is the client's mistake
            return refuse(400, f"send multipart/form-data with a file `photo` and a field `label` ({exc})")
        try:
            photo, label = form.get("photo"), form.get("label")
            if not isinstance(photo, UploadFile):
                return refuse(400, "send the photo as a file field `photo` (multipart/form-data)")
            if not isinstance(label, str) or not label.strip():
                return refuse(400, f"send the correct label in the field `label`: one of "
                                   f"{', '.join(labels_for(current().class_names))}")
            data = await photo.read()
        finally:
            await form.close()
        try:
            client = client_key(user, request.client.host if request.client else None)
            kept = await run_in_threadpool(record_correction, store, current(), data, label, max_pixels, client)
        except FeedbackError as exc:
            return refuse(STATUS.get(exc.reason, 400), str(exc))
        except OSError as exc:  # a full disk, a read-only project
            return refuse(500, f"the correction could not be kept ({exc.strerror or exc})")
        return JSONResponse({"stored": kept.relative, "sha256": kept.sha256, "label": kept.label, "new": kept.new})

    return Route("/feedback", feedback, methods=["POST"])
