"""A sweep's shared stages, run by the driver in a thread while Tune starts the trials
(``pipelines.sweep``); the trials wait at the board's gate (``sweep_trial.wait_for_shared``)."""

from __future__ import annotations

import threading


class SharedStages(threading.Thread):
    """The stages every trial shares, run once by the driver (``run_plan``: committed,
    tracked) while Tune starts its trial actors, so Tune's start-up overlaps them; the
    trials wait at the board's gate, which opens when these end (or fail: the trials then
    fail at once and the sweep raises this run's error)."""

    def __init__(self, plan, board, address, tracking_uri, progress, tags):
        super().__init__(name="distill-sweep-shared-stages", daemon=True)
        self.plan, self.board, self.address = plan, board, address
        self.tracking_uri, self.progress, self.tags = tracking_uri, progress, tags
        self.result, self.error = None, None

    def run(self):
        from .runner import run_plan
        try:
            self.result = run_plan(self.plan, self.address, self.tracking_uri, self.progress,
                                   tags=self.tags)
        except KeyboardInterrupt as e:  # the sweep is going down (``interrupt``): the
            self.error = e              # waiting trials end with Ray, saying nothing
            return
        except BaseException as e:  # noqa: BLE001 - re-raised by the sweep's own thread
            self.error = e
        self.board.open_gate.remote(self.error is None, "" if self.error is None else
                                    str(self.error) or type(self.error).__name__)

    def interrupt(self) -> None:
        """Ctrl-C reaches the sweep's main thread (Tune's); this raises KeyboardInterrupt
        in the shared stages' run too (at its next Python step, within the scheduler's
        0.5 s wait), which cancels its stages and ends its MLflow runs KILLED, as a
        ``distill run`` interrupted by Ctrl-C does."""
        import ctypes
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident),
                                                   ctypes.py_object(KeyboardInterrupt))
