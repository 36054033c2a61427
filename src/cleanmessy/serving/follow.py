"""A server's model kept on its alias: `models:/clean-vs-messy@production` is resolved again every
`poll_seconds`; when the alias has moved, the new version is loaded beside the old one and swapped
in only once it is ready, so every request is answered by a whole model. A version that fails to
load leaves the old one serving, and says why (`error`), until the alias moves again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from cleanmessy import tracking
from cleanmessy.errors import UserError
from cleanmessy.serving.model import ServedModel

log = logging.getLogger(__name__)
DEFAULT_POLL_SECONDS = 5.0


class ModelFollower:
    """The model to serve now (`current`), since when (`since`, UTC) and why a newer one is not
    served (`error`, one line; empty when all is well). A URI naming an exact version is never
    checked again; one naming an alias (or a legacy stage) is, by `check` or the thread `start`s."""

    def __init__(self, model_uri: str, poll_seconds: float = DEFAULT_POLL_SECONDS,
                 load: Callable[[str], ServedModel] = ServedModel.load,
                 resolve: Callable[[str], tracking.RegisteredVersion] = tracking.resolve_version,
                 clock: Callable[[], float] = time.time) -> None:
        self.model_uri, self.poll_seconds = model_uri, poll_seconds
        self._load, self._resolve, self._clock = load, resolve, clock
        self.follows = not tracking.names_exact_version(model_uri)
        self._current = load(model_uri)
        self.since = clock()
        self.error = ""
        self._failed_version = ""  # the version that failed to load: not tried again until the alias moves
        self._stop = threading.Event()

    @property
    def current(self) -> ServedModel:
        return self._current  # one attribute read: a request gets the old model or the new, never half

    def check(self) -> bool:
        """Resolve the alias once; load and swap in the version it names now, if that is another
        one. True when the served model changed."""
        if not self.follows:
            return False
        try:
            version = self._resolve(self.model_uri)
        except UserError as exc:  # the alias was removed, or the store is unreachable: keep serving
            self.error = f"cannot check {self.model_uri}: {exc}"
            return False
        served = self._current
        if version.version == served.version.version:
            served.version, self.error, self._failed_version = version, "", ""  # its aliases may have changed
            return False
        if version.version == self._failed_version:
            return False
        try:
            new = self._load(version.uri)
        except UserError as exc:
            self._failed_version = version.version
            self.error = (f"version {version.version} (now at {self.model_uri}) could not be loaded: {exc}; "
                          f"still serving version {served.version.version}")
            log.warning("%s", self.error)
            return False
        self._current, self.since, self.error, self._failed_version = new, self._clock(), "", ""
        log.info("%s moved: now serving version %s (was %s)", self.model_uri, version.version,
                 served.version.version)
        return True

    def start(self) -> None:
        """Check every `poll_seconds` in a daemon thread (nothing when the URI is an exact version
        or `poll_seconds` is 0)."""
        if self.follows and self.poll_seconds > 0:
            threading.Thread(target=self._loop, name="model-follower", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the server's model
                self.error = f"checking {self.model_uri} failed: {exc}"
                log.warning("%s", self.error)

    def info(self) -> dict:
        """The served model's `info()`, with since when it is served and why a newer one is not."""
        since = datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return {**self.current.info(), "model_uri": self.model_uri, "follows_alias": self.follows,
                "serving_since": since, "load_error": self.error}
