"""Ctrl-C and SIGTERM as exceptions, raised where TensorFlow can take them.

Python raises a signal's exception between any two bytecodes. Inside TensorFlow that can be the
middle of a context manager's `__enter__` or `__exit__`: the run then dies with TensorFlow's own
`RuntimeError: Exiting device scope without proper scope nesting` and a traceback, instead of
stopping cleanly (seen in CI on a SIGTERM during `model.fit`). So while TensorFlow runs a loop of
steps (`deferred()`), the handler only records the signal, and the loop raises it at its next step
boundary (`raise_pending()`), where every scope has been left. A second signal does not wait.

Only the main thread receives signals, so deferring is for the main thread alone: the app's worker
threads run the same prediction loops and must neither swallow nor raise the server's Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `docker stop`, `kill`), raised like Ctrl-C so that MLflow marks the
    run FAILED and nothing is registered."""


_depth = 0  # of nested `deferred()` blocks in the main thread
_pending: type[KeyboardInterrupt] | None = None
HELD = b"cleanmessy: stopping after this step (a second signal stops at once)\n"


def _on_signal(signum: int, frame: object) -> None:
    global _pending
    error = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    if _depth and _pending is None:
        _pending = error
        os.write(2, HELD)  # a step can take long (tracing, a big backbone); os.write is safe here, logging is not
        return
    # A second signal goes at once and takes the first with it (SIGTERM then Ctrl-C exits 130,
    # as interrupted); raised mid-step, it may show TensorFlow's traceback: the user chose to.
    _pending = None
    raise error()


def install() -> None:
    """Handle SIGTERM and Ctrl-C (SIGINT) in this process; call from the main thread. A SIGINT
    that the process started ignoring (a background job) stays ignored."""
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_signal)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def raise_pending() -> None:
    """Raise the signal that arrived while deferred, if one did (a step boundary: call it between
    TensorFlow steps)."""
    global _pending
    if _pending is not None and _in_main_thread():
        error, _pending = _pending, None
        raise error()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a signal that arrives in the block until the next `raise_pending()` in it, or the
    block's end (the main thread only; elsewhere this does nothing). When the block stops on an
    exception of its own, that exception goes on and a held signal is dropped: the work it was
    to stop has stopped (SIGTERM then an unreadable photo exits 2, with the photo's line)."""
    global _depth, _pending
    if not _in_main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    except BaseException:
        _depth -= 1  # first: from here on a signal raises at once, so none can be left held
        if not _depth:
            _pending = None
        raise
    _depth -= 1
    raise_pending()


# ---------------------------------------------------------------- dying with `dvc`

WATCH_SECONDS = 1.0
ORPHANED = b"cleanmessy: the dvc process that started this stage is gone: stopping\n"


def _stat(pid: int) -> tuple[str, int] | None:
    """`(state, parent pid)` from /proc (Linux), or None when the process is gone."""
    try:
        fields = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1])


def _is_dvc(pid: int) -> bool:
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:2]
    except OSError:
        return False
    return any(os.path.basename(arg.decode(errors="replace")) == "dvc" for arg in argv)


def dvc_ancestor(max_depth: int = 6) -> int | None:
    """The `dvc` process this one runs under (through `sh -c` and src/stage.sh), or None."""
    pid = os.getppid()
    for _ in range(max_depth):
        if pid <= 1:
            return None
        if _is_dvc(pid):
            return pid
        stat = _stat(pid)
        if stat is None:
            return None
        pid = stat[1]
    return None


def die_with(pid: int, seconds: float = WATCH_SECONDS) -> threading.Thread:
    """Send this process SIGTERM once `pid` is gone (a zombie counts as gone): a stage whose `dvc`
    was killed (`kill -9`) stops as if terminated, its MLflow run FAILED, instead of running on as
    an orphan that logs a run nobody evaluates. A daemon thread polls /proc every `seconds`."""
    def watch() -> None:
        while (stat := _stat(pid)) is not None and stat[0] != "Z":
            threading.Event().wait(seconds)
        os.write(2, ORPHANED)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="die-with-dvc", daemon=True)
    thread.start()
    return thread
