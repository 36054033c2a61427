"""The Gradio app: classify a room photo with the model the registry holds at a stage, and show a
Grad-CAM heat map of what drove the "messy" score."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import uuid
from pathlib import Path

import gradio as gr
from PIL import Image, UnidentifiedImageError

from cleanmessy import sample
from cleanmessy.errors import UserError
from cleanmessy.images import DEFAULT_MAX_PIXELS, ImageError, open_rgb
from cleanmessy.serving.explain import overlay
from cleanmessy.serving.model import ServedModel

log = logging.getLogger(__name__)
MAX_UPLOAD = "25mb"


class PhotoInput(gr.Image):
    """gr.Image whose upload decoding failures become a message in the UI, not a bare "Error"."""

    is_template = True  # rendered by the frontend as a plain Image

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except (UnidentifiedImageError, OSError, ValueError):
            raise gr.Error("That file is not an image this app can read (try a JPEG or PNG photo).") from None


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


def info_markdown(info: dict) -> str:
    accuracy = "n/a" if info["test_accuracy"] is None else f"{info['test_accuracy']:.1%}"
    stages = ", ".join(info["stages"]) or "none"
    return (f"**Model** `{info['name']}` version **{info['version']}** · stage: **{stages}** · "
            f"test accuracy: **{accuracy}** · run `{info['run_id']}` · classes: {', '.join(info['class_names'])} · "
            f"input {info['image_size']} px")


def example_photos(folder: Path, per_class: int = 2) -> list[str]:
    """A few pictures of the embedded synthetic sample, rendered on the fly (no photos in the repo)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for label in sample.CLASSES:
        for i in range(per_class):
            path = folder / f"{label}_{i}.png"
            sample.render(label, i, size=256).save(path)
            out.append(str(path))
    return out


def build_app(served: ServedModel, examples: list[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> gr.Blocks:
    info = served.info()

    def classify(photo_path: str | None):
        if not photo_path:
            raise gr.Error("Upload or paste a photo first.")
        try:
            photo, _ = open_rgb(Path(photo_path), max_pixels=max_pixels)
        except ImageError as exc:
            raise gr.Error(f"Cannot classify this file: {exc}.") from None
        probs, cam = served.explain(photo)
        return {c: float(p) for c, p in zip(served.class_names, probs)}, overlay(photo, cam)

    def model_info() -> dict:
        return info

    with gr.Blocks(title="Clean vs Messy") as demo:
        gr.Markdown("# Clean vs Messy\nIs this room tidy or cluttered? Upload or paste a photo.")
        gr.Markdown(info_markdown(info), elem_id="model-info")
        if served.model_card:
            with gr.Accordion("Model card", open=False):
                gr.Markdown(served.model_card)
        with gr.Row():
            with gr.Column():
                # image_mode=None: Gradio hands over the uploaded file untouched, so the app decodes it
                # with the same function as the CLI and training (Gradio's RGBA->RGB turns alpha black).
                photo = PhotoInput(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Room photo",
                                   elem_id="photo")
                submit = gr.Button("Classify", variant="primary", elem_id="classify")
                gr.Examples(examples, inputs=photo, label="Examples (synthetic sample rooms)")
            with gr.Column():
                label = gr.Label(num_top_classes=len(served.class_names), label="Prediction", elem_id="label")
                # JPEG: 0.2 ms to encode a 256 px overlay against 7 ms for Gradio's default WebP.
                heat = HeatMapOutput(type="pil", format="jpeg", label='Grad-CAM: regions that drove the "messy" score',
                                elem_id="heatmap", interactive=False)
        submit.click(classify, photo, [label, heat], api_name="predict")
        gr.api(model_info, api_name="model_info")
    return demo


def auth_from(value: str | None) -> tuple[str, str] | None:
    """`user:password` from --auth or CLEANMESSY_AUTH, for Gradio's basic login."""
    value = value or os.environ.get("CLEANMESSY_AUTH")
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth / CLEANMESSY_AUTH must be user:password")
    return user, password


def serve(model_uri: str, host: str, port: int, auth: str | None, max_pixels: int) -> None:
    """Load the model once, warm it up, then serve until interrupted."""
    credentials = auth_from(auth)
    served = ServedModel.load(model_uri)
    examples_dir = Path(tempfile.mkdtemp(prefix="cleanmessy-examples-"))
    demo = build_app(served, example_photos(examples_dir), max_pixels)
    demo.queue(default_concurrency_limit=2)
    log.info("serving on http://%s:%d", host, port)
    demo.launch(server_name=host, server_port=port, share=False, auth=credentials, ssr_mode=False,
                max_file_size=MAX_UPLOAD, allowed_paths=[str(examples_dir)], show_error=True,
                quiet=True, enable_monitoring=False)
