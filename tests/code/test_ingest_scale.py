"""ingest at scale: each file read once, checked and stored on worker threads, results in input
order, a bounded number of files in flight; the sample rendered when read; a progress bar, not a
log line per 10 %."""

import io
import logging
import random
import struct
import sys
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cleanmessy import sample
from cleanmessy.parallel import IN_FLIGHT_PER_WORKER, ordered_map
from cleanmessy.params import IngestParams
from cleanmessy.stages import ingest
from cleanmessy.stages.ingest import Refused, run_ingest, source_files

IMAGES_REL = "data/images"
WORKERS = 4  # more than the CI machine's cores: the thread pool is exercised wherever the tests run


def png_bytes(seed: int, side: int = 40) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def messy_source(n: int = 12) -> list[tuple[str, bytes]]:
    """Good photos in two classes plus one of each kind of trouble: a duplicate, a conflict, a
    truncated file, text, a README, an unsafe name."""
    files = [(f"{('clean', 'messy')[i % 2]}/{i:03d}.png", png_bytes(i)) for i in range(n)]
    files += [("clean/dup.png", png_bytes(0)), ("messy/conflict.png", png_bytes(2)),
              ("messy/half.png", png_bytes(99)[:300]), ("clean/notes.png", b"text"),
              ("README.md", b"# rooms"), ("../evil.png", png_bytes(98))]
    return files


def sleepy(files: list[tuple[str, bytes]], seed: int) -> list[tuple[str, ingest.Reader]]:
    """Readers that each sleep 0-10 ms first, so the threads finish in a shuffled order."""
    rng = random.Random(seed)

    def reader(data: bytes, delay: float) -> ingest.Reader:
        def read() -> bytes:
            time.sleep(delay)
            return data
        return read
    return [(name, reader(data, rng.uniform(0, 0.01))) for name, data in files]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ordered_map_yields_in_input_order_whatever_finishes_first():
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.005) for _ in range(60)]

    def work(i: int) -> int:
        time.sleep(delays[i])
        return i * i
    assert list(ordered_map(work, range(60), WORKERS)) == [i * i for i in range(60)]


def test_threads_give_the_same_result_as_one(tmp_path, caplog):
    """Manifest, report, stored files and the 'left out' lines do not depend on the number of
    threads or on which file finishes first (readers sleep at random)."""
    runs = []
    for workers, seed in ((1, 0), (WORKERS, 1), (WORKERS, 2)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cleanmessy"):
            result = run_ingest(sleepy(messy_source(), seed), IngestParams(), tmp_path / str(seed), IMAGES_REL,
                                workers=workers)
        runs.append((result.manifest.to_csv(index=False), result.report, tree(tmp_path / str(seed)),
                     [r.getMessage() for r in caplog.records]))
    assert runs[1] == runs[0] and runs[2] == runs[0]
    manifest, report, stored, left_out = runs[0]
    assert {r["source_path"]: r["reason"] for r in report["rejections"]} == {
        "clean/dup.png": "duplicate", "clean/002.png": "conflicting_labels", "messy/conflict.png": "conflicting_labels",
        "messy/half.png": "truncated", "clean/notes.png": "not_an_image", "../evil.png": "unsafe_path"}
    assert report["skipped_outside_class_folders"] == ["README.md"]
    assert len(stored) == report["accepted"] == 11
    assert [line.split(":")[0] for line in left_out[:3]] == [  # input order, as one thread logs them
        "left out messy/half.png", "left out clean/notes.png", "left out ../evil.png"]


def test_files_in_flight_are_bounded(tmp_path):
    """While the first file is slow, the threads run ahead by at most IN_FLIGHT_PER_WORKER
    files per worker, not through the whole source; no more reads run at once than there are
    workers. So memory does not grow with the number of files."""
    lock = threading.Lock()
    state = {"started": 0, "active": 0, "most_active": 0, "started_when_first_done": None}

    def counted(index: int, data: bytes) -> ingest.Reader:
        def read() -> bytes:
            with lock:
                state["started"] += 1
                state["active"] += 1
                state["most_active"] = max(state["most_active"], state["active"])
            time.sleep(0.3 if index == 0 else 0.001)
            with lock:
                state["active"] -= 1
                if index == 0:
                    state["started_when_first_done"] = state["started"]
            return data
        return read

    photos = [png_bytes(i, side=32) for i in range(200)]
    files = [(f"{('clean', 'messy')[i % 2]}/{i:03d}.png", counted(i, data)) for i, data in enumerate(photos)]
    result = run_ingest(files, IngestParams(), tmp_path / "images", IMAGES_REL, workers=WORKERS)
    window = IN_FLIGHT_PER_WORKER * WORKERS
    assert 1 < state["started_when_first_done"] <= window
    assert state["most_active"] <= WORKERS
    assert result.report["accepted"] == 200


def test_each_file_is_read_once(tmp_path):
    """A file is read to be checked and stored in one go: a source (a slow disk, a zip to
    inflate, a sample to render) is not read twice."""
    reads = []

    def counted(name: str, data: bytes) -> ingest.Reader:
        def read() -> bytes:
            reads.append(name)
            return data
        return read
    files = [(name, counted(name, data)) for name, data in messy_source()]
    result = run_ingest(files, IngestParams(), tmp_path / "images", IMAGES_REL, workers=WORKERS)
    assert sorted(reads) == sorted(name for name, _ in files if name not in ("README.md", "../evil.png"))
    assert len(tree(tmp_path / "images")) == result.report["accepted"]


def test_a_failed_ingest_keeps_the_previous_images_and_leaves_nothing_behind(tmp_path):
    """Files are stored in a hidden folder beside images_dir that replaces it only on success:
    when a check fails, the previous images stay as they were and the hidden folder is gone."""
    out = tmp_path / "data"
    run_ingest(sleepy(messy_source(), 0), IngestParams(), out / "images", IMAGES_REL, workers=WORKERS)
    before = tree(out / "images")
    one_class = [(f"clean/{i}.png", (lambda d=png_bytes(500 + i): d)) for i in range(6)]
    with pytest.raises(ingest.UserError, match="at least 2 class folders"):
        run_ingest(one_class, IngestParams(), out / "images", IMAGES_REL, workers=WORKERS)
    assert tree(out / "images") == before
    assert sorted(p.name for p in out.iterdir()) == ["images"]


def test_what_a_killed_run_left_is_removed_by_the_next(tmp_path):
    """A run killed mid-way (SIGKILL: no clean-up) leaves its hidden folder; the next run,
    which stages into the same one, starts by removing it."""
    out = tmp_path / "data"
    leftover = out / ".images.partial" / "clean" / "half-written.png"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    result = run_ingest(sleepy(messy_source(), 0), IngestParams(), out / "images", IMAGES_REL, workers=WORKERS)
    assert sorted(p.name for p in out.iterdir()) == ["images"]
    assert len(tree(out / "images")) == result.report["accepted"]


def test_bad_files_are_reported_with_their_reason_on_threads(tmp_path):
    """A zip member that fails its CRC, a truncated photo, a refused entry and text are each
    reported with their reason when checked on worker threads; the others are ingested."""
    half = png_bytes(50)[:200]
    flipped = png_bytes(51)
    archive = tmp_path / "rooms.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for i in range(8):
            z.writestr(f"rooms/{('clean', 'messy')[i % 2]}/{i}.png", png_bytes(i))
        z.writestr("rooms/clean/half.png", half)
        z.writestr("rooms/messy/flipped.png", flipped)
        z.writestr("rooms/messy/notes.png", b"not pixels")
    raw = bytearray(archive.read_bytes())
    at = raw.index(flipped) + len(flipped) // 2
    raw[at] ^= 0xFF  # the stored CRC no longer matches: zipfile raises on reading it
    archive.write_bytes(bytes(raw))

    _, files, _ = source_files(str(archive), "", tmp_path, tmp_path)
    files.append(("clean/refused.png", ingest._refuse("symlink", "a link to /etc/passwd")))
    result = run_ingest(files, IngestParams(), tmp_path / "images", IMAGES_REL, workers=WORKERS)
    got = {r["source_path"]: (r["reason"], r["detail"]) for r in result.report["rejections"]}
    assert {name: reason for name, (reason, _) in got.items()} == {
        "clean/half.png": "truncated", "messy/flipped.png": "unreadable_entry",
        "messy/notes.png": "not_an_image", "clean/refused.png": "symlink"}
    assert "CRC" in got["messy/flipped.png"][1]
    assert result.report["accepted"] == 8


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds none (as in test_images)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pil_bomb_warning_refuses_every_such_file_on_threads_and_leaves_the_filters_alone(tmp_path):
    """A 90-megapixel header (over PIL's warning limit; max_pixels raised past it) is refused by
    PIL's warning, made an error, on every thread; the warning filters are as they were after.
    (Threads switch every microsecond here: without ingest's own filter around them, this test
    failed on every run tried.)"""
    filters = list(warnings.filters)
    big = png_header_only(10_000, 9_000)
    files = [(f"messy/big{i}.png", lambda: big) if i % 2 else (f"clean/{i}.png", (lambda d=png_bytes(i): d))
             for i in range(80)] + [("messy/ok.png", lambda: png_bytes(1000))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        result = run_ingest(files, IngestParams(max_pixels=500_000_000), tmp_path / "images", IMAGES_REL,
                            workers=WORKERS)
    finally:
        sys.setswitchinterval(interval)
    details = {r["detail"].split(" (")[0] for r in result.report["rejections"]}
    assert result.report["rejected"] == 40 and details == {"over the decoder's pixel limit"}
    assert warnings.filters == filters


def test_an_unexpected_error_on_a_thread_stops_ingest_as_it_would_on_one(tmp_path):
    """An error that is no file's reason (here a PermissionError) is raised, not swallowed by the
    pool, and nothing is written."""
    def denied() -> bytes:
        raise PermissionError("no access")
    files = [(f"{('clean', 'messy')[i % 2]}/{i}.png", (lambda d=png_bytes(i): d)) for i in range(40)]
    files.insert(5, ("clean/locked.png", denied))
    with pytest.raises(PermissionError, match="no access"):
        run_ingest(files, IngestParams(), tmp_path / "images", IMAGES_REL, workers=WORKERS)
    assert list(tmp_path.iterdir()) == []  # no images, no hidden staging folder


def test_sample_is_rendered_when_read_with_the_names_and_bytes_of_sample_generate(tmp_path):
    """The sample source holds recipes, not bytes: each reader renders its picture, the same PNG
    as before (sample.generate, saved as PNG), as often as it is read."""
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "sample.yaml").write_text("per_class: 3\nsize: 32\nseed: 5\n")
    kind, files, _ = source_files(str(tmp_path / "sample"), "", tmp_path, tmp_path)
    expected = []
    for rel, _label, img in sample.generate(sample.read_recipe(tmp_path / "sample")):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        expected.append((rel, buf.getvalue()))
    assert kind == "sample"
    assert [(name, read()) for name, read in files] == expected
    assert [read() for _, read in files] == [data for _, data in expected]


def test_one_progress_bar_and_one_summary_line(tmp_path, monkeypatch, caplog):
    """Checking (and storing) shows a bar over the files; the log says once what was checked, not
    every 10 %."""
    bars = []

    def fake_progress(iterable, total, desc, unit="photo"):
        bars.append((desc, total, unit))
        return iter(iterable)
    monkeypatch.setattr(ingest, "progress", fake_progress)
    files = [(f"{('clean', 'messy')[i % 2]}/{i:03d}.png", (lambda d=png_bytes(i): d)) for i in range(30)]
    files.append(("clean/bad.png", lambda: b""))
    with caplog.at_level(logging.INFO, logger="cleanmessy"):
        run_ingest(files, IngestParams(), tmp_path / "images", IMAGES_REL, workers=2)
    assert bars == [("ingest: checking", 31, "photo")]
    checked = [r.getMessage() for r in caplog.records if "checked" in r.getMessage()]
    assert len(checked) == 1
    assert checked[0].startswith("ingest: checked 31 files in ") and "on 2 threads (1 rejected" in checked[0]


def test_usable_cpus_follows_the_affinity_mask(monkeypatch):
    from cleanmessy import parallel

    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert parallel.usable_cpus() == 3
    monkeypatch.delattr(parallel.os, "sched_getaffinity")
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 7)
    assert parallel.usable_cpus() == 7


def test_one_worker_checks_in_this_thread_with_the_same_reasons(tmp_path):
    """One worker (a one-CPU machine) runs the same checks in this thread, without a pool."""
    files = [(f"{('clean', 'messy')[i % 2]}/{i}.png", (lambda d=png_bytes(i): d)) for i in range(4)]

    def too_big() -> bytes:
        raise Refused("file_too_large", "over the limit")
    files.append(("messy/big.png", too_big))
    result = run_ingest(files, IngestParams(), tmp_path / "images", IMAGES_REL, workers=1)
    rejections = [(r["source_path"], r["reason"]) for r in result.report["rejections"]]
    assert rejections == [("messy/big.png", "file_too_large")]


def test_manifest_frame_built_by_columns_equals_one_built_by_rows():
    """The column-wise manifest (no dict per image) is the frame the row-wise one was, dtypes too."""
    kept = [ingest.Accepted(f"{label}/{i}.png", label, split, f"{i:064x}", 40 + i, 30, "PNG")
            for i, (label, split) in enumerate([("messy", ""), ("clean", "train"), ("clean", "val")])]
    rows = [{**ingest.asdict(a), "path": f"{IMAGES_REL}/{ingest.stored_name(a)}"}
            for a in sorted(kept, key=lambda a: (a.label, a.sha256))]
    expected = ingest.pd.DataFrame(rows, columns=ingest.MANIFEST_COLUMNS)
    got = ingest.manifest_frame(kept, IMAGES_REL)
    assert got.equals(expected) and list(got.dtypes) == list(expected.dtypes)
    assert got.to_csv(index=False) == expected.to_csv(index=False)


@pytest.mark.parametrize("label", ["..", ".", "", "a/b"])
def test_store_refuses_a_label_that_is_not_one_plain_folder_name(tmp_path, label):
    """unsafe_name keeps such labels out; _store checks again before it writes anything."""
    a = ingest.Accepted(f"{label}/x.png", label, "", "0" * 64, 40, 40, "PNG")
    with pytest.raises(RuntimeError, match="refusing to write"):
        ingest._store(a, b"data", tmp_path / "images")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- compact records, streamed manifest


def test_manifest_and_report_equal_the_record_reference(tmp_path, monkeypatch):
    """The table-based dedup and the manifest written in chunks give, byte for byte, what records
    of every file, `deduplicate` on all of them and one manifest frame give; on a folder whose walk
    order is not its sorted order (train/ is walked before train-2/, which sorts first), with
    copies, a conflict, source splits and rejects."""
    monkeypatch.setattr(ingest, "MANIFEST_CHUNK", 3)
    src = tmp_path / "src"
    layout = {f"train/{('clean', 'messy')[i % 2]}/{i:02d}.png": png_bytes(i) for i in range(10)}
    layout |= {f"val/clean/{i}.png": png_bytes(20 + i) for i in range(4)}
    layout |= {"train/clean/zz.png": png_bytes(0), "train-2/clean/00.png": png_bytes(0),  # copies
               "val/messy/x.png": png_bytes(21), "val/clean/bad.png": b"not an image"}  # a conflict, a reject
    for name, data in layout.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    _, files, empty = source_files(str(src), "", tmp_path, tmp_path)
    result = run_ingest(files, IngestParams(), tmp_path / "images", IMAGES_REL, empty, workers=WORKERS)
    result.write_manifest(tmp_path / "manifest.csv")

    records = []
    for name, read in files:
        outcome = ingest.check_file(name, *ingest.locate(ingest.PurePosixPath(name)), read(), IngestParams())
        if isinstance(outcome, ingest.Accepted):
            records.append(outcome)
    kept, dupes = ingest.deduplicate(records)
    assert "train-2/clean/00.png" in {a.source_path for a in kept}
    want = ingest.manifest_frame(kept, IMAGES_REL)
    assert (tmp_path / "manifest.csv").read_bytes() == want.to_csv(index=False).encode()
    assert result.manifest.equals(want)
    assert result.report["classes"] == dict(sorted(ingest.Counter(a.label for a in kept).items()))
    assert result.report["original_splits"] == dict(sorted(ingest.Counter(a.original_split or "none"
                                                                          for a in kept).items()))
    assert sorted((r["source_path"], r["reason"]) for r in result.report["rejections"]) == sorted(
        [(r.source_path, r.reason) for r in dupes] + [("val/clean/bad.png", "not_an_image")])
    assert len(list((tmp_path / "images").rglob("*.png"))) == len(kept)


def test_a_kept_file_costs_a_fixed_small_record():
    """What ingest holds per accepted file stays a few dozen bytes (a record object was ~400)."""
    import tracemalloc

    names = [f"clean/{i}.png" for i in range(20_000)]  # the source listing holds these anyway
    tracemalloc.start()
    table = ingest.AcceptedTable()
    for i, name in enumerate(names):
        table.add(ingest.Accepted(name, "clean", "", f"{i:064x}", 384, 288, "JPEG"))
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size / len(names) < 80
    assert table.record(7) == ingest.Accepted("clean/7.png", "clean", "", f"{7:064x}", 384, 288, "JPEG")
