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
