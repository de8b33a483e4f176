"""A test that hangs fails the run at once, with the evidence of where it hung.

Without this a stalled test (a lock never granted, an app shutdown waiting for a task
that never ends) runs until CI kills the whole job after 90 minutes, and all it leaves
is the name of the file it was in. After `LEDGER_TEST_HANG_SECONDS` (900 by default; the
slowest test takes a few minutes on a loaded machine) in one test this prints the stack
of every thread and of every unfinished asyncio task to the real stderr (past pytest's
capture), then interrupts the run; if the run still has not ended two minutes later
(its own teardown hanging too), it exits the process."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

HANG_SECONDS = float(os.environ.get("LEDGER_TEST_HANG_SECONDS", "900"))
EXIT_AFTER_INTERRUPT_SECONDS = 120.0


def _dump(test: str, started: float) -> None:
    out = sys.__stderr__
    print(f"\n\n*** {test} has run for {time.monotonic() - started:.0f} s: it looks hung ***", file=out)
    print("*** every thread:", file=out, flush=True)
    faulthandler.dump_traceback(file=out, all_threads=True)
    print("*** every unfinished asyncio task:", file=out)
    # Another thread owns the event loop: find its tasks through the garbage collector
    # (read-only, for a diagnosis).
    for task in [o for o in gc.get_objects() if isinstance(o, asyncio.Task)]:
        if task.done():
            continue
        print(f"--- {task!r}", file=out)
        try:
            task.print_stack(file=out)
        except Exception as error:  # a diagnosis must not fail
            print(f"(no stack: {error!r})", file=out)
    out.flush()


def _hung(test: str, started: float, uncaptured: Callable[[], ContextManager[None]]) -> None:
    # pytest captures file descriptors 1 and 2 while a test runs: write past it.
    with uncaptured():
        _dump(test, started)
        print(f"*** interrupting the test run: {test} hung ***", file=sys.__stderr__, flush=True)
    # A real signal (not _thread.interrupt_main) wakes the event loop's blocking poll.
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(EXIT_AFTER_INTERRUPT_SECONDS)
    print("*** the interrupted run did not end: exiting", file=sys.__stderr__, flush=True)
    os._exit(3)


class Watchdog:
    """One timer per test, over setup, call and teardown. `uncaptured` suspends pytest's
    output capture (its capture manager's `global_and_fixture_disabled`)."""

    def __init__(self, seconds: float = HANG_SECONDS) -> None:
        self.seconds = seconds

    def start(self, test: str, uncaptured: Callable[[], ContextManager[None]] | None = None) -> threading.Timer:
        args = (test, time.monotonic(), uncaptured or contextlib.nullcontext)
        timer = threading.Timer(self.seconds, _hung, args=args)
        timer.daemon = True
        timer.name = "test-hang-watchdog"
        timer.start()
        return timer
