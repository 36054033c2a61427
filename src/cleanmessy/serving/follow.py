"""A server's model kept on its alias: `models:/clean-vs-messy@production` is resolved again every
`poll_seconds`; when the alias has moved, the new version is loaded beside the old one and swapped
in only once it is ready, so every request is answered by a whole model. A version that fails to
load leaves the old one serving, and says why (`error`), until the alias moves again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cleanmessy import tracking
from cleanmessy.errors import UserError
from cleanmessy.serving.model import ServedModel

log = logging.getLogger(__name__)
DEFAULT_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class _State:
    """What is served, since when, and why a newer version is not: replaced whole, in one
    attribute store, so a request never sees one model with another's time or error."""

    served: ServedModel
    since: float
    error: str = ""
    failed_version: str = ""  # a version that failed to load: not tried again until the alias moves


class ModelFollower:
    """The model to serve now (`current`), since when (`since`, UTC) and why a newer one is not
    served (`error`, one line; empty when all is well). It follows an alias (or a legacy stage)
    when `poll_seconds` > 0, by `check` or the thread `start`s; a URI naming an exact version, or
    `poll_seconds` 0, is never checked again, and `info()` says so."""

    def __init__(self, model_uri: str, poll_seconds: float = DEFAULT_POLL_SECONDS,
                 load: Callable[[str], ServedModel] = ServedModel.load,
                 resolve: Callable[[str], tracking.RegisteredVersion] = tracking.resolve_version,
                 clock: Callable[[], float] = time.time) -> None:
        self.model_uri, self.poll_seconds = model_uri, poll_seconds
        self._load, self._resolve, self._clock = load, resolve, clock
        self.follows = poll_seconds > 0 and not tracking.names_exact_version(model_uri)
        self._state = _State(load(model_uri), clock())
        self._stop = threading.Event()

    @property
    def current(self) -> ServedModel:
        return self._state.served

    @property
    def since(self) -> float:
        return self._state.since

    @property
    def error(self) -> str:
        return self._state.error

    def _keep(self, state: _State, error: str, failed_version: str = "") -> None:
        self._state = _State(state.served, state.since, error, failed_version)

    def check(self) -> bool:
        """Resolve the alias once; load and swap in the version it names now, if that is another
        one. True when the served model changed."""
        if not self.follows:
            return False
        state = self._state
        try:
            version = self._resolve(self.model_uri)
        except UserError as exc:  # the alias was removed, or the store is unreachable: keep serving
            self._keep(state, f"cannot check {self.model_uri}: {exc}", state.failed_version)
            return False
        if version.version == state.served.version.version:
            state.served.version = version  # the same version; its aliases may have changed
            self._keep(state, "")
            return False
        if version.version == state.failed_version:
            return False
        try:
            new = self._load(version.uri)
        except Exception as exc:  # noqa: BLE001 - whatever breaks a new version, the old one keeps serving
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._keep(state, f"version {version.version} (now at {self.model_uri}) could not be loaded: {reason}; "
                              f"still serving version {state.served.version.version}", version.version)
            log.warning("%s", self.error)
            return False
        self._state = _State(new, self._clock())
        log.info("%s moved: now serving version %s (was %s)", self.model_uri, version.version,
                 state.served.version.version)
        return True

    def start(self) -> None:
        """Check every `poll_seconds` in a daemon thread (when it follows at all)."""
        if self.follows:
            threading.Thread(target=self._loop, name="model-follower", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the server's model
                self._keep(self._state, f"checking {self.model_uri} failed: {exc}", self._state.failed_version)
                log.warning("%s", self.error)

    def info(self) -> dict:
        """The served model's `info()`, with since when it is served and why a newer one is not."""
        state = self._state
        since = datetime.fromtimestamp(state.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return {**state.served.info(), "model_uri": self.model_uri, "follows_alias": self.follows,
                "serving_since": since, "load_error": state.error}
