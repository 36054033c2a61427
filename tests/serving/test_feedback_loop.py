"""Feedback that the next `dvc repro` learns from (issue 20, point 6), end to end: a real
`cleanmessy serve --feedback` on a private copy of the tiny pipeline's project, a correction clicked
in Chromium (Playwright) and sent to `POST /feedback`, then a real `dvc repro` in that copy. Without
--feedback there are no buttons and no endpoint (tests/serving/test_serving.py)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx
import pandas as pd
import pytest
from gradio_client import Client, handle_file
from PIL import Image, ImageOps

from conftest import browser_page, clone_project, run, screenshot, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def feedback_app(tiny_project, tmp_path_factory):
    """`cleanmessy serve --feedback` on the module's own copy of the tiny project (a correction
    changes the project; the session's tiny_project stays read-only); its console in app.log."""
    source, _ = tiny_project
    project = clone_project(source, tmp_path_factory.mktemp("feedback") / "project")
    log = project.parent / "app.log"
    with serving(project, "--stage", "production", "--feedback", log=log) as url:
        yield project, url, log


def new_photo(project: Path, folder: Path, name: str, label: str = "clean", turn=ImageOps.mirror) -> Path:
    """A photo the project's data does not hold: one of its test photos, turned (`turn`) and enlarged."""
    test = pd.read_csv(project / "data/splits/test.csv")
    with Image.open(project / test[test["label"] == label]["path"].iloc[0]) as image:
        photo = turn(image.convert("RGB")).resize((64, 48))
    path = folder / name
    photo.save(path)
    known = set(pd.read_csv(project / "data/manifest.csv")["sha256"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() not in known
    return path


def corrections(project: Path) -> list[dict]:
    path = project / "data/feedback/corrections.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_post_feedback_keeps_a_photo_and_refuses_bad_input(feedback_app, tmp_path):
    """`POST /feedback` (multipart: `photo`, `label`): a "not a room" photo is kept under
    data/feedback/not-a-room/<sha256>.png and the JSON answer names it; the same again writes
    nothing; a non-image, an unknown label and a missing photo are 400s with one-line JSON errors."""
    project, url, log = feedback_app
    photo = new_photo(project, tmp_path, "wall.png", turn=ImageOps.flip)  # not the browser test's photo
    data, digest = photo.read_bytes(), hashlib.sha256(photo.read_bytes()).hexdigest()
    answer = httpx.post(f"{url}feedback", files={"photo": ("wall.png", data, "image/png")},
                        data={"label": "not a room"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"stored": f"data/feedback/not-a-room/{digest}.png", "sha256": digest,
                             "label": "not-a-room", "new": True}
    assert (project / answer.json()["stored"]).read_bytes() == data
    line = [c for c in corrections(project) if c["sha256"] == digest]
    assert len(line) == 1 and line[0]["label"] == "not-a-room" and line[0]["prediction"] in ("clean", "messy")
    again = httpx.post(f"{url}feedback", files={"photo": ("x.png", data)}, data={"label": "not-a-room"}, timeout=60)
    assert again.status_code == 200 and again.json()["new"] is False
    assert len([c for c in corrections(project) if c["sha256"] == digest]) == 1

    bad = [({"photo": ("notes.png", b"this is not an image")}, {"label": "clean"}, "not_an_image"),
           ({"photo": ("wall.png", data)}, {"label": "tidy"}, "unknown_label"),
           (None, {"label": "clean"}, "file field `photo`")]
    for files, form, words in bad:
        answer = httpx.post(f"{url}feedback", files=files, data=form, timeout=60)
        assert answer.status_code == 400 and list(answer.json()) == ["error"], answer.text
        assert words in answer.json()["error"] and "\n" not in answer.json()["error"]
    assert "Traceback" not in log.read_text()


def test_a_correction_clicked_in_the_browser_is_learned_by_the_next_dvc_repro(feedback_app, tmp_path):
    """The whole loop. In Chromium: the page says corrected photos are kept; once a photo is
    classified, "Wrong? It is clean / messy / not a room" appears; a click keeps the photo under
    data/feedback/<label>/<sha256>.png with a JSON line whose prediction is the server's own, and
    says so. Then `dvc repro` reruns ingest and train, the manifest holds the photo under the
    corrected label, and the training run records feedback_images = 1."""
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    project, url, log = feedback_app
    photo = new_photo(project, tmp_path, "room.png")
    data, digest = photo.read_bytes(), hashlib.sha256(photo.read_bytes()).hexdigest()
    api = Client(url, verbose=False)
    predicted = api.predict(handle_file(str(photo)), api_name="/predict")[0]["label"]
    corrected = "messy" if predicted == "clean" else "clean"
    info = api.predict(api_name="/model_info")

    with browser_page() as page:
        page.goto(url)
        expect(page.locator("#model-info")).to_contain_text("clean-vs-messy", timeout=30_000)
        expect(page.locator("#feedback-note")).to_contain_text("the photos you correct are kept in this project")
        expect(page.locator("#feedback-clean")).to_be_hidden()  # nothing classified yet
        page.locator("#photo input[type=file]").set_input_files(str(photo))
        page.locator("#classify").click()
        expect(page.locator("#heatmap img")).to_be_visible(timeout=30_000)
        expect(page.locator("#feedback")).to_contain_text("Wrong? It is:", timeout=15_000)
        for name, text in (("clean", "clean"), ("messy", "messy"), ("not-a-room", "not a room")):
            expect(page.locator(f"#feedback-{name}")).to_have_text(text)
        page.locator(f"#feedback-{corrected}").click()
        status = page.locator("#feedback-status")
        expect(status).to_contain_text(f"Thank you: kept as {corrected}", timeout=30_000)
        expect(status).to_contain_text(f"data/feedback/{corrected}/{digest}.png")
        screenshot(page, tmp_path / "feedback-kept.png")
        page.locator("#photo input[type=file]").set_input_files(str(new_photo(project, tmp_path, "next.png", "messy")))
        expect(page.locator("#feedback-clean")).to_be_hidden(timeout=15_000)  # a new photo: no buttons until classified
        expect(status).to_have_text("")

    stored = project / "data/feedback" / corrected / f"{digest}.png"
    assert stored.read_bytes() == data
    (line,) = [c for c in corrections(project) if c["sha256"] == digest]
    assert line["label"] == corrected and line["prediction"] == predicted
    assert line["model"] == f"{info['name']}/{info['version']}" and re.match(r"\d{4}-\d\d-\d\dT.*Z$", line["time"])
    assert set(line) >= {"time", "model", "sha256", "prediction", "familiarity", "unfamiliar", "label"}
    assert "Traceback" not in log.read_text()

    result = run(["dvc", "repro"], project)
    ran = re.findall(r"Running stage '(\w+)'", result.stdout)
    assert ran[:2] == ["ingest", "split"] and "train" in ran, result.stdout[-3000:]
    manifest = pd.read_csv(project / "data/manifest.csv", keep_default_na=False)
    row = manifest[manifest["sha256"] == digest]
    assert row["label"].tolist() == [corrected]
    assert row["source_path"].tolist() == [f"data/feedback/{corrected}/{digest}.png"]
    assert (project / row["path"].iloc[0]).read_bytes() == data
    report = json.loads((project / "data/ingest_report.json").read_text())
    assert report["feedback"]["used"] == 1 and report["feedback"]["conflicts"] == []
    store = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    run_id = json.loads((project / "pipeline/mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(tracking_uri=store).get_run(run_id).data.params["feedback_images"] == "1"
