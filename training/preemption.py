"""Preemption: SIGUSR1 or SIGTERM asks the run to save a checkpoint and exit with PREEMPTED_EXIT_CODE.

The handler only sets a flag. At the next optimizer-step boundary all ranks agree (the driver sums the
flag over ranks in the step's token-count all-reduce), save, and exit 85. A second signal during the save
only sets the flag again, so it cannot interrupt the save; the atomic ``latest`` pointer protects against
anything harder (SIGKILL).
"""

from __future__ import annotations

import signal

from training import PREEMPTED_EXIT_CODE  # noqa: F401  (re-exported: 85, "preempted, checkpoint saved")
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """The ranks agreed to stop; ``rng_state`` is what the checkpoint must hold for an exact resume."""

    def __init__(self, rng_state: dict):
        super().__init__("preempted")
        self.rng_state = rng_state


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM; ``requested`` is read by the driver at each step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore_further(self) -> None:
        """Ignore the signals from now on (SIG_IGN survives interpreter shutdown; a Python handler does not)."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        self.requested = True
