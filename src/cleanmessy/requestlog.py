"""The request log: one JSON line per photo a server classified (the app, and the REST server the
registered model runs in), for `cleanmessy monitor`. A line holds the time, the model version, the
photo's sha256, the label, the probabilities, the familiarity score and the `unfamiliar` flag, and
the photo's features on the familiarity detector's principal axes (a few numbers from which no
photo can be rebuilt, for the drift test): never the photo's bytes.

Size-bounded: past `max_bytes` the log is renamed to `<name>.1.jsonl` (replacing the older one) and
a new one begun, so the log never takes more than twice `max_bytes`. Appends are whole lines under
a lock (threads) and an advisory file lock (the REST server's worker processes)."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_PATH = "data/served/requests.jsonl"  # under the project root
DEFAULT_MAX_MB = 20
ENV_PATH = "CLEANMESSY_REQUEST_LOG"  # the REST server's log: set by `cleanmessy api`
ENV_MAX_MB = "CLEANMESSY_REQUEST_LOG_MB"
ENV_MODEL = "CLEANMESSY_SERVED_MODEL"  # "name/version" the REST server serves, for its log lines


def rotated(path: Path) -> Path:
    """Where the previous log goes: requests.jsonl -> requests.1.jsonl."""
    return path.with_name(f"{path.stem}.1{path.suffix}")


class RequestLog:
    """Appends records as JSON lines to `path`, rotating past `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_MB * 1024 * 1024) -> None:
        self.path, self.max_bytes = Path(path), int(max_bytes)
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> RequestLog | None:
        """The log `CLEANMESSY_REQUEST_LOG` names (size from `CLEANMESSY_REQUEST_LOG_MB`), or None."""
        path = os.environ.get(ENV_PATH, "")
        if not path:
            return None
        try:
            mb = float(os.environ.get(ENV_MAX_MB, DEFAULT_MAX_MB))
        except ValueError:
            mb = DEFAULT_MAX_MB
        return cls(Path(path), int(max(mb, 0.001) * 1024 * 1024))

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write `records`, one line each; an OSError (a full disk, a vanished folder) is raised to
        the caller, which decides whether serving goes on."""
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records).encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    if f.tell() and f.tell() + len(data) > self.max_bytes:
                        os.replace(self.path, rotated(self.path))
                        with open(self.path, "ab") as fresh:
                            fresh.write(data)
                    else:
                        f.write(data)
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of `path` and its rotated predecessor, oldest first, and how many lines were
    not records (cut short by a crash, edited by hand): skipped, counted."""
    records, bad = [], 0
    for file in (rotated(path), path):
        if not file.is_file():
            continue
        with open(file, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(record, dict):
                    records.append(record)
                else:
                    bad += 1
    return records, bad

