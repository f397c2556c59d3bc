"""The device time of one model step, which the scheduler splits among its requests.

On a GPU it is measured with CUDA events around the step's kernels (the device's own clock,
not a host timer around asynchronous launches); on the CPU the step's wall time is its
device time, less the time spent inside it on another step (the runner collects the
previous step in the middle of launching the next).
"""

from __future__ import annotations

import time

import torch


class StepTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> StepClock:
        """A clock for one step, started before its first kernel."""
        return StepClock(self.cuda)


class StepClock:
    """`start` (at creation) before the step's first kernel, `end()` after its last launch,
    `seconds()` once its results are wanted on the host (it waits for the device)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        if cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        self._t0 = time.perf_counter()
        self._host = 0.0
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Host time spent inside this step on another one (the CPU's measure leaves it out)."""
        self._excluded += seconds

    @property
    def excluded_seconds(self) -> float:
        return self._excluded

    def end(self) -> None:
        if self.cuda:
            self._end.record()
        self._host = time.perf_counter() - self._t0

    def wait(self) -> None:
        """Block until the device has run every kernel launched before `end()`."""
        if self.cuda:
            self._end.synchronize()

    def seconds(self) -> float:
        """The step's device seconds (waits for the device)."""
        if not self.cuda:
            return max(self._host - self._excluded, 0.0)
        self._end.synchronize()
        return self._begin.elapsed_time(self._end) / 1000.0
