"""The served model, end to end: a real `cleanmessy serve` (Gradio) on a loopback port, against the
model registered by the tiny real pipeline run; called with gradio_client, the predict CLI, and a
real browser (Playwright driving Debian's Chromium). Serving and predicting only read a project:
every test here uses the session's read-only `tiny_project`, which no test changes."""

from __future__ import annotations

import os
import shlex
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from conftest import CHROMIUM, CHROMIUM_ARGS, run, serving

pytestmark = pytest.mark.slow
MAX_PIXELS = 1_000_000  # the test server's pixel budget


@pytest.fixture(scope="module")
def app(tiny_project, tmp_path_factory):
    """One server for the module, with a small pixel budget so the over-budget case is cheap; its
    console goes to app.log (read by ServerLog), outside the project."""
    project, _ = tiny_project
    log = tmp_path_factory.mktemp("serve") / "app.log"
    with serving(project, "--stage", "production", "--max-pixels", str(MAX_PIXELS), log=log) as url:
        yield project, url, log


@pytest.fixture(scope="module")
def photos(tiny_project, tmp_path_factory) -> dict[str, Path]:
    """Test photos in the shapes users send: the pipeline's own test images, plus RGBA, grayscale,
    palette and EXIF-rotated JPEG versions of one."""
    project, _ = tiny_project
    test = pd.read_csv(project / "data/splits/test.csv")
    folder = tmp_path_factory.mktemp("photos")
    out = {}
    for label in ("clean", "messy"):
        out[label] = project / test[test["label"] == label]["path"].iloc[0]
    base = Image.open(out["messy"]).convert("RGB").resize((120, 90))
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("L").save(folder / "gray.png")
    base.convert("P").save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    base.save(folder / "rotated.jpg", exif=exif)
    out.update({name: folder / f"{name}.{ext}" for name, ext in
                (("rgba", "png"), ("gray", "png"), ("palette", "png"), ("rotated", "jpg"))})
    return out


class ServerLog:
    """The `cleanmessy serve` console (the `app` fixture's log): what appeared since the last call
    to `new_lines`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = len(self.path.read_text())

    def new_lines(self) -> list[str]:
        text = self.path.read_text()
        new, self.seen = text[self.seen:], len(text)
        return new.splitlines()


def require_chromium() -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (make test does)")
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")


def cli_predictions(project: Path, files: list[Path], tmp_path: Path, *args: str) -> pd.DataFrame:
    out = tmp_path / "preds.csv"
    result = run(["cleanmessy", "predict", *map(str, files), "--out", str(out), *args], project, check=False)
    assert result.returncode in (0, 1), result.stderr
    frame = pd.read_csv(out)  # confidences stay numeric (empty = NaN for failed rows)
    return frame.fillna({"label": "", "error": ""})


def confidences(label_output: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label_output["confidences"]}


@pytest.mark.smoke  # `make test-fast`: this server starts and answers
def test_app_and_cli_agree(app, photos, tmp_path):
    """For every input shape, the app's label and confidences equal the predict CLI's."""
    project, url, _ = app
    client = Client(url, verbose=False)
    names = ["clean", "messy", "rgba", "gray", "palette", "rotated"]
    cli = cli_predictions(project, [photos[n] for n in names], tmp_path)
    assert (cli["error"] == "").all()
    for name, (_, row) in zip(names, cli.iterrows()):
        label, heatmap = client.predict(handle_file(str(photos[name])), api_name="/predict")
        assert label["label"] == row["label"], name
        for cls, conf in confidences(label).items():
            assert conf == pytest.approx(row[cls], abs=1e-5), (name, cls)
        with Image.open(heatmap) as heat:  # the overlay has the photo's (EXIF-corrected) size
            with Image.open(photos[name]) as original:
                expected = original.size[::-1] if name == "rotated" else original.size
            assert heat.size == expected


def test_model_info_names_the_registered_version(app):
    """The model-info endpoint reports the version the registry holds at `production`."""
    from mlflow import MlflowClient

    project, url, _ = app
    info = Client(url, verbose=False).predict(api_name="/model_info")
    store = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=store, registry_uri=store).get_model_version_by_alias(
        "clean-vs-messy", "production")
    assert info["name"] == "clean-vs-messy" and info["version"] == str(version.version)
    assert "production" in info["stages"] and info["run_id"] == version.run_id
    assert info["test_accuracy"] == pytest.approx(float(version.tags["test_accuracy"]))
    assert info["class_names"] == ["clean", "messy"]
    assert info["model_card"].startswith("# Model card: clean-vs-messy")  # shown in the app's model panel
    # The tiny pipeline trains on the embedded sample; evaluate records that, and ingest's min_side.
    data = info["training_data"]
    assert data["kind"] == "sample" and "not photos" in data["description"]
    assert set(data["classes"]) == {"clean", "messy"} and data["n_images"] == sum(data["classes"].values())
    assert info["min_side"] == 32  # ingest.min_side's default, not changed by the tiny params
    assert info["test_images"] == int(version.tags["test_images"])


def test_model_panel_says_what_the_model_was_trained_on():
    """The panel's words for the embedded sample, for photos, and for versions registered before
    evaluate recorded the training data."""
    from cleanmessy.serving.app import data_warning, info_markdown, training_markdown
    from cleanmessy.serving.model import ServedModel, _training_data

    sample = {"kind": "sample", "n_images": 100, "classes": {"clean": 50, "messy": 50}, "description":
              "the embedded synthetic sample: cartoon rooms drawn by the project's generator, not photos"}
    info = {"training_data": sample, "test_accuracy": 1.0, "test_images": 10}
    assert training_markdown(info) == (
        "Trained on the embedded synthetic sample: cartoon rooms drawn by the project's generator, not photos — "
        "100 images (clean 50, messy 50). Test accuracy 100.0 % (95 % interval 72.2 %–100.0 %) on 10 held-out "
        "images of that data.")
    assert "not meaningful" in data_warning(info)

    folder = {**sample, "kind": "folder", "description": "photos from the folder ../shared/datasets/clean-messy"}
    info = {"training_data": folder, "test_accuracy": 0.95, "test_images": 20}
    assert training_markdown(info).startswith("Trained on photos from the folder ../shared/datasets/clean-messy — ")
    assert data_warning(info) == ""

    legacy_meta = {"class_names": ["clean", "messy"], "image_size": 32}  # what evaluate logged before
    assert _training_data(legacy_meta) is None and ServedModel.min_side == 32
    info = {"name": "clean-vs-messy", "version": "1", "stages": ["production"], "run_id": "abc",
            "class_names": ["clean", "messy"], "image_size": 32, "training_data": None, "min_side": 32,
            "test_accuracy": 1.0, "test_images": None}
    assert "Training data: not recorded" in info_markdown(info) and "Test accuracy 100.0 %." in info_markdown(info)
    assert data_warning(info) == ""

    # Whether the app follows its alias, in words: following it, or not checking it (--poll 0).
    served = {**info, "uri": "models:/clean-vs-messy/1", "serving_since": "2026-12-07 06:00:00 UTC"}
    following = {**served, "model_uri": "models:/clean-vs-messy@production", "follows_alias": True}
    assert "Serving version 1 since 2026-12-07 06:00:00 UTC, following `models:/clean-vs-messy@production`." in \
        info_markdown(following)
    assert "`models:/clean-vs-messy@production` is not checked again (--poll 0)" in \
        info_markdown({**following, "follows_alias": False})
    exact = info_markdown({**served, "model_uri": "models:/clean-vs-messy/1", "follows_alias": False})
    assert "since 2026-12-07 06:00:00 UTC." in exact and "checked" not in exact


def _bad_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    (folder / "notes.png").write_text("this is not an image")
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1100, 1000), "white").save(folder / "huge.png")  # 1.1 MP > the 1 MP budget
    return {
        "not an image": (folder / "notes.png", "not an image"),
        "truncated": (folder / "truncated.png", "truncated"),
        "over budget": (folder / "huge.png", "over the budget"),
    }


def test_bad_uploads_get_a_clear_message_and_the_server_keeps_serving(app, photos, tmp_path):
    """Non-image, truncated and over-budget uploads each get their own message, and one line in the
    server's console (no traceback); a good photo after them is still classified."""
    project, url, log = app
    client = Client(url, verbose=False)
    console = ServerLog(log)
    bad = _bad_files(tmp_path, photos["messy"])
    for case, (path, words) in bad.items():
        with pytest.raises(Exception) as error:
            client.predict(handle_file(str(path)), api_name="/predict")
        assert words in str(error.value), case
    label, _ = client.predict(handle_file(str(photos["messy"])), api_name="/predict")
    assert set(confidences(label)) == {"clean", "messy"}
    lines = console.new_lines()
    assert len(lines) <= len(bad) and not any("Traceback" in line for line in lines), lines


def test_photos_smaller_than_the_models_min_side_are_refused(app, photos, tmp_path):
    """A 1x1 or 31x40 photo is refused by the app and the CLI with ingest's reason code; 32x32 passes."""
    project, url, _ = app
    client = Client(url, verbose=False)
    base = Image.open(photos["messy"]).convert("RGB")
    sizes = {"1x1": (1, 1), "31x40": (31, 40), "32x32": (32, 32)}
    files = {}
    for name, size in sizes.items():
        files[name] = tmp_path / f"{name}.png"
        base.resize(size).save(files[name])
    for name in ("1x1", "31x40"):
        with pytest.raises(Exception) as error:
            client.predict(handle_file(str(files[name])), api_name="/predict")
        assert "too_small" in str(error.value) and "32 px" in str(error.value), name
    label, _ = client.predict(handle_file(str(files["32x32"])), api_name="/predict")
    assert set(confidences(label)) == {"clean", "messy"}
    cli = cli_predictions(project, list(files.values()), tmp_path)
    assert cli["error"][0].startswith("too_small") and cli["error"][1].startswith("too_small")
    assert cli["error"][2] == "" and cli["label"][2] in ("clean", "messy")


def test_concurrent_clients_are_all_answered(app, photos, tmp_path):
    """8 clients x 25 requests against one server: every answer is correct, the server lives on."""
    project, url, _ = app
    expected = cli_predictions(project, [photos["clean"], photos["messy"]], tmp_path)
    want = dict(zip(["clean", "messy"], expected["label"]))
    failures: list[str] = []

    def client_loop(worker: int) -> None:
        client = Client(url, verbose=False)
        for i in range(25):
            name = ("clean", "messy")[(worker + i) % 2]
            try:
                label, _ = client.predict(handle_file(str(photos[name])), api_name="/predict")
                if label["label"] != want[name]:
                    failures.append(f"worker {worker} request {i}: {label['label']} != {want[name]}")
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"worker {worker} request {i}: {exc!r}")

    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures, failures[:5]
    assert Client(url, verbose=False).predict(api_name="/model_info")["name"] == "clean-vs-messy"


def test_browser_upload_shows_label_and_heat_map(app, photos, tmp_path):
    """In Chromium: the model panel names the training data and warns that a sample-trained model
    means nothing on photos; upload a photo, click Classify, see the label and the Grad-CAM image."""
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    project, url, _ = app
    expected = cli_predictions(project, [photos["messy"]], tmp_path)["label"][0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        panel = page.locator("#model-info")
        expect(panel).to_contain_text("clean-vs-messy", timeout=30_000)
        expect(panel).to_contain_text("Trained on the embedded synthetic sample: cartoon rooms")
        expect(panel).to_contain_text("held-out images of that data")
        expect(panel).to_contain_text("95 % interval")
        expect(panel).to_contain_text("Serving version")
        expect(page.locator("#data-warning")).to_be_visible()
        # The examples are test pictures of the model's own data (the sample's here), not fixed cartoons.
        expect(page.get_by_text("Examples (test photos of the model's own data)")).to_be_visible()
        expect(page.locator("#data-warning")).to_contain_text("answers on real photos are not meaningful")
        page.locator("#photo input[type=file]").set_input_files(str(photos["messy"]))
        page.locator("#classify").click()
        expect(page.locator("#label")).to_contain_text(expected, timeout=30_000)
        heat = page.locator("#heatmap img")
        expect(heat).to_be_visible(timeout=30_000)
        assert heat.evaluate("img => img.naturalWidth") > 0
        expect(page.locator("#status")).to_have_text("")
        # Beside the label, how familiar the photo is (a tiny model's 16 training photos are too few to
        # flag any photo at 5 %: the unfamiliar warning is tested on a fresh clone's full model).
        familiar = page.locator("#familiarity")
        expect(familiar).to_contain_text("Like the photos this model was trained on (familiarity")
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        page.locator("#photo input[type=file]").set_input_files(str(photos["clean"]))  # a new photo: line gone
        expect(familiar).to_be_hidden(timeout=15_000)
        browser.close()


def test_browser_user_mistakes_get_one_line_and_no_error_state(app, photos, tmp_path):
    """In Chromium: a text file named .png is refused as soon as it is uploaded (no broken image, a
    one-line reason), Classify with no photo asks for one, a 1x1 photo is too small; no red "Error"
    badge or toast anywhere, and at most one console line per mistake, no traceback."""
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    project, url, log = app
    notes = tmp_path / "notes.png"
    notes.write_text("this is not an image")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), "white").save(tiny)
    console = ServerLog(log)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def no_error_state() -> None:
            page.wait_for_timeout(1000)  # an error badge or toast would be up by now
            assert page.get_by_text("Error", exact=True).count() == 0
            assert page.locator(".toast-body").count() == 0

        page.goto(url)
        expect(page.locator("#model-info")).to_contain_text("clean-vs-messy", timeout=30_000)
        status = page.locator("#status")
        page.locator("#photo input[type=file]").set_input_files(str(notes))
        expect(status).to_contain_text("not an image", timeout=15_000)  # on upload, before any Classify
        expect(status).to_contain_text("(not_an_image)")
        expect(page.locator("#photo img")).to_have_count(0)  # the input is emptied: no broken-image icon
        no_error_state()
        page.screenshot(path=str(tmp_path / "text-as-png.png"), full_page=True)

        page.reload()
        expect(page.locator("#model-info")).to_contain_text("clean-vs-messy", timeout=30_000)
        page.locator("#classify").click()
        expect(status).to_have_text("Upload or paste a photo first.", timeout=15_000)
        no_error_state()

        page.locator("#photo input[type=file]").set_input_files(str(tiny))
        expect(status).to_contain_text("(too_small)", timeout=15_000)
        expect(status).to_contain_text("1x1 is smaller than 32 px")
        expect(page.locator("#photo img")).to_have_count(0)
        no_error_state()

        page.locator("#photo input[type=file]").set_input_files(str(photos["messy"]))  # the app still works
        expect(status).to_have_text("")
        page.locator("#classify").click()
        expect(page.locator("#heatmap img")).to_be_visible(timeout=30_000)
        browser.close()
    lines = console.new_lines()
    assert len(lines) <= 2 and not any("Traceback" in line for line in lines), lines  # two files refused


def test_predict_cli_reports_bad_files_per_row(tiny_project, photos, tmp_path):
    """A batch with bad files still classifies the good ones; each bad one has its reason."""
    project, _ = tiny_project
    bad = _bad_files(tmp_path, photos["messy"])
    files = [photos["clean"], bad["not an image"][0], bad["truncated"][0], tmp_path / "missing.jpg", photos["messy"]]
    frame = cli_predictions(project, files, tmp_path)
    assert list(frame.columns) == ["path", "label", "clean", "messy", "familiarity", "unfamiliar", "error", "model",
                                   "trained_on"]
    assert len(frame) == 5
    assert frame["error"][0] == "" and frame["error"][4] == ""
    assert frame["error"][1].startswith("not_an_image") and frame["error"][2].startswith("truncated")
    assert "No such file" in frame["error"][3]
    assert frame["clean"][0] + frame["messy"][0] == pytest.approx(1.0, abs=1e-5)
    assert 0 < frame["familiarity"][0] <= 1 and frame["unfamiliar"][0] in (True, False)
    assert frame[["familiarity", "unfamiliar"]].iloc[1:4].isna().all().all()  # not classified: not measured


def test_predict_table_fits_100_columns(tiny_project, photos, tmp_path):
    """A batch with long paths and long errors prints lines of at most 100 characters: the table
    shows each failure's reason code, the full reasons follow it; the CSV keeps them whole. The log
    says the model was loaded (nothing is served)."""
    project, _ = tiny_project
    deep = tmp_path / ("a-folder-with-a-rather-long-name-" * 3) / "and-another-long-one-inside-it"
    deep.mkdir(parents=True)
    bad = _bad_files(deep, photos["messy"])
    files = [photos["clean"], bad["not an image"][0], bad["truncated"][0], deep / "missing.jpg", photos["messy"]]
    out = tmp_path / "preds.csv"
    result = run(["cleanmessy", "predict", *map(str, files), "--out", str(out)], project, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    frame = pd.read_csv(out).fillna({"label": "", "error": ""})
    full = [f"{p}: {e}" for p, e in zip(frame["path"], frame["error"]) if e]
    assert len(full) == 3 and max(map(len, full)) > 100  # what used to stretch the table
    table = "\n".join(lines)
    for code in ("not_an_image", "truncated", "unreadable"):
        assert code in table
    assert "not classified (3):" in lines
    flat = " ".join(line.strip() for line in lines)  # the wrapped reasons, read back
    assert "No such file or directory" in flat and "truncated or corrupt" in flat
    assert "loaded models:/clean-vs-messy/" in result.stderr and "serving models" not in result.stderr


def test_predict_user_mistakes_are_one_line_errors(tiny_project, photos, tmp_path):
    """Bad options get one line and exit 2; a reader that stops early (`| head`) gets no traceback."""
    project, _ = tiny_project
    photo = str(photos["messy"])
    for args, words in ((["--batch-size", "0"], "--batch-size must be at least 1"),
                        (["--out", str(tmp_path / "nowhere" / "p.csv")], "does not exist"),
                        (["--out", str(tmp_path)], "is a folder")):
        result = run(["cleanmessy", "predict", photo, *args], project, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, args
        assert result.stderr.strip().splitlines()[-1].startswith("cleanmessy predict: error: "), args
        assert words in result.stderr, args
    # More than a pipe's buffer of rows, so the write fails once head has gone.
    result = run(["bash", "-c", f"cleanmessy predict {' '.join([shlex.quote(photo)] * 1000)} | head -n 1"], project)
    assert result.stdout.startswith("path") and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_predict_accepts_version_and_legacy_stage_uris(tiny_project, photos, tmp_path):
    """`models:/name/1` and the legacy `models:/name/Production` load through the registry."""
    project, _ = tiny_project
    by_version = cli_predictions(project, [photos["messy"]], tmp_path, "--model-uri", "models:/clean-vs-messy/1")
    legacy = cli_predictions(project, [photos["messy"]], tmp_path, "--model-uri", "models:/clean-vs-messy/Production")
    production = cli_predictions(project, [photos["messy"]], tmp_path, "--stage", "production")
    assert by_version["label"][0] in ("clean", "messy")
    assert legacy["messy"][0] == pytest.approx(production["messy"][0], abs=1e-6)


def test_missing_stage_or_loose_file_is_a_clear_error(tiny_project, photos):
    """An unknown stage names the command that registers one; a loose file path is refused."""
    project, _ = tiny_project
    result = run(["cleanmessy", "serve", "--stage", "nonexistent"], project, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stage 'nonexistent'" in result.stderr and "dvc repro" in result.stderr
    result = run(["cleanmessy", "predict", str(photos["messy"]), "--model-uri", "pipeline/model.keras"],
                 project, check=False)
    assert result.returncode == 2 and "loose files are not served" in result.stderr


def test_auth_protects_the_app(tiny_project, photos):
    """With --auth, the API refuses an anonymous client and answers a logged-in one."""
    project, _ = tiny_project
    with serving(project, "--auth", "alice:s3cret") as url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}config", timeout=10)
        assert refused.value.code == 401
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own error types
            Client(url, verbose=False).predict(api_name="/model_info")
        client = Client(url, auth=("alice", "s3cret"), verbose=False)
        label, _ = client.predict(handle_file(str(photos["messy"])), api_name="/predict")
        assert set(confidences(label)) == {"clean", "messy"}


def test_serve_staging_serves_the_staging_version(tiny_project):
    """`cleanmessy serve --stage staging` serves the version the `staging` alias points at."""
    from mlflow import MlflowClient

    project, _ = tiny_project
    store = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    staging = client.get_model_version_by_alias("clean-vs-messy", "staging")
    with serving(project, "--stage", "staging") as url:
        info = Client(url, verbose=False).predict(api_name="/model_info")
    assert info["version"] == str(staging.version) and "staging" in info["stages"]


def test_predict_a_folder_writes_every_photo_to_the_csv(tiny_project, photos, tmp_path):
    """`cleanmessy predict photos/ --out predictions.csv`: a folder is searched recursively for
    image files (other files are not images and are skipped); one row per photo."""
    project, _ = tiny_project
    folder = tmp_path / "photos"
    (folder / "kitchen").mkdir(parents=True)
    for name in ("clean", "messy"):
        (folder / "kitchen" / f"{name}.png").write_bytes(photos[name].read_bytes())
    (folder / "notes.txt").write_text("not a photo")
    out = tmp_path / "predictions.csv"
    result = run(["cleanmessy", "predict", str(folder), "--out", str(out)], project)
    frame = pd.read_csv(out, keep_default_na=False)
    assert sorted(Path(p).name for p in frame["path"]) == ["clean.png", "messy.png"]
    assert (frame["error"] == "").all() and set(frame["label"]) <= {"clean", "messy"}
    # What the model knows: the CSV names the model and its training data, and stderr warns, as the
    # app does, that a sample-trained model has never seen a photo (in lines that fit 100 columns).
    assert list(frame.columns) == ["path", "label", "clean", "messy", "familiarity", "unfamiliar", "error", "model",
                                   "trained_on"]
    assert set(frame["trained_on"]) == {"sample"} and set(frame["model"]) == {"models:/clean-vs-messy/1"}
    assert "predict: warning: models:/clean-vs-messy/1: Not trained on photos." in result.stderr
    warning = result.stderr[result.stderr.index("predict: warning"):result.stderr.index("predict: wrote")]
    assert "not meaningful" in warning and max(map(len, warning.splitlines())) <= 100


def test_login_limiter_refuses_after_five_failures_then_forgives():
    from cleanmessy.serving.app import LoginLimiter

    now = [0.0]
    check = LoginLimiter("alice", "s3cret", max_failures=5, window=60, clock=lambda: now[0])
    assert check("alice", "s3cret")
    for _ in range(5):
        assert not check("alice", "guess")
    assert not check("alice", "s3cret")  # locked: the right password too
    assert check("bob", "s3cret") is False  # other users are not locked, and bob is not a user
    now[0] = 61.0
    assert check("alice", "s3cret")


def test_a_strangers_wrong_passwords_lock_out_only_the_stranger():
    """The lock-out is per user and client address: five wrong passwords from one address do not
    keep the real user, at another, out; the stranger's address stays locked. Distinct user names
    cannot grow the limiter's memory past its bound."""
    import asyncio

    from cleanmessy.serving.app import ClientAddress, LoginLimiter

    check = LoginLimiter("alice", "s3cret", max_failures=5, window=60, clock=lambda: 0.0, max_tracked=100)
    answers = []

    def login(address: str, password: str, user: str = "alice") -> bool:
        async def app(scope, receive, send):  # the login route: the check runs inside the request
            answers.append(check(user, password))

        asyncio.run(ClientAddress(app)({"type": "http", "path": "/login", "client": (address, 1234)}, None, None))
        return answers[-1]

    for _ in range(5):
        assert not login("203.0.113.9", "guess")
    assert not login("203.0.113.9", "s3cret")  # the stranger's address is locked, the right password too
    assert login("198.51.100.7", "s3cret")  # the real user, elsewhere, is not
    for i in range(1000):
        login("203.0.113.9", "guess", user=f"user{i}")
    assert len(check._failures) <= 100


def test_guessing_the_password_is_stopped(tiny_project):
    """30 wrong passwords against the real server, then the right one: refused (the limit holds);
    the password given by CLEANMESSY_AUTH (not in `ps`) works for a fresh user session later."""
    project, _ = tiny_project
    with serving(project, CLEANMESSY_AUTH="alice:s3cret") as url:
        def login(password: str) -> int:
            data = urllib.parse.urlencode({"username": "alice", "password": password}).encode()
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}login", data=data), timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert login("s3cret") == 200
        codes = [login(f"guess{i}") for i in range(30)]
        assert all(code >= 400 for code in codes)
        assert login("s3cret") >= 400  # locked for a minute


def test_uploads_are_deleted_after_the_ttl(tiny_project, photos, tmp_path):
    """Every upload lands in Gradio's temp folder; with --upload-ttl they are deleted, so
    anonymous users cannot fill the disk."""
    import time

    project, _ = tiny_project
    temp = tmp_path / "gradio-tmp"
    with serving(project, "--upload-ttl", "2", GRADIO_TEMP_DIR=str(temp)) as url:
        examples = {p for p in temp.rglob("*") if p.is_file()}  # the app's own example photos stay
        client = Client(url, verbose=False)
        for name in ("messy", "clean", "rgba"):
            client.predict(handle_file(str(photos[name])), api_name="/predict")
        uploaded = [p for p in temp.rglob("*") if p.is_file() and p not in examples]
        assert len(uploaded) >= 3  # the photos, and the heat maps made from them
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.exists() for p in uploaded):
            time.sleep(1)
        assert not [p for p in uploaded if p.exists()], [p.relative_to(temp) for p in uploaded if p.exists()]


def test_decompression_bomb_upload_gets_the_apps_own_message(app, tmp_path):
    """A 400-megapixel PNG of a few KB: the app's own one-line reason (too_large), not Gradio's
    generic error naming the server's temp folder."""
    project, url, _ = app
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(Exception) as error:
        Client(url, verbose=False).predict(handle_file(str(bomb)), api_name="/predict")
    message = str(error.value)
    assert "too_large" in message and "/tmp" not in message, message


def test_the_app_follows_its_alias_in_the_browser(own_project, tmp_path):
    """`cleanmessy serve --stage production` checks its alias (here every second): when production
    moves, the page's model panel and `/model_info` follow, with the time it switched. A version
    that fails to load leaves the old one serving, and the panel says why."""
    require_chromium()
    from mlflow import MlflowClient
    from playwright.sync_api import expect, sync_playwright

    store = f"sqlite:///{own_project / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    first = client.get_model_version_by_alias("clean-vs-messy", "production")
    artifacts = client.get_model_version_download_uri("clean-vs-messy", first.version)  # the same model again
    second = client.create_model_version("clean-vs-messy", artifacts, run_id=first.run_id, tags=first.tags,
                                         description=first.description)
    broken_folder = tmp_path / "not-a-model"
    broken_folder.mkdir()
    (broken_folder / "README").write_text("no MLmodel here")
    broken = client.create_model_version("clean-vs-messy", broken_folder.as_uri(), tags=first.tags)
    with serving(own_project, "--stage", "production", "--poll", "1") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        panel = page.locator("#model-info")
        expect(panel).to_contain_text(f"version {first.version} · stage: production", timeout=30_000)
        api = Client(url, verbose=False)
        assert api.predict(api_name="/model_info")["version"] == str(first.version)

        client.set_registered_model_alias("clean-vs-messy", "production", second.version)
        expect(panel).to_contain_text(f"version {second.version} · stage: production", timeout=60_000)
        expect(panel).to_contain_text(f"Serving version {second.version} since ")
        info = api.predict(api_name="/model_info")
        assert info["version"] == str(second.version) and info["load_error"] == ""
        page.screenshot(path=str(tmp_path / "followed.png"), full_page=True)

        client.set_registered_model_alias("clean-vs-messy", "production", broken.version)
        expect(panel).to_contain_text(f"version {broken.version} (now at models:/clean-vs-messy@production) could "
                                      "not be loaded", timeout=60_000)
        expect(panel).to_contain_text(f"still serving version {second.version}")
        info = api.predict(api_name="/model_info")
        assert info["version"] == str(second.version) and "could not be loaded" in info["load_error"]
        page.screenshot(path=str(tmp_path / "load-failed.png"), full_page=True)
        browser.close()


def test_feedback_is_off_unless_asked_for(app):
    """Without --feedback (tests/serving/test_feedback_loop.py has it on): the page has no
    correction buttons or note, and POST /feedback is 404; nothing is kept."""
    project, url, _ = app
    request = urllib.request.Request(f"{url}feedback", data=b"label=clean", method="POST")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=10)
    assert missing.value.code == 404
    with urllib.request.urlopen(f"{url}config", timeout=10) as response:
        config = response.read().decode()
    assert "feedback-note" not in config and "Wrong?" not in config and "feedback-clean" not in config
    assert not (project / "data/feedback/corrections.jsonl").exists()
