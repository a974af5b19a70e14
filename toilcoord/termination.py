"""Run this process's deferred functions when the batch system says stop.

Slurm sends SIGTERM (or the ``--signal`` the user chose) before the time
limit, and SIGKILL a while later; LSF and PBS do the same. Deferred
functions survive the SIGKILL (another process runs them later), but the
scratch and containers they would remove stay until then.
:func:`install_termination_cleanup` runs them at once, on the signal, and
then lets the process die of it, as it would have without the handler.

The handler runs in the main thread, between two bytecodes of whatever the
main thread was doing. Two moments must not be cut into: a ``defer`` whose
record is being written (the record would be torn and its function lost),
and a deferred function that is running or has just returned and is not yet
marked done (it would run twice). When the signal lands in one of those, the
handler lets that piece finish first (it waits for the frame to return),
then runs the rest; the deferred-function file's own "done" marks make sure
nothing that finished runs again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import types
from typing import Any, Callable, Iterable, List, Optional, Sequence

from . import deferred, deferred_records
from .deferred import DeferredFunctionManager

__all__ = ["install_termination_cleanup"]

logger = logging.getLogger(__name__)

# Threads other than the main one may be writing a record or running a
# function of a manager; the handler waits for them this often.
_POLL_SECONDS = 0.001

_Handler = Callable[[int, Optional[types.FrameType]], Any]


def install_termination_cleanup(
    manager: Optional[DeferredFunctionManager] = None,
    signals: Iterable[int] = (signal.SIGTERM,),
    grace: float = 30.0,
) -> Callable[[], None]:
    """On any of *signals*, run the pending deferred functions of *manager*
    (None: of every open DeferredFunctionManager of this process), then die
    of the signal (exit status 128 + its number, as without a handler).

    Opt-in, for a worker's main program; call it from the main thread
    (RuntimeError otherwise: Python runs signal handlers there only).
    Returns a function that puts the previous handlers back.

    What the handler guarantees:

    * Functions run in the order registered; each runs at most once: one
      that had already finished is never run again, one running when the
      signal came is let finish and is not run again.
    * A ``defer`` that the signal interrupts finishes first, and its
      function runs with the others.
    * Everything is over within *grace* seconds (positive; keep it below
      the time the batch system gives between its signal and SIGKILL): when
      the time is up, what did not finish is logged and the process dies of
      the signal; the functions not run stay in the state file, and the
      next manager on the directory or ``cleanupWorker`` runs them, as after
      a SIGKILL.
    * While the cleanup runs, the signals get their default action back: a
      second one ends the process at once.

    Other threads keep running meanwhile; a record they are writing, or a
    function they are running, is waited for (within *grace*). Dead
    processes' functions are not run here (that is left for later, to keep
    within the grace period).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "install_termination_cleanup() must be called from the main thread: Python runs signal handlers only there"
        )
    if manager is not None and not isinstance(manager, DeferredFunctionManager):
        raise TypeError(f"manager must be a DeferredFunctionManager or None, not {type(manager).__name__}")
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 < grace < float("inf"):
        raise ValueError(f"grace must be a positive number of seconds, not {grace!r}")
    wanted = _checked_signals(signals)
    cleanup = _Cleanup(manager, wanted, float(grace))
    previous = {signum: signal.signal(signum, cleanup.handle) for signum in wanted}

    def uninstall() -> None:
        """Put back the handlers that were there before."""
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return uninstall


def _checked_signals(signals: Iterable[int]) -> List[signal.Signals]:
    try:
        wanted = [signal.Signals(signum) for signum in signals]
    except (TypeError, ValueError) as error:
        raise ValueError(f"signals must be signal numbers: {error}") from None
    if not wanted:
        raise ValueError("signals is empty: name at least one signal to clean up on")
    for signum in wanted:
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{signum.name} cannot be caught")
    return wanted


class _Cleanup:
    """The signal handler and what it does."""

    def __init__(self, manager: Optional[DeferredFunctionManager], signals: Sequence[int], grace: float) -> None:
        self.manager = manager
        self.signals = signals
        self.grace = grace
        self.finished = threading.Event()

    def handle(self, signum: int, frame: Optional[types.FrameType]) -> None:
        for caught in self.signals:
            signal.signal(caught, signal.SIG_DFL)  # a second signal ends us at once
        deadline = time.monotonic() + self.grace
        threading.Thread(target=self._watch, args=(signum,), name="toilcoord-termination", daemon=True).start()
        logger.warning(
            "got %s: running this process's deferred functions (within %g s), then exiting",
            signal.Signals(signum).name,
            self.grace,
        )
        busy = _outermost_critical_frame(frame)
        if busy is None:
            self._run_and_exit(signum, deadline)
            return

        # The main thread is writing a record or running a function: let
        # that return, then run the rest (see the module's docstring).
        def on_return(frame: types.FrameType, event: str, arg: object) -> None:
            if frame is busy and event == "return":
                sys.setprofile(None)
                self._run_and_exit(signum, deadline)

        sys.setprofile(on_return)

    def _run_and_exit(self, signum: int, deadline: float) -> None:
        _wait_for_other_threads(deadline)
        for manager in self._managers():
            try:
                _run_own_functions(manager)
            except Exception:
                logger.exception(
                    "cannot run the deferred functions in %s; they stay there for the next process",
                    manager.stateFileName,
                )
        self.finished.set()
        logger.info("deferred functions done; exiting on %s", signal.Signals(signum).name)
        _die_of(signum)

    def _managers(self) -> List[DeferredFunctionManager]:
        managers = [self.manager] if self.manager is not None else list(deferred._managers)
        return [manager for manager in managers if not (manager._closed or manager._inert)]

    def _watch(self, signum: int) -> None:
        if self.finished.wait(self.grace):
            return
        running = _running_function()
        logger.error(
            "the %g s grace period after %s ran out%s; the deferred functions not yet run stay in %s "
            "for the next DeferredFunctionManager on that directory (or cleanupWorker)",
            self.grace,
            signal.Signals(signum).name,
            f" while {running} was running" if running else "",
            ", ".join(manager.stateFileName for manager in self._managers()) or "their state files",
        )
        _die_of(signum)


def _die_of(signum: int) -> None:
    """End the process as *signum* would have (its handler is already the
    default): the parent sees the signal, the shell 128 + its number."""
    for handler in logging.getLogger().handlers + logger.handlers:
        handler.flush()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    signal.raise_signal(signum)  # to this thread, so it lands before we go on
    os._exit(128 + signum)  # only if the default action did not end us


# ------------------------------------------------ what deferred.py keeps to itself
#
# DeferredFunctionManager has no public way to run its own functions while
# open() is active, nor to say whether a thread is inside a record write or
# a function run; these few lines are the only place that reaches in (read
# only, plus the run the manager itself would do on leaving open()).

_CRITICAL_CODES = frozenset(
    (
        DeferredFunctionManager._defer.__code__,  # a record being written
        deferred._write_rest.__code__,
        deferred_records.run_file.__code__,  # functions being run and marked done
    )
)


def _run_own_functions(manager: DeferredFunctionManager) -> None:
    manager._run_own()


def _outermost_critical_frame(frame: Optional[types.FrameType]) -> Optional[types.FrameType]:
    outermost = None
    while frame is not None:
        if frame.f_code in _CRITICAL_CODES:
            outermost = frame
        frame = frame.f_back
    return outermost


def _wait_for_other_threads(deadline: float) -> None:
    main = threading.main_thread().ident
    while time.monotonic() < deadline:
        frames = sys._current_frames()
        if not any(_outermost_critical_frame(frame) for ident, frame in frames.items() if ident != main):
            return
        time.sleep(_POLL_SECONDS)


def _running_function() -> Optional[str]:
    """The deferred function the main thread is running, if any."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code is deferred_records._run_record.__code__:
            return str(frame.f_locals.get("function", "a deferred function"))
        frame = frame.f_back
    return None
