"""Stopping a run on request: SIGINT (Ctrl-C) or SIGTERM ends it after the current step, with a checkpoint.

The first signal is only recorded; the loop looks at it after each step, saves that step and raises
``Interrupted``, which the command line turns into one line (the step, the last checkpoint, the command that
resumes) and a non-zero exit. A second signal exits at once: checkpoints are written into a temporary folder
and renamed into place, so the last complete one stays whole whatever is being written at that moment.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on ``signum`` after step ``step``; ``saved`` is its last checkpoint's step (or None)."""

    def __init__(self, signum: int, step: int, saved: int | None, out: str, world: int):
        self.signum, self.step, self.saved, self.out, self.world = signum, step, saved, out, world
        launch = (f"torchrun --nproc_per_node {world} -m fusedlora.train" if world > 1 else "fusedlora train")
        last = f"last checkpoint step {saved}" if saved is not None else "no checkpoint was written"
        resume = f"; resume with: {launch} --resume --out {out}" if saved is not None else ""
        super().__init__(f"interrupted ({signal.Signals(signum).name}) at step {step}; {last}{resume}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """While entered, SIGINT and SIGTERM are recorded in ``signal`` instead of raising or killing; outside
    the main thread (where handlers cannot be installed) it records nothing."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            os.write(2, b"\nfusedlora train: second interrupt, exiting now (the last complete checkpoint is "
                        b"intact)\n")
            os._exit(128 + signum)
        self.signal = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
