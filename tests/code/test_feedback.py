"""Feedback (issue 20, point 6): the store behind `cleanmessy serve --feedback` (photos by label and
sha256, the corrections' JSON lines, bounds, refusals), the server-side re-classification, the
`POST /feedback` route, and ingest merging `data/feedback` into the data (duplicates dropped,
contradictions reported, `not-a-room/` never training data). Tiny generated images; no model."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cleanmessy.errors import UndeclaredInput
from cleanmessy.params import IngestParams, Params
from cleanmessy.project import Paths
from cleanmessy.serving.feedback import (
    CORRECTIONS,
    NOT_A_ROOM,
    FeedbackError,
    FeedbackStore,
    feedback_confirmation,
    feedback_route,
    label_from,
    record_correction,
)
from cleanmessy.stages import declaration, ingest, restrict_params
from cleanmessy.stages.ingest import FEEDBACK_SHOWN, run_ingest, source_files

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["clean", "messy"]
MODEL = "clean-vs-messy/3"


def image_bytes(seed: int, size=(40, 40), fmt: str = "PNG") -> bytes:
    """An image of random pixels: a different seed gives different content."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lines(store: FeedbackStore) -> list[dict]:
    if not store.log_path.exists():
        return []
    return [json.loads(line) for line in store.log_path.read_text().splitlines()]


def every_file(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    return FeedbackStore(tmp_path / "data" / "feedback")


def keep(store: FeedbackStore, data: bytes, label: str, **kwargs):
    said = {"model": MODEL, "classes": CLASSES, "prediction": "clean", "familiarity": 0.42, "unfamiliar": False}
    return store.store(data, label, **{**said, **kwargs})


# ---------------------------------------------------------------- the store


def test_a_correction_keeps_the_photo_by_sha256_and_one_json_line(store, tmp_path):
    """The original bytes under <label>/<sha256>.png, written atomically (no temporary file left);
    one JSON line with the time, model, sha256, prediction, score, flag and corrected label; the
    path relative to the project."""
    data = image_bytes(1)
    kept = keep(store, data, "messy")
    assert kept.new and kept.label == "messy" and kept.sha256 == sha(data)
    assert kept.relative == f"data/feedback/messy/{sha(data)}.png"
    assert (tmp_path / kept.relative).read_bytes() == data
    assert every_file(store.root) == [CORRECTIONS, f"messy/{sha(data)}.png"]  # nothing else, no .part
    (line,) = lines(store)
    assert line.pop("time").endswith("Z")
    assert line == {"model": MODEL, "sha256": sha(data), "prediction": "clean", "familiarity": 0.42,
                    "unfamiliar": False, "label": "messy", "file": f"messy/{sha(data)}.png", "client": ""}
    assert "photo" not in store.log_path.read_text() and len(store.log_path.read_bytes()) < 400  # no bytes


def test_the_extension_is_the_decoded_format_not_the_upload_name(store):
    data = image_bytes(2, fmt="JPEG")
    assert keep(store, data, "clean").path.name == f"{sha(data)}.jpg"


def test_the_same_photo_again_writes_nothing_another_label_is_kept_too(store):
    """Corrected again to the same label: no second file, no second line. To another label: kept
    as well (ingest reports the contradiction)."""
    data = image_bytes(3)
    first, again = keep(store, data, "messy"), keep(store, data, "messy")
    assert first.new and not again.new and again.path == first.path
    assert len(lines(store)) == 1
    other = keep(store, data, "clean")
    assert other.new and other.path.parent.name == "clean"
    assert [line["label"] for line in lines(store)] == ["messy", "clean"]


def test_not_a_room_is_a_label_as_the_app_and_clients_say_it(store):
    assert label_from("not a room") == label_from("Not a room") == label_from(NOT_A_ROOM) == NOT_A_ROOM
    kept = keep(store, image_bytes(4), "not a room")
    assert kept.label == NOT_A_ROOM and kept.path.parent == store.root / NOT_A_ROOM


@pytest.mark.parametrize("label", ["tidy", "", "../clean", "clean/../../x", ".hidden"])
def test_a_label_the_model_does_not_have_is_refused(store, label):
    with pytest.raises(FeedbackError) as error:
        keep(store, image_bytes(5), label)
    assert error.value.reason == "unknown_label" and "clean, messy, not-a-room" in str(error.value)
    assert not store.root.exists()


@pytest.mark.parametrize(("data", "reason", "kwargs"), [
    (b"this is not an image", "not_an_image", {}),
    (b"", "empty", {}),
    (image_bytes(6)[:200], "truncated", {}),
    (image_bytes(7, size=(100, 100)), "too_large", {"max_pixels": 5_000}),
    (image_bytes(8, size=(20, 20)), "too_small", {"min_side": 32}),
])
def test_what_is_not_a_usable_image_is_refused_with_ingests_reason(store, data, reason, kwargs):
    """ImageError's reason codes, in one line; nothing is written."""
    with pytest.raises(FeedbackError) as error:
        keep(store, data, "clean", **kwargs)
    assert error.value.reason == reason and "\n" not in str(error.value)
    assert str(error.value).startswith(f"{reason}: ")
    assert not store.root.exists()


def test_a_full_store_refuses_with_a_clear_message(tmp_path):
    """Past the photo count or the size bound: "feedback store full", nothing written; a photo
    already kept is still answered (nothing new to write)."""
    small = FeedbackStore(tmp_path / "data" / "feedback", max_photos=2)
    keep(small, image_bytes(10), "clean")
    keep(small, image_bytes(11), "messy")
    with pytest.raises(FeedbackError, match="feedback store full") as error:
        keep(small, image_bytes(12), "clean")
    assert error.value.reason == "store_full" and "2 photos" in str(error.value)
    assert not keep(small, image_bytes(10), "clean").new
    assert len(every_file(small.root)) == 3 and len(lines(small)) == 2

    tiny = FeedbackStore(tmp_path / "other" / "feedback", max_bytes=len(image_bytes(13)) + 100)
    with pytest.raises(FeedbackError, match="feedback store full"):
        keep(tiny, image_bytes(13), "clean")
    assert not (tmp_path / "other" / "feedback").exists()


# ---------------------------------------------------------------- the server's own classification


class FakeServed:
    """What record_correction uses of a ServedModel: class names, min side, version, classify."""

    def __init__(self, answer: dict) -> None:
        self.class_names, self.min_side = CLASSES, 32
        self.version = SimpleNamespace(name="clean-vs-messy", version="3")
        self.answer, self.calls = answer, 0

    def classify(self, photos: list, log: bool = True) -> pd.DataFrame:
        assert not log  # classified again to record a correction: the request log has it already
        self.calls += 1
        return pd.DataFrame([self.answer] * len(photos))


def test_the_prediction_logged_is_the_servers_own(store):
    """The model's label and familiarity come from classifying the bytes on the server (numpy
    values and NaN become JSON's bools and null); the client sends only the photo and a label."""
    served = FakeServed({"label": "messy", "clean": 0.1, "messy": 0.9, "familiarity": np.float64("nan"),
                         "unfamiliar": np.bool_(True), "error": ""})
    kept = record_correction(store, served, image_bytes(20), "clean")
    assert served.calls == 1 and kept.label == "clean"
    (line,) = lines(store)
    assert line["model"] == MODEL and line["prediction"] == "messy"
    assert line["familiarity"] is None and line["unfamiliar"] is True


def test_record_correction_refuses_before_running_the_model(store):
    """A wrong label or a bad photo is refused without classifying; a photo the model refuses
    (its own error) is not kept either."""
    served = FakeServed({"label": "clean", "clean": 0.9, "messy": 0.1, "familiarity": 0.5, "unfamiliar": False,
                         "error": ""})
    with pytest.raises(FeedbackError, match="unknown_label"):
        record_correction(store, served, image_bytes(21), "tidy")
    with pytest.raises(FeedbackError, match="too_small"):
        record_correction(store, served, image_bytes(22, size=(31, 40)), "clean")  # the model's min_side is 32
    assert served.calls == 0
    refusing = FakeServed({"label": "", "clean": None, "messy": None, "familiarity": None, "unfamiliar": None,
                           "error": "too_large: more than 1 byte"})
    with pytest.raises(FeedbackError, match="too_large"):
        record_correction(store, refusing, image_bytes(23), "clean")
    assert not store.root.exists()


# ---------------------------------------------------------------- POST /feedback


@pytest.fixture
def client(store):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    served = FakeServed({"label": "clean", "clean": 0.8, "messy": 0.2, "familiarity": 0.3, "unfamiliar": False,
                         "error": ""})
    app = Starlette(routes=[feedback_route(store, lambda: served, max_body=200_000)])
    with TestClient(app) as test_client:
        yield app, test_client


def test_post_feedback_keeps_the_photo_and_answers_where(client, store, tmp_path):
    _, http = client
    data = image_bytes(30)
    answer = http.post("/feedback", files={"photo": ("room.png", data, "image/png")}, data={"label": "messy"})
    assert answer.status_code == 200
    assert answer.json() == {"stored": f"data/feedback/messy/{sha(data)}.png", "sha256": sha(data), "label": "messy",
                             "new": True}
    assert (tmp_path / answer.json()["stored"]).read_bytes() == data
    assert lines(store)[0]["prediction"] == "clean"
    again = http.post("/feedback", files={"photo": ("x.png", data)}, data={"label": "messy"})
    assert again.status_code == 200 and again.json()["new"] is False and len(lines(store)) == 1


@pytest.mark.parametrize(("send", "status", "words"), [
    ({"files": {"photo": ("a.txt", b"not an image")}, "data": {"label": "clean"}}, 400, "not_an_image"),
    ({"files": {"photo": ("a.png", image_bytes(31))}, "data": {"label": "tidy"}}, 400, "unknown_label"),
    ({"files": {"photo": ("a.png", image_bytes(32))}}, 400, "field `label`"),
    ({"data": {"label": "clean", "photo": "text, not a file"}}, 400, "file field `photo`"),
    ({"content": b"{}", "headers": {"content-type": "application/json"}}, 400, "file field `photo`"),
    ({"files": {"photo": ("a.png", b"x" * 300_000)}, "data": {"label": "clean"}}, 413, "limit"),
])
def test_post_feedback_bad_input_is_a_one_line_json_error(client, store, send, status, words):
    _, http = client
    answer = http.post("/feedback", **send)
    assert answer.status_code == status
    assert list(answer.json()) == ["error"] and words in answer.json()["error"]
    assert "\n" not in answer.json()["error"]
    assert not store.root.exists()


def test_post_feedback_needs_the_login_when_the_app_has_one(client, store):
    """With Gradio's login (--auth), a request without its cookie is refused (401)."""
    app, http = client
    app.auth, app.tokens, app.cookie_id = {"alice": "s3cret"}, {"tok": "alice"}, "cid"
    photo = {"photo": ("a.png", image_bytes(33))}
    assert http.post("/feedback", files=photo, data={"label": "clean"}).status_code == 401
    http.cookies.set("access-token-cid", "tok")
    assert http.post("/feedback", files=photo, data={"label": "clean"}).status_code == 200


def test_one_client_may_add_only_so_many_corrections_an_hour(tmp_path):
    """Flooding: past max_per_client new corrections within the window, a client's corrections are
    refused (`too_many`) and nothing is written; another client is not affected, a photo already
    kept costs nothing, and the window passes. Each line records its client."""
    now = [0.0]
    store = FeedbackStore(tmp_path / "data" / "feedback", max_per_client=2, window=3600, clock=lambda: now[0])
    first, second, third = image_bytes(40), image_bytes(41), image_bytes(42)
    assert keep(store, first, "clean", client="address:10.0.0.9").new
    assert keep(store, second, "clean", client="address:10.0.0.9").new
    assert not keep(store, first, "clean", client="address:10.0.0.9").new  # already kept: not counted, no error
    with pytest.raises(FeedbackError, match="too_many: 2 corrections from this client") as refused:
        keep(store, third, "messy", client="address:10.0.0.9")
    assert refused.value.reason == "too_many" and "\n" not in str(refused.value)
    assert not (store.root / "messy").exists() and len(lines(store)) == 2
    assert keep(store, third, "messy", client="user:alice").new  # someone else
    now[0] = 3601.0
    assert keep(store, image_bytes(43), "messy", client="address:10.0.0.9").new  # the hour has passed
    assert [line["client"] for line in lines(store)] == ["address:10.0.0.9"] * 2 + ["user:alice", "address:10.0.0.9"]


def test_post_feedback_past_the_clients_limit_is_429_and_names_the_client(store, tmp_path):
    """Over HTTP the limit is per address (per user when logged in): 429, one line."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    store.max_per_client = 1
    served = FakeServed({"label": "clean", "clean": 0.8, "messy": 0.2, "familiarity": 0.3, "unfamiliar": False,
                         "error": ""})
    with TestClient(Starlette(routes=[feedback_route(store, lambda: served)])) as http:
        ok = http.post("/feedback", files={"photo": ("a.png", image_bytes(44))}, data={"label": "messy"})
        refused = http.post("/feedback", files={"photo": ("b.png", image_bytes(45))}, data={"label": "messy"})
    assert ok.status_code == 200 and refused.status_code == 429
    assert refused.json()["error"].startswith("too_many: 1 corrections from this client")
    assert [line["client"] for line in lines(store)] == ["address:testclient"]


def test_the_store_leaves_the_disk_free_for_the_pipeline(tmp_path):
    """A correction that would leave less than min_free bytes on the disk is refused (store_full,
    HTTP 507) and nothing is written."""
    store = FeedbackStore(tmp_path / "data" / "feedback", min_free=2**62)
    with pytest.raises(FeedbackError, match="store_full: feedback store full: the disk has"):
        keep(store, image_bytes(46), "clean")
    assert every_file(tmp_path) == []


def test_feedback_confirmation_says_what_happens_to_the_photo():
    text = feedback_confirmation("messy", "data/feedback/messy/ab.png", True)
    assert text.startswith("Thank you: kept as **messy**") and "next `dvc repro` trains on it" in text
    assert "never the training data" in feedback_confirmation(NOT_A_ROOM, "data/feedback/not-a-room/ab.png", True)
    assert feedback_confirmation("clean", "x", False).startswith("Already kept")


# ---------------------------------------------------------------- ingest merges data/feedback


def write(folder: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return folder


SOURCE = {**{f"clean/{i}.png": image_bytes(100 + i) for i in range(4)},  # feedback may add 1 a class
          **{f"messy/{i}.png": image_bytes(200 + i) for i in range(4)}}  # (ingest.feedback_max_share 0.25)


def ingest_with(tmp_path: Path, feedback: dict[str, bytes | str] | None, source: dict = SOURCE):
    """Ingest `source` plus a feedback folder holding `feedback` (None: no folder at all)."""
    src = write(tmp_path / "src", source)
    folder = tmp_path / "data" / "feedback"
    if feedback is not None:
        write(folder, feedback)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    _, files, empty = source_files(str(src), "", tmp_path, work, tmp_path / "out" / "images")
    return run_ingest(files, IngestParams(), tmp_path / "out" / "images", "data/images", empty, workers=2,
                      feedback=folder, feedback_rel="data/feedback")


def test_feedback_photos_join_the_data_named_by_their_label(tmp_path):
    """A new photo under feedback clean/ is in the manifest (label clean, its source path in
    data/feedback), stored in data/images, counted in the classes and the feedback section."""
    new = image_bytes(300)
    result = ingest_with(tmp_path, {"README.md": "x", CORRECTIONS: "{}\n", f"clean/{sha(new)}.png": new})
    manifest = result.manifest
    row = manifest[manifest["sha256"] == sha(new)].iloc[0]
    assert row["label"] == "clean" and row["source_path"] == f"data/feedback/clean/{sha(new)}.png"
    assert row["original_split"] == "" and (tmp_path / "out" / row["path"].removeprefix("data/")).read_bytes() == new
    report = result.report
    assert report["classes"] == {"clean": 5, "messy": 4} and len(manifest) == 9
    assert report["accepted"] == 9 and report["files"] == 8  # accepted: the images in the data; files: the source's
    assert report["feedback"] == {"folder": "data/feedback", "photos": 1, "used": 1, "classes": {"clean": 1},
                                  "duplicates": [], "conflicts": [], "over_share": [], "rejections": [],
                                  "ignored_folders": []}


def test_duplicates_are_dropped(tmp_path):
    """The source's own photo under the same label, and one photo twice under one label: used once."""
    new = image_bytes(301)
    result = ingest_with(tmp_path, {"messy/copy-of-source.png": SOURCE["messy/1.png"],
                                    "clean/a.png": new, "clean/b.png": new})
    section = result.report["feedback"]
    assert section["used"] == 1 and section["conflicts"] == []
    assert sorted((d["path"], d["same_as"]) for d in section["duplicates"]) == [
        ("data/feedback/clean/b.png", "data/feedback/clean/a.png"),
        ("data/feedback/messy/copy-of-source.png", "the source")]
    assert result.manifest["sha256"].value_counts().max() == 1 and len(result.manifest) == 9


def test_feedback_adds_at_most_its_share_of_a_class(tmp_path, caplog):
    """Poisoning through corrections: feedback adds at most ingest.feedback_max_share (0.25) of a
    class's source photos (4 each here: 1 photo), in path order; the rest are reported and
    printed, never merged. Another class's share is its own."""
    new = [image_bytes(310 + i) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="cleanmessy.stages.ingest"):
        result = ingest_with(tmp_path, {**{f"messy/{sha(n)}.png": n for n in new},
                                        f"clean/{sha(image_bytes(320))}.png": image_bytes(320)})
    section = result.report["feedback"]
    assert section["used"] == 2 and section["classes"] == {"clean": 1, "messy": 1}
    first, *rest = sorted(sha(n) for n in new)
    assert sorted(o["sha256"] for o in section["over_share"]) == rest
    assert all(o["label"] == "messy" and o["path"].startswith("data/feedback/messy/") for o in section["over_share"])
    assert result.report["classes"] == {"clean": 5, "messy": 5}
    assert first in set(result.manifest["sha256"]) and not set(rest) & set(result.manifest["sha256"])
    assert "2 feedback photos left out: past ingest.feedback_max_share (0.25)" in caplog.text


def test_contradictions_are_reported_not_merged(tmp_path, caplog):
    """A photo the data has as clean, corrected to messy; a new photo corrected to both labels:
    both reported (sha256 and the labels) and printed, neither merged, and the source's own copy
    stays in the data under its label."""
    source_clean, both = SOURCE["clean/0.png"], image_bytes(302)
    with caplog.at_level(logging.WARNING, logger="cleanmessy.stages.ingest"):
        result = ingest_with(tmp_path, {"messy/wrong.png": source_clean, "clean/x.png": both, "messy/x.png": both})
    conflicts = {c["sha256"]: c for c in result.report["feedback"]["conflicts"]}
    assert conflicts[sha(source_clean)] == {"sha256": sha(source_clean), "feedback_labels": ["messy"],
                                            "data_labels": ["clean"], "paths": ["data/feedback/messy/wrong.png"]}
    assert conflicts[sha(both)] == {"sha256": sha(both), "feedback_labels": ["clean", "messy"], "data_labels": [],
                                    "paths": ["data/feedback/clean/x.png", "data/feedback/messy/x.png"]}
    assert result.report["feedback"]["used"] == 0
    manifest = result.manifest
    assert sha(both) not in set(manifest["sha256"])
    kept = manifest[manifest["sha256"] == sha(source_clean)]
    assert list(kept["label"]) == ["clean"] and (tmp_path / "out" / kept["path"].iloc[0].removeprefix("data/")).exists()
    printed = [r.getMessage() for r in caplog.records if "not merged" in r.getMessage()]
    assert len(printed) == 2 and any("the data has it as clean" in line for line in printed)


def test_a_photo_also_corrected_to_not_a_room_is_a_contradiction(tmp_path):
    both = image_bytes(303)
    result = ingest_with(tmp_path, {f"clean/{sha(both)}.png": both, f"{NOT_A_ROOM}/{sha(both)}.png": both})
    (conflict,) = result.report["feedback"]["conflicts"]
    assert conflict["feedback_labels"] == ["clean", NOT_A_ROOM] and len(conflict["paths"]) == 2
    assert result.report["feedback"]["used"] == 0 and sha(both) not in set(result.manifest["sha256"])


def test_many_contradictions_are_printed_a_few_then_counted(tmp_path, caplog):
    feedback = {f"messy/{i}.png": SOURCE[f"clean/{i}.png"] for i in range(3)}
    feedback.update({f"clean/{i}.png": SOURCE[f"messy/{i}.png"] for i in range(3)})
    feedback.update({f"clean/n{i}.png": image_bytes(400 + i) for i in range(2)})
    feedback.update({f"messy/n{i}.png": image_bytes(400 + i) for i in range(2)})
    with caplog.at_level(logging.WARNING, logger="cleanmessy.stages.ingest"):
        result = ingest_with(tmp_path, feedback)
    assert len(result.report["feedback"]["conflicts"]) == 8
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not merged" in m for m in messages) == FEEDBACK_SHOWN
    assert any(f"... and {8 - FEEDBACK_SHOWN} more feedback conflicts" in m for m in messages)


def test_not_a_room_and_other_folders_are_never_training_data(tmp_path):
    """not-a-room/ is left to evaluate; a folder that is no class is reported as ignored; a bad
    file under a class is rejected with its reason."""
    result = ingest_with(tmp_path, {f"{NOT_A_ROOM}/a.png": image_bytes(500), "tidy/b.png": image_bytes(501),
                                    "clean/bad.png": b"not an image"})
    section = result.report["feedback"]
    assert section["used"] == 0 and section["ignored_folders"] == ["tidy"]
    assert [(r["source_path"], r["reason"]) for r in section["rejections"]] == [("data/feedback/clean/bad.png",
                                                                                 "not_an_image")]
    assert set(result.manifest["sha256"]) == {sha(data) for data in SOURCE.values()}

    only_not_a_room = ingest_with(tmp_path / "again", {f"{NOT_A_ROOM}/a.png": image_bytes(500)})
    assert "feedback" not in only_not_a_room.report  # evaluate's business: ingest's outputs do not change


def test_a_feedback_folder_with_only_its_readme_changes_nothing(tmp_path):
    """A fresh clone's data/feedback (its README only) gives the very report, manifest and images
    that no feedback folder gives."""
    plain = ingest_with(tmp_path / "plain", None)
    readme = ingest_with(tmp_path / "readme", {"README.md": "# Corrections from the app\n"})
    assert readme.report == plain.report and "feedback" not in readme.report
    assert readme.manifest.equals(plain.manifest)
    assert every_file(tmp_path / "readme" / "out" / "images") == every_file(tmp_path / "plain" / "out" / "images")


def test_the_ingest_stage_reads_data_feedback_as_dvc_yaml_declares_it(tmp_path):
    """`cleanmessy ingest` with only what dvc.yaml declares: data/feedback is an ingest input (its
    photo ends up in the manifest and the report), and no other stage may read it."""
    new = image_bytes(600)
    write(tmp_path / "photos", SOURCE)
    write(tmp_path / "data" / "feedback", {"README.md": "x", f"messy/{sha(new)}.png": new})
    params = Params()
    params = dataclasses.replace(params, ingest=dataclasses.replace(params.ingest, source="photos"))
    declared = declaration(REPO / "dvc.yaml", "ingest", params)
    assert "data/feedback" in declared.files
    ingest.main(Paths(tmp_path, declared=frozenset(declared.files), stage="ingest"),
                restrict_params(params, declared.params, "ingest"))
    manifest = pd.read_csv(tmp_path / "data" / "manifest.csv", keep_default_na=False)
    assert manifest[manifest["sha256"] == sha(new)]["label"].tolist() == ["messy"]
    report = json.loads((tmp_path / "data" / "ingest_report.json").read_text())
    assert report["feedback"]["used"] == 1 and report["classes"] == {"clean": 4, "messy": 5}
    with pytest.raises(UndeclaredInput, match="data/feedback"):
        _ = Paths(tmp_path, declared=frozenset(declaration(REPO / "dvc.yaml", "split", params).files),
                  stage="split").feedback
